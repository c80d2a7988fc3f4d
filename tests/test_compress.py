"""compress.py: encode / decode from the command line (round trip to predict.py's reconstruction, header checks
and refusals, never overwriting) and the rate-distortion study, on the session's tiny models
(conftest.trained_models)."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import compress
import train
from anatomy.brain import COMPUTED_RULE, TRUE_RULE, brain_masks
from codec import study
from codec import vqz as codec
from codec.classical import BudgetSearch, available_codecs, classical_codec
from codec.ladder import read_ladder
from evaluation.metrics import score_split
from helpers import tiny_args, write_image
from imaging.quality import psnr, ssim
from imaging.slices import natural_key, to_uint8
from training.checkpoints import load_split
from utils import autocast

CPU = torch.device("cpu")


def fails_with(capsys, argv, *fragments):
    """compress.main(argv) must stop with exit status 2 and one line 'error: ...' holding every fragment."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        compress.main(argv)
    err = capsys.readouterr().err.split("\r")[-1].strip()  # what a terminal shows once a progress bar is cleared
    assert stop.value.code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, err
    return err


# ---------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------

def test_encode_decode_round_trip_gives_the_same_codes_and_predicts_reconstruction(trained_codec, trained_models,
                                                                                    tmp_path):
    """Files -> .vqz -> PNG: the decoded codes are the encoder's, and each PNG is the VQ-VAE's reconstruction as
    predict.py computes it (metrics.score_split, same precision), to the 8-bit pixel."""
    checkpoint, prior = trained_models
    images = trained_codec.test_images
    for i, image in enumerate(images):
        write_image(tmp_path / "in" / f"case_{i}_slice_0.nii.png", image.numpy())
    compress.main(["encode", "--checkpoint", str(checkpoint), "--prior", str(prior), str(tmp_path / "in"),
                   "--out", str(tmp_path / "vqz")])
    files = sorted((tmp_path / "vqz").iterdir())
    assert [f.name for f in files] == [f"case_{i}_slice_0.nii.vqz" for i in range(len(images))]
    compress.main(["decode", "--checkpoint", str(checkpoint), "--prior", str(prior), str(tmp_path / "vqz"),
                   "--out", str(tmp_path / "png")])
    decoded = np.stack([np.asarray(Image.open(tmp_path / "png" / f"case_{i}_slice_0.nii.png"))
                        for i in range(len(images))])
    codes, recon = trained_codec.decode([f.read_bytes() for f in files], [f.name for f in files])
    assert torch.equal(codes, trained_codec.codes(images))
    assert np.array_equal(decoded, recon.numpy())
    predicted = score_split(trained_codec.vqvae, images, CPU, autocast("auto", CPU), keep=len(images))
    assert torch.equal(predicted.indices, codes)
    assert np.array_equal(to_uint8(predicted.outputs)[:, 0].numpy(), decoded)


# ---------------------------------------------------------------------------------------------------------
# Bad files and refusals
# ---------------------------------------------------------------------------------------------------------

def header_with(blob: bytes, **fields) -> bytes:
    names = ["magic", "version", "coder", "label", "height", "width", "gh", "gw", "vq", "prior", "crc", "length"]
    values = dict(zip(names, codec.HEADER.unpack_from(blob)))
    values.update(fields)
    return codec.HEADER.pack(*values.values()) + blob[codec.HEADER.size:]


BAD_FILES = {
    "empty": (lambda b: b"", "is empty"),
    "foreign": (lambda b: b"\x89PNG\r\n\x1a\n" + bytes(60), "not a .vqz file"),
    "short header": (lambda b: b[:20], "truncated"),
    "version": (lambda b: header_with(b, version=9), "format version 9"),
    "coder": (lambda b: header_with(b, coder=7), "unknown coder 7"),
    "huge grid": (lambda b: header_with(b, gh=65535, gw=65535), "code grid"),
    "huge image": (lambda b: header_with(b, height=60000), "60000x32 image"),
    "huge payload": (lambda b: header_with(b, length=2**32 - 1), "payload"),
    "truncated payload": (lambda b: b[:-3], "truncated: its payload has"),
    "trailing bytes": (lambda b: b + b"xx", "2 bytes after its payload"),
    "other grid": (lambda b: header_with(b, gh=4), "this VQ-VAE makes 8x8"),
    "other VQ-VAE": (lambda b: header_with(b, vq=bytes(8)), "other VQ-VAE weights"),
    "other prior": (lambda b: header_with(b, prior=b"\x01" * 8), "other prior weights"),
    "corrupt payload": (lambda b: b[:-8] + bytes(x ^ 0x5A for x in b[-8:]), "checksum"),
}


