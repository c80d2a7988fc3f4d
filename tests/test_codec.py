"""codec/vqz.py: the .vqz codec as a library -- the prior's incremental float64 conditionals, integer frequencies that
do not depend on the thread count, exact round trips under every coder, coded size against the prior's NLL, class
labels in the header -- on the session's tiny models (conftest.trained_models)."""
import sys

import numpy as np
import pytest
import torch

from codec import vqz as codec
from codec.classical import CLASSICAL_CODECS, BudgetSearch, available_codecs
from evaluation.generation import prior_bits
from helpers import incremental_logits
from modules import PriorConfig, build_prior

CPU = torch.device("cpu")


def random_prior(k=16, layers=3, kernel_size=5, num_classes=0, seed=0, arch="pixelcnn", positions=False):
    """A random prior whose logits are large enough to be confident (so frequencies are far from uniform)."""
    torch.manual_seed(seed)
    prior = build_prior(PriorConfig(arch=arch, codebook_size=k, channels=8, layers=layers, kernel_size=kernel_size,
                                    heads=2, max_grid=8, num_classes=num_classes, positions=positions)).eval()
    with torch.no_grad():
        if arch == "pixelcnn":
            prior.head[3].weight.mul_(3.0)
        else:
            prior.head.weight.mul_(100.0)  # its weights start at std 0.02
        if positions:  # they start at zero
            prior.rows.weight.normal_()
            prior.columns.weight.normal_()
    return prior


# ---------------------------------------------------------------------------------------------------------
# Probabilities
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, kernel_size, layers, num_classes, positions",
                         [("pixelcnn", 3, 4, 0, False), ("pixelcnn", 5, 3, 2, False), ("pixelcnn", 3, 4, 2, True),
                          ("transformer", 3, 2, 0, False), ("transformer", 3, 2, 2, False)])
