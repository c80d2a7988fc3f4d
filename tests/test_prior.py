"""The priors (gated PixelCNN, transformer, multiscale): causality, sampling and completion in each prior's coding
order, learning, conditioning (the multiscale prior's passes: test_parallel_prior.py); the Frechet
distance and nearest-neighbour SSIM; train_prior.py and sample.py end to end on tiny generated data."""
import json
import os
import shutil
import signal
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import sample
import train
import train_prior
from evaluation.generation import frechet_distance, nearest_ssim
from evaluation.metrics import encode_images
from helpers import (
    INDUCTOR,
    assert_one_line_error,
    interrupted_in_second_call,
    make_adni,
    nan_weights_on_second_call,
    run_main,
    tiny_args,
)
from imaging.quality import ssim
from modules import PriorConfig, build_prior
from training import protocol, steps
from training.checkpoints import PriorTrainConfig, load_checkpoint, load_split, load_vqvae, save_checkpoint
from utils import autocast

ARCHS = ["pixelcnn", "pixelcnn+positions", "transformer", "multiscale"]


def tiny_prior(k=8, layers=3, kernel_size=3, num_classes=0, seed=0, arch="pixelcnn"):
    """arch: one of ARCHS ("pixelcnn+positions": the PixelCNN with learned row and column embeddings)."""
    torch.manual_seed(seed)
    arch, _, extra = arch.partition("+")
    prior = build_prior(PriorConfig(arch=arch, codebook_size=k, channels=16, layers=layers, kernel_size=kernel_size,
                                    heads=2, max_grid=8, num_classes=num_classes, positions=extra == "positions",
                                    levels=2))  # multiscale: 5 passes
    if extra == "positions":  # they start at zero
        torch.nn.init.normal_(prior.rows.weight)
        torch.nn.init.normal_(prior.columns.weight)
    return prior.eval()


@pytest.mark.parametrize("arch, kernel_size, layers", [("pixelcnn", 3, 5), ("pixelcnn", 5, 3),
                                                      ("pixelcnn+positions", 3, 5), ("transformer", 3, 2)])
def test_each_position_sees_exactly_the_positions_before_it(arch, kernel_size, layers):
    """d logits(i, j) / d one-hot input is zero at (i, j) and after it in raster order, and nonzero at every
    position before it (the layers are deep enough to reach the whole 5x6 grid): no leak, no blind spot."""
    prior, (h, w), k = tiny_prior(layers=layers, kernel_size=kernel_size, arch=arch), (5, 6), 8
    codes = torch.randint(0, k, (2, h, w))
    one_hot = F.one_hot(codes, k).float().requires_grad_()  # (B, h, w, K)
    # the embedding's input: the (B, h, w) map (PixelCNN), or the (B, h*w - 1) codes before the last (transformer)
    prior.embed.register_forward_hook(
        lambda module, args, out: one_hot.reshape(*args[0].shape[:1], -1, k)[:, :args[0].shape[1]] @ module.weight
        if args[0].dim() == 2 else one_hot @ module.weight)
    logits = prior(codes)
    raster = torch.arange(h * w).view(h, w)
    for i in range(h):
        for j in range(w):
            weights = torch.randn(k)  # a random mix of the K logits, so no cancellation hides a dependency
            grad, = torch.autograd.grad((logits[:, :, i, j] * weights).sum(), one_hot, retain_graph=True)
            seen = grad.abs().sum((0, 3)) > 0  # (h, w)
            assert torch.equal(seen, raster < i * w + j), (i, j)
            if i > 0 and j + 1 < w:
                assert seen[i - 1, j + 1], "blind spot: the position up-right does not influence (i, j)"


