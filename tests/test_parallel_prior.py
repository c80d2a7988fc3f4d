"""The multiscale prior (modules.MultiscalePrior), which codes and samples a map in 1 + levels * phases parallel
passes: what each pass sees, its passes against its forward pass, .vqz files coded in its passes (round trips at
every pass count, across thread counts and batch sizes, tampered headers), and train_prior.py, compress.py and
sample.py with it end to end on the session's tiny models."""
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench
import compress
import sample
import train_prior
from codec import vqz
from evaluation.generation import prior_bits
from helpers import assert_one_line_error, interrupted_in_second_call, run_main
from modules import MULTISCALE_PHASES, build_prior, prior_config
from training.checkpoints import load_checkpoint

PASS_COUNTS = [(levels, phases) for levels in (1, 2, 3) for phases in MULTISCALE_PHASES]


def multiscale(k=16, levels=2, phases=2, num_classes=0, seed=0, max_grid=8):
    """A random multiscale prior, its weights large enough that its frequencies are far from uniform."""
    torch.manual_seed(seed)
    prior = build_prior(prior_config(arch="multiscale", codebook_size=k, channels=8, layers=2, levels=levels,
                                     phases=phases, max_grid=max_grid, num_classes=num_classes)).eval()
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(std=0.4)
    return prior


def filled(prior, codes, labels=None, dtype=torch.float64):
    """Teacher forcing through prior.fill: (n, h, w) codes -> (n, K, h, w) logits and (h, w) the pass of each
    position."""
    n, h, w = codes.shape
    logits = torch.full((n, prior.config.codebook_size, h * w), float("nan"), dtype=dtype)
    pass_of = torch.full((h * w,), -1)
    calls = []

    def record(positions, pass_logits):
        assert (pass_of[positions] == -1).all(), "a position coded twice"
        pass_of[positions] = len(calls)
        calls.append(len(positions))
        logits[:, :, positions] = pass_logits.transpose(1, 2)
        return codes.reshape(n, -1)[:, positions]
    with torch.no_grad():
        prior.fill(n, h, w, labels, record, dtype)
    return logits.view(n, -1, h, w), pass_of.view(h, w)


@pytest.mark.parametrize("levels, phases", PASS_COUNTS)
def test_every_position_is_coded_once_from_exactly_the_passes_before_its_own(levels, phases):
    """Changing the codes of a position's own pass and later ones leaves its logits alone; changing those of the
    passes before it changes them. The passes equal the forward pass's logits in float64, and there are
    1 + levels * phases of them on a map large enough."""
    prior = multiscale(k=8, levels=levels, phases=phases, num_classes=2, max_grid=16).double()
    h, w = 2 ** levels + 1, 2 ** levels + 2  # odd sizes: cells cut by the map's edge
    codes, labels = torch.randint(0, 8, (2, h, w)), torch.tensor([0, 1])
    logits, pass_of = filled(prior, codes, labels)
    assert (pass_of >= 0).all() and pass_of.max() + 1 == prior.passes(h, w) == 1 + levels * phases
    with torch.no_grad():
        full = prior(codes, labels)
        assert (full - logits).abs().max() < 1e-12
        for p in range(prior.passes(h, w)):
            here = pass_of == p
            later, earlier = codes.clone(), codes.clone()
            later[:, pass_of >= p] = torch.randint(0, 8, (2, int((pass_of >= p).sum())))
            earlier[:, pass_of < p] = (earlier[:, pass_of < p] + 1) % 8
            assert torch.equal(prior(later, labels)[:, :, here], full[:, :, here]), p
            if p:
                assert not torch.equal(prior(earlier, labels)[:, :, here], full[:, :, here]), p


def test_small_maps_skip_the_passes_of_lattices_coarser_than_they_are():
    prior = multiscale(levels=3)
    assert prior.passes(1, 1) == 1 and prior.passes(2, 2) == 3 and prior.passes(8, 8) == 7
    codes = torch.randint(0, 16, (1, 2, 3))
    logits, pass_of = filled(prior, codes)
    assert pass_of.tolist() == [[0, 3, 1], [3, 2, 3]] and prior.passes(2, 3) == 4  # 3 of 7 passes code nothing
    with torch.no_grad():
        assert (prior.double()(codes) - logits).abs().max() < 1e-12


