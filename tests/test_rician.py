"""Rician-aware denoising: the stabilising transform's variance and exact unbiased inverse, the noise level read off
the background, the bias-corrected non-local means' mean on a constant image, BM3D inside the transform (a stand-in
for the bm3d package), and the one line when bm3d is missing."""
import math
import sys
import types

import numpy as np
import pytest
from scipy.ndimage import uniform_filter
from scipy.stats import rice

from denoising import rician
from denoising.classical import CLASSICAL_DENOISERS, available_denoisers, wavelet_sigma
from denoising.noise import Noise


def rician_image(nu, sigma: float, shape=(64, 64), seed=0) -> np.ndarray:
    """The repo's Rician noise (Noise.apply) on a float image of intensity `nu` (a number or an (H, W) array)."""
    clean = np.broadcast_to(np.asarray(nu, dtype=np.float32), shape)
    return Noise("rician", sigma, sigma).apply(clean, np.random.default_rng(seed)).astype(np.float64)


def phantom(size=96) -> np.ndarray:
    """A disc of tissue (0.3 to 0.7, a ring and a core) on a black background, like a slice: (size, size)."""
    r = np.hypot(*np.mgrid[-1:1:size * 1j, -1:1:size * 1j])
    return np.where(r < 0.7, 0.3, 0) + np.where(r < 0.4, 0.4, 0)


@pytest.mark.parametrize("nu", [0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 40.0])
def test_the_stabilised_rician_variable_has_unit_variance_and_the_exact_inverse_of_its_mean_is_nu(nu):
    vst = rician.rician_vst()
    z = np.linspace(0, nu + 12, 24001)  # an independent quadrature: scipy's Rician density, sigma = 1
    density = rice.pdf(z, b=nu) if nu > 0 else z * np.exp(-z ** 2 / 2)
    density /= np.trapezoid(density, z)
    f = vst.forward(z)
    mean = np.trapezoid(density * f, z)
    assert math.sqrt(np.trapezoid(density * (f - mean) ** 2, z)) == pytest.approx(1, abs=0.02)
    assert vst.inverse(np.array(mean)) == pytest.approx(nu, abs=0.01)


def test_the_exact_inverse_recovers_a_dark_level_that_inverting_the_transform_itself_overshoots():
    sigma, nu = 0.1, 0.1  # one sigma: the Rician bias is large
    vst = rician.rician_vst()
    stabilised = vst.forward(rician_image(nu, sigma, (256, 256)) / sigma)
    mean = stabilised.mean()  # what an ideal denoiser of a flat region returns
    assert sigma * vst.inverse(np.array(mean)) == pytest.approx(nu, abs=0.01)
    assert sigma * np.interp(mean, vst.f, vst.z) > nu + 0.015  # f's own inverse keeps some of the bias


def test_the_noise_level_is_read_off_the_background_where_the_wavelet_estimate_runs_low():
    for sigma in (0.02, 0.1, 0.2):
        noisy = rician_image(phantom(), sigma, (96, 96))
        assert rician.rician_sigma(noisy) == pytest.approx(sigma, rel=0.05)
        assert wavelet_sigma(noisy) < 0.9 * sigma


def test_bias_corrected_nlm_recovers_the_level_of_a_constant_image_under_rician_noise():
    sigma, nu = 0.1, 0.1
    noisy = rician_image(nu, sigma)
    corrected = rician.nlm_rician(noisy, sigma, 1.0).mean()
    plain = CLASSICAL_DENOISERS["nlm"].run(noisy, sigma, 1.0).mean()
    assert abs(corrected - nu) < 0.01 and plain - nu > 0.04  # the plain mean is E[z] ~ 1.55 sigma


def test_bm3d_inside_the_transform_returns_an_unbiased_flat_image(monkeypatch):
    seen = []

    def flat_bm3d(z, sigma_psd):
        """A stand-in for BM3D that removes the noise of a flat image: a wide mean."""
        seen.append(sigma_psd)
        return uniform_filter(z, 31, mode="reflect")
    monkeypatch.setitem(sys.modules, "bm3d", types.SimpleNamespace(bm3d=flat_bm3d))
    noisy = rician_image(0.15, 0.1)
    out = rician.bm3d_vst(noisy, 0.1, 1.25)
    assert seen == [1.25] and out.shape == noisy.shape
    assert out.mean() == pytest.approx(0.15, abs=0.005) and noisy.mean() > 0.18


def test_without_bm3d_both_bm3d_methods_are_skipped_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bm3d", None)
    chosen = available_denoisers(["nlm-rician", "bm3d", "bm3d-vst"])
    assert [c.name for c in chosen] == ["nlm-rician"]
    assert capsys.readouterr().out == ("note: bm3d, bm3d-vst skipped: the optional bm3d package is not installed "
                                       "(pip install bm3d)\n")


def test_the_rician_methods_say_rician_in_their_labels():
    assert all("Rician" in CLASSICAL_DENOISERS[name].label for name in ("nlm-rician", "bm3d-vst"))