@pytest.mark.parametrize("arch", ARCHS)
def test_sampler_uses_the_same_conditionals_as_the_forward_pass(arch):
    """The sampler runs the incremental procedure; at a temperature near 0 it picks the argmax, so every sampled
    code must be the argmax of the full forward pass's logits on the finished map."""
    prior = tiny_prior(k=16, num_classes=2, arch=arch)
    labels = torch.tensor([0, 1, 1])
    codes = prior.sample(3, (5, 7), labels, temperature=1e-4)
    assert torch.equal(prior(codes, labels).argmax(1), codes)


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_shape_range_and_determinism_under_a_seed(arch):
    prior = tiny_prior(arch=arch)
    draw = lambda seed: prior.sample(4, (3, 5), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (4, 3, 5) and a.dtype == torch.long and 0 <= a.min() and a.max() < 8
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("arch", ARCHS)
def test_completion_keeps_the_given_codes(arch):
    prior = tiny_prior(num_classes=2, arch=arch)
    given = torch.randint(0, 8, (6, 4, 4))
    top_half = torch.zeros(4, 4, dtype=torch.bool)
    top_half[:2] = True
    scattered = torch.rand(6, 4, 4) < 0.5
    for mask in (top_half, scattered):
        out = prior.sample(6, (4, 4), torch.arange(6) % 2, generator=torch.Generator().manual_seed(0),
                           given=given, given_mask=mask)
        kept = mask.expand(6, 4, 4)
        assert torch.equal(out[kept], given[kept])
        assert not torch.equal(out[~kept], given[~kept])  # the rest was sampled (32 of 8 codes: all equal by chance ~0)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_tiny_prior_overfits_a_tiny_code_set(arch):
    torch.manual_seed(0)
    codes = torch.randint(0, 8, (4, 6, 6))  # log2 8 = 3 bits per code when nothing is learned
    prior = tiny_prior(layers=4 if arch == "pixelcnn" else 2, arch=arch).train()
    opt = torch.optim.Adam(prior.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(prior(codes), codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bits = F.cross_entropy(prior.eval()(codes), codes).item() / torch.log(torch.tensor(2.0)).item()
    assert bits < 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_conditioning_changes_the_output(arch):
    prior = tiny_prior(num_classes=2, arch=arch)
    codes = torch.randint(0, 8, (2, 4, 4))
    zero, one = prior(codes, torch.tensor([0, 0])), prior(codes, torch.tensor([1, 1]))
    assert not torch.allclose(zero, one)
    assert torch.equal(zero, prior(codes, torch.tensor([0, 0])))
    with pytest.raises(ValueError, match="labels"):
        prior(codes)


def test_frechet_distance_matches_the_scipy_formula():
    from scipy import linalg
    a, b = torch.randn(200, 6, dtype=torch.float64), 1.5 * torch.randn(300, 6, dtype=torch.float64) + 0.3
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    expected = float((mu_a - mu_b).square().sum()) + (s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real).trace()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8


def test_frechet_distance_of_a_small_set_from_the_same_distribution_is_biased_upwards():
    """Why sample.py compares the samples with as many real slices as there are samples."""
    population = torch.randn(20000, 16, generator=torch.Generator().manual_seed(0))
    small, large = population[:64], population[64:1184]
    assert frechet_distance(small, population) > 2 * frechet_distance(large, population)


def test_nearest_ssim_finds_copies_and_equals_an_exhaustive_search():
    torch.manual_seed(0)
    gallery, queries = torch.rand(12, 1, 16, 16), torch.rand(3, 1, 16, 16)
    exhaustive = torch.stack([ssim(q.expand(12, 1, 16, 16), gallery).max() for q in queries])
    assert torch.allclose(nearest_ssim(queries, gallery), exhaustive)
    assert torch.allclose(nearest_ssim(gallery[[4, 7]], gallery, candidates=1), torch.ones(2))


@pytest.fixture(scope="module")
def vqvae(trained_models):
    """The session's tiny VQ-VAE (8x8 code maps, K=16)."""
    return trained_models[0]


PRIOR_FLAGS = ["--batch-size", "8", "--channels", "8", "--layers", "2", "--kernel-size", "3", "--epoch-samples", "4"]


def test_train_prior_then_sample_write_every_promised_file(vqvae, tmp_path, capsys):
    out = tmp_path / "prior"
    r = run_main(train_prior.main, ["--vqvae", vqvae, "--epochs", "2", "--out", out, *PRIOR_FLAGS], capsys)
    assert r.returncode == 0, r.stderr
    for name in ("config.json", "metrics.csv", "loss.png", "best.pt", "last.pt", "samples/epoch_001.png",
                 "samples/epoch_002.png"):
        assert (out / name).is_file(), name
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train_bits_per_code", "val_bits_per_code", "lr"} <= set(header)
    state = load_checkpoint(out / "last.pt", kind="prior")
    assert state["epoch"] == 2 and state["model_config"]["codebook_size"] == 16
    assert state["model_config"]["layers"] == 2 and state["vqvae_checkpoint"] == str(vqvae)
    assert state["vqvae_model_config"] == load_checkpoint(vqvae)["model_config"]

    r = run_main(train_prior.main, ["--resume", out / "last.pt", "--epochs", "3"], capsys)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out / "last.pt", kind="prior")["epoch"] == 3
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 3

    r = run_main(sample.main, ["--num-samples", "4", "--prior", out / "best.pt", "--out", tmp_path / "s"], capsys)
    assert r.returncode == 0, r.stderr
    for name in ("samples.png", "completions.png", "sample_scores.json"):
        assert (tmp_path / "s" / name).is_file(), name
    scores = json.loads((tmp_path / "s" / "sample_scores.json").read_text())
    assert 0 < scores["validation_nll_bits_per_code"] and scores["log2_codebook_size"] == 4  # K = 16
    for name in ("samples", "validate_real", "validate_reconstructions"):
        assert -1 <= scores["nearest_train_ssim"][name]["mean"] <= scores["nearest_train_ssim"][name]["max"] <= 1
        assert scores["frechet_distance"][f"{name}_vs_train"] >= 0
    for name in ("samples", "validate_real", "validate_reconstructions"):  # the references are as many as the samples
        assert scores["nearest_train_ssim"][name]["images"] == 4
    assert scores["reference_slices"]["validate"] == 4
    with pytest.raises(SystemExit):
        sample.main(["--num-samples", "2", "--prior", str(out / "best.pt"), "--class", "AD"])
    assert "--class needs a class-conditional prior" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main(["--num-samples", "2", "--prior", str(out / "best.pt"), "--reference-slices", "1"])
    err = capsys.readouterr().err
    assert "--reference-slices must be at least 2" in err and len(err.strip().splitlines()) == 1


def test_mirror_adds_the_codes_of_every_train_slice_flipped_and_leaves_validation_alone(vqvae):
    cpu, fp32 = torch.device("cpu"), autocast("fp32", torch.device("cpu"))
    model, vqvae_cfg, state = load_vqvae(vqvae, cpu)
    train_images = load_split(vqvae_cfg, "train", demo=state["demo_settings"]).images
    cfg = PriorTrainConfig(vqvae=str(vqvae), mirror="rows")
    plain, mirrored = (train_prior.encode_splits(replace(cfg, mirror=m), cpu, fp32)[3] for m in ("none", "rows"))
    n = len(train_images)
    assert torch.equal(mirrored["train"][:n], plain["train"]) and torch.equal(mirrored["validate"], plain["validate"])
    assert torch.equal(mirrored["train"][n:], encode_images(model, train_images.flip(1), cpu, amp=fp32))
    assert not torch.equal(mirrored["train"][n:], plain["train"])


def test_prior_training_stops_at_its_deadline_after_one_step_and_says_so_in_its_checkpoint(vqvae, tmp_path, capsys):
    out = tmp_path / "prior"
    r = run_main(train_prior.main, ["--vqvae", vqvae, "--epochs", "5", "--max-minutes", "1e-06", "--out", out,
                                    *PRIOR_FLAGS], capsys)
    assert r.returncode == 0 and "stopping after epoch 1: --max-minutes 1e-06" in r.stdout, r.stderr
    state = load_checkpoint(out / "last.pt", kind="prior")
    assert state["epoch"] == 1 and state["time_budget"] == {"seconds_left": 0.0, "done": True}
    assert state["scheduler"]["last_epoch"] == 1  # 60 us had passed after the first step: the epoch ended there
    assert_one_line_error(run_main(train_prior.main, ["--resume", out], capsys),
                          "stopped when its --max-minutes 1e-06 were spent; pass --max-minutes M with --resume")


def test_a_transformer_prior_trains_resumes_and_samples_through_the_commands(vqvae, tmp_path, capsys):
    out, flags = tmp_path / "prior", ["--arch", "transformer", "--channels", "8", "--heads", "2", "--layers", "1",
                                      "--batch-size", "8", "--epoch-samples", "2"]
    assert run_main(train_prior.main, ["--vqvae", vqvae, "--epochs", "1", "--out", out, *flags], capsys).returncode == 0
    assert run_main(train_prior.main, ["--resume", out, "--epochs", "2"], capsys).returncode == 0
    state = load_checkpoint(out / "last.pt", kind="prior")
    assert state["epoch"] == 2 and state["model_config"]["arch"] == "transformer"
    assert (out / "samples" / "epoch_002.png").is_file()
    r = run_main(sample.main, ["--num-samples", "2", "--prior", out, "--out", tmp_path / "s"], capsys)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "s" / "sample_scores.json").read_text())["validation_nll_bits_per_code"] > 0


