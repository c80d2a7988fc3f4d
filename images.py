"""What every module agrees on about a slice image, in torch only (nothing of this project is imported here):

- pixel conventions: uint8 (N, H, W) as decoded, float in [-1, 1] as the models see it, [0, 1] as it is scored,
  and the conversions between them (to_float, to_unit, to_uint8);
- SliceDataset, one split's decoded slices in memory, and the names shared by every loader (SPLITS, SLICE_AXES,
  IMAGE_SUFFIXES, the image-size limits, natural_key);
- SSIM and PSNR, batched in torch: the scores of every command and the SSIM term of the training loss.
"""
import functools
import re
import warnings

import torch

SPLITS = ("train", "validate", "test")
SLICE_AXES = ("axial", "coronal", "sagittal")  # nifti: the anatomical axis slices are cut across
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # slice image files, compared in lower case
MAX_IMAGE_SIDE = 8192  # pixels per side of any image read, resized to or declared by a .vqz file
MIN_IMAGE_SIDE = 8  # SSIM's 7x7 window, and the model's downsampling of the default preset (2^3)


def natural_key(name: str) -> list:
    """Sort key of natural order: case_2 before case_10. Case-sensitive (Z before a): the order of patients and
    subjects seeds the carved validation and test splits, which a checkpoint re-derives rather than stores."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------------------------------------
# Pixel conventions
# ---------------------------------------------------------------------------------------------------------

def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W) -> float32 in [-1, 1]."""
    return images_uint8.float() / 127.5 - 1


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] float32, clamped."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 in 0..255, rounded: the 8-bit image a reconstruction is when written to a file."""
    return torch.round(to_unit(x) * 255).to(torch.uint8)


class SliceDataset(torch.utils.data.Dataset):
    """Decoded 2D slices of one split; items are (float32 (1, H, W) image in [-1, 1], int label)."""

    def __init__(self, images, labels, class_names, patients, files, name, split, volumes=None, masks=None):
        self.images = images  # uint8 (N, H, W)
        self.masks = masks  # uint8 (N, H, W) tissue classes 0..3 (build_dataset(..., masks=True)), else None
        self.labels = labels  # int64 (N,)
        self.class_names = class_names
        self.patients = patients
        self.files = files
        self.name = name
        self.split = split
        self.volumes = volumes  # nifti: a nifti.Volume per volume, in row order (where its slices are, how to write
        # a reconstruction back); None for datasets of slice images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return to_float(self.images[i]).unsqueeze(0), int(self.labels[i])

    @property
    def image_shape(self):
        return tuple(self.images.shape[1:])

    def subset(self, rows: torch.Tensor) -> "SliceDataset":
        """The slices at `rows` (int64 (n,)), with their masks, labels, patients and files; without the volumes,
        whose slices a subset no longer holds whole."""
        picked = rows.tolist()
        return SliceDataset(self.images[rows], self.labels[rows], self.class_names,
                            [self.patients[i] for i in picked], [self.files[i] for i in picked], self.name,
                            self.split, masks=None if self.masks is None else self.masks[rows])


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
