"""compress.py: the .vqz codec (exact round trips, the prior's incremental float64 conditionals, integer
frequencies that do not depend on the thread count, coded size against the prior's NLL), its header checks and
refusals, and the rate-distortion study, on the session's tiny models (conftest.trained_models)."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import compress
from checkpoints import load_split
from helpers import incremental_logits, write_image
from images import to_uint8
from metrics import prior_bits, score_split
from modules import PriorConfig, build_prior
from utils import autocast

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def codec(trained_models):
    c, cfg, state = compress.load_codec(*trained_models, CPU, 64, "auto")
    c.test_images = load_split(cfg, "test", None, demo=state["demo_settings"], verbose=False).images
    c.train_images = load_split(cfg, "train", None, demo=state["demo_settings"], verbose=False).images
    return c


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


def random_prior(k=16, layers=3, kernel_size=5, num_classes=0, seed=0, arch="pixelcnn"):
    """A random prior whose logits are large enough to be confident (so frequencies are far from uniform)."""
    torch.manual_seed(seed)
    prior = build_prior(PriorConfig(arch=arch, codebook_size=k, channels=8, layers=layers, kernel_size=kernel_size,
                                    heads=2, max_grid=8, num_classes=num_classes)).eval()
    with torch.no_grad():
        if arch == "pixelcnn":
            prior.head[3].weight.mul_(3.0)
        else:
            prior.head.weight.mul_(100.0)  # its weights start at std 0.02
    return prior


# ---------------------------------------------------------------------------------------------------------
# Probabilities
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, kernel_size, layers, num_classes",
                         [("pixelcnn", 3, 4, 0), ("pixelcnn", 5, 3, 2), ("transformer", 3, 2, 0),
                          ("transformer", 3, 2, 2)])
def test_the_incremental_float64_conditionals_equal_the_forward_pass(arch, kernel_size, layers, num_classes):
    prior = random_prior(layers=layers, kernel_size=kernel_size, num_classes=num_classes, arch=arch)
    codes = torch.randint(0, 16, (3, 5, 7))
    labels = torch.tensor([0, 1, 1]) if num_classes else None
    incremental = incremental_logits(prior, codes, labels)
    with torch.no_grad():
        full = prior.double()(codes, labels)
    assert incremental.dtype == torch.float64
    assert (incremental - full).abs().max() < 1e-12


def test_frequencies_are_integers_that_sum_to_a_power_of_two_and_follow_the_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 16)) * 4
    logits[0] = [100.0] + [-100.0] * 15  # one symbol takes almost everything; the rest keep 1 each
    f = compress.frequencies(logits, 16)
    assert f.dtype == np.int64 and (f >= 1).all() and (f.sum(1) == 1 << 16).all()
    assert f[0, 0] == (1 << 16) - 15 and (f[0, 1:] == 1).all()
    assert (np.argsort(f[1:], 1, kind="stable")[:, -1] == np.argmax(logits[1:], 1)).all()
    # only logits rounded to 1/64 nat matter, and a common shift of them changes nothing
    assert np.array_equal(compress.frequencies(logits + 1e-9, 16), f)
    assert np.array_equal(compress.frequencies(logits + 3.0, 16), f)
    # close to the softmax: the coding cost of the integers is within 0.1% of the float model's
    p = np.exp(logits[1:] - logits[1:].max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    kl = (p * np.log2(p / (f[1:] / (1 << 16)))).sum(1)
    assert kl.max() < 1e-3
    assert compress.probability_bits(16) == 16 and compress.probability_bits(1024) == 18
    with pytest.raises(compress.UserError, match="non-finite"):
        compress.frequencies(np.full((1, 4), np.nan), 16)


@pytest.mark.parametrize("arch", ["pixelcnn", "transformer"])
def test_the_frequencies_do_not_depend_on_the_thread_count(arch):
    """The integers the coder sees are identical with 1 and 2 threads (the float64 logits may differ in the last
    bits; rounding to 1/64 nat absorbs that, and the code-map CRC would catch a case it did not)."""
    prior = random_prior(k=32, layers=4, kernel_size=5, arch=arch)
    codes = torch.randint(0, 32, (16, 8, 8))
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            logits = incremental_logits(prior, codes).permute(0, 2, 3, 1).reshape(-1, 32).numpy()
            out[threads] = compress.frequencies(logits, 16)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(out[1], out[2])


def test_a_transformer_prior_refuses_images_whose_code_grid_its_positions_do_not_cover(codec):
    transformer = compress.Codec(codec.vqvae, random_prior(arch="transformer"))  # positions for 8x8 grids
    assert len(transformer.encode(torch.zeros(1, 32, 32, dtype=torch.uint8))) == 1  # 8x8 codes
    with pytest.raises(compress.UserError, match="makes a 16x16 code grid, larger than this prior's positions cover"):
        transformer.encode(torch.zeros(1, 64, 64, dtype=torch.uint8))


def test_fixed_length_codes_pack_and_unpack():
    rng = np.random.default_rng(0)
    for k in (2, 16, 37, 256, 1000):
        codes = rng.integers(0, k, 61)
        packed = compress.pack_fixed(codes, k)
        assert len(packed) == compress.fixed_payload_bytes(61, k) == (61 * int(np.ceil(np.log2(k))) + 7) // 8
        assert np.array_equal(compress.unpack_fixed(packed, 61, k), codes)


# ---------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------

def test_encode_decode_round_trip_gives_the_same_codes_and_predicts_reconstruction(codec, trained_models, tmp_path):
    """Files -> .vqz -> PNG: the decoded codes are the encoder's, and each PNG is the VQ-VAE's reconstruction as
    predict.py computes it (metrics.score_split, same precision), to the 8-bit pixel."""
    checkpoint, prior = trained_models
    images = codec.test_images
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
    codes, recon = codec.decode([f.read_bytes() for f in files], [f.name for f in files])
    assert torch.equal(codes, codec.codes(images))
    assert np.array_equal(decoded, recon.numpy())
    predicted = score_split(codec.vqvae, images, CPU, autocast("auto", CPU), keep=len(images))
    assert torch.equal(predicted.indices, codes)
    assert np.array_equal(to_uint8(predicted.outputs)[:, 0].numpy(), decoded)


@pytest.mark.parametrize("coder", ["prior", "static", "fixed"])
def test_every_coder_round_trips_in_any_grouping_and_thread_count(codec, coder):
    """Encoded with 1 thread, decoded with 2, one file at a time and all together: the same codes."""
    images = codec.test_images
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        files = codec.encode(images, coder=coder)
        torch.set_num_threads(2)
        together, _ = codec.decode(files, [f"{i}.vqz" for i in range(len(files))])
        alone = torch.cat([codec.decode([f], ["one.vqz"])[0] for f in files])
    finally:
        torch.set_num_threads(before)
    assert {f[4] for f in files} == {getattr(compress, coder.upper())}
    assert torch.equal(together, codec.codes(images)) and torch.equal(alone, together)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_files_coded_on_the_cpu_and_on_cuda_are_the_same_bytes(trained_models, codec):
    """The prior's integer frequencies on a GPU (float64 there too) are the CPU's: the same code maps give
    byte-identical files, and CPU-coded files decode to the same codes on the GPU."""
    codes = codec.codes(codec.test_images)
    shape = tuple(codec.test_images.shape[1:])
    on_cpu = codec.encode_codes(codes, shape, coder="prior")
    gpu, _, _ = compress.load_codec(*trained_models, torch.device("cuda"), 64, "auto")
    assert gpu.encode_codes(codes, shape, coder="prior") == on_cpu
    decoded, _ = gpu.decode(on_cpu, [f"{i}.vqz" for i in range(len(on_cpu))])
    assert torch.equal(decoded, codes)


def test_prior_coded_size_equals_the_priors_nll_within_a_few_bytes(codec):
    """On the slices the prior was fitted to (so that no code has a probability under the frequencies' floor of
    2^-16, where the integer model is cheaper than the float one): the payload is the float32 forward pass's NLL
    to within a few bytes, and the integer model's ideal code length plus about one 32-bit word."""
    images = codec.train_images
    codes = codec.codes(images)
    n, h, w = codes.shape
    ideal = []
    files = codec.encode_codes(codes, images.shape[1:], coder="prior", ideal=ideal)
    payload = np.array([len(f) - compress.HEADER.size for f in files])
    nll_bytes = prior_bits(codec.prior, codes) * h * w / 8  # the float32 forward pass, per slice
    per_slice = np.array([prior_bits(codec.prior, codes[i:i + 1]) * h * w / 8 for i in range(n)])
    assert abs(per_slice.mean() - nll_bytes) < 1e-3
    assert np.abs(payload - per_slice).max() <= 5, (payload, per_slice)
    over = payload - np.array(ideal) / 8  # the range coder's cost over the integer model: ~one 32-bit word
    assert over.min() >= 0 and over.max() <= 5 and over.mean() <= 4
    assert nll_bytes < h * w * 4 / 8  # the prior learned something: below the fixed-length 4 bits per code


