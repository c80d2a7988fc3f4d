"""SSIM and PSNR, batched in torch: the scores of every command and the SSIM term of the training loss."""
import functools
import warnings

import torch

# ---------------------------------------------------------------------------------------------------------
# Similarity: SSIM and PSNR (images in [0, 1] unless data_range says otherwise)
# ---------------------------------------------------------------------------------------------------------

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
