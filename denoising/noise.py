"""Denoising: the noise model MRI magnitude images carry, its flag syntax, and the classical denoisers a trained
VQ-VAE is measured against.

Noise (a flag value "MODEL:SIGMA", or "MODEL:LO-HI" for a level drawn per image from [LO, HI]), on images whose
intensities span [0, 1], SIGMA a fraction of that range:

    gaussian:0.05    y = x + SIGMA n                                   n ~ N(0, 1) per pixel
    rician:0.1       y = sqrt((x + SIGMA n1)^2 + (SIGMA n2)^2)          the magnitude of a complex signal whose real
                                                                        and imaginary channels each get independent
                                                                        Gaussian noise, as in MRI magnitude images
    rician:0.03-0.25 as rician, SIGMA drawn uniformly from [0.03, 0.25] per image

then clipped to [0, 1], the range an 8-bit slice can hold. The clipping changes the noise's statistics only where
the clean intensity lies within a few SIGMA of a bound: Rician noise is never negative, so for it only bright tissue
near 1 is affected; Gaussian noise on the black background (x = 0) loses its negative half, so there its mean is
SIGMA / sqrt(2 pi) rather than 0.

The noise of an image depends only on a seed and the image's key (its row in the split; in training also the
epoch), never on the batch it is drawn in or the device: numpy's Generator seeded with (seed..., key) per image.

Classical denoisers (scikit-image's non-local means, total variation and wavelet denoising; BM3D when the optional
`bm3d` package is installed): each is set from the noise level it estimates itself on the noisy slice
(skimage.restoration.estimate_sigma), times a factor per method chosen on the validation split (STRENGTH).
"""
import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from imaging.slices import to_unit, unit_to_float
from utils import UserError

NOISE_MODELS = ("rician", "gaussian")
NOISE_SYNTAX = "MODEL:SIGMA or MODEL:LO-HI, MODEL rician or gaussian, 0 < SIGMA < 1 (e.g. rician:0.1, rician:0.05-0.2)"


