"""The training kit every trainer runs on: the LR schedule and --max-minutes, run folders with one writer, flags."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modules import PriorConfig, VQVAEConfig
from training import flags, runs, schedule
from training.checkpoints import PriorTrainConfig, TrainConfig
from training.runs import reserve_run_folder
from utils import UserError


def test_steps_that_fit_count_each_begun_epochs_validation():
    # 10 steps of 1 s per epoch, 5 s of validation per epoch: 15 s per epoch
    assert schedule.steps_that_fit(30, 1.0, 10, 0, 5.0, 1000) == 20
    assert schedule.steps_that_fit(37, 1.0, 10, 0, 5.0, 1000) == 22  # 2 epochs, then 2 steps and a validation
    assert schedule.steps_that_fit(33, 1.0, 10, 4, 5.0, 1000) == 18  # the current epoch has 6 steps left: 6 + 10 + 2
    assert schedule.steps_that_fit(3, 1.0, 10, 0, 5.0, 1000) == 0
    assert schedule.steps_that_fit(1e9, 1.0, 10, 0, 5.0, 123) == 123


def test_a_schedule_fitted_to_the_deadline_is_restored_on_resume_and_others_stretch_to_new_epochs():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    fitted = schedule.lr_scheduler(opt, TrainConfig(lr_schedule="cosine").resolved(), 100)
    fitted.lr_lambdas[0].total_steps, fitted.lr_lambdas[0].fitted_to_deadline = 37, True
    plain = schedule.lr_scheduler(opt, TrainConfig(lr_schedule="cosine").resolved(), 100)
    for saved, expected in ((fitted, 37), (plain, 200)):
        resumed = schedule.lr_scheduler(opt, TrainConfig(lr_schedule="cosine").resolved(), 999)
        schedule.restore_scheduler(resumed, saved.state_dict(), total_steps=200)
        assert resumed.lr_lambdas[0].total_steps == expected
    assert schedule.LRSchedule("cosine", 0, 37)(37) == pytest.approx(0.0)


def planned(seconds_left, step, step_seconds, warmup=100, steps_per_epoch=1000, eval_seconds=0.0, most=10000,
            scheduler=None):
    """A cosine schedule at `step` planned by a TimeBudget with `seconds_left` before its deadline."""
    if scheduler is None:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule.LRSchedule("cosine", warmup, most))
        scheduler.last_epoch = step
    budget = schedule.TimeBudget(1.0, 0, 16, verbose=False)
    budget.deadline = time.monotonic() + seconds_left
    budget.plan(scheduler, steps_per_epoch, step_seconds, eval_seconds, most, torch.device("cpu"))
    return scheduler


def test_a_budget_shorter_than_the_warmup_ends_annealed():
    schedule = planned(seconds_left=36, step=40, step_seconds=1.0, warmup=100).lr_lambdas[0]
    assert schedule.fitted_to_deadline and 70 <= schedule.total_steps <= 75
    assert schedule.warmup_steps == 40  # past a tenth of the plan already: the warmup ends now
    assert schedule(schedule.total_steps - 1) < 0.01 and schedule(schedule.total_steps) == pytest.approx(0.0)
    long = planned(seconds_left=10000, step=40, step_seconds=1.0, warmup=100).lr_lambdas[0]
    assert long.warmup_steps == 100  # a plan of thousands of steps keeps the preset's warmup


def test_the_plan_is_made_again_at_each_epoch_end_from_that_epochs_step_time():
    scheduler = planned(seconds_left=1000, step=40, step_seconds=1.0, steps_per_epoch=100)
    first = scheduler.lr_lambdas[0].total_steps
    scheduler.last_epoch = 100  # the end of epoch 1: the host got twice as slow
    budget = schedule.TimeBudget(1.0, 0, 16, verbose=False)
    budget.deadline = time.monotonic() + 1000 - 60 - 100
    budget.replan(scheduler, 100, 2.0, 5.0, 10000, torch.device("cpu"))
    slower = scheduler.lr_lambdas[0].total_steps
    budget.replan(scheduler, 100, 0.5, 5.0, 10000, torch.device("cpu"))  # and then four times faster
    assert slower < first < scheduler.lr_lambdas[0].total_steps
    budget.replan(scheduler, 100, 1e-6, 0.0, 2000, torch.device("cpu"))
    assert scheduler.lr_lambdas[0].total_steps == 2000  # never beyond --epochs


def test_a_schedule_not_yet_planned_is_left_at_an_epoch_end():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule.LRSchedule("cosine", 100, 600))
    budget = schedule.TimeBudget(1.0, 0, 16, verbose=False)
    budget.replan(scheduler, 20, 1.0, 1.0, 600, torch.device("cpu"))
    assert scheduler.lr_lambdas[0].total_steps == 600 and not scheduler.lr_lambdas[0].fitted_to_deadline


def test_a_resumed_run_gets_the_rest_of_its_budget_and_a_spent_one_is_refused(tmp_path):
    saved = TrainConfig(dataset="demo", epochs=10, max_minutes=30.0)
    state = {"epoch": 2, "time_budget": {"seconds_left": 600.0, "done": False}}
    assert runs.resumed_config(saved, {}, tmp_path / "last.pt", state).max_minutes == pytest.approx(10.0)
    assert runs.resumed_config(saved, {"max_minutes": 5.0}, tmp_path / "last.pt", state).max_minutes == 5.0
    spent = {"epoch": 2, "time_budget": {"seconds_left": 0.0, "done": True}}
    with pytest.raises(UserError, match="stopped when its --max-minutes 30 were spent; pass --max-minutes M"):
        runs.resumed_config(saved, {}, tmp_path / "last.pt", spent)
    assert runs.resumed_config(saved, {"max_minutes": 5.0}, tmp_path / "last.pt", spent).max_minutes == 5.0


@pytest.mark.parametrize("cls", [TrainConfig, VQVAEConfig, PriorTrainConfig, PriorConfig])
def test_every_config_field_has_a_one_line_help_string(cls):
    helps = flags.field_help(cls)
    assert set(helps) == {f.name for f in flags.fields(cls)}
    assert all(text.strip() and "\n" not in text for text in helps.values())


def test_two_runs_without_out_get_two_folders_and_a_second_writer_of_one_folder_is_refused(tmp_path):
    first, lock = reserve_run_folder(None, tmp_path / "runs", "OASIS-default", "train.py")
    second, lock2 = reserve_run_folder(None, tmp_path / "runs", "OASIS-default", "train.py")
    assert (first.name, second.name) == ("OASIS-default-000", "OASIS-default-001")
    other = subprocess.run([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {str(Path(runs.__file__).resolve().parent.parent)!r})
from training.runs import reserve_run_folder
from utils import UserError
try:
    reserve_run_folder({str(first)!r}, None, None, "train.py", resuming=True)
except UserError as e:
    print(e)
"""], capture_output=True, text=True, timeout=60)
    assert f"{first} is being written by train.py (pid" in other.stdout


