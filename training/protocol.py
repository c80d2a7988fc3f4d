"""The epoch protocol every trainer runs (train.py, train_prior.py, segment.py train, hyperprior.py train), written
once: train and validate an epoch, keep the best, stop at the deadline or re-plan the schedule to it, save the
epoch atomically with its CSV rows, draw and log; Ctrl-C or SIGTERM (a second one ignored) ends it with what is
kept and how to resume, and the run folder's lock is released however it ends."""
import math
import sys
from pathlib import Path

import torch

from imaging.slices import to_unit
from training.checkpoints import save_checkpoint
from training.distributed import fail_together
from training.runs import RunLock
from training.schedule import TimeBudget, schedule_done
from utils import UserError, append_csv, ignore_further_interrupts, interrupts_deferred, rng_state, trim_csvs

# ---------------------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------------------

def tensorboard_writer_class(enabled: bool):
    """SummaryWriter when --tensorboard is given (imported only then; checked before the run starts), else None."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or drop --tensorboard)") from None
    return SummaryWriter


class TensorBoardLog:
    """What the trainers log besides their CSVs: every metrics.csv column per epoch, the training loss every
    few steps, and the figures as images, under <run>/tensorboard/. A no-op without --tensorboard."""

    def __init__(self, writer_class, run_dir: Path):
        self.writer = writer_class(log_dir=str(Path(run_dir) / "tensorboard")) if writer_class else None

    def step_loss(self, step: int, loss: float):
        if self.writer:
            self.writer.add_scalar("train/loss_every_25_steps", loss, step)

    def epoch(self, row: dict):
        if self.writer:
            for name, value in row.items():
                if name != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"epoch/{name}", value, row["epoch"])
            self.writer.flush()

    def image(self, name: str, images: torch.Tensor, epoch: int, nrow: int = 4):
        """(B, 1, H, W) images in [-1, 1] as one grid."""
        if self.writer:
            from torchvision.utils import make_grid
            self.writer.add_image(name, make_grid(to_unit(images), nrow=nrow), epoch)

    def close(self):
        if self.writer:
            self.writer.close()


# ---------------------------------------------------------------------------------------------------------
# An epoch's save, and what a stopped run says
# ---------------------------------------------------------------------------------------------------------

class SavedEpochs:
    """The newest epoch whose checkpoints and CSV rows are complete on disk, the one sequence that writes them, and
    what a run that stops early says about them. Every trainer saves through `save` (run_epochs)."""

    def __init__(self, script: str, run_dir: Path, start_epoch: int, resume: str | None, resume_note: str = ""):
        self.script, self.run_dir, self.start_epoch, self.resume = script, Path(run_dir), start_epoch, resume
        self.resume_note = resume_note  # appended to the resume command, e.g. "(under the same torchrun command)"
        self.epoch = start_epoch - 1    # a resumed run starts with the epoch of its --resume file

    def save(self, state: dict, epoch: int, best: bool, csv_rows: dict):
        """checkpoints/epoch_NNN.pt, best.pt (if `best`) and last.pt (one file, three names), then each CSV's row
        ({file name: row}). Ctrl-C or SIGTERM meanwhile lands after all of it. The first epoch of a resumed run
        first trims each CSV to the epochs before it (utils.trim_csvs)."""
        folder = self.run_dir
        with interrupts_deferred():
            save_checkpoint({**state, "epoch": epoch, "rng": rng_state()},
                            folder / "checkpoints" / f"epoch_{epoch:03d}.pt",
                            *([folder / "best.pt"] if best else []), folder / "last.pt")
            if epoch == self.start_epoch:
                trim_csvs(epoch - 1, [folder / name for name in csv_rows])
            for name, row in csv_rows.items():
                append_csv(folder / name, row)
            self.epoch = epoch

    def path(self):
        """The file that holds self.epoch: last.pt, or the --resume file if nothing was saved since."""
        return self.run_dir / "last.pt" if self.epoch >= self.start_epoch else self.resume

    def kept(self) -> str:
        if self.epoch < 1:
            return "no epoch had finished, so nothing was saved"
        return f"{self.path()} holds epoch {self.epoch}"

    def check_finite(self, epoch: int, what: str, value: float, cfg):
        """UserError for a NaN/inf loss in `epoch`, before anything of it is saved; cfg: the run's config."""
        if math.isfinite(value):
            return
        fixes = [f"a lower --lr (this one had {cfg.lr:g})"]
        if not cfg.grad_clip:
            fixes.append("--grad-clip 1")
        if not cfg.warmup_steps:
            fixes.append("--warmup-steps 500")
        raise UserError(f"training diverged in epoch {epoch} ({what} {value}); {self.kept()}"
                        f"{' (the last good one)' if self.epoch >= 1 else ''}; start a new run with "
                        f"{' or '.join([', '.join(fixes[:-1]), fixes[-1]]) if len(fixes) > 1 else fixes[0]}")

    def interrupted(self, epoch: int) -> str:
        """The message for Ctrl-C or SIGTERM in `epoch`: what is kept and the command that resumes it."""
        when = f"after epoch {epoch} was saved" if self.epoch == epoch else f"during epoch {epoch}"
        resume = ""
        if self.epoch >= 1:
            resume = (f". Resume with: python {self.script} --resume {self.path()}"
                      + (f" {self.resume_note}" if self.resume_note else ""))
        return f"\ninterrupted {when}; {self.kept()}{resume}"


