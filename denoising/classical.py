"""The classical denoisers a trained VQ-VAE is measured against, run as predict.py --noise runs them: scikit-image's
non-local means, total variation and wavelet denoising, BM3D when the optional `bm3d` package is installed, and the
two the MRI literature runs on magnitude images (denoising.rician): non-local means with Rician bias correction and
BM3D inside Foi's variance-stabilising transform; and a pool of worker processes to run them in. No torch here: a
worker process imports only this, numpy, scipy and scikit-image.
"""
import multiprocessing
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from denoising.rician import bm3d_vst, nlm_rician, rician_sigma

# Each denoises one float64 (H, W) slice in [0, 1] from the noise level sigma it estimates on the slice itself and a
# strength factor chosen on validation slices carrying the same noise (denoising.benchmark.choose_factor). The
# Gaussian-noise methods run at a strength factor x sigma, sigma their wavelet estimate
# (skimage.restoration.estimate_sigma), which on MRI slices runs low (most of a slice is background, where Rician
# noise is Rayleigh and shrunk); the factor makes up for it. The Rician methods read sigma off the background
# (rician_sigma, within 1 % on OASIS) and use it as the noise model's sigma; their factor scales only the smoothing.

FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
SLOW_FACTORS = (1.0, 1.5, 2.0)  # BM3D: ~6 s per 256x256 slice on one core, so a shorter search
RICIAN_NLM_FACTORS = (0.4, 0.5, 0.6, 0.75, 1.0, 1.5)  # x sigma itself: best 0.6-0.75 on OASIS validate
VST_FACTORS = (0.9, 1.0, 1.1, 1.25)  # BM3D's sigma_psd on the stabilised slice (noise std 1); 0.75 is far worse


def _at_strength(denoise: Callable[[np.ndarray, float], np.ndarray], noisy: np.ndarray, sigma: float,
                 factor: float) -> np.ndarray:
    """A denoiser of Gaussian noise at strength s, run at s = factor x sigma."""
    return denoise(noisy, factor * sigma)


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


def wavelet_sigma(noisy: np.ndarray) -> float:
    from skimage.restoration import estimate_sigma
    return float(estimate_sigma(noisy))


@dataclass(frozen=True)
class ClassicalDenoiser:
    name: str
    label: str
    run: Callable[[np.ndarray, float, float], np.ndarray]  # (noisy slice, its sigma, factor) -> denoised slice
    sigma: Callable[[np.ndarray], float] = wavelet_sigma    # noisy slice -> its noise level
    factors: tuple = FACTORS                                # the strength factors choose_factor tries
    slow: bool = False                                      # run on --slow-baseline-slices only
    package: str | None = None                              # an optional package it needs

    @property
    def tuning_slices(self) -> int:
        """How many validation slices choose the factor."""
        return 4 if self.slow else 8

    def __call__(self, noisy: np.ndarray, factor: float) -> np.ndarray:
        """float32 (H, W) in [0, 1] -> the denoised float32 (H, W) in [0, 1]."""
        noisy = noisy.astype(np.float64)
        sigma = max(self.sigma(noisy), 1e-4)  # a flat slice estimates 0
        return np.clip(self.run(noisy, sigma, factor), 0, 1).astype(np.float32)


CLASSICAL_DENOISERS = {c.name: c for c in (
    ClassicalDenoiser("nlm", "non-local means", partial(_at_strength, _nl_means)),
    ClassicalDenoiser("tv", "total variation", partial(_at_strength, _total_variation)),
    ClassicalDenoiser("wavelet", "wavelet (BayesShrink)", partial(_at_strength, _wavelet)),
    ClassicalDenoiser("bm3d", "BM3D", partial(_at_strength, _bm3d), factors=SLOW_FACTORS, slow=True, package="bm3d"),
    ClassicalDenoiser("nlm-rician", "non-local means, Rician bias-corrected (Manjon 2008)", nlm_rician,
                      sigma=rician_sigma, factors=RICIAN_NLM_FACTORS),
    ClassicalDenoiser("bm3d-vst", "BM3D, Rician VST (Foi 2011)", bm3d_vst, sigma=rician_sigma,
                      factors=VST_FACTORS, slow=True, package="bm3d"))}


def available_denoisers(names: Sequence[str]) -> list[ClassicalDenoiser]:
    """The classical denoisers of `names` that can run here; one line names those left out for a missing package."""
    chosen = [CLASSICAL_DENOISERS[n] for n in names]
    missing = {c.package for c in chosen if c.package and not installed(c.package)}
    for package in sorted(missing):
        skipped = [c.name for c in chosen if c.package == package]
        print(f"note: {', '.join(skipped)} skipped: the optional {package} package is not installed "
              f"(pip install {package})")
    return [c for c in chosen if c.package not in missing]


def installed(package: str) -> bool:
    """Whether `package` imports here."""
    try:
        __import__(package)
        return True
    except ImportError:
        return False


@contextmanager
def denoiser_pool(workers: int):
    """`workers` processes for run_denoiser (each denoiser runs on one thread), or None (run here) for one. On the
    way out the workers finish and exit; an error or interrupt terminates them instead."""
    if workers <= 1:
        yield None
        return
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_pool_worker)
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()


def _pool_worker():
    """A denoiser_pool process: SIGTERM back to its default, since a signal the parent ignores (as a finished
    command does: utils.exits_with_one_line) stays ignored across exec, and Pool.terminate sends it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_denoiser(method: ClassicalDenoiser, noisy: np.ndarray, factor: float, desc: str | None = None, pool=None
                 ) -> tuple[np.ndarray, float]:
    """float32 (N, H, W) noisy slices in [0, 1] -> (denoised (N, H, W), mean seconds a slice took in the process
    that ran it, on one core where `pool` is denoiser_pool's), the slices spread over `pool`'s processes."""
    jobs = [(method, image, factor) for image in noisy]
    done = pool.imap(_timed, jobs) if pool is not None else map(_timed, jobs)
    out, seconds = np.empty_like(noisy), []
    for i, (denoised, took) in enumerate(tqdm(done, total=len(jobs), desc=desc, leave=False, disable=desc is None)):
        out[i] = denoised
        seconds.append(took)
    return out, float(np.mean(seconds)) if seconds else 0.0


def _timed(job: tuple) -> tuple[np.ndarray, float]:
    method, noisy, factor = job
    start = time.perf_counter()
    return method(noisy, factor), time.perf_counter() - start