def test_a_class_conditional_prior_codes_with_the_label_in_the_header(codec):
    prior = random_prior(k=16, layers=2, kernel_size=3, num_classes=2)
    conditional = compress.Codec(codec.vqvae, prior, ["NC", "AD"], CPU)
    images, labels = codec.test_images, torch.tensor([0, 1, 1, 0])
    files = conditional.encode(images, labels, coder="prior")
    assert [f[5] for f in files] == [0, 1, 1, 0]
    codes, _ = conditional.decode(files, ["f"] * len(files))
    assert torch.equal(codes, conditional.codes(images))
    swapped = [f[:5] + bytes([1 - f[5]]) + f[6:] for f in files]  # another label: other probabilities
    with pytest.raises(compress.UserError, match="checksum|does not decode"):
        conditional.decode(swapped, ["f"] * len(files))
    with pytest.raises(compress.UserError, match="class-conditional"):
        conditional.encode(images, coder="prior")


# ---------------------------------------------------------------------------------------------------------
# Bad files and refusals
# ---------------------------------------------------------------------------------------------------------

def header_with(blob: bytes, **fields) -> bytes:
    names = ["magic", "version", "coder", "label", "height", "width", "gh", "gw", "vq", "prior", "crc", "length"]
    values = dict(zip(names, compress.HEADER.unpack_from(blob)))
    values.update(fields)
    return compress.HEADER.pack(*values.values()) + blob[compress.HEADER.size:]


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
def one_file(codec):
    return codec.encode(codec.test_images[:1], coder="prior")[0]


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
        h.truncate(compress.MAX_FILE_BYTES + 1)  # sparse: nothing is allocated to make or refuse it
    fails_with(capsys, ["decode", "--checkpoint", str(checkpoint), str(huge), "--out", str(tmp_path / "o")],
               "larger than any .vqz file")