@pytest.fixture(scope="module")
def one_file(trained_codec):
    return trained_codec.encode(trained_codec.test_images[:1], coder="prior")[0]


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_refused_with_one_line(case, one_file, trained_models, tmp_path, capsys):
    make, message = BAD_FILES[case]
    bad = tmp_path / "bad.vqz"
    bad.write_bytes(make(one_file))
    checkpoint, prior = trained_models
    fails_with(capsys, ["decode", "--checkpoint", str(checkpoint), "--prior", str(prior), str(bad),
                        "--out", str(tmp_path / "out")], message)
    assert not any((tmp_path / "out").glob("*.png"))


def test_decoding_needs_the_prior_and_the_vqvae_it_was_encoded_with(one_file, trained_models, tmp_path, capsys):
    checkpoint, prior = trained_models
    f = tmp_path / "a.vqz"
    f.write_bytes(one_file)
    fails_with(capsys, ["decode", "--checkpoint", str(checkpoint), str(f), "--out", str(tmp_path / "o")],
               "coded with a prior", "--prior")
    fails_with(capsys, ["decode", "--checkpoint", str(prior), str(f), "--out", str(tmp_path / "o")],
               "prior checkpoint, but a vqvae checkpoint is needed")
    fails_with(capsys, ["decode", "--checkpoint", str(checkpoint), str(tmp_path / "missing.vqz"),
                        "--out", str(tmp_path / "o")], "does not exist")
    huge = tmp_path / "huge.vqz"
    with open(huge, "wb") as h:
        h.truncate(codec.MAX_FILE_BYTES + 1)  # sparse: nothing is allocated to make or refuse it
    fails_with(capsys, ["decode", "--checkpoint", str(checkpoint), str(huge), "--out", str(tmp_path / "o")],
               "larger than any .vqz file")


