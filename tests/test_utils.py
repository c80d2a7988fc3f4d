"""Shared plumbing: SSIM/PSNR agree with scikit-image, checkpoints are atomic and load safely."""
import os
import pickle

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import utils
from utils import UserError, append_csv, drop_rows_after, load_checkpoint, psnr, save_checkpoint, ssim


def test_batched_ssim_equals_skimage_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 40, 36, generator=g)
    y = (x + 0.2 * torch.randn(4, 1, 40, 36, generator=g)).clamp(0, 1)
    y[3] = x[3]  # identical pair: SSIM 1
    ours = ssim(x, y)
    for i in range(4):
        ref = structural_similarity(x[i, 0].numpy(), y[i, 0].numpy(), data_range=1.0)
        assert abs(ours[i].item() - ref) < 1e-4


@pytest.mark.parametrize("width", [1, 2, 3, 5, 7, 8, 11])
def test_window_sums_equal_direct_sums_along_either_axis(width):
    m = torch.randn(2, 1, 13, 17, dtype=torch.float64)
    for dim in (-1, -2):
        assert torch.allclose(utils.window_sums(m, dim, width), m.unfold(dim, width, 1).sum(-1))


def test_compiled_ssim_equals_the_eager_one():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 24, 20, generator=g)  # a chunk of 4 compiled, the last 2 eager
    y = (x + 0.2 * torch.randn(6, 1, 24, 20, generator=g)).clamp(0, 1)
    assert torch.allclose(ssim(x, y, compiled=True), ssim(x, y), atol=1e-6)


def test_ssim_runs_eagerly_with_one_warning_where_compiling_fails(monkeypatch):
    def no_compiler():
        def fail(*args):
            raise RuntimeError("no C++ compiler found\nlong details")
        return fail
    monkeypatch.setattr(utils, "_ssim_compiled_once", no_compiler)
    monkeypatch.setattr(utils, "_compile_failed", False)
    x = torch.rand(8, 1, 16, 16)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler found\\); running it eagerly"):
        values = ssim(x, x.flip(-1), compiled=True)
    assert torch.allclose(values, ssim(x, x.flip(-1)))


def test_psnr_equals_skimage():
    x = torch.rand(2, 1, 16, 16)
    y = (x + 0.05).clamp(0, 1)
    for i in range(2):
        ref = peak_signal_noise_ratio(x[i, 0].numpy(), y[i, 0].numpy(), data_range=1.0)
        assert psnr(x, y)[i].item() == pytest.approx(ref, abs=1e-3)


def test_checkpoint_round_trip_keeps_tensors_and_plain_data(tmp_path):
    state = {"kind": "vqvae", "model": {"w": torch.arange(6.0)}, "epoch": 3, "config": {"lr": 0.002, "name": "x"}}
    save_checkpoint(state, tmp_path / "a.pt")
    back = load_checkpoint(tmp_path / "a.pt")
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["epoch"] == 3 and back["config"] == state["config"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp file left behind


def test_one_save_under_several_names_writes_once_and_later_saves_replace_only_their_name(tmp_path):
    save_checkpoint({"kind": "vqvae", "epoch": 1}, tmp_path / "epoch_001.pt", tmp_path / "best.pt", tmp_path / "last.pt")
    assert os.stat(tmp_path / "epoch_001.pt").st_ino == os.stat(tmp_path / "last.pt").st_ino  # one file, three names
    save_checkpoint({"kind": "vqvae", "epoch": 2}, tmp_path / "epoch_002.pt", tmp_path / "last.pt")
    epochs = {name: load_checkpoint(tmp_path / name)["epoch"] for name in ("epoch_001.pt", "best.pt", "last.pt")}
    assert epochs == {"epoch_001.pt": 1, "best.pt": 1, "last.pt": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch_001.pt", "epoch_002.pt", "last.pt"]


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    save_checkpoint({"kind": "vqvae", "epoch": 1}, tmp_path / "last.pt")

    class Unpicklable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="could not write checkpoint .*No space left on device"):
        save_checkpoint({"kind": "vqvae", "epoch": 2, "bad": Unpicklable()}, tmp_path / "last.pt")
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


def test_truncated_foreign_and_missing_checkpoints_are_refused(tmp_path):
    save_checkpoint({"kind": "vqvae", "model": {"w": torch.zeros(1000)}}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="prior checkpoint"):
        load_checkpoint(tmp_path / "good.pt", kind="prior")


def test_dropping_later_epochs_keeps_the_earlier_rows_byte_for_byte_and_replaces_the_file(tmp_path):
    rows = [{"epoch": e, "loss": 1 / e, "note": "a, b"} for e in (1, 2, 3)]
    for row in rows:
        append_csv(tmp_path / "metrics.csv", row)
    append_csv(tmp_path / "expected.csv", rows[0])
    inode = (tmp_path / "metrics.csv").stat().st_ino
    assert drop_rows_after(tmp_path / "metrics.csv", 1) == [2, 3]
    assert (tmp_path / "metrics.csv").read_bytes() == (tmp_path / "expected.csv").read_bytes()
    assert (tmp_path / "metrics.csv").stat().st_ino != inode  # a new file renamed over it, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected.csv", "metrics.csv"]  # no temporary file left
    assert drop_rows_after(tmp_path / "metrics.csv", 1) == [] and drop_rows_after(tmp_path / "none.csv", 0) == []
