"""Denoising: the noise model's statistics and seeding, the noise flags' bad values, a denoising VQ-VAE trained and
scored against classical denoisers end to end on demo data, and the classical denoisers' worker processes."""
import json
import math
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.special import i0e, i1e

import predict
import train
from denoising import classical
from denoising.noise import Noise, add_noise, parse_noise
from helpers import assert_one_line_error, interrupted_in_second_call, run_main, tiny_args
from training.checkpoints import load_checkpoint
from utils import read_csv


def constant(value: float, n: int = 4, size: int = 256) -> torch.Tensor:
    """(n, 1, size, size) images of one intensity `value` in [0, 1], as [-1, 1] model inputs."""
    return torch.full((n, 1, size, size), value * 2 - 1)


def noisy_unit(x: torch.Tensor, spec: str, seed=(0,), keys=None) -> torch.Tensor:
    return (add_noise(x, parse_noise(spec), seed, range(len(x)) if keys is None else keys) + 1) / 2


def rician_moments(nu: float, sigma: float) -> tuple[float, float]:
    """Mean and variance of |nu + sigma (n1 + i n2)|: sigma sqrt(pi/2) L_1/2(-nu^2 / 2 sigma^2) and
    2 sigma^2 + nu^2 - mean^2, the Laguerre polynomial through exponentially scaled Bessel functions."""
    x = -nu ** 2 / (2 * sigma ** 2)
    laguerre = (1 - x) * i0e(-x / 2) - x * i1e(-x / 2)  # exp(x/2) folded into i0e, i1e
    mean = sigma * math.sqrt(math.pi / 2) * laguerre
    return mean, 2 * sigma ** 2 + nu ** 2 - mean ** 2


# ---------------------------------------------------------------------------------------------------------
# Noise model
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nu, sigma", [(0.0, 0.1), (0.05, 0.1), (0.3, 0.1), (0.5, 0.02)])
def test_rician_noise_on_a_constant_image_has_the_closed_form_mean_and_variance(nu, sigma):
    y = noisy_unit(constant(nu), f"rician:{sigma}").double()  # 4 x 65536 pixels; nu + 5 sigma < 1: no clipping
    mean, var = rician_moments(nu, sigma)
    assert y.mean().item() == pytest.approx(mean, abs=4 * math.sqrt(var / y.numel()))
    assert y.var().item() == pytest.approx(var, rel=0.02)
    assert nu > 0.2 or y.mean().item() > nu + 0.3 * sigma  # the Rician bias: dark tissue comes out brighter


def test_gaussian_noise_on_mid_grey_has_zero_mean_and_variance_sigma_squared():
    y = noisy_unit(constant(0.5), "gaussian:0.05").double()
    assert y.mean().item() == pytest.approx(0.5, abs=4 * 0.05 / math.sqrt(y.numel()))
    assert y.var().item() == pytest.approx(0.05 ** 2, rel=0.02)


def test_noise_is_clipped_to_the_intensity_range_which_biases_it_at_the_bounds():
    black, white = noisy_unit(constant(0.0), "gaussian:0.1"), noisy_unit(constant(1.0), "rician:0.1")
    assert black.min() == 0 and white.max() == 1 and 0 <= black.max() <= 1 and 0 <= white.min() <= 1
    assert black.double().mean().item() == pytest.approx(0.1 / math.sqrt(2 * math.pi), rel=0.03)  # a half-normal


def test_an_images_noise_depends_on_the_seed_and_its_key_not_on_its_batch():
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    together = add_noise(x, parse_noise("rician:0.05-0.2"), (7,), [0, 1, 2])
    apart = add_noise(x[[2, 0]], parse_noise("rician:0.05-0.2"), (7,), [2, 0])
    assert torch.equal(together[[2, 0]], apart)
    assert not torch.equal(together, add_noise(x, parse_noise("rician:0.05-0.2"), (8,), [0, 1, 2]))
    assert not torch.equal(together[0], add_noise(x[:1], parse_noise("rician:0.05-0.2"), (7,), [1])[0])


def test_a_range_draws_a_level_per_image_within_it():
    y = noisy_unit(constant(0.0, n=32, size=64), "rician:0.05-0.2").double()
    sigmas = y.flatten(1).mean(1) / math.sqrt(math.pi / 2)  # Rayleigh: mean = sigma sqrt(pi / 2)
    assert sigmas.min() > 0.045 and sigmas.max() < 0.21 and sigmas.std() > 0.02