def test_a_class_conditional_prior_trains_and_samples_the_asked_class(tmp_path, capsys):
    """Tiny ADNI-layout data (AD and NC slices of different brightness) exercises the labels end to end."""
    ad_nc = make_adni(tmp_path / "AD_NC")
    train.main(tiny_args(ad_nc, tmp_path / "vqvae", "--dataset", "ADNI", "--image-size", "32", "--epochs", "1"))
    train_prior.main(["--vqvae", str(tmp_path / "vqvae" / "best.pt"), "--conditional", "--epochs", "1",
                      *PRIOR_FLAGS])
    state = load_checkpoint(tmp_path / "vqvae" / "prior" / "best.pt", kind="prior")
    assert state["model_config"]["num_classes"] == 2 and state["class_names"] == ["NC", "AD"]
    sample.main(["--num-samples", "2", "--checkpoint", str(tmp_path / "vqvae" / "best.pt"), "--class", "ad"])
    scores = json.loads((tmp_path / "vqvae" / "prior" / "predict_samples" / "sample_scores.json").read_text())
    assert scores["class"] == "AD" and scores["validation_nll_bits_per_code"] > 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        sample.main(["--num-samples", "2", "--checkpoint", str(tmp_path / "vqvae" / "best.pt"), "--class", "MCI"])
    err = capsys.readouterr().err
    assert "unknown --class 'MCI'; choose one of NC, AD" in err and len(err.strip().splitlines()) == 1


