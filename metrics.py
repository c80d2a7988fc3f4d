"""Scores: per-image SSIM and PSNR, the one function that scores a VQ-VAE on a split, and the measures of samples
(nearest-neighbour SSIM, Frechet distance). Images are in [0, 1] unless said otherwise."""
import functools
import math
import warnings
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataset import to_float
from utils import to_unit

if TYPE_CHECKING:  # modules imports ssim from here
    from modules import VQVAE, PixelCNNPrior


class SplitScores(NamedTuple):
    ssim: torch.Tensor         # (N,) per image
    psnr: torch.Tensor         # (N,) per image, dB
    loss_sums: dict            # each loss term summed over the images (batch mean x batch size)
    inputs: torch.Tensor       # (keep, 1, H, W) the first `keep` inputs in [-1, 1], as the model read them
    outputs: torch.Tensor      # (keep, 1, H, W) their reconstructions
    indices: torch.Tensor      # (keep, h, w) their code maps


@torch.no_grad()
def score_split(model, images: torch.Tensor, device: torch.device, autocast, batch_size: int = 32,
                channels_last: bool = True, compiled_ssim: bool = False, keep: int = 0, progress: str | None = None,
                corrupt=None) -> SplitScores:
    """Reconstruct uint8 (N, H, W) `images` with `model` (a VQVAE, in eval mode) and score every one. Validation
    during training, predict.py and ablate.py all score through this, in the same precision (`autocast`) and memory
    format as training, so their figures agree. Denoising: `corrupt(x, rows)` gives the noisy version of the batch
    x of `images[rows]`; the model reads it, and its output is scored against the clean x (`inputs` keeps the
    noisy ones)."""
    model.eval()
    ssims, psnrs, sums, kept = [], [], {}, {"inputs": [], "outputs": [], "indices": []}
    for start in tqdm(range(0, len(images), batch_size), desc=progress, leave=False, disable=progress is None):
        x = to_float(images[start:start + batch_size].unsqueeze(1).to(device, non_blocking=True))  # (B, 1, H, W)
        inputs = x if corrupt is None else corrupt(x, range(start, start + len(x)))
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast:
            out = model(inputs, None if corrupt is None else x)
        rec, ref = to_unit(out.reconstruction), to_unit(x)
        ssims.append(ssim(rec, ref, compiled=compiled_ssim))
        psnrs.append(psnr(rec, ref))
        for name, value in out.losses.items():
            sums[name] = sums.get(name, 0.0) + value.double() * len(x)
        if start < keep:
            kept["inputs"].append(inputs.float().cpu())
            kept["outputs"].append(out.reconstruction.float().cpu())
            kept["indices"].append(out.indices.cpu())
    empty = torch.zeros(0)
    return SplitScores(torch.cat(ssims) if ssims else empty, torch.cat(psnrs) if psnrs else empty, sums,
                       *(torch.cat(v)[:keep] if v else empty for v in kept.values()))


@torch.no_grad()
def batched(fn, x: torch.Tensor, device: torch.device, batch_size: int = 64, desc: str | None = None) -> torch.Tensor:
    """fn over x in batches on `device`; the results concatenated on the CPU."""
    return torch.cat([fn(b.to(device)).cpu() for b in tqdm(x.split(batch_size), desc=desc, leave=False,
                                                              disable=desc is None)])


def encode_images(model: "VQVAE", images: torch.Tensor, device, batch_size: int = 64, desc=None,
                  amp=None) -> torch.Tensor:
    """uint8 (N, H, W) slices -> (N, h, w) code maps, under `amp` (utils.autocast) if given, as score_split runs."""
    def encode(x):
        with amp or torch.autocast(device.type, enabled=False):
            return model.encode(to_float(x.unsqueeze(1)))
    return batched(encode, images, device, batch_size, desc)


@torch.no_grad()
def prior_bits(prior: "PixelCNNPrior", codes: torch.Tensor, labels=None, batch_size: int = 64,
               amp=None) -> float:
    """Negative log-likelihood of (N, h, w) code maps under the prior, in bits per code."""
    prior.eval()
    device, nats = next(prior.parameters()).device, 0.0
    for start in range(0, len(codes), batch_size):
        x = codes[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device) if labels is not None else None
        with amp or torch.autocast(device.type, enabled=False):
            logits = prior(x, y)
        nats += F.cross_entropy(logits.float(), x, reduction="sum")
    return float(nats) / codes.numel() / math.log(2)