def test_sampling_runs_each_passs_network_once_on_all_the_maps():
    """(Sampling's draws, seeds, completion and learning: test_prior.py, for every architecture.)"""
    prior = multiscale(levels=2, num_classes=2)
    runs = []
    for network in prior.networks:
        network.register_forward_hook(lambda module, args, out: runs.append(len(out)))
    labels = torch.tensor([0, 1, 1])
    codes = prior.sample(3, (7, 5), labels, temperature=1e-4)
    assert runs == [3] * prior.passes(7, 5) and prior.passes(7, 5) == 5
    assert torch.equal(prior(codes, labels).argmax(1), codes)


def test_a_grid_larger_than_the_positions_cover_is_refused():
    prior = multiscale(max_grid=8)
    assert prior.fits(8, 8) and not prior.fits(9, 8)
    with pytest.raises(ValueError, match="9x8 code grid is larger than this prior's max_grid 8"):
        prior(torch.zeros(1, 9, 8, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------
# .vqz files coded in passes
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("levels, phases", PASS_COUNTS)
def test_files_coded_in_passes_round_trip_at_every_pass_count(trained_codec, levels, phases):
    codec = vqz.Codec(trained_codec.vqvae, multiscale(levels=levels, phases=phases))
    codes = torch.randint(0, 16, (3, 8, 8), generator=torch.Generator().manual_seed(levels * 10 + phases))
    files = codec.encode_codes(codes, (32, 32), coder="prior")
    assert {f[4] for f in files} == {vqz.PASSES} and codec.prior_coder == vqz.PASSES
    decoded, _ = codec.decode(files, ["a.vqz", "b.vqz", "c.vqz"])
    assert torch.equal(decoded, codes)


def test_files_coded_in_passes_are_the_same_bytes_for_any_thread_count_and_batch(trained_codec):
    """Encoded with 1 thread in one batch, with 2 threads two slices at a time: the same files, which decode one
    at a time or all together to the same codes."""
    prior = multiscale(k=16, levels=2, num_classes=2)
    codes = torch.randint(0, 16, (3, 8, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 1])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        files = vqz.Codec(trained_codec.vqvae, prior, ["NC", "AD"], batch_size=64).encode_codes(codes, (32, 32),
                                                                                                  labels, "prior")
        torch.set_num_threads(2)
        pairs = vqz.Codec(trained_codec.vqvae, prior, ["NC", "AD"], batch_size=2)
        assert pairs.encode_codes(codes, (32, 32), labels, "prior") == files
        together, _ = pairs.decode(files, [f"{i}.vqz" for i in range(3)])
        alone = torch.cat([pairs.decode([f], ["one.vqz"])[0] for f in files])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(together, codes) and torch.equal(alone, codes)
    assert [f[5] for f in files] == labels.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_files_coded_in_passes_on_the_cpu_and_on_cuda_are_the_same_bytes(trained_codec):
    prior = multiscale(levels=3)
    codes = torch.randint(0, 16, (4, 8, 8), generator=torch.Generator().manual_seed(2))
    on_cpu = vqz.Codec(trained_codec.vqvae, prior).encode_codes(codes, (32, 32), coder="prior")
    cuda = torch.device("cuda")
    gpu = vqz.Codec(copy.deepcopy(trained_codec.vqvae).to(cuda), copy.deepcopy(prior).to(cuda), device=cuda)
    assert gpu.encode_codes(codes, (32, 32), coder="prior") == on_cpu
    assert torch.equal(gpu.decode(on_cpu, [f"{i}.vqz" for i in range(4)])[0], codes)


def test_the_size_of_a_file_coded_in_passes_is_the_forward_passs_nll(trained_codec):
    """A multiscale prior fitted to the train slices' codes for a few steps: each payload is its forward pass's
    NLL (what train_prior.py reports) to within a few bytes, as for the raster priors."""
    codes = trained_codec.codes(trained_codec.train_images)
    n, h, w = codes.shape
    torch.manual_seed(0)
    prior = build_prior(prior_config(arch="multiscale", codebook_size=16, channels=16, layers=2, levels=2,
                                     max_grid=8))
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for _ in range(40):
        loss = F.cross_entropy(prior(codes), codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    codec = vqz.Codec(trained_codec.vqvae, prior.eval())
    ideal = []
    files = codec.encode_codes(codes, tuple(trained_codec.train_images.shape[1:]), coder="prior", ideal=ideal)
    payload = np.array([len(f) - vqz.HEADER.size for f in files])
    per_slice = np.array([prior_bits(prior, codes[i:i + 1]) * h * w / 8 for i in range(n)])
    assert np.abs(payload - per_slice).max() <= 5, (payload, per_slice)
    assert 0 <= (payload - np.array(ideal) / 8).min() and (payload - np.array(ideal) / 8).max() <= 5
    assert per_slice.mean() < h * w * 4 / 8  # below fixed-length coding: it learned something


def test_a_header_that_names_the_other_coding_order_is_refused(trained_codec):
    passes = vqz.Codec(trained_codec.vqvae, multiscale())
    raster = vqz.Codec(trained_codec.vqvae, trained_codec.prior)
    codes = torch.randint(0, 16, (1, 8, 8))
    coded_in_passes = passes.encode_codes(codes, (32, 32), coder="prior")[0]
    coded_in_raster = raster.encode_codes(codes, (32, 32), coder="prior")[0]
    for codec, blob, message in (
            (passes, coded_in_passes[:4] + bytes([vqz.PRIOR]) + coded_in_passes[5:],
             "was coded in raster order (a pixelcnn or transformer prior), but this prior codes in a multiscale "
             "prior's passes"),
            (raster, coded_in_raster[:4] + bytes([vqz.PASSES]) + coded_in_raster[5:],
             "was coded in a multiscale prior's passes, but this prior codes in raster order")):
        with pytest.raises(vqz.UserError) as refused:
            codec.decode([blob], ["tampered.vqz"])
        assert_one_line_error(refused, "tampered.vqz " + message, "decode it with the prior it was encoded with")


# ---------------------------------------------------------------------------------------------------------
# train_prior.py, compress.py and sample.py with --arch multiscale
# ---------------------------------------------------------------------------------------------------------

MULTISCALE_FLAGS = ["--arch", "multiscale", "--channels", "8", "--layers", "2", "--levels", "2", "--batch-size", "8",
                    "--epoch-samples", "2", "--dropout", "0.2"]  # dropout: the resumed run must restore its RNG


def test_a_multiscale_prior_trains_resumes_exactly_and_samples_through_the_commands(trained_models, tmp_path,
                                                                                    monkeypatch, capsys):
    vqvae, _ = trained_models
    args = ["--vqvae", vqvae, "--epochs", "2", *MULTISCALE_FLAGS]
    r = run_main(train_prior.main, [*args, "--out", tmp_path / "straight"], capsys)
    assert r.returncode == 0 and "decoded in 5 passes" in r.stdout, r.stderr
    real_epoch = train_prior.train_epoch
    monkeypatch.setattr(train_prior, "train_epoch", interrupted_in_second_call(real_epoch))
    assert run_main(train_prior.main, [*args, "--out", tmp_path / "resumed"], capsys).returncode == 130
    monkeypatch.setattr(train_prior, "train_epoch", real_epoch)
    assert run_main(train_prior.main, ["--resume", tmp_path / "resumed"], capsys).returncode == 0
    a, b = (load_checkpoint(tmp_path / name / "last.pt", kind="prior") for name in ("straight", "resumed"))
    assert a["epoch"] == b["epoch"] == 2 and a["metrics"]["val_bits_per_code"] == b["metrics"]["val_bits_per_code"]
    assert a["model_config"]["arch"] == "multiscale" and a["model_config"]["levels"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert (tmp_path / "straight" / "samples" / "epoch_002.png").is_file()

    r = run_main(sample.main, ["--num-samples", "2", "--prior", tmp_path / "straight", "--out", tmp_path / "s"],
                 capsys)
    assert r.returncode == 0, r.stderr
    scores = json.loads((tmp_path / "s" / "sample_scores.json").read_text())
    assert scores["validation_nll_bits_per_code"] > 0 and scores["prior_passes"] == 5


def test_compress_codes_in_passes_and_refuses_a_tampered_coder_in_one_line(trained_models, tmp_path, capsys):
    vqvae, _ = trained_models
    out = tmp_path / "prior"
    assert run_main(train_prior.main, ["--vqvae", vqvae, "--epochs", "1", "--out", out, *MULTISCALE_FLAGS],
                    capsys).returncode == 0
    coded = tmp_path / "vqz"
    r = run_main(compress.main, ["encode", "--checkpoint", vqvae, "--prior", out / "best.pt", "--split", "test",
                                 "--coder", "prior", "--out", coded], capsys)
    assert r.returncode == 0, r.stderr
    files = sorted(coded.glob("*.vqz"))
    assert files and {f.read_bytes()[4] for f in files} == {vqz.PASSES}
    r = run_main(compress.main, ["decode", "--checkpoint", vqvae, "--prior", out / "best.pt", *files,
                                 "--out", tmp_path / "png"], capsys)
    assert r.returncode == 0 and len(list((tmp_path / "png").glob("*.png"))) == len(files), r.stderr
    blob = files[0].read_bytes()
    for coder, message in ((vqz.PRIOR, "was coded in raster order"), (9, "unknown coder 9")):
        tampered = tmp_path / f"coder{coder}.vqz"
        tampered.write_bytes(blob[:4] + bytes([coder]) + blob[5:])
        r = run_main(compress.main, ["decode", "--checkpoint", vqvae, "--prior", out / "best.pt", tampered,
                                     "--out", tmp_path / "bad"], capsys)
        assert r.returncode == 2
        assert_one_line_error(r, message)


def test_bench_times_the_codec_of_each_prior_beside_the_vqvae_alone_and_the_classical_codecs(trained_models, tmp_path,
                                                                                              capsys):
    vqvae, raster = trained_models
    run = tmp_path / "run"
    (run / "prior").mkdir(parents=True)
    shutil.copy(vqvae, run / "best.pt")
    shutil.copy(raster, run / "prior" / "best.pt")
    assert run_main(train_prior.main, ["--vqvae", run / "best.pt", "--epochs", "1", "--out", run / "prior-multiscale",
                                       *MULTISCALE_FLAGS], capsys).returncode == 0
    r = run_main(bench.main, ["--codec", run, "--images", "3", "--json", tmp_path / "codec.json"], capsys)
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "codec.json").read_text())
    measured = results["runs"][str(run)]
    assert measured["latent_grid"] == [8, 8] and measured["vqvae"]["decode_slices_per_s"] > 0
    priors = {Path(p["prior"]).parent.name: p for p in measured["priors"]}
    assert set(priors) == {"prior", "prior-multiscale"}
    assert (priors["prior"]["coding_order"], priors["prior"]["passes"]) == ("raster", 64)
    assert (priors["prior-multiscale"]["coding_order"], priors["prior-multiscale"]["passes"]) == ("passes", 5)
    for p in priors.values():
        assert p["encode_slices_per_s"] > 0 and p["decode_slices_per_s"] > 0 and p["load_s"] > 0
        assert p["decode_fraction_of_vqvae"] == pytest.approx(p["decode_slices_per_s"]
                                                              / measured["vqvae"]["decode_slices_per_s"])
    assert priors["prior-multiscale"]["bytes_over_raster_prior"] == pytest.approx(
        priors["prior-multiscale"]["mean_bytes"] / priors["prior"]["mean_bytes"])
    assert {"jpeg", "webp", "jpeg2000", "avif"} <= set(results["classical"])
    assert all(c["decode_slices_per_s"] > 0 for c in results["classical"].values())
    assert len(results["targets"]) == 2 and "of the VQ-VAE's speed" in r.stdout