# ---------------------------------------------------------------------------------------------------------
# Noise model
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Noise:
    model: str   # rician or gaussian
    low: float   # SIGMA, or the lower end of its range
    high: float  # = low for a fixed level

    def __str__(self):
        return f"{self.model}:{self.low:g}" + (f"-{self.high:g}" if self.high != self.low else "")

    def sigma(self, rng: np.random.Generator) -> float:
        return self.low if self.high == self.low else float(rng.uniform(self.low, self.high))

    def apply(self, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One float32 image (H, W) in [0, 1] -> its noisy version in [0, 1], drawn from `rng`."""
        s = np.float32(self.sigma(rng))
        real = clean + s * rng.standard_normal(clean.shape, dtype=np.float32)
        if self.model == "rician":
            real = np.hypot(real, s * rng.standard_normal(clean.shape, dtype=np.float32))
        return np.clip(real, 0, 1)


def parse_noise(spec: str, flag: str = "--noise") -> Noise:
    """'rician:0.1', 'gaussian:5e-2' or 'rician:0.05-0.2' -> Noise, each level read as Python's float() reads a
    number; UserError in one line otherwise."""
    match = re.fullmatch(r"\s*(\w+)\s*:(.+)", str(spec))
    if not match:
        raise UserError(f"{flag} {spec!r} is not {NOISE_SYNTAX}")
    model = match.group(1).lower()
    if model not in NOISE_MODELS:
        raise UserError(f"{flag} {spec!r}: unknown noise model {match.group(1)!r}; choose rician or gaussian")
    levels = noise_levels(match.group(2))
    if levels is None:
        raise UserError(f"{flag} {spec!r}: the level is not a number; it takes {NOISE_SYNTAX}")
    for sigma in levels:
        if not (math.isfinite(sigma) and 0 < sigma < 1):
            raise UserError(f"{flag} {spec!r}: SIGMA must be a fraction of the intensity range, 0 < SIGMA < 1, "
                            f"got {sigma:g}")
    low, high = levels
    if high < low:
        raise UserError(f"{flag} {spec!r}: a range LO-HI needs LO <= HI")
    return Noise(model, low, high)


def noise_levels(text: str) -> tuple[float, float] | None:
    """'SIGMA' -> (SIGMA, SIGMA), 'LO-HI' -> (LO, HI), each number as float() reads it (5e-2 too: the range's dash
    is the one with a number on either side); None if the text is neither."""
    splits = [(text, text)] + [(text[:i], text[i + 1:]) for i in range(1, len(text)) if text[i] == "-"]
    for low, high in splits:
        try:
            return float(low), float(high)
        except ValueError:
            continue
    return None


def add_noise(x: torch.Tensor, noise: Noise, seed: Sequence[int], keys: Sequence[int]) -> torch.Tensor:
    """(B, 1, H, W) images in [-1, 1] -> noisy ones on the same device; image b's noise is drawn from a Generator
    seeded with (*seed, keys[b]), so it is the same in any batch, order or device."""
    clean = to_unit(x.detach()).cpu().numpy()  # (B, 1, H, W) in [0, 1]
    noisy = np.stack([noise.apply(c[0], np.random.default_rng([*seed, int(k)]))[None] for c, k in zip(clean, keys)])
    return unit_to_float(torch.from_numpy(noisy)).to(x.device, x.dtype)


def is_noise_spec(spec: str) -> bool:
    try:
        parse_noise(spec)
        return True
    except UserError:
        return False


# ---------------------------------------------------------------------------------------------------------
# Classical denoisers
# ---------------------------------------------------------------------------------------------------------
# Each denoises one float64 (H, W) slice in [0, 1] at a strength s = factor x the noise level the slice's own
# wavelet estimate gives (skimage.restoration.estimate_sigma). On MRI slices that estimate runs low (most of a slice
# is background, where Rician noise is Rayleigh and shrunk), so the factor is chosen on validation slices carrying
# the same noise (denoising.benchmark.choose_factor), from FACTORS.

FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
SLOW_FACTORS = (1.0, 1.5, 2.0)  # BM3D: ~10 s per 256x256 slice on one core, so a shorter search


def _nl_means(noisy: np.ndarray, s: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means
    # scikit-image's recommended settings when sigma is given: h ~ 0.8 sigma, 5x5 patches searched 6 pixels away.
    return denoise_nl_means(noisy, h=0.8 * s, sigma=s, patch_size=5, patch_distance=6, fast_mode=True)


def _total_variation(noisy: np.ndarray, s: float) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle
    return denoise_tv_chambolle(noisy, weight=s)


def _wavelet(noisy: np.ndarray, s: float) -> np.ndarray:
    from skimage.restoration import denoise_wavelet
    return denoise_wavelet(noisy, sigma=s, method="BayesShrink", mode="soft", rescale_sigma=True)


def _bm3d(noisy: np.ndarray, s: float) -> np.ndarray:
    import bm3d
    return bm3d.bm3d(noisy, sigma_psd=s)


@dataclass(frozen=True)
class ClassicalDenoiser:
    name: str
    label: str
    run: Callable[[np.ndarray, float], np.ndarray]  # (noisy slice, strength) -> denoised slice
    slow: bool = False

    @property
    def factors(self) -> tuple:
        return SLOW_FACTORS if self.slow else FACTORS

    @property
    def tuning_slices(self) -> int:
        """How many validation slices choose the factor."""
        return 2 if self.slow else 8

    def __call__(self, noisy: np.ndarray, factor: float) -> np.ndarray:
        """float32 (H, W) in [0, 1] -> the denoised float32 (H, W) in [0, 1]."""
        from skimage.restoration import estimate_sigma
        noisy = noisy.astype(np.float64)
        strength = max(factor * float(estimate_sigma(noisy)), 1e-4)  # a flat slice estimates 0
        return np.clip(self.run(noisy, strength), 0, 1).astype(np.float32)


CLASSICAL_DENOISERS = {c.name: c for c in (ClassicalDenoiser("nlm", "non-local means", _nl_means),
                                           ClassicalDenoiser("tv", "total variation", _total_variation),
                                           ClassicalDenoiser("wavelet", "wavelet (BayesShrink)", _wavelet),
                                           ClassicalDenoiser("bm3d", "BM3D", _bm3d, slow=True))}


def available_denoisers(names: Sequence[str]) -> list[ClassicalDenoiser]:
    """The classical denoisers of `names` that can run here; one line says so where bm3d is not installed."""
    chosen = [CLASSICAL_DENOISERS[n] for n in names]
    if any(c.name == "bm3d" for c in chosen):
        try:
            import bm3d  # noqa: F401
        except ImportError:
            print("note: BM3D skipped: the optional bm3d package is not installed (pip install bm3d)")
            chosen = [c for c in chosen if c.name != "bm3d"]
    return chosen


def run_denoiser(method: ClassicalDenoiser, noisy: np.ndarray, factor: float, desc: str | None = None
                 ) -> tuple[np.ndarray, float]:
    """float32 (N, H, W) noisy slices in [0, 1] -> (denoised (N, H, W), mean seconds per slice)."""
    out, start = np.empty_like(noisy), time.perf_counter()
    for i in tqdm(range(len(noisy)), desc=desc, leave=False, disable=desc is None):
        out[i] = method(noisy[i], factor)
    return out, (time.perf_counter() - start) / max(len(noisy), 1)
