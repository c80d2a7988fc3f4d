"""Scores: SSIM and PSNR agree with scikit-image, eagerly and compiled; one function scores a split."""
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from evaluation.metrics import score_split
from helpers import INDUCTOR
from imaging import quality
from imaging.quality import psnr, ssim
from modules import VQVAE, VQVAEConfig
from utils import autocast


def test_batched_ssim_equals_skimage_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 40, 36, generator=g)
    y = (x + 0.2 * torch.randn(4, 1, 40, 36, generator=g)).clamp(0, 1)
    y[3] = x[3]  # identical pair: SSIM 1
    ours = ssim(x, y)
    for i in range(4):
        ref = structural_similarity(x[i, 0].numpy(), y[i, 0].numpy(), data_range=1.0)
        assert abs(ours[i].item() - ref) < 1e-4


@pytest.mark.parametrize("width", [1, 2, 3, 5, 7, 8, 11])
def test_window_sums_equal_direct_sums_along_either_axis(width):
    m = torch.randn(2, 1, 13, 17, dtype=torch.float64)
    for dim in (-1, -2):
        assert torch.allclose(quality.window_sums(m, dim, width), m.unfold(dim, width, 1).sum(-1))


@INDUCTOR
def test_compiled_ssim_equals_the_eager_one():
    g = torch.Generator().manual_seed(1)
    # a chunk of 4 compiled, the last 2 eager; 32x32 as in the other INDUCTOR tests, which then reuse the compile
    x = torch.rand(6, 1, 32, 32, generator=g)
    y = (x + 0.2 * torch.randn(6, 1, 32, 32, generator=g)).clamp(0, 1)
    assert torch.allclose(ssim(x, y, compiled=True), ssim(x, y), atol=1e-6)


def test_ssim_runs_eagerly_with_one_warning_where_compiling_fails(monkeypatch):
    def no_compiler():
        def fail(*args):
            raise RuntimeError("no C++ compiler found\nlong details")
        return fail
    monkeypatch.setattr(quality, "_ssim_compiled_once", no_compiler)
    monkeypatch.setattr(quality, "_compile_failed", False)
    x = torch.rand(8, 1, 16, 16)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler found\\); running it eagerly"):
        values = ssim(x, x.flip(-1), compiled=True)
    assert torch.allclose(values, ssim(x, x.flip(-1)))


def test_psnr_equals_skimage():
    x = torch.rand(2, 1, 16, 16)
    y = (x + 0.05).clamp(0, 1)
    for i in range(2):
        ref = peak_signal_noise_ratio(x[i, 0].numpy(), y[i, 0].numpy(), data_range=1.0)
        assert psnr(x, y)[i].item() == pytest.approx(ref, abs=1e-3)




def test_score_split_scores_every_image_once_keeps_every_code_map_and_the_first_images_for_figures():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(hidden_channels=8, embedding_dim=8, codebook_size=8, downsamplings=2)).eval()
    images = torch.randint(0, 256, (5, 16, 16), dtype=torch.uint8)
    scores = score_split(model, images, torch.device("cpu"), autocast("fp32", torch.device("cpu")), batch_size=2,
                         keep=3)
    x = images.float().unsqueeze(1) / 127.5 - 1
    with torch.no_grad():
        out = model(x)
    rec = out.reconstruction
    expected = ssim((rec + 1) / 2, (x + 1) / 2)
    assert torch.allclose(scores.ssim, expected, atol=1e-5) and scores.psnr.shape == (5,)
    assert scores.inputs.shape == (3, 1, 16, 16) and scores.indices.shape == (5, 4, 4)
    assert torch.equal(scores.indices, out.indices)
    total = sum(float(v) for v in scores.loss_sums.values())
    assert total == pytest.approx(float(sum(out.losses.values())) * 5, rel=1e-4)