def test_outputs_are_never_overwritten(trained_codec, trained_models, tmp_path, capsys):
    checkpoint, prior = trained_models
    write_image(tmp_path / "in" / "x.png", trained_codec.test_images[0].numpy())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.vqz").write_bytes(b"mine")
    fails_with(capsys, ["encode", "--checkpoint", str(checkpoint), str(tmp_path / "in"), "--out",
                        str(tmp_path / "out")], "already exists", "never overwrites")
    assert (tmp_path / "out" / "x.vqz").read_bytes() == b"mine"
    fails_with(capsys, ["encode", "--checkpoint", str(checkpoint), str(tmp_path / "nothing"), "--out",
                        str(tmp_path / "o2")], "does not exist")
    fails_with(capsys, ["encode", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o2")], "nothing to encode")
    write_image(tmp_path / "odd" / "y.png", np.zeros((30, 30), np.uint8))
    fails_with(capsys, ["encode", "--checkpoint", str(checkpoint), str(tmp_path / "odd"), "--out",
                        str(tmp_path / "o3")], "not divisible")


@pytest.fixture(scope="module")
def coarse_run(trained_models, tmp_path_factory):
    """A second operating point beside trained_models' (8x8 codes with a prior): 4x4 codes, no prior."""
    checkpoint, _ = trained_models
    coarse = tmp_path_factory.mktemp("coarse") / "run"
    train.main(tiny_args(checkpoint.parent.parent / "demo", coarse, "--epochs", "1", "--codebook-size", "16",
                         "--downsamplings", "3"))
    return coarse


def test_max_bytes_picks_per_slice_the_best_file_that_fits_and_decode_reads_any_mix(trained_models, trained_codec,
                                                                                      coarse_run, tmp_path, capsys):
    """Two operating points (8x8 codes with a prior, 4x4 codes without): each slice gets the file of the point whose
    reconstruction has the highest SSIM among the files of at most --max-bytes; decode, given both, reads them all."""
    checkpoint, prior = trained_models
    coarse = coarse_run
    images = trained_codec.test_images
    points = [trained_codec, codec.load_codec(coarse / "best.pt", None, CPU, 64, "auto")[0]]
    files = [p.encode(images) for p in points]
    quality = [ssim(p.reconstruct(p.codes(images)).unsqueeze(1) / 255, images.unsqueeze(1) / 255) for p in points]
    coarsest = max(len(f) for f in files[1])
    for budget in (coarsest, max(len(f) for f in files[0] + files[1])):
        out = tmp_path / f"within_{budget}"
        compress.main(["encode", "--checkpoint", str(checkpoint), "--prior", str(prior), "--checkpoint", str(coarse),
                       "--prior", "none", "--max-bytes", str(budget), "--split", "test", "--out", str(out)])
        written = sorted(out.iterdir(), key=lambda f: natural_key(f.name))
        for i, f in enumerate(written):
            fits = [k for k in (0, 1) if len(files[k][i]) <= budget]
            best = max(fits, key=lambda k: quality[k][i])
            assert f.read_bytes() == files[best][i] and f.stat().st_size <= budget
        compress.main(["decode", "--checkpoint", str(coarse), "--checkpoint", str(checkpoint), "--prior", "none",
                       "--prior", str(prior), str(out), "--out", str(tmp_path / f"png_{budget}")])
        for i, f in enumerate(written):
            k = next(k for k in (0, 1) if files[k][i] == f.read_bytes())
            png = np.asarray(Image.open(tmp_path / f"png_{budget}" / (f.stem + ".png")))
            assert np.array_equal(png, points[k].decode([files[k][i]], [f.name])[1][0].numpy())
    smallest = min(len(f) for f in files[0] + files[1])
    fails_with(capsys, ["encode", "--checkpoint", str(checkpoint), "--checkpoint", str(coarse), "--max-bytes",
                        str(smallest - 1), "--split", "test", "--out", str(tmp_path / "none")],
               "fits no operating point")
    fails_with(capsys, ["encode", "--checkpoint", str(checkpoint), "--checkpoint", str(coarse), "--split", "test",
                        "--out", str(tmp_path / "none")], "pass --max-bytes")
    (tmp_path / "fine.vqz").write_bytes(files[0][0])
    fails_with(capsys, ["decode", "--checkpoint", str(coarse), str(tmp_path / "fine.vqz"), "--out",
                        str(tmp_path / "none")], "other VQ-VAE weights")
    fails_with(capsys, ["decode", "--checkpoint", str(coarse), "--checkpoint", str(coarse), str(tmp_path / "fine.vqz"),
                        "--out", str(tmp_path / "none")], "none of the 2 given VQ-VAEs")


def test_a_ladder_folder_stands_for_its_points_with_their_priors(trained_models, coarse_run, tmp_path, capsys):
    """--ladder DIR is every point of DIR/ladder.json as a --checkpoint, with DIR/<point>/prior/best.pt where that
    exists: the files are those of the points given one by one."""
    checkpoint, prior = trained_models
    ladder = tmp_path / "ladder"
    shutil.copytree(checkpoint.parent, ladder / "fine")
    shutil.copytree(coarse_run, ladder / "coarse")
    (ladder / "ladder.json").write_text(json.dumps({"points": [{"name": "coarse"}, {"name": "fine"}]}))
    assert read_ladder(ladder) == [(ladder / "coarse" / "best.pt", None),
                                         (ladder / "fine" / "best.pt", ladder / "fine" / "prior" / "best.pt")]
    budget = "400"
    compress.main(["encode", "--ladder", str(ladder), "--max-bytes", budget, "--split", "test", "--out",
                   str(tmp_path / "a")])
    compress.main(["encode", "--checkpoint", str(coarse_run), "--prior", "none", "--checkpoint", str(checkpoint),
                   "--prior", str(prior), "--max-bytes", budget, "--split", "test", "--out", str(tmp_path / "b")])
    a, b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert [f.name for f in a] == [f.name for f in b] and all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    compress.main(["decode", "--ladder", str(ladder), str(tmp_path / "a"), "--out", str(tmp_path / "png")])
    assert len(list((tmp_path / "png").iterdir())) == len(a)
    fails_with(capsys, ["encode", "--split", "test", "--out", str(tmp_path / "c")], "pass --checkpoint", "--ladder")
    (ladder / "ladder.json").write_text(json.dumps({"points": [{"name": "../elsewhere"}]}))
    fails_with(capsys, ["encode", "--ladder", str(ladder), "--split", "test", "--out", str(tmp_path / "c")],
               "not a ladder's list of points")
    fails_with(capsys, ["rd", "--ladder", str(tmp_path), "--out", str(tmp_path / "c")], "ladder.json")


def test_encode_without_a_prior_writes_static_or_fixed_length_files_of_a_split(trained_models, trained_codec, tmp_path,
                                                                               capsys):
    checkpoint, _ = trained_models
    compress.main(["encode", "--checkpoint", str(checkpoint), "--split", "test", "--out", str(tmp_path / "s")])
    files = sorted((tmp_path / "s").glob("*.vqz"))
    assert len(files) == len(trained_codec.test_images)
    fixed = codec.HEADER.size + codec.fixed_payload_bytes(64, 16)
    assert all(f.read_bytes()[4] in (codec.STATIC, codec.FIXED) and f.stat().st_size <= fixed for f in files)
    assert "slices/s" in capsys.readouterr().out



def test_predict_reports_the_bytes_of_the_static_coded_files_compress_writes(trained_models, tmp_path):
    import predict
    checkpoint, _ = trained_models
    compress.main(["encode", "--checkpoint", str(checkpoint), "--split", "test", "--coder", "static",
                   "--out", str(tmp_path / "s")])
    summary = predict.main(["--checkpoint", str(checkpoint), "--split", "test", "--out", str(tmp_path / "p")])
    with open(tmp_path / "p" / "per_image.csv", newline="") as f:
        reported = {Path(row["file"]).name: int(row["static_vqz_bytes"]) for row in csv.DictReader(f)}
    written = {f.stem + ".png": f.stat().st_size for f in (tmp_path / "s").glob("*.vqz")}
    assert reported == written
    assert summary["static_vqz_bytes"]["mean"] == pytest.approx(np.mean(list(written.values())))

# ---------------------------------------------------------------------------------------------------------
# Rate-distortion study
# ---------------------------------------------------------------------------------------------------------

def test_rd_writes_the_table_the_figures_and_counts_what_does_not_fit(trained_models, tmp_path, capsys):
    checkpoint, prior = trained_models
    out = tmp_path / "rd"
    compress.main(["rd", "--checkpoint", str(checkpoint), "--prior", str(prior), "--budgets", "50,400,3000",
                   "--out", str(out)])
    for name in ("rd.csv", "rd.json", "rd.png", "rd_slice.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "rd.csv")))
    vq = [r for r in rows if r["codec"].startswith("VQ-VAE")]
    assert sorted(r["setting"] for r in vq) == ["fixed", "prior", "static"]
    assert len({r["mean_ssim"] for r in vq}) == 1  # one reconstruction, three sizes
    ladder = {r["budget_bytes"]: r for r in rows if r["codec"] == study.LADDER}
    assert sorted(ladder) == ["3000", "400", "50"]
    assert ladder["50"]["images_over_budget"] == "4"  # smaller than any .vqz file
    assert ladder["3000"]["images_over_budget"] == "0" and ladder["3000"]["mean_ssim"] == vq[0]["mean_ssim"]
    assert float(ladder["3000"]["mean_bytes"]) == min(float(r["mean_bytes"]) for r in vq)  # same image: the smallest
    classical = [r for r in rows if not r["codec"].startswith("VQ-VAE") and r["codec"] != study.LADDER]
    assert sorted({r["codec"] for r in classical}) == sorted(available_codecs())
    # each classical codec at 3 budgets, and at the sizes of the 3 VQ-VAE rows' files
    assert len(classical) == len(available_codecs()) * (3 + 3)
    for r in classical:
        assert int(r["images_fit"]) + int(r["images_over_budget"]) == int(r["images"]) == 4
        if int(r["images_fit"]) and r["budget_bytes"] != "per slice":
            assert float(r["mean_bytes"]) <= int(r["budget_bytes"])
    jpeg50 = next(r for r in classical if r["codec"] == "jpeg" and r["budget_bytes"] == "50")
    assert jpeg50["images_over_budget"] == "4"  # a JPEG's headers alone are larger
    summary = json.loads((out / "rd.json").read_text())
    assert summary["header_bytes"] == codec.HEADER.size and summary["images"] == 4
    assert {"prior_coded_mean_bytes", "vqvae_above_classical_below_1536_bytes",
            "ssim_minus_classical_at_equal_bytes_per_slice", "bd_rate_percent"} <= set(summary["targets"])
    bd = summary["targets"]["bd_rate_percent"]
    assert set(available_codecs()) <= set(bd)  # one VQ point: no curve
    assert bd["jpeg"] == {"ssim": None, "psnr": None, "ssim_brain": None, "psnr_brain": None}
    speed = next(iter(summary["speed"].values()))
    assert speed["prior_encode_slices_per_s"] > 0 and speed["prior_decode_slices_per_s"] > 0
    fails_with(capsys, ["rd", "--checkpoint", str(checkpoint), "--out", str(out)], "already exists")


def test_rd_compares_several_checkpoints(trained_models, tmp_path, capsys):
    checkpoint, prior = trained_models
    out = tmp_path / "rd2"
    compress.main(["rd", "--checkpoint", str(checkpoint), "--checkpoint", str(checkpoint), "--prior", "none",
                   "--prior", str(prior), "--budgets", "500", "--codecs", "jpeg2000", "--no-verify", "--out", str(out)])
    rows = list(csv.DictReader(open(out / "rd.csv")))
    assert len({r["codec"] for r in rows if r["codec"].startswith("VQ-VAE")}) == 2
    assert sum(r["setting"] == "prior" for r in rows) == 1
    assert len(json.loads((out / "rd.json").read_text())["models"]) == 2
    fails_with(capsys, ["rd", "--checkpoint", str(checkpoint), "--prior", "none", "--prior", "none",
                        "--out", str(tmp_path / "rd3")], "one --prior per --checkpoint")
    fails_with(capsys, ["rd", "--checkpoint", str(checkpoint), "--codecs", "gif", "--out", str(tmp_path / "rd3")],
               "unknown codec 'gif'")
    fails_with(capsys, ["rd", "--checkpoint", str(checkpoint), "--workers", "0", "--out", str(tmp_path / "rd3")],
               "--workers must be at least 1, got 0")
    fails_with(capsys, ["encode", "--checkpoint", str(checkpoint), str(tmp_path), "--data-root", str(tmp_path),
                        "--out", str(tmp_path / "o")], "--data-root says where --split's dataset is")
    assert not (tmp_path / "rd3").exists() and not (tmp_path / "o").exists()


def test_rd_scores_every_codec_inside_the_brain_too(trained_models, tmp_path, capsys):
    """Every row of rd.csv but a peer's has mean_ssim_brain and mean_psnr_brain, after the other columns; a
    classical codec's is imaging.quality's in-brain SSIM of its decoded slices over the true tissue masks' brain
    (the demo ships them); rd.json records the rule and the in-brain BD-rates beside the whole-slice ones."""
    checkpoint, prior = trained_models
    out = tmp_path / "rd"
    compress.main(["rd", "--checkpoint", str(checkpoint), "--prior", str(prior), "--budgets", "400,3000",
                   "--codecs", "jpeg2000", "--no-verify", "--out", str(out)])
    assert "(brain " in capsys.readouterr().out  # print_rd shows the in-brain SSIM beside SSIM
    rows = list(csv.DictReader(open(out / "rd.csv", newline="")))
    assert list(rows[0])[-2:] == ["mean_ssim_brain", "mean_psnr_brain"]
    assert {r["codec"] for r in rows} == {"VQ-VAE default (vq)", "jpeg2000", study.LADDER}
    assert all(np.isfinite(float(r[c])) for r in rows if r["images_fit"] != "0" for c in study.BRAIN_COLUMNS)
    _, cfg, state = codec.load_codec(checkpoint, None, CPU, 64, "auto")
    data = load_split(cfg, "test", None, demo=state["demo_settings"], masks=True, verbose=False)
    brain, rule = brain_masks(data)
    j2k = classical_codec("jpeg2000")
    decoded = torch.from_numpy(np.stack([j2k.decode(BudgetSearch(image, j2k).fit(400))
                                         for image in data.images.numpy()]))  # (4, H, W): each fits 400 B
    x, y, mask = decoded[:, None] / 255, data.images[:, None] / 255, brain[:, None]
    row = next(r for r in rows if r["codec"] == "jpeg2000" and r["budget_bytes"] == "400")
    assert row["images_fit"] == "4"
    assert float(row["mean_ssim_brain"]) == pytest.approx(float(ssim(x, y, mask=mask).nanmean()), abs=1e-6)
    assert float(row["mean_psnr_brain"]) == pytest.approx(float(psnr(x, y, mask=mask).nanmean()), abs=1e-4)
    summary = json.loads((out / "rd.json").read_text())
    assert summary["brain_mask"] == rule == TRUE_RULE
    assert set(summary["targets"]["bd_rate_percent"]["jpeg2000"]) == {"ssim", "psnr", "ssim_brain", "psnr_brain"}


def test_rd_without_the_tissue_masks_scores_inside_computed_brain_masks(trained_models, tmp_path, capsys):
    """A split whose dataset ships tissue masks but whose mask folders are missing: rd still scores inside the
    brain, over masks computed from the slices, says so in one line and records the computed rule."""
    checkpoint, _ = trained_models
    bare = tmp_path / "demo"
    shutil.copytree(checkpoint.parent.parent / "demo", bare, ignore=shutil.ignore_patterns("keras_png_slices_seg_*"))
    compress.main(["rd", "--checkpoint", str(checkpoint), "--prior", "none", "--data-root", str(bare), "--budgets",
                   "400", "--codecs", "jpeg2000", "--out", str(tmp_path / "rd")])
    said = [line for line in capsys.readouterr().out.splitlines() if "no tissue masks" in line]
    assert len(said) == 1 and "computed" in said[0]
    summary = json.loads((tmp_path / "rd" / "rd.json").read_text())
    assert summary["brain_mask"] == COMPUTED_RULE
    assert all(np.isfinite(r["mean_ssim_brain"]) for r in summary["rows"] if r["images_fit"])


PEER_ROW = {"codec": "hyperprior", "setting": "lambda 0.01", "images_fit": 4, "images_over_budget": 0,
            "mean_bytes": 300.0, "mean_ssim": 0.5, "mean_psnr": 20.0}
BAD_PEERS = {  # what a peer file holds -> the one line's fragment
    "a row without setting": ({"rows": [{k: v for k, v in PEER_ROW.items() if k != "setting"}], "files": []},
                              "a row lacks setting"),
    "a size that is text": ({"rows": [{**PEER_ROW, "mean_bytes": "300"}], "files": []}, "a row lacks mean_bytes"),
    "a row named as ours": ({"rows": [{**PEER_ROW, "codec": "ladder"}], "files": []}, "as the study's own rows"),
    "files that are no list": ({"rows": [PEER_ROW], "files": 4}, "not iterable"),
    "nested too deeply": ("[" * 100000 + "]" * 100000, "nested too deeply"),
}


@pytest.mark.parametrize("case", list(BAD_PEERS))
def test_a_peer_file_the_study_could_not_use_to_its_end_is_refused_before_anything_is_written(case, trained_models,
                                                                                              tmp_path, capsys):
    content, fragment = BAD_PEERS[case]
    peer = tmp_path / "rd_hyperprior.json"
    peer.write_text(content if isinstance(content, str) else json.dumps(content))
    fails_with(capsys, ["rd", "--checkpoint", str(trained_models[0]), "--prior", "none", "--codecs", "jpeg",
                        "--budgets", "400", "--peer", str(peer), "--out", str(tmp_path / "rd")],
               f"cannot read the peer's rate points {peer}", fragment)
    assert not (tmp_path / "rd").exists()


def test_the_study_returns_plain_rows_and_what_its_figures_need(trained_codec, tmp_path):
    """codec.study.rate_distortion, the library behind compress.py rd: rows of plain values only (what rd.csv and
    rd.json hold), the per-slice measurements kept apart from them. Over brain masks that cover every pixel, each
    row's in-brain scores are its whole-slice ones; a learned peer has none (empty in rd.csv, no BD-rate)."""
    images = trained_codec.test_images
    files = [f"{i}.png" for i in range(len(images))]
    slices = (images, torch.zeros(len(images), dtype=torch.long), files)
    peer = tmp_path / "rd_hyperprior.json"
    peer.write_text(json.dumps({"rows": [PEER_ROW], "files": files}))
    everything = torch.ones(images.shape, dtype=torch.bool)
    result = study.rate_distortion([("tiny", trained_codec, {"checkpoint": "x"})], slices, (everything, "all"),
                                   ["jpeg"], [400, 3000], verify=False, peers=[peer])
    assert all(not key.startswith("_") and isinstance(value, (str, int, float))
               for row in result.rows for key, value in row.items())
    json.dumps(result.summary())
    assert result.models["tiny"].model["checkpoint"] == "x" and set(result.figures()) == {"tiny"}
    assert [f.coder for f in result.models["tiny"].files] == ["fixed", "static", "prior"]
    assert list(result.ladder_picks) == [400, 3000] and len(result.ladder_picks[400]) == len(images)
    ours = [r for r in result.rows if r["codec"] != PEER_ROW["codec"]]
    for r in ours:
        for metric in ("ssim", "psnr"):
            whole, brain = r[f"mean_{metric}"], r[f"mean_{metric}_brain"]
            assert brain == pytest.approx(whole, abs=1e-5, nan_ok=True), (r["codec"], r["setting"], metric)
    table = result.table()
    assert list(table[0])[-2:] == list(study.BRAIN_COLUMNS)
    assert [r["mean_ssim_brain"] for r in table if r["codec"] == PEER_ROW["codec"]] == [""]
    assert result.summary()["brain_mask"] == "all"
    assert result.summary()["targets"]["bd_rate_percent"][PEER_ROW["codec"]]["ssim_brain"] is None


def test_the_ladder_row_of_a_budget_takes_per_slice_the_best_file_within_it():
    """Two models' files of three slices: per slice the best SSIM among the files within the budget, the smaller
    file on a tie; a slice with no file that small is counted, not averaged."""
    def row(name, sizes, ssims, ssims_brain):
        return study.VqvaeFiles(f"VQ-VAE {name}", "prior", np.array(sizes, float), np.array(ssims),
                                np.array(ssims) * 40, np.array(ssims_brain), np.array(ssims_brain) * 40)
    small = row("small", [100, 120, 300], [0.80, 0.70, 0.90], [0.60, 0.50, 0.85])
    large = row("large", [500, 110, 900], [0.95, 0.70, 0.99], [0.90, np.nan, 0.97])  # slice 1: an empty brain mask
    (at_200, at_600), picks = study.ladder_rows([small, large], [200, 600])
    assert picks == {200: ["small", "large", None], 600: ["large", "large", "small"]}
    assert at_200["images_fit"] == 2 and at_200["images_over_budget"] == 1
    assert at_200["mean_ssim"] == pytest.approx((0.80 + 0.70) / 2)
    assert at_200["mean_ssim_brain"] == pytest.approx(0.60)  # the in-brain scores of the files picked, NaN left out
    assert at_600["mean_ssim_brain"] == pytest.approx((0.90 + 0.85) / 2)
    assert at_600["mean_psnr_brain"] == pytest.approx((0.90 + 0.85) / 2 * 40)
    assert at_200["mean_bytes"] == pytest.approx((100 + 110) / 2)  # slice 1: equal SSIM, the smaller file
    assert at_600["images_over_budget"] == 0 and at_600["mean_ssim"] == pytest.approx((0.95 + 0.70 + 0.90) / 3)
    gains = study.ladder_gains({600: at_600}, [
        {"codec": "avif", "budget_bytes": 600, "images_over_budget": 0, "mean_ssim": 0.80},
        {"codec": "jpeg", "budget_bytes": 600, "images_over_budget": 2, "mean_ssim": 0.99}])
    assert gains["600 B"]["ssim_gain_over"] == {"avif": pytest.approx(0.85 - 0.80)}
    assert gains["600 B"]["classical_images_over_budget"] == {"jpeg": 2} and gains["above_at_every_budget"]


def test_bd_rate_is_the_mean_byte_change_at_equal_quality_over_the_shared_range():
    rates = np.array([200.0, 400, 800, 1600, 3200])
    quality = np.log(rates) / 10  # any increasing curve
    assert study.bd_rate(rates / 2, quality, rates, quality) == pytest.approx(-50)
    assert study.bd_rate(rates[:3] * 1.25, quality[:3], rates, quality) == pytest.approx(25)  # 3 points
    assert study.bd_rate(rates, quality, rates, quality) == pytest.approx(0, abs=1e-9)
    assert study.bd_rate(rates[:2], quality[:2] + 5, rates, quality) is None  # no shared quality
    assert study.bd_rate(rates[:1], quality[:1], rates, quality) is None  # one point is no curve