# ---------------------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------------------

class EpochRun:
    """A trainer's run as the protocol (run_epochs) sees it: the shared pieces, set here, and four methods the
    trainer writes: train_and_validate, checkpoint, report and, if it writes more than metrics.csv, csv_rows.

    BEST_COLUMN is the metrics.csv column whose best value picks best.pt (the highest with HIGHER_IS_BETTER, else
    the lowest); None makes every epoch the best, for a trainer without a validation score (its newest model is
    the one to use). Without a `scheduler` (an LR schedule that --max-minutes fits to its deadline) a run stops
    at the deadline only. SETUP names what the trainer did before its first epoch, which --max-minutes paid for."""
    BEST_COLUMN: str | None = "val_loss"
    HIGHER_IS_BETTER = False
    SETUP = "loading the data, building the model"

    def __init__(self, saved: SavedEpochs, lock: RunLock | None, budget: TimeBudget, device: torch.device,
                 epochs: int, best: float | None = None, scheduler=None, steps_per_epoch: int = 0,
                 main: bool = True, tensorboard: TensorBoardLog | None = None):
        self.saved, self.lock, self.budget, self.device, self.epochs = saved, lock, budget, device, epochs
        self.scheduler, self.steps_per_epoch = scheduler, steps_per_epoch
        self.main, self.tensorboard = main, tensorboard
        self.best = best if best is not None else (-math.inf if self.HIGHER_IS_BETTER else math.inf)

    def train_and_validate(self, epoch: int) -> tuple[dict, tuple[float, float] | None]:
        """Train epoch `epoch` and validate it (a NaN stops it: SavedEpochs.check_finite); returns its metrics.csv
        row and (seconds per training step, seconds of validation), which --max-minutes re-plans with."""
        raise NotImplementedError

    def checkpoint(self, row: dict, stopping: bool) -> dict:
        """What the epoch's checkpoint holds besides the epoch and the random streams (SavedEpochs.save adds
        those); `stopping`: whether the run ends after it (its time budget is then done)."""
        raise NotImplementedError

    def report(self, row: dict, best: bool, stopping: bool):
        """After the epoch is saved (on rank 0): its figures and its log line."""
        raise NotImplementedError

    def csv_rows(self, row: dict) -> dict:
        """{CSV file name in the run folder: the epoch's row}."""
        return {"metrics.csv": row}

    def is_best(self, row: dict) -> bool:
        """Whether the epoch's row beats every epoch before it (self.best, updated)."""
        if self.BEST_COLUMN is None:
            return True
        value = row[self.BEST_COLUMN]
        best = value > self.best if self.HIGHER_IS_BETTER else value < self.best
        self.best = value if best else self.best
        return best

    def planned_steps_done(self) -> bool:
        return self.scheduler is not None and schedule_done(self.scheduler)

    def stopping(self) -> bool:
        """Whether the run ends after this epoch: the steps planned for its --max-minutes are done, or the
        deadline passed (by rank 0's clock, so every rank agrees)."""
        return self.planned_steps_done() or self.budget.up(self.device)

    def replan(self, timing):
        """Fit the LR schedule to the deadline again from the epoch's timing (a run that goes on)."""
        if self.scheduler is not None:
            self.budget.replan(self.scheduler, self.steps_per_epoch, *timing, self.epochs * self.steps_per_epoch,
                               self.device)

    def stop_reason(self) -> str:
        minutes = f"--max-minutes {self.budget.minutes:g}"
        return f"the steps planned for {minutes} are done" if self.planned_steps_done() else f"{minutes} reached"


def run_epochs(run: EpochRun):
    """The epoch protocol: each epoch trained and validated, judged best or not, the stop decided (or the schedule
    re-planned) before the save so that a resumed run continues the same plan, saved on rank 0 with its CSV rows
    (every rank waits for it), then drawn and logged. Ctrl-C or SIGTERM ends the run with exit status 130 and one
    line on what is kept and how to resume it (utils.stop_on_interrupts: a second signal is ignored); the run
    folder's lock is released however the run ends. With --max-minutes, a line before the first epoch says what
    the setup took of the budget, and one after the last what the run took in all and what ran past the deadline."""
    epoch = run.saved.epoch
    say_budget = run.main and bool(run.budget)
    try:
        if say_budget:
            print(run.budget.begin(run.SETUP))
        for epoch in range(run.saved.start_epoch, run.epochs + 1):
            row, timing = run.train_and_validate(epoch)
            best, stopping = run.is_best(row), run.stopping()
            if not stopping:  # before the save: a resumed run continues this plan
                run.replan(timing)
            with fail_together(run.device):  # also the barrier: no rank goes on before rank 0 has saved
                if run.main:
                    run.saved.save(run.checkpoint(row, stopping), epoch, best, run.csv_rows(row))
                    run.report(row, best, stopping)
            run.saved.epoch = epoch  # on every rank: fail_together returned, so rank 0 has saved
            if stopping:
                if run.main:
                    print(f"stopping after epoch {epoch}: {run.stop_reason()}")
                break
        if say_budget:
            print(run.budget.account())
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (utils.stop_on_interrupts)
        ignore_further_interrupts()
        if run.main:
            print(run.saved.interrupted(epoch), file=sys.stderr)
        raise SystemExit(130)
    finally:
        if run.tensorboard is not None:
            run.tensorboard.close()
        if run.lock is not None:
            run.lock.release()