def test_outputs_are_never_overwritten(codec, trained_models, tmp_path, capsys):
    checkpoint, prior = trained_models
    write_image(tmp_path / "in" / "x.png", codec.test_images[0].numpy())
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


def test_encode_without_a_prior_writes_static_or_fixed_length_files_of_a_split(trained_models, codec, tmp_path, capsys):
    checkpoint, _ = trained_models
    compress.main(["encode", "--checkpoint", str(checkpoint), "--split", "test", "--out", str(tmp_path / "s")])
    files = sorted((tmp_path / "s").glob("*.vqz"))
    assert len(files) == len(codec.test_images)
    fixed = compress.HEADER.size + compress.fixed_payload_bytes(64, 16)
    assert all(f.read_bytes()[4] in (compress.STATIC, compress.FIXED) and f.stat().st_size <= fixed for f in files)
    assert "slices/s" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# Rate-distortion study
# ---------------------------------------------------------------------------------------------------------

def test_rd_writes_the_table_the_figures_and_counts_what_does_not_fit(trained_models, tmp_path, capsys):
    checkpoint, prior = trained_models
    out = tmp_path / "rd"
    compress.main(["rd", "--checkpoint", str(checkpoint), "--prior", str(prior), "--budgets", "80,400,3000",
                   "--out", str(out)])
    for name in ("rd.csv", "rd.json", "rd.png", "rd_slice.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "rd.csv")))
    vq = [r for r in rows if r["codec"].startswith("VQ-VAE")]
    assert sorted(r["setting"] for r in vq) == ["fixed", "prior", "static"]
    assert len({r["mean_ssim"] for r in vq}) == 1  # one reconstruction, three sizes
    classical = [r for r in rows if not r["codec"].startswith("VQ-VAE")]
    assert sorted({r["codec"] for r in classical}) == ["avif", "jpeg", "jpeg2000", "webp"]
    assert len(classical) == 4 * (3 + 3)  # each codec at 3 budgets, and at the sizes of the 3 VQ-VAE rows' files
    for r in classical:
        assert int(r["images_fit"]) + int(r["images_over_budget"]) == int(r["images"]) == 4
        if int(r["images_fit"]) and r["budget_bytes"] != "per slice":
            assert float(r["mean_bytes"]) <= int(r["budget_bytes"])
    jpeg80 = next(r for r in classical if r["codec"] == "jpeg" and r["budget_bytes"] == "80")
    assert jpeg80["images_over_budget"] == "4"  # a JPEG's headers alone are larger
    summary = json.loads((out / "rd.json").read_text())
    assert summary["header_bytes"] == compress.HEADER.size and summary["images"] == 4
    assert {"prior_coded_mean_bytes", "vqvae_above_classical_below_1536_bytes",
            "ssim_minus_classical_at_equal_bytes_per_slice"} <= set(summary["targets"])
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