def test_interrupted_and_resumed_prior_training_equals_an_uninterrupted_run(vqvae, tmp_path, monkeypatch):
    args = ["--vqvae", str(vqvae), "--epochs", "3", *PRIOR_FLAGS, "--dropout", "0.2"]  # dropout: RNG state matters
    train_prior.main([*args, "--out", str(tmp_path / "straight")])

    real_epoch = train_prior.train_epoch
    monkeypatch.setattr(train_prior, "train_epoch", interrupted_in_second_call(real_epoch))
    with pytest.raises(SystemExit) as stop:
        train_prior.main([*args, "--out", str(tmp_path / "resumed")])
    assert stop.value.code == 130 and load_checkpoint(tmp_path / "resumed" / "last.pt", kind="prior")["epoch"] == 1
    monkeypatch.setattr(train_prior, "train_epoch", real_epoch)
    train_prior.main(["--resume", str(tmp_path / "resumed")])

    a, b = (load_checkpoint(tmp_path / name / "last.pt", kind="prior") for name in ("straight", "resumed"))
    assert a["epoch"] == b["epoch"] == 3 and a["metrics"]["val_bits_per_code"] == b["metrics"]["val_bits_per_code"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@INDUCTOR
def test_a_compiled_prior_trains_to_the_eager_prior_weights_and_saves_them_unwrapped(vqvae, tmp_path):
    """Dropout included: compiled, it draws the eager prior's random masks."""
    args = ["--vqvae", str(vqvae), "--epochs", "1", *PRIOR_FLAGS, "--precision", "fp32", "--epoch-samples", "0",
            "--dropout", "0.1"]
    for name, flags in (("eager", []), ("compiled", ["--compile"])):
        train_prior.main([*args, *flags, "--out", str(tmp_path / name)])
    eager, compiled = (load_checkpoint(tmp_path / name / "last.pt", kind="prior") for name in ("eager", "compiled"))
    assert compiled["train_config"]["compile"] and eager["model"].keys() == compiled["model"].keys()
    for key in eager["model"]:
        assert torch.allclose(eager["model"][key], compiled["model"][key], atol=1e-4), key
    assert compiled["metrics"]["val_bits_per_code"] == pytest.approx(eager["metrics"]["val_bits_per_code"], abs=1e-4)


def test_compile_without_a_cpp_compiler_stops_before_the_prior_run_folder_is_made(vqvae, tmp_path, capsys,
                                                                                   monkeypatch):
    monkeypatch.setattr(steps.shutil, "which", lambda name: None)
    r = run_main(train_prior.main, ["--vqvae", vqvae, "--compile", "--out", tmp_path / "p", *PRIOR_FLAGS], capsys)
    assert_one_line_error(r, "--compile needs a C++ compiler")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "invalid --epochs 0"),
    (["--kernel-size", "4"], "invalid --kernel-size 4"),
    (["--conditional"], "--conditional needs a dataset with classes"),
])
def test_train_prior_user_errors_exit_with_one_line(vqvae, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        train_prior.main(["--vqvae", str(vqvae), "--out", str(tmp_path / "p"), *PRIOR_FLAGS, *flags])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_wrong_or_missing_checkpoints_exit_with_one_line(vqvae, tmp_path, capsys):
    for argv, message in ((["--vqvae", str(tmp_path / "none.pt")], "does not exist"),
                          (["--resume", str(vqvae)], "holds a vqvae checkpoint, but a prior checkpoint is needed"),
                          ([], "--vqvae is required")):
        with pytest.raises(SystemExit):
            train_prior.main(argv)
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert_one_line_error(run_main(sample.main, ["--num-samples", "2", "--prior", vqvae], capsys),
                          "a prior checkpoint is needed")


# ---------------------------------------------------------------------------------------------------------
# train_prior.py stops as train.py does: interruptions, divergence, unwritable folders, resuming an earlier epoch
# ---------------------------------------------------------------------------------------------------------

def metrics_epochs(out):
    return [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_while_a_prior_epoch_is_saved_lands_after_its_checkpoints_and_csv_row(
        vqvae, tmp_path, monkeypatch, capsys, signum):
    real_save = protocol.save_checkpoint

    def save_after_an_interrupt(state, path, *also):
        os.kill(os.getpid(), signum)  # arrives as the epoch's checkpoints begin to be written
        real_save(state, path, *also)

    monkeypatch.setattr(protocol, "save_checkpoint", save_after_an_interrupt)
    out = tmp_path / "prior"
    with pytest.raises(SystemExit) as stop:
        train_prior.main(["--vqvae", str(vqvae), "--epochs", "3", "--out", str(out), *PRIOR_FLAGS])
    assert stop.value.code == 130
    assert load_checkpoint(out / "last.pt", kind="prior")["epoch"] == 1
    assert load_checkpoint(out / "best.pt", kind="prior")["epoch"] == 1 and metrics_epochs(out) == [1]
    assert (f"interrupted after epoch 1 was saved; {out / 'last.pt'} holds epoch 1. Resume with: python "
            f"train_prior.py --resume {out / 'last.pt'}") in capsys.readouterr().err


def test_prior_loss_turning_nan_keeps_the_last_good_epoch_and_suggests_a_new_run(vqvae, tmp_path, monkeypatch,
                                                                                 capsys):
    monkeypatch.setattr(train_prior, "train_epoch", nan_weights_on_second_call(train_prior.train_epoch))
    out = tmp_path / "prior"
    with pytest.raises(SystemExit) as stop:
        train_prior.main(["--vqvae", str(vqvae), "--epochs", "3", "--out", str(out), *PRIOR_FLAGS])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert "training diverged in epoch 2 (train NLL nan)" in err
    assert f"{out / 'last.pt'} holds epoch 1 (the last good one); start a new run with a lower --lr" in err
    assert load_checkpoint(out / "last.pt", kind="prior")["epoch"] == 1 and metrics_epochs(out) == [1]


def test_a_prior_run_folder_that_cannot_be_written_exits_with_one_error_line(vqvae, tmp_path, capsys):
    (tmp_path / "a file").write_text("")
    with pytest.raises(SystemExit) as stop:
        train_prior.main(["--vqvae", str(vqvae), "--out", str(tmp_path / "a file" / "prior"), *PRIOR_FLAGS])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the progress bars of the encoding
    assert last.startswith("error: ") and str(tmp_path / "a file") in last and "Not a directory" in last, err


def test_resuming_a_prior_from_an_earlier_epoch_replaces_the_later_csv_rows(vqvae, tmp_path, capsys):
    out = tmp_path / "prior"
    train_prior.main(["--vqvae", str(vqvae), "--epochs", "1", "--out", str(out), *PRIOR_FLAGS])
    train_prior.main(["--resume", str(out), "--epochs", "3"])
    assert metrics_epochs(out) == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_001.pt", "epoch_002.pt", "epoch_003.pt"]
    capsys.readouterr()
    train_prior.main(["--resume", str(out / "checkpoints" / "epoch_001.pt"), "--epochs", "3"])
    assert ("resumed from epoch 1: removed the rows of epochs 2-3, which this run trains again, from metrics.csv"
            in capsys.readouterr().out)
    assert metrics_epochs(out) == [1, 2, 3]


def test_a_prior_is_not_resumed_on_the_codes_of_a_vqvae_that_was_trained_further(vqvae, tmp_path, capsys):
    moved = tmp_path / "vqvae" / "best.pt"
    moved.parent.mkdir()
    shutil.copy(vqvae, moved)
    out = tmp_path / "prior"
    train_prior.main(["--vqvae", str(moved), "--epochs", "1", "--out", str(out), *PRIOR_FLAGS])
    state = load_checkpoint(moved)
    state["model"]["quantizer.codebook"] += 0.1  # what another epoch of the VQ-VAE does to its codebook
    save_checkpoint(state, moved)
    r = run_main(train_prior.main, ["--resume", out, "--epochs", "2"], capsys)
    assert_one_line_error(r.stderr.strip().splitlines()[-1], "was trained on the codes of another VQ-VAE")
    assert metrics_epochs(out) == [1]