def encoder_features(model: "VQVAE", images: torch.Tensor, device, batch_size: int = 64) -> torch.Tensor:
    """(N, 1, H, W) images in [-1, 1] -> (N, 2D): mean and std over space of the encoder's output, the fixed
    feature space of the Frechet distance."""
    def pooled(x):
        z = model.encoder(x).float().flatten(2)  # (B, D, h*w)
        return torch.cat([z.mean(2), z.std(2)], 1)
    return batched(pooled, images, device, batch_size)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 7,
         compiled: bool = False) -> torch.Tensor:
    """Per-image mean SSIM of (B, 1, H, W) batches, equal to skimage.metrics.structural_similarity
    with its defaults (7x7 uniform window, sample covariance, K1=0.01, K2=0.03) -> (B,).

    skimage averages over the image minus a (win_size-1)/2 border, which is exactly the 'valid' region
    of a stride-1 window, so no cropping is needed. On the CPU four images at a time, so that their maps stay in
    cache (~1 MB per 256x256 image): ~3x faster than whole batches of 32. compiled=True runs the same code through
    torch.compile on the CPU (CUDA is fast as it is): a few fused loops instead of ~20 passes over memory, after a
    one-off compile per image size, so it pays off for large splits only. Where compiling fails (no C++ compiler),
    it warns once and runs eagerly."""
    x, y = x.float(), y.float()
    if x.is_cuda:
        return _ssim(x, y, data_range, win_size)
    chunk = 4
    full = len(x) - len(x) % chunk
    parts = [(_compiled_ssim if compiled else _ssim)(x[i:i + chunk], y[i:i + chunk], data_range, win_size)
             for i in range(0, full, chunk)]
    if full < len(x):  # a last, smaller chunk runs eagerly rather than compiling for its size too
        parts.append(_ssim(x[full:], y[full:], data_range, win_size))
    return torch.cat(parts)


def _ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, win_size: int) -> torch.Tensor:
    """ssim on one chunk. Four maps instead of the usual five (only var(x) + var(y) enters the formula), and the
    formula multiplied through by n^2 so that it takes the window sums as they are: with Sx = n * mean(x) over a
    window of n pixels, 2 ux uy + C1 = (2 Sx Sy + n^2 C1) / n^2 and var(x) = (n Sxx - Sx^2) / (n (n - 1))."""
    n = win_size * win_size
    cov_norm = n / (n - 1)
    c1, c2 = (0.01 * data_range * n) ** 2, (0.03 * data_range * n) ** 2
    sx, sy, sq, sxy = (window_sums(window_sums(m, -1, win_size), -2, win_size)  # (B, 1, H-6, W-6) each
                       for m in (x, y, x * x + y * y, x * y))
    p = sx * sy
    m = (sx * sx).addcmul_(sy, sy)
    numerator = (p * 2 + c1).mul_(sxy.mul_(n).sub_(p).mul_(2 * cov_norm).add_(c2))
    denominator = (m + c1).mul_(sq.mul_(n).sub_(m).mul_(cov_norm).add_(c2))
    return numerator.div_(denominator).flatten(1).mean(1)


def window_sums(m: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """Sums of every `width` consecutive entries along `dim` (the 'valid' positions, size - width + 1 of them), by
    doubling: sums of 1, 2, 4, ... entries, each from the previous, added up by the binary digits of `width`
    (7 = 4 + 2 + 1: four additions where a direct sum takes six). Only out-of-place additions of slices, which
    torch.compile fuses into one loop."""
    powers = [m]  # powers[k][i] = m[i] + ... + m[i + 2**k - 1]
    while 2 ** len(powers) <= width:
        span = 2 ** (len(powers) - 1)
        size = powers[-1].shape[dim] - span
        powers.append(powers[-1].narrow(dim, 0, size) + powers[-1].narrow(dim, span, size))
    length, total, offset = m.shape[dim] - width + 1, None, 0
    for k in reversed(range(len(powers))):
        if width >> k & 1:
            part = powers[k].narrow(dim, offset, length)
            total = part if total is None else total + part
            offset += 2 ** k
    return total


_compile_failed = False


def _compiled_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, win_size: int) -> torch.Tensor:
    global _compile_failed
    if not _compile_failed:
        try:
            return _ssim_compiled_once()(x, y, data_range, win_size)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            _compile_failed = True
            warnings.warn(f"torch.compile failed for SSIM ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "running it eagerly")
    return _ssim(x, y, data_range, win_size)


@functools.cache
def _ssim_compiled_once():
    return torch.compile(_ssim, dynamic=False)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) batches -> (B,); capped at 100 dB for identical images."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-10))).clamp(max=100)


def nearest_ssim(queries: torch.Tensor, gallery: torch.Tensor, candidates: int = 64,
                 compiled: bool = False) -> torch.Tensor:
    """For each (1, H, W) image of `queries`, its highest SSIM to any image of `gallery` (all in [0, 1]) -> (Nq,).

    SSIM is computed against the `candidates` gallery images nearest in pixel L2 distance (exact when the
    gallery is no larger), which keeps a search over a whole training split of thousands of slices cheap."""
    distances = torch.cdist(queries.flatten(1).float(), gallery.flatten(1).float())  # (Nq, Ng)
    nearest = distances.topk(min(candidates, len(gallery)), dim=1, largest=False).indices  # (Nq, candidates)
    return torch.stack([ssim(q.expand(len(i), *q.shape), gallery[i], compiled=compiled).max()
                        for q, i in zip(queries, nearest)])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, F) and (M, F), as in FID:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2).

    tr((S_a S_b)^1/2) is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    S_a^1/2 S_b S_a^1/2 (same spectrum), which needs only symmetric eigendecompositions."""
    a, b = a.double().cpu(), b.double().cpu()
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    trace_root = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + s_a.trace() + s_b.trace() - 2 * trace_root)


