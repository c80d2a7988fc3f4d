"""train.py and predict.py end to end on tiny generated data: outputs, resume, and user errors."""
import json

import pytest
import torch

import predict
import train
from dataset import generate_demo
from helpers import INDUCTOR, assert_one_line_error, interrupted_in_second_call, run_main, tiny_args
from training.checkpoints import load_checkpoint, save_checkpoint


@INDUCTOR
def test_train_then_predict_write_every_promised_file(demo_root, tmp_path, capsys):
    out = tmp_path / "run"
    r = run_main(train.main, tiny_args(demo_root, out, "--epochs", "2"), capsys)
    assert r.returncode == 0, r.stderr
    for name in ("config.json", "metrics.csv", "code_usage.csv", "best.pt", "last.pt", "loss.png", "ssim.png",
                 "codebook.png", "code_usage.png", "checkpoints/epoch_001.pt", "checkpoints/epoch_002.pt",
                 "recon/epoch_001.png", "recon/epoch_002.png"):
        assert (out / name).is_file(), name
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("train_reconstruction", "train_codebook", "train_commitment", "val_loss", "val_ssim",
                   "codes_used_pct", "perplexity", "lr", "epoch_seconds"):
        assert column in header

    r = run_main(predict.main, ["--checkpoint", out / "best.pt", "--out", tmp_path / "pred"], capsys)
    assert r.returncode == 0, r.stderr
    for name in ("per_image.csv", "summary.json", "reconstructions.png", "triplets.png", "ssim_hist.png",
                 "loss.png", "ssim.png"):
        assert (tmp_path / "pred" / name).is_file(), name
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["images"] == 4 and 0 <= summary["ssim"]["mean"] <= 1
    assert set(summary["ssim"]) == {"mean", "std", "min", "max"} and "fraction_ssim_ge_0.6" in summary
    assert len((tmp_path / "pred" / "per_image.csv").read_text().splitlines()) == 1 + 4

    predict.main(["--checkpoint", str(out / "best.pt"), "--out", str(tmp_path / "compiled"), "--compile"])
    assert json.loads((tmp_path / "compiled" / "summary.json").read_text())["ssim"] == pytest.approx(summary["ssim"],
                                                                                                   abs=1e-5)


def test_figures_of_quick_epochs_are_drawn_at_most_every_interval_and_for_the_last_epoch(demo_root, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setattr(train, "FIGURES_EVERY_S", 3600.0)
    train.main(tiny_args(demo_root, tmp_path / "run", "--epochs", "3"))
    assert sorted(p.name for p in (tmp_path / "run" / "recon").iterdir()) == ["epoch_001.png", "epoch_003.png"]
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 3  # checkpoints and CSV rows every epoch
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 1 + 3


def test_a_run_stopped_by_its_deadline_says_so_in_its_checkpoint_and_is_not_resumed_without_more_minutes(
        demo_root, tmp_path, capsys):
    r = run_main(train.main, tiny_args(demo_root, tmp_path / "run", "--epochs", "5", "--max-minutes", "1e-06"), capsys)
    assert r.returncode == 0 and "stopping after epoch 1: --max-minutes 1e-06 reached" in r.stdout
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1 and state["time_budget"] == {"seconds_left": 0.0, "done": True}
    assert_one_line_error(run_main(train.main, ["--resume", tmp_path / "run"], capsys),
                          "stopped when its --max-minutes 1e-06 were spent; pass --max-minutes M with --resume")


def test_training_steps_on_crops_smaller_than_the_slices_and_on_whole_slices_otherwise(demo_root, tmp_path,
                                                                                        monkeypatch):
    seen = []
    real_step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda model, opt, scheduler, x, *a, **k: (
        seen.append(tuple(x.shape)), real_step(model, opt, scheduler, x, *a, **k))[1])
    train.main(tiny_args(demo_root, tmp_path / "run", "--epochs", "1", "--train-crop", "16"))
    assert seen and set(seen) == {(8, 1, 16, 16)}
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["train_config"]["train_crop"] == 16 and 0 < state["metrics"]["val_ssim"] <= 1

    seen.clear()  # hq's crops of 128 are larger than these 32x32 slices: whole slices
    train.main(tiny_args(demo_root, tmp_path / "hq", "--epochs", "1", "--preset", "hq"))
    assert set(seen) == {(8, 1, 32, 32)}
    assert load_checkpoint(tmp_path / "hq" / "last.pt")["train_config"]["train_crop"] == 128


def test_checkpoint_rebuilds_the_model_from_its_own_config(demo_root, tmp_path):
    train.main(tiny_args(demo_root, tmp_path / "run", "--epochs", "1", "--preset", "seed", "--codebook-size", "8"))
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["model_config"]["codebook_size"] == 8 and state["train_config"]["preset"] == "seed"
    assert state["model"]["quantizer.codebook"].shape == (8, 8)


@pytest.mark.parametrize("loss_flags", [[], ["--tissue-weight", "2", "--gradient-weight", "1"]],
                         ids=["default-loss", "tissue-and-gradient-loss"])