def test_a_lock_is_released_when_its_process_ends_however_it_ends(tmp_path):
    folder = tmp_path / "run"
    subprocess.run([sys.executable, "-c", f"""
import os, sys; sys.path.insert(0, {str(Path(runs.__file__).resolve().parent.parent)!r})
from training.runs import reserve_run_folder
reserve_run_folder({str(folder)!r}, None, None, "train.py")
os._exit(9)  # no clean-up runs: as after a crash or kill -9
"""], check=False, timeout=60)
    assert reserve_run_folder(str(folder), None, None, "train.py", resuming=True)[0] == folder


def test_out_at_a_folder_that_holds_other_files_or_a_run_is_refused_and_left_alone(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not empty .*notes.txt"):
        reserve_run_folder(str(tmp_path / "mine"), None, None, "train.py")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="already holds a run; continue it with --resume"):
        reserve_run_folder(str(tmp_path / "run"), None, None, "train.py")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        reserve_run_folder(str(tmp_path / "file"), None, None, "train.py")


def test_a_run_that_stopped_before_its_first_epoch_leaves_a_folder_a_new_run_may_use(tmp_path):
    folder, lock = reserve_run_folder(str(tmp_path / "run"), None, None, "train.py")
    (folder / "config.json").write_text("{}")
    (folder / "checkpoints").mkdir()
    lock.release()
    assert reserve_run_folder(str(folder), None, None, "train.py")[0] == folder


class FakeSummaryWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter, which needs the optional tensorboard package."""
    logged = []

    def __init__(self, log_dir):
        self.log_dir = log_dir

    def add_scalar(self, name, value, step):
        self.logged.append(("scalar", name, step))

    def add_image(self, name, image, step):
        self.logged.append(("image", name, step, tuple(image.shape)))

    def flush(self):
        pass

    def close(self):
        pass


def test_tensorboard_logs_every_metrics_column_the_step_loss_and_the_reconstructions(demo_root, tmp_path,
                                                                                     monkeypatch):
    import csv
    import types

    import train
    from helpers import tiny_args
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    FakeSummaryWriter.logged = []
    train.main(tiny_args(demo_root, tmp_path / "run", "--epochs", "2", "--tensorboard"))
    columns = next(csv.reader(open(tmp_path / "run" / "metrics.csv")))
    scalars = {(name, step) for kind, name, step, *_ in FakeSummaryWriter.logged if kind == "scalar"}
    assert {(f"epoch/{c}", e) for c in columns if c != "epoch" for e in (1, 2)} <= scalars
    assert ("train/loss_every_25_steps", 1) in scalars
    assert ("image", "validation/inputs_then_reconstructions", 2, (3, 70, 138)) in FakeSummaryWriter.logged


def test_tensorboard_without_its_package_is_one_line_with_the_install_command(demo_root, tmp_path, monkeypatch,
                                                                               capsys):
    import train
    from helpers import assert_one_line_error, run_main, tiny_args
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    r = run_main(train.main, tiny_args(demo_root, tmp_path / "run", "--tensorboard"), capsys)
    assert_one_line_error(r, "--tensorboard needs the tensorboard package: pip install tensorboard")
    assert not (tmp_path / "run").exists()


def test_a_script_of_subcommands_lists_them_on_help_and_refuses_a_missing_one_in_one_line(capsys):
    script, commands = "segment.py", {"train": "train it", "score": "score it"}
    with pytest.raises(SystemExit) as done:
        flags.split_subcommand(["--help"], script, commands, "train --dataset demo")
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert f"python {script} {{train,score}}" in shown and "score it" in shown
    assert flags.split_subcommand(["score", "--split", "test"], script, commands, "x") == ("score", ["--split", "test"])
    for argv in ([], ["--split", "test"], ["fit"]):
        with pytest.raises(UserError, match=f"{script} needs a command first: train or score"):
            flags.split_subcommand(argv, script, commands, "train --dataset demo")