def test_the_incremental_float64_conditionals_equal_the_forward_pass(arch, kernel_size, layers, num_classes,
                                                                     positions):
    prior = random_prior(layers=layers, kernel_size=kernel_size, num_classes=num_classes, arch=arch,
                         positions=positions)
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
    f = codec.frequencies(logits, 16)
    assert f.dtype == np.int64 and (f >= 1).all() and (f.sum(1) == 1 << 16).all()
    assert f[0, 0] == (1 << 16) - 15 and (f[0, 1:] == 1).all()
    assert (np.argsort(f[1:], 1, kind="stable")[:, -1] == np.argmax(logits[1:], 1)).all()
    # only logits rounded to 1/64 nat matter, and a common shift of them changes nothing
    assert np.array_equal(codec.frequencies(logits + 1e-9, 16), f)
    assert np.array_equal(codec.frequencies(logits + 3.0, 16), f)
    # close to the softmax: the coding cost of the integers is within 0.1% of the float model's
    p = np.exp(logits[1:] - logits[1:].max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    kl = (p * np.log2(p / (f[1:] / (1 << 16)))).sum(1)
    assert kl.max() < 1e-3
    assert codec.probability_bits(16) == 16 and codec.probability_bits(1024) == 18
    with pytest.raises(codec.UserError, match="non-finite"):
        codec.frequencies(np.full((1, 4), np.nan), 16)


def test_the_frequencies_are_the_integers_the_first_format_defined():
    """The formula every .vqz file so far was coded with, in numpy as it was first written: the torch version
    gives the same integers (ties included: the first maximum takes the remainder; halves round to even)."""
    def first_written(logits, bits):
        z = np.rint(logits * codec.LOGIT_STEPS)
        d = np.minimum(z.max(1, keepdims=True) - z, len(codec.EXP_TABLE) - 1).astype(np.int64)
        e = codec.EXP_TABLE[d]
        f = e * ((1 << bits) - logits.shape[1]) // e.sum(1, keepdims=True) + 1
        f[np.arange(len(f)), e.argmax(1)] += (1 << bits) - f.sum(1)
        return f
    rng = np.random.default_rng(0)
    for k, bits, scale in ((16, 16, 4.0), (256, 16, 8.0), (1000, 18, 30.0)):
        logits = rng.normal(size=(500, k)) * scale
        logits[:50] = np.round(logits[:50] * 4) / 4  # ties between maxima, and exact halves of 1/64 nat
        logits[50:60, :3] = 1e4  # one symbol's logit far above the table's end
        assert np.array_equal(codec.frequencies(logits, bits), first_written(logits, bits))
        assert np.array_equal(codec.frequencies(torch.from_numpy(logits), bits), first_written(logits, bits))


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
            out[threads] = codec.frequencies(logits, 16)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(out[1], out[2])


def test_a_transformer_prior_refuses_images_whose_code_grid_its_positions_do_not_cover(trained_codec):
    transformer = codec.Codec(trained_codec.vqvae, random_prior(arch="transformer"))  # positions for 8x8 grids
    assert len(transformer.encode(torch.zeros(1, 32, 32, dtype=torch.uint8))) == 1  # 8x8 codes
    with pytest.raises(codec.UserError, match="makes a 16x16 code grid, larger than this prior's positions cover"):
        transformer.encode(torch.zeros(1, 64, 64, dtype=torch.uint8))


def test_fixed_length_codes_pack_and_unpack():
    rng = np.random.default_rng(0)
    for k in (2, 16, 37, 256, 1000):
        codes = rng.integers(0, k, 61)
        packed = codec.pack_fixed(codes, k)
        assert len(packed) == codec.fixed_payload_bytes(61, k) == (61 * int(np.ceil(np.log2(k))) + 7) // 8
        assert np.array_equal(codec.unpack_fixed(packed, 61, k), codes)


# ---------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("coder", ["prior", "static", "fixed"])
def test_every_coder_round_trips_in_any_grouping_and_thread_count(trained_codec, coder):
    """Encoded with 1 thread, decoded with 2, one file at a time and all together: the same codes."""
    images = trained_codec.test_images
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        files = trained_codec.encode(images, coder=coder)
        torch.set_num_threads(2)
        together, _ = trained_codec.decode(files, [f"{i}.vqz" for i in range(len(files))])
        alone = torch.cat([trained_codec.decode([f], ["one.vqz"])[0] for f in files])
    finally:
        torch.set_num_threads(before)
    assert {f[4] for f in files} == {getattr(codec, coder.upper())}
    assert torch.equal(together, trained_codec.codes(images)) and torch.equal(alone, together)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_files_coded_on_the_cpu_and_on_cuda_are_the_same_bytes(trained_models, trained_codec):
    """The prior's integer frequencies on a GPU (float64 there too) are the CPU's: the same code maps give
    byte-identical files, and CPU-coded files decode to the same codes on the GPU."""
    codes = trained_codec.codes(trained_codec.test_images)
    shape = tuple(trained_codec.test_images.shape[1:])
    on_cpu = trained_codec.encode_codes(codes, shape, coder="prior")
    gpu, _, _ = codec.load_codec(*trained_models, torch.device("cuda"), 64, "auto")
    assert gpu.encode_codes(codes, shape, coder="prior") == on_cpu
    decoded, _ = gpu.decode(on_cpu, [f"{i}.vqz" for i in range(len(on_cpu))])
    assert torch.equal(decoded, codes)


def test_prior_coded_size_equals_the_priors_nll_within_a_few_bytes(trained_codec):
    """On the slices the prior was fitted to (so that no code has a probability under the frequencies' floor of
    2^-16, where the integer model is cheaper than the float one): the payload is the float32 forward pass's NLL
    to within a few bytes, and the integer model's ideal code length plus about one 32-bit word."""
    images = trained_codec.train_images
    codes = trained_codec.codes(images)
    n, h, w = codes.shape
    ideal = []
    files = trained_codec.encode_codes(codes, images.shape[1:], coder="prior", ideal=ideal)
    payload = np.array([len(f) - codec.HEADER.size for f in files])
    nll_bytes = prior_bits(trained_codec.prior, codes) * h * w / 8  # the float32 forward pass, per slice
    per_slice = np.array([prior_bits(trained_codec.prior, codes[i:i + 1]) * h * w / 8 for i in range(n)])
    assert abs(per_slice.mean() - nll_bytes) < 1e-3
    assert np.abs(payload - per_slice).max() <= 5, (payload, per_slice)
    over = payload - np.array(ideal) / 8  # the range coder's cost over the integer model: ~one 32-bit word
    assert over.min() >= 0 and over.max() <= 5 and over.mean() <= 4
    assert nll_bytes < h * w * 4 / 8  # the prior learned something: below the fixed-length 4 bits per code


def deterministic_prior():
    """A PixelCNN whose weights are small integers / 8 (exact in float32): the same on every machine and torch."""
    prior = build_prior(PriorConfig(codebook_size=16, channels=4, layers=2, kernel_size=3))
    with torch.no_grad():
        for index, (name, p) in enumerate(sorted(prior.named_parameters())):
            values = (torch.arange(p.numel()) * 37 + index * 11) % 17 - 8  # integers -8..8
            p.copy_(values.view(p.shape).float() / 8)
    return prior.eval()


# A .vqz file written before issue 43 (coder 2: deterministic_prior's conditionals in raster order) by
# `Codec(vqvae, deterministic_prior()).encode_codes(OLD_FILE_CODES, (32, 32), coder="prior")`; bytes 14-21 held the
# VQ-VAE hash of a model of that time, which the test sets to this session's.
OLD_FILE = bytes.fromhex("56515a0102ff20002000080008000000000000000000d24710613fb0dd46ee6433ca28000000fd0f854d9bc9c52a"
                         "669b8d02aa63c5805a56e5ee2c2f906f1c209b6a3b59e087e31d92fb691c8555")
OLD_FILE_CODES = [0, 7, 14, 5, 12, 3, 10, 1, 11, 2, 9, 0, 7, 14, 5, 12, 6, 4, 4, 4, 4, 4, 0, 7, 1, 4, 4, 4, 4, 4, 11, 2,
                  12, 4, 4, 4, 4, 4, 6, 13, 7, 14, 5, 12, 3, 10, 1, 8, 2, 9, 0, 7, 14, 5, 12, 3, 13, 4, 11, 2, 9, 0, 7,
                  14]


def test_a_file_written_before_the_multiscale_prior_still_decodes_and_is_still_written_the_same(trained_codec):
    raster = codec.Codec(trained_codec.vqvae, deterministic_prior())
    blob = OLD_FILE[:14] + raster.vqvae_hash + OLD_FILE[22:]
    header = codec.parse_header(blob, "old.vqz")
    assert (header.coder, header.grid, header.prior_hash) == (codec.PRIOR, (8, 8), raster.prior_hash)
    codes, _ = raster.decode([blob], ["old.vqz"])
    assert codes.flatten().tolist() == OLD_FILE_CODES
    assert raster.encode_codes(codes, (32, 32), coder="prior") == [blob]


def test_a_class_conditional_prior_codes_with_the_label_in_the_header(trained_codec):
    prior = random_prior(k=16, layers=2, kernel_size=3, num_classes=2)
    conditional = codec.Codec(trained_codec.vqvae, prior, ["NC", "AD"], CPU)
    images, labels = trained_codec.test_images, torch.tensor([0, 1, 1, 0])
    files = conditional.encode(images, labels, coder="prior")
    assert [f[5] for f in files] == [0, 1, 1, 0]
    codes, _ = conditional.decode(files, ["f"] * len(files))
    assert torch.equal(codes, conditional.codes(images))
    swapped = [f[:5] + bytes([1 - f[5]]) + f[6:] for f in files]  # another label: other probabilities
    with pytest.raises(codec.UserError, match="checksum|does not decode"):
        conditional.decode(swapped, ["f"] * len(files))
    with pytest.raises(codec.UserError, match="class-conditional"):
        conditional.encode(images, coder="prior")


def smooth_slice(size: int = 64) -> np.ndarray:
    y, x = np.mgrid[:size, :size] / size
    return (127 + 100 * np.sin(6 * x) * np.cos(4 * y)).astype(np.uint8)


@pytest.mark.parametrize("name", CLASSICAL_CODECS)
def test_each_classical_codec_fits_a_budget_with_its_best_setting_and_decodes(name):
    if name == "jpegxl":
        pytest.importorskip("imagecodecs")
    image = smooth_slice()
    search = BudgetSearch(image, CLASSICAL_CODECS[name])
    budget = search.smallest() + 300
    data = search.fit(budget)
    assert len(data) <= budget
    better = [s for s in range(len(search.settings)) if len(search.encoded(s)) <= budget]
    assert data == search.encoded(max(better))  # sizes grow with quality, so the best that fits is the last
    decoded = CLASSICAL_CODECS[name].decode(data)
    assert decoded.shape == image.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - image).mean() < 20
    assert search.fit(search.smallest() - 1) is None


def test_jpeg_xl_without_imagecodecs_is_one_line_and_left_out_of_the_available_codecs(monkeypatch):
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # import imagecodecs now raises ImportError
    with pytest.raises(codec.UserError, match="pip install imagecodecs"):
        CLASSICAL_CODECS["jpegxl"].settings(64 * 64)
    assert available_codecs() == ["jpeg", "webp", "jpeg2000", "avif"]
