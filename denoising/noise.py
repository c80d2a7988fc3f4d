"""Denoising: the noise model MRI magnitude images carry and its flag syntax (the classical denoisers a trained
VQ-VAE is measured against: denoising.classical).

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
"""
import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

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