def test_noise_specs_parse_and_print_back():
    assert parse_noise("rician:0.1") == Noise("rician", 0.1, 0.1)
    assert parse_noise("Gaussian:0.05") == Noise("gaussian", 0.05, 0.05)
    assert parse_noise("rician:0.05-0.2") == Noise("rician", 0.05, 0.2)
    assert [str(parse_noise(s)) for s in ("rician:0.10", "rician:0.05-0.2")] == ["rician:0.1", "rician:0.05-0.2"]


BAD_NOISE = [("poisson:0.1", "unknown noise model 'poisson'"), ("rician:0", "0 < SIGMA < 1, got 0"),
             ("rician:1", "0 < SIGMA < 1, got 1"), ("gaussian:1.5", "got 1.5"), ("rician:nan", "got nan"),
             ("rician:-0.1", "0 < SIGMA < 1, got -0.1"), ("rician", "is not MODEL:SIGMA"),
             ("rician:abc", "not a number"), ("rician:0.2-0.1", "LO <= HI"), ("rician:0.1-1", "got 1")]


@pytest.mark.parametrize("spec, message", BAD_NOISE)
def test_bad_noise_flags_exit_with_one_line(spec, message, demo_root, tmp_path, capsys):
    r = run_main(predict.main, ["--checkpoint", tmp_path / "none.pt", "--noise", spec], capsys)
    assert r.returncode == 2
    assert_one_line_error(r.stderr, f"--noise {spec!r}", message)
    r = run_main(train.main, tiny_args(demo_root, tmp_path / "run", "--train-noise", spec), capsys)
    assert r.returncode == 2
    assert_one_line_error(r.stderr, f"--train-noise {spec!r}", message)
    assert not (tmp_path / "run").exists()


def test_noise_goes_with_a_split_only(tmp_path, capsys):
    r = run_main(predict.main, ["--noise", "rician:0.1", "--volumes", "scan.nii.gz"], capsys)
    assert_one_line_error(r, "--noise corrupts and scores a split")


@pytest.mark.parametrize("flags", [["--seed", "3"], ["--baselines", "tv"], ["--baselines"],
                                   ["--slow-baseline-slices", "2"], ["--workers", "2"]])
def test_a_setting_of_the_denoising_without_noise_is_refused(flags, capsys):
    r = run_main(predict.main, ["--checkpoint", "runs/X", *flags], capsys)
    assert_one_line_error(r, f"{flags[0]} is a setting of --noise's denoising; pass --noise too, or leave it out")


# ---------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def denoising_run(demo_root, tmp_path_factory):
    """A tiny VQ-VAE trained 2 epochs to denoise demo slices (figures drawn for the last epoch only)."""
    out = tmp_path_factory.mktemp("denoise") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "FIGURES_EVERY_S", 3600.0)
        train.main(tiny_args(demo_root, out, "--epochs", "2", "--train-noise", "rician:0.05-0.2"))
    return out


def test_the_checkpoint_records_the_training_noise(denoising_run):
    assert load_checkpoint(denoising_run / "best.pt")["train_config"]["train_noise"] == "rician:0.05-0.2"
    assert json.loads((denoising_run / "config.json").read_text())["train"]["train_noise"] == "rician:0.05-0.2"


