"""Shared plumbing: CSV files that survive crashes and resumes, atomic writes, JSON, random streams, figures."""
import csv
import json
import os
import random
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import utils
from utils import UserError, append_csv, rng_state, set_rng_state, trim_csv, write_atomically, write_json


def test_trimming_later_epochs_keeps_the_earlier_rows_byte_for_byte_and_replaces_the_file(tmp_path):
    rows = [{"epoch": e, "loss": 1 / e, "note": "a, b"} for e in (1, 2, 3)]
    for row in rows:
        append_csv(tmp_path / "metrics.csv", row)
    append_csv(tmp_path / "expected.csv", rows[0])
    inode = (tmp_path / "metrics.csv").stat().st_ino
    assert trim_csv(tmp_path / "metrics.csv", 1) == [2, 3]
    assert (tmp_path / "metrics.csv").read_bytes() == (tmp_path / "expected.csv").read_bytes()
    assert (tmp_path / "metrics.csv").stat().st_ino != inode  # a new file renamed over it, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected.csv", "metrics.csv"]  # no temporary file left
    assert trim_csv(tmp_path / "metrics.csv", 1) == [] and trim_csv(tmp_path / "none.csv", 0) == []


def test_a_row_appended_to_a_csv_without_its_final_line_end_starts_a_line_of_its_own(tmp_path):
    path = tmp_path / "metrics.csv"
    append_csv(path, {"epoch": 1, "loss": 0.5})
    path.write_bytes(path.read_bytes().rstrip(b"\r\n"))  # an editor saved it without the last line end
    append_csv(path, {"epoch": 2, "loss": 0.25})
    assert [r["epoch"] for r in csv.DictReader(open(path))] == ["1", "2"]


def test_an_emptied_csv_gets_its_header_again_and_another_runs_csv_is_refused(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("")
    append_csv(path, {"epoch": 1, "loss": 0.5})
    assert list(csv.DictReader(open(path))) == [{"epoch": "1", "loss": "0.5"}]
    with pytest.raises(UserError, match="does not have the columns"):
        append_csv(path, {"epoch": 2, "val": 0.1})


def test_trimming_drops_a_row_cut_short_by_a_crash(tmp_path):
    path = tmp_path / "metrics.csv"
    for e in (1, 2):
        append_csv(path, {"epoch": e, "loss": 0.5, "ssim": 0.9})
    path.write_bytes(path.read_bytes() + b"3,0.4")  # a kill in the middle of writing epoch 3's row
    assert trim_csv(path, 2) == []
    assert [r["epoch"] for r in csv.DictReader(open(path))] == ["1", "2"]


def test_an_atomic_write_never_touches_another_writers_temp_file(tmp_path):
    other = tmp_path / ".last.pt.abcdef.tmp"  # another writer's, mid-write
    other.write_bytes(b"theirs")
    write_atomically(tmp_path / "last.pt", b"mine")
    assert other.read_bytes() == b"theirs" and (tmp_path / "last.pt").read_bytes() == b"mine"


def test_json_is_written_atomically_and_nan_becomes_null(tmp_path):
    write_json(tmp_path / "s.json", {"mean": float("nan"), "x": [1.0, float("inf")]})
    assert json.loads((tmp_path / "s.json").read_text()) == {"mean": None, "x": [1.0, None]}


def test_restored_random_streams_continue_exactly_numpy_included():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.rand(3), np.random.randn()  # a position inside numpy's key array and a cached gaussian
    state = rng_state()
    expected = (random.random(), np.random.rand(5), np.random.randn(3), torch.rand(3))
    np.random.rand(100), torch.rand(10)
    set_rng_state(state)
    again = (random.random(), np.random.rand(5), np.random.randn(3), torch.rand(3))
    assert expected[0] == again[0] and np.array_equal(expected[1], again[1])
    assert np.array_equal(expected[2], again[2]) and torch.equal(expected[3], again[3])


def test_every_series_the_training_curves_plot_is_a_column_train_writes():
    import train
    quantizer = SimpleNamespace(usage=torch.tensor([2.0, 0.0, 1.0, 0.0]), dead_code_threshold=0.5)
    row = {"epoch": 1, **{f"train_{k}": 0.1 for k in train.LOSS_NAMES}, "train_loss": 0.3,
           **{f"val_{k}": 0.1 for k in train.LOSS_NAMES}, "val_loss": 0.3, "val_ssim": 0.5, "val_psnr": 20.0,
           **train.codebook_stats(torch.tensor([3, 0, 1, 0]), quantizer), "lr": 1e-3}
    missing = {c for spec in utils.TRAINING_CURVES.values() for c in spec["series"]} - set(row)
    assert not missing


@pytest.mark.parametrize("ending", ["finished", "user error", "interrupted", "crashed"])
def test_every_way_out_of_a_command_disarms_its_interrupt_handlers(ending):
    """A signal that lands after a command's last line, during teardown or the interpreter's shutdown (torchrun's
    SIGTERM to the ranks still alive once one died, a late Ctrl-C), finds stop_on_interrupts' handlers ignored
    (the process is ending) and raises nothing: no "Exception ignored in <module 'threading'>" traceback."""
    faults = {"finished": None, "user error": UserError("bad"), "interrupted": KeyboardInterrupt(),
              "crashed": RuntimeError("a bug")}
    utils.stop_on_interrupts()
    with pytest.raises((SystemExit, RuntimeError)) if faults[ending] else utils.nullcontext():
        with utils.exits_with_one_line():
            if faults[ending]:
                raise faults[ending]
    for s in (signal.SIGINT, signal.SIGTERM):
        assert signal.getsignal(s) is signal.SIG_IGN, s
        os.kill(os.getpid(), s)  # and nothing is raised


def test_a_command_without_interrupt_handlers_of_its_own_keeps_pythons():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with utils.exits_with_one_line():
        pass
    assert {s: signal.getsignal(s) for s in before} == before
