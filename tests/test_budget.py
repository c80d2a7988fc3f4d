"""--max-minutes covers the whole command: the setup before the first epoch is spent from it, and a run ends with a
line on what it took and what ran past the deadline. Fake clocks, so nothing here depends on how fast the host is."""
import time
from pathlib import Path

import pytest
import torch

import hyperprior
import segment
import train
import train_prior
from helpers import run_main, tiny_args
from training import schedule
from training.protocol import EpochRun, SavedEpochs, run_epochs


class FakeClock:
    """Stands in for the time module in training/schedule.py: time moves only when a test moves it."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def monotonic(self) -> float:
        return self.now

    perf_counter = monotonic


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(schedule, "time", fake)
    return fake


def cosine_at(step: int, most: int = 100000):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule.LRSchedule("cosine", 10, most))
    scheduler.last_epoch = step
    return scheduler


def test_the_setup_before_the_first_epoch_is_spent_from_the_budget_and_the_plan_fits_what_it_left(clock):
    budget = schedule.TimeBudget(30.0, 0, 16, verbose=False, started=0.0)
    clock.now = 600.0  # ten minutes of decoding and encoding before the first epoch
    assert budget.begin("encoding the splits") == ("--max-minutes 30: the setup (encoding the splits) used 10.0 "
                                                   "minutes; the epochs get the other 20.0 minutes")
    scheduler = cosine_at(step=40)
    budget.plan(scheduler, 100000, 1.0, 0.0, 100000, torch.device("cpu"))
    assert scheduler.lr_lambdas[0].total_steps == 40 + int(schedule.TimeBudget.SAFETY * 1200)
    assert budget.state(done=False)["seconds_left"] == 1200.0  # what a resumed run gets


def test_a_setup_longer_than_the_budget_leaves_the_first_epoch_to_stop_at_once(clock):
    budget = schedule.TimeBudget(1.0, 0, 16, verbose=False, started=0.0)
    clock.now = 90.0
    assert budget.begin("loading the data").endswith("used 90.0 s, the whole budget: the first epoch stops at its "
                                                     "first look at the clock")
    assert budget.up(torch.device("cpu"))


class ClockedRun(EpochRun):
    """An epoch protocol run whose epochs take `epoch_seconds` of the fake clock and save nothing heavy."""
    BEST_COLUMN = None

    def __init__(self, clock, epoch_seconds: float, **protocol):
        super().__init__(device=torch.device("cpu"), **protocol)
        self.clock, self.epoch_seconds = clock, epoch_seconds

    def train_and_validate(self, epoch):
        self.clock.now += self.epoch_seconds
        return {"epoch": epoch}, None

    def checkpoint(self, row, stopping):
        return {"time_budget": self.budget.state(done=stopping)}

    def report(self, row, best, stopping):
        pass


def clocked_run(clock, tmp_path, minutes, setup_seconds, epoch_seconds, epochs=5):
    budget = schedule.TimeBudget(minutes, 0, 1, verbose=False, started=0.0)
    clock.now = setup_seconds
    run_epochs(ClockedRun(clock, epoch_seconds, saved=SavedEpochs("x.py", tmp_path, 1, None), lock=None,
                          budget=budget, epochs=epochs))


def test_a_run_stopped_past_its_deadline_ends_naming_the_time_outside_the_budget(clock, tmp_path, capsys):
    clocked_run(clock, tmp_path, minutes=1.0, setup_seconds=30.0, epoch_seconds=20.0)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("--max-minutes 1: the setup (loading the data, building the model) used 30.0 s; the epochs "
                        "get the other 30.0 s")
    assert lines[-2] == "stopping after epoch 2: --max-minutes 1 reached"  # at 70 s: 10 s past the deadline
    assert lines[-1] == ("--max-minutes 1: 70.0 s since the command started, 30.0 s of it setup; 10.0 s of it ran "
                         "past the deadline, outside the budget (the rest of the step under way, the last epoch's "
                         "validation, checkpoint and figures)")


def test_a_run_done_within_its_budget_says_so_and_one_without_a_budget_says_nothing(clock, tmp_path, capsys):
    clocked_run(clock, tmp_path / "a", minutes=1.0, setup_seconds=5.0, epoch_seconds=10.0, epochs=2)
    assert capsys.readouterr().out.splitlines()[-1] == ("--max-minutes 1: 25.0 s since the command started, 5.0 s "
                                                        "of it setup; all within the budget")
    clocked_run(clock, tmp_path / "b", minutes=0, setup_seconds=5.0, epoch_seconds=10.0, epochs=2)
    assert capsys.readouterr().out == ""


def trainer_runs(vqvae: Path, demo_root: Path, out: Path) -> dict:
    """Each trainer: (its module, what loads its data, a one-epoch run of it with --max-minutes 30)."""
    return {
        "vqvae": (train, "load_data", tiny_args(demo_root, out, "--epochs", 1, "--max-minutes", 30)),
        "prior": (train_prior, "encode_splits", ["--vqvae", vqvae, "--epochs", 1, "--batch-size", 8, "--channels", 8,
                                                 "--layers", 2, "--kernel-size", 3, "--epoch-samples", 0,
                                                 "--max-minutes", 30, "--out", out]),
        "segmenter": (segment, "load_data", ["train", "--dataset", "demo", "--data-root", demo_root,
                                             "--base-channels", 4, "--levels", 3, "--batch-size", 4, "--epoch-slices",
                                             8, "--epochs", 1, "--max-minutes", 30, "--out", out]),
        "hyperprior": (hyperprior, "build_dataset", ["train", "--dataset", "demo", "--data-root", demo_root, "--n", 8,
                                                     "--m", 8, "--batch-size", 4, "--save-minutes", 0.002,
                                                     "--epochs", 1, "--max-minutes", 30, "--out", out]),
    }


@pytest.mark.parametrize("trainer", ["vqvae", "prior", "segmenter", "hyperprior"])
def test_every_trainer_starts_its_budget_before_it_loads_or_encodes_its_data(
        trainer, trained_models, demo_root, tmp_path, monkeypatch, capsys):
    if trainer == "hyperprior":
        pytest.importorskip("compressai")
    module, loader, argv = trainer_runs(trained_models[0], demo_root, tmp_path / "run")[trainer]
    budgets, loaded_at, real_loader = [], [], getattr(module, loader)

    class RecordedBudget(schedule.TimeBudget):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            budgets.append(self)

    def timed_loader(*args, **kwargs):
        loaded_at.append(time.monotonic())
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(module, "TimeBudget", RecordedBudget)
    monkeypatch.setattr(module, loader, timed_loader)
    r = run_main(module.main, argv, capsys)
    assert r.returncode == 0, r.stderr
    assert len(budgets) == 1 and budgets[0].started <= loaded_at[0]
    assert f"--max-minutes 30: the setup ({module_run(module).SETUP}) used " in r.stdout
    assert "--max-minutes 30: " in r.stdout.splitlines()[-1] and "since the command started" in r.stdout


def module_run(module):
    """The trainer's EpochRun class."""
    return next(v for v in vars(module).values() if isinstance(v, type) and issubclass(v, EpochRun)
                and v is not EpochRun)