def test_a_resumed_denoising_run_draws_the_same_noise_as_an_uninterrupted_one(denoising_run, demo_root, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(train, "FIGURES_EVERY_S", 3600.0)
    real_epoch = train.train_epoch
    monkeypatch.setattr(train, "train_epoch", interrupted_in_second_call(real_epoch))
    with pytest.raises(SystemExit):
        train.main(tiny_args(demo_root, tmp_path / "run", "--epochs", "2", "--train-noise", "rician:0.05-0.2"))
    monkeypatch.setattr(train, "train_epoch", real_epoch)
    train.main(["--resume", str(tmp_path / "run" / "last.pt")])
    a, b = (load_checkpoint(run / "last.pt") for run in (denoising_run, tmp_path / "run"))
    assert b["epoch"] == 2 and b["train_config"]["train_noise"] == "rician:0.05-0.2"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_validation_in_training_is_the_denoising_of_fixed_noisy_slices_against_clean(denoising_run, tmp_path):
    summary = predict.main(["--checkpoint", str(denoising_run / "best.pt"), "--split", "validate", "--noise",
                            "rician:0.05-0.2", "--seed", "0", "--baselines", "--out", str(tmp_path)])
    row = read_csv(denoising_run / "metrics.csv")[load_checkpoint(denoising_run / "best.pt")["epoch"] - 1]
    assert summary["ours"]["ssim"]["mean"] == pytest.approx(row["val_ssim"], abs=1e-6)
    assert summary["ours"]["psnr"]["mean"] == pytest.approx(row["val_psnr"], abs=1e-4)


def test_predict_noise_scores_the_model_beside_the_noisy_input_and_classical_denoisers(denoising_run, tmp_path,
                                                                                       capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bm3d", None)  # not installed: skipped with one line
    argv = ["--checkpoint", denoising_run, "--noise", "rician:0.1", "--slow-baseline-slices", "2",
            "--out", tmp_path / "a"]
    r = run_main(predict.main, argv, capsys)
    assert r.returncode == 0, r.stderr
    assert "note: bm3d, bm3d-vst skipped: the optional bm3d package is not installed (pip install bm3d)" in r.stdout
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["noise"] == "rician:0.1" and summary["trained_with_noise"] == "rician:0.05-0.2"
    assert set(summary["classical"]) == {"nlm", "tv", "wavelet", "nlm-rician"}
    assert summary["best_classical"] in summary["classical"]
    for name, c in summary["classical"].items():
        assert c["slices"] == 4 and c["seconds_per_slice"] > 0
        assert c["factor"] in classical.CLASSICAL_DENOISERS[name].factors
        assert c["ssim"]["mean"] > summary["noisy"]["ssim"]["mean"], name  # each one removes noise
        assert c["chosen_by"] == "mean in-brain SSIM on the validation slices"
        tried = c["validation_ssim_brain_by_factor"]  # JSON's keys are strings
        assert str(c["factor"]) == max(tried, key=tried.get)
    assert summary["classical"]["nlm-rician"]["sigma_estimate"] == "rician_sigma"
    assert summary["classical"]["nlm"]["sigma_estimate"] == "wavelet_sigma"
    rows = read_csv(tmp_path / "a" / "per_image.csv")
    assert len(rows) == 4 and list(rows[0]) == ["file"] + [f"{key}_{metric}" for key in ("noisy", "ours", "nlm", "tv",
                                                                                           "wavelet", "nlm-rician")
                                                          for metric in ("ssim", "psnr", "ssim_brain", "psnr_brain")]
    for metric in ("ssim", "ssim_brain", "psnr_brain"):
        assert np.mean([r[f"ours_{metric}"] for r in rows]) == pytest.approx(summary["ours"][metric]["mean"], abs=1e-4)
    assert summary["brain_mask"].startswith("true")  # the demo ships its tissue masks
    assert (tmp_path / "a" / "denoising.png").is_file()

    # A slow denoiser (BM3D's kind, here total variation marked slow: BM3D takes >1 s even on a 32x32 slice) runs
    # on the seeded subset only, on the same noisy slices.
    monkeypatch.setitem(classical.CLASSICAL_DENOISERS, "tv", replace(classical.CLASSICAL_DENOISERS["tv"], slow=True))
    predict.main([str(a) for a in argv[:-1]] + [str(tmp_path / "b"), "--baselines", "tv"])
    again = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert again["noisy"]["ssim"] == summary["noisy"]["ssim"] and again["ours"]["ssim"] == summary["ours"]["ssim"]
    assert again["classical"]["tv"]["slices"] == again["common_slices"]["slices"] == 2
    rows = read_csv(tmp_path / "b" / "per_image.csv")
    assert sum(isinstance(r["tv_ssim"], float) for r in rows) == 2  # the others left empty


def test_bm3d_in_the_rician_transform_runs_in_predict_on_the_slow_subset(denoising_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bm3d", types.SimpleNamespace(bm3d=lambda z, sigma_psd: gaussian_filter(z, 1)))
    summary = predict.main(["--checkpoint", str(denoising_run), "--noise", "rician:0.1", "--baselines", "bm3d-vst",
                            "--slow-baseline-slices", "2", "--out", str(tmp_path)])
    c = summary["classical"]["bm3d-vst"]
    assert c["slices"] == 2 and c["sigma_estimate"] == "rician_sigma" and "Rician" in c["label"]
    assert c["factor"] in classical.VST_FACTORS and c["validation_slices"] == 4
    assert c["ssim_brain"]["mean"] > summary["noisy"]["ssim_brain"]["mean"]


def test_the_classical_denoisers_give_the_same_slices_in_worker_processes():
    noisy = np.random.default_rng(0).random((3, 16, 16), dtype=np.float32)
    method = classical.CLASSICAL_DENOISERS["nlm-rician"]
    with classical.denoiser_pool(2) as pool:
        apart, seconds = classical.run_denoiser(method, noisy, 0.75, pool=pool)
    assert np.array_equal(apart, classical.run_denoiser(method, noisy, 0.75)[0]) and seconds > 0
