"""SSIM and PSNR, batched in torch: the scores of every command and the SSIM term of the training loss."""
import functools
import warnings

import torch

# ---------------------------------------------------------------------------------------------------------
# Similarity: SSIM and PSNR (images in [0, 1] unless data_range says otherwise)
# ---------------------------------------------------------------------------------------------------------

def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 7,
         compiled: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image mean SSIM of (B, 1, H, W) batches, equal to skimage.metrics.structural_similarity
    with its defaults (7x7 uniform window, sample covariance, K1=0.01, K2=0.03) -> (B,).

    With a (B, 1, H, W) boolean `mask` (the brain): the SSIM inside it, in_mask_ssim's definition.

    skimage averages over the image minus a (win_size-1)/2 border, which is exactly the 'valid' region
    of a stride-1 window, so no cropping is needed. On the CPU four images at a time, so that their maps stay in
    cache (~1 MB per 256x256 image): ~3x faster than whole batches of 32. compiled=True runs the same code through
    torch.compile on the CPU (CUDA is fast as it is): a few fused loops instead of ~20 passes over memory, after a
    one-off compile per image size, so it pays off for large splits only. Where compiling fails (no C++ compiler),
    it warns once and runs eagerly."""
    x, y = x.float(), y.float()
    if mask is not None:
        return in_mask_ssim(x, y, mask, data_range, win_size)
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
    return ssim_map(x, y, data_range, win_size).flatten(1).mean(1)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 7) -> torch.Tensor:
    """(B, 1, H, W) pairs -> (B, 1, H - win_size + 1, W - win_size + 1): the SSIM of the window centred on each
    pixel that has a whole window (its mean is ssim()). Four maps instead of the usual five (only var(x) + var(y)
    enters the formula), and the formula multiplied through by n^2 so that it takes the window sums as they are:
    with Sx = n * mean(x) over a window of n pixels, 2 ux uy + C1 = (2 Sx Sy + n^2 C1) / n^2 and
    var(x) = (n Sxx - Sx^2) / (n (n - 1))."""
    n = win_size * win_size
    cov_norm = n / (n - 1)
    c1, c2 = (0.01 * data_range * n) ** 2, (0.03 * data_range * n) ** 2
    sx, sy, sq, sxy = (window_sums(window_sums(m, -1, win_size), -2, win_size)  # (B, 1, H-6, W-6) each
                       for m in (x, y, x * x + y * y, x * y))
    p = sx * sy
    m = (sx * sx).addcmul_(sy, sy)
    numerator = (p * 2 + c1).mul_(sxy.mul_(n).sub_(p).mul_(2 * cov_norm).add_(c2))
    denominator = (m + c1).mul_(sq.mul_(n).sub_(m).mul_(cov_norm).add_(c2))
    return numerator.div_(denominator)


def centre_crop_of_windows(mask: torch.Tensor, win_size: int = 7) -> torch.Tensor:
    """(..., H, W) -> (..., H - win_size + 1, W - win_size + 1): the mask at the centres of ssim_map's windows."""
    r = (win_size - 1) // 2
    return mask[..., r:mask.shape[-2] - r, r:mask.shape[-1] - r]


def in_mask_ssim(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, data_range: float = 1.0,
                 win_size: int = 7) -> torch.Tensor:
    """SSIM inside a region (the brain) of (B, 1, H, W) images in [0, data_range], with a boolean mask of that
    shape -> (B,): both images are set to 0 (black) outside the mask, and the SSIM map is averaged over the windows
    centred on mask pixels. So only pixels inside the mask count (a change outside it leaves the score as it is),
    the windows at the region's edge see its outline against black, as a skull-stripped image does, and an
    all-ones mask gives ssim() exactly. NaN for an image whose mask has no window centre (an empty mask)."""
    keep = mask.to(x.dtype)
    chunks = [ssim_map(x[i:i + 4] * keep[i:i + 4], y[i:i + 4] * keep[i:i + 4], data_range, win_size)
              for i in range(0, len(x), 4)]  # four at a time, as ssim() does, for the cache
    weights = centre_crop_of_windows(keep, win_size).flatten(1)
    total = torch.cat(chunks).flatten(1).mul(weights).sum(1) if chunks else x.new_zeros(0)
    return total / weights.sum(1)  # 0 / 0 = NaN where the mask is empty


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


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) batches -> (B,); capped at 100 dB for identical images. With a boolean
    `mask` of the same shape: the mean squared error over its pixels only (NaN where it has none)."""
    error = (x.float() - y.float()).pow(2).flatten(1)
    if mask is None:
        mse = error.mean(1)
    else:
        keep = mask.flatten(1).to(error.dtype)
        mse = (error * keep).sum(1) / keep.sum(1)
    return (10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-10))).clamp(max=100)
