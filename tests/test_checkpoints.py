"""Checkpoints: written atomically, loaded without running code, and checked against their schema and types
before anything uses them."""
import os
import pickle

import pytest
import torch

from helpers import vqvae_state
from modules import PRESETS
from training.checkpoints import TrainConfig, load_checkpoint, load_vqvae, save_checkpoint
from utils import UserError

CPU = torch.device("cpu")


def test_checkpoint_round_trip_rebuilds_the_exact_model(tmp_path):
    state = vqvae_state(epoch=3)
    save_checkpoint(state, tmp_path / "a.pt")
    model, cfg, back = load_vqvae(tmp_path / "a.pt", CPU)
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    assert back["epoch"] == 3 and cfg.dataset == "demo" and not model.training
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp file left behind


def test_one_save_under_several_names_writes_once_and_later_saves_replace_only_their_name(tmp_path):
    save_checkpoint(vqvae_state(epoch=1), tmp_path / "epoch_001.pt", tmp_path / "best.pt", tmp_path / "last.pt")
    assert os.stat(tmp_path / "epoch_001.pt").st_ino == os.stat(tmp_path / "last.pt").st_ino  # one file, three names
    save_checkpoint(vqvae_state(epoch=2), tmp_path / "epoch_002.pt", tmp_path / "last.pt")
    epochs = {name: load_checkpoint(tmp_path / name)["epoch"] for name in ("epoch_001.pt", "best.pt", "last.pt")}
    assert epochs == {"epoch_001.pt": 1, "best.pt": 1, "last.pt": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch_001.pt", "epoch_002.pt", "last.pt"]


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(vqvae_state(epoch=1), tmp_path / "last.pt")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(UserError, match="could not write checkpoint .*No space left on device"):
        save_checkpoint(vqvae_state(epoch=2), tmp_path / "last.pt")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "vqvae-mri/1", "kind": "vqvae", "payload": RunsCode()}, tmp_path / "evil.pt")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(RunsCode(), f)
    for name in ("evil.pt", "evil.pkl"):
        with pytest.raises(UserError, match="cannot load checkpoint"):
            load_checkpoint(tmp_path / name)
    assert not (tmp_path / "PWNED").exists()


def test_truncated_empty_zeroed_foreign_and_missing_checkpoints_are_refused_with_their_reason(tmp_path):
    save_checkpoint(vqvae_state(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "zeros.pt").write_bytes(bytes(4096))
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "foreign.pt")
    for name, reason in (("truncated.pt", "truncated or corrupt"), ("empty.pt", "empty or cut short"),
                         ("zeros.pt", "not a file written by torch.save"),
                         ("foreign.pt", "not a checkpoint of this project"), ("missing.pt", "does not exist")):
        with pytest.raises(UserError, match=reason):
            load_checkpoint(tmp_path / name)
    with pytest.raises(UserError, match="prior checkpoint"):
        load_checkpoint(tmp_path / "good.pt", kind="prior")


@pytest.mark.parametrize("tamper, reason", [
    (lambda s: s.update(epoch="3"), "epoch is a str"),
    (lambda s: s.pop("model_config"), "missing model_config"),
    (lambda s: s["train_config"].update(batch_size="16"), "batch_size"),
    (lambda s: s["train_config"].update(image_size="256"), "image_size"),
    (lambda s: s["model"]["decoder.to_image.weight"].fill_(float("nan")), "NaN"),
    (lambda s: s["model"].pop("decoder.to_image.weight"), "decoder.to_image.weight"),
    (lambda s: s.update(time_budget=[600.0]), "time_budget is a list"),
    (lambda s: s.update(time_budget={"seconds_left": "600", "done": False}), "time_budget.seconds_left is a str"),
    (lambda s: s.update(time_budget={"seconds_left": 600.0}), "missing time_budget.done"),
])
def test_a_checkpoint_whose_schema_or_types_are_wrong_is_refused_on_load(tmp_path, tamper, reason):
    state = vqvae_state()
    tamper(state)
    save_checkpoint(state, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=reason):
        load_vqvae(tmp_path / "bad.pt", CPU)


@pytest.mark.parametrize("tamper, reason", [
    (lambda s: s.update(optimizer={}), "optimizer state is empty"),
    (lambda s: s.update(rng={}), "missing rng.torch"),
    (lambda s: s.pop("scheduler"), "missing scheduler"),
])
def test_a_checkpoint_without_what_a_resume_reads_loads_for_scoring_but_not_for_resuming(tmp_path, tamper, reason):
    state = vqvae_state()
    tamper(state)
    save_checkpoint(state, tmp_path / "x.pt")
    load_vqvae(tmp_path / "x.pt", CPU)
    with pytest.raises(UserError, match=reason):
        load_checkpoint(tmp_path / "x.pt", resume=True)


def test_training_settings_left_unset_come_from_the_preset_and_flags_override_them():
    for name, recipe in PRESETS.items():
        cfg = TrainConfig(preset=name).resolved()
        assert (cfg.lr, cfg.lr_schedule, cfg.warmup_steps, cfg.grad_clip, cfg.batch_size) == \
            (recipe.lr, recipe.lr_schedule, recipe.warmup_steps, recipe.grad_clip, recipe.batch_size)
    assert TrainConfig(preset="seed").resolved().grad_clip == 0  # the first report's recipe clips nothing
    assert TrainConfig(preset="seed").resolved().batch_size == 16  # and trains on batches of 16
    cfg = TrainConfig(preset="default", grad_clip=0.0, warmup_steps=7, batch_size=3).resolved()
    assert (cfg.grad_clip, cfg.warmup_steps, cfg.batch_size) == (0.0, 7, 3)