def test_interrupted_and_resumed_training_equals_an_uninterrupted_run(demo_root, tmp_path, monkeypatch, loss_flags):
    args = ["--epochs", "3", "--lr-schedule", "cosine", *loss_flags]
    train.main(tiny_args(demo_root, tmp_path / "straight", *args))

    real_epoch = train.train_epoch
    monkeypatch.setattr(train, "train_epoch", interrupted_in_second_call(real_epoch))
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(demo_root, tmp_path / "resumed", *args))
    assert stop.value.code == 130
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(train, "train_epoch", real_epoch)
    train.main(["--resume", str(tmp_path / "resumed" / "last.pt")])

    a, b = (load_checkpoint(tmp_path / name / "last.pt") for name in ("straight", "resumed"))
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["metrics"]["val_loss"] == b["metrics"]["val_loss"]
    assert b["model_config"]["tissue_weight"] == (2.0 if loss_flags else 0.0)


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "invalid --epochs -1"),
    (["--batch-size", "0"], "invalid --batch-size 0"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--image-size", "36"], "not divisible by 2^downsamplings"),
    (["--image-size", "100000"], "invalid --image-size 100000"),
    (["--lr", "-0.1"], "invalid --lr -0.1"),
    (["--seed", str(2**64)], "invalid --seed"),
    (["--codebook-size", "1e10"], "invalid int value: '1e10'"),
    (["--hidden-channels", "100000"], "invalid --hidden-channels 100000"),
    (["--in-channels", "3"], "unrecognized arguments: --in-channels 3"),
    (["--train-crop", "12"], "--train-crop 12 is not a multiple of the model's downsampling (8)"),
    (["--train-crop", "4"], "invalid --train-crop 4"),
    (["--train-noise", "rician:nan"], "--train-noise 'rician:nan': SIGMA must be a fraction"),
    (["--train-noise", "rician:1e-2-2"], "SIGMA must be a fraction of the intensity range, 0 < SIGMA < 1, got 2"),
    (["--train-noise", "rician:5e"], "--train-noise 'rician:5e': the level is not a number"),
])
def test_out_of_range_flags_exit_with_one_line_before_anything_is_written(demo_root, tmp_path, flags, message,
                                                                         capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(demo_root, tmp_path / "run", *flags))
    assert stop.value.code == 2
    assert_one_line_error(capsys.readouterr().err, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec, saved", [
    ("rician:5e-2", "rician:0.05"), ("gaussian:1E-1", "gaussian:0.1"), ("rician:1e-2-5e-2", "rician:0.01-0.05"),
    ("rician:.03 - .25", "rician:0.03-0.25")])
def test_train_noise_reads_its_levels_as_python_reads_numbers(spec, saved):
    cfg, _, _ = train.configs_from_args({"dataset": "demo", "train_noise": spec}, {})
    assert cfg.train_noise == saved


def test_missing_dataset_root_and_bad_checkpoint_exit_with_one_line(tmp_path, capsys):
    r = run_main(train.main, ["--dataset", "OASIS", "--data-root", tmp_path / "nowhere"], capsys)
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    r = run_main(predict.main, ["--checkpoint", tmp_path / "bad.pt"], capsys)
    assert r.returncode != 0 and "cannot load checkpoint" in r.stderr and "Traceback" not in r.stderr
    r = run_main(train.main, ["--resume", tmp_path / "bad.pt"], capsys)
    assert r.returncode != 0 and "cannot load checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_predict_says_how_to_point_at_a_dataset_that_moved(demo_root, tmp_path, capsys):
    import shutil
    moved = tmp_path / "data"
    shutil.copytree(demo_root, moved)
    train.main(tiny_args(moved, tmp_path / "run", "--epochs", "1", "--dataset", "OASIS"))  # demo files, OASIS layout
    shutil.rmtree(moved)
    r = run_main(predict.main, ["--checkpoint", tmp_path / "run" / "best.pt"], capsys)
    assert r.returncode != 0 and "--data-root" in r.stderr and "Traceback" not in r.stderr
    r = run_main(predict.main, ["--checkpoint", tmp_path / "run" / "best.pt", "--data-root", demo_root], capsys)
    assert r.returncode == 0, r.stderr


def test_predict_makes_missing_demo_data_again_as_it_was_and_says_so(tmp_path, capsys):
    import shutil
    data = generate_demo(tmp_path / "demo", size=16, n_patients=10, slices_per_patient=2)
    train.main(tiny_args(data, tmp_path / "run", "--epochs", "1"))
    original = {p.relative_to(data): p.read_bytes() for p in data.rglob("*.png")}
    shutil.rmtree(data)
    capsys.readouterr()
    predict.main(["--checkpoint", str(tmp_path / "run" / "best.pt"), "--out", str(tmp_path / "predicted")])
    assert (f"the demo data of this checkpoint is not at {data}; making it again there with the settings it was made "
            f"with (size 16, n_patients 10, slices_per_patient 2, seed 0)") in capsys.readouterr().out
    assert {p.relative_to(data): p.read_bytes() for p in data.rglob("*.png")} == original

    state = load_checkpoint(tmp_path / "run" / "best.pt")  # a checkpoint from before they were recorded
    state["demo_settings"] = None
    save_checkpoint(state, tmp_path / "old" / "best.pt")
    shutil.rmtree(data)
    predict.main(["--checkpoint", str(tmp_path / "old" / "best.pt"), "--out", str(tmp_path / "predicted")])
    assert (f"the demo data of this checkpoint is not at {data}; making it again there with the default "
            f"settings") in capsys.readouterr().out
