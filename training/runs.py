"""Run folders: one writer each (an flock held for the life of the run), what may be written where, and resuming a
run from its checkpoint with the flags a resume may change."""
import fcntl
import os
from dataclasses import replace
from pathlib import Path

from training.checkpoints import checkpoint_file, load_checkpoint, run_dir_of
from training.flags import config_or_error, flag
from training.schedule import restore_scheduler
from utils import UserError

RUN_FILES = ("last.pt", "best.pt", "metrics.csv")
LOCK_NAME = ".lock"
# What a run leaves before its first epoch is saved; a new run may start over in such a folder.
EARLY_FILES, EARLY_FOLDERS = (LOCK_NAME, "config.json"), ("checkpoints", "recon", "samples")


def is_run_leftover(path: Path) -> bool:
    return path.name in EARLY_FILES or (path.name in EARLY_FOLDERS and path.is_dir() and not any(path.iterdir()))


def holds_a_run(folder: Path) -> bool:
    return any((Path(folder) / name).exists() for name in RUN_FILES)


class RunLock:
    """An exclusive flock on <run>/.lock for the life of the run: the kernel drops it on any exit, a crash and
    kill -9 included, so a lock is never stale. The file itself stays (removing a lock file races with the next
    writer); it names its holder once the run has the folder."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"{folder} is being written by {holder}; wait for it to finish, or choose another "
                            f"--out") from None

    def claim(self, script: str):
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{script} (pid {os.getpid()})\n")
        self.file.flush()

    def release(self):
        """Before the process ends: a later run in this same process (tests, ablations) may take the folder."""
        self.file.close()


def reserve_run_folder(out: str | None, default_parent: Path, default_name: str, script: str,
                       resuming: bool = False) -> tuple[Path, RunLock]:
    """The run folder, created or checked, and locked for this process. Without `out`, the first free
    <default_parent>/<default_name>-NNN, taken by an atomic mkdir so two runs started together get two folders.
    A given `out` must be new, empty, or (when `resuming`) the run being resumed: a folder holding another run or
    anything else is refused before anything in it is written. Under the lock, temp files that a killed writer of
    this run left behind are removed: no other writer can be using them."""
    if out is None:
        default_parent.mkdir(parents=True, exist_ok=True)
        n = 0
        while True:
            folder = default_parent / f"{default_name}-{n:03d}"
            try:
                folder.mkdir()
                break
            except FileExistsError:
                n += 1
    else:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out {folder} is a file, not a folder; choose another --out")
        folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder)
    try:
        if not resuming:  # checked under the lock: a run that finished a moment ago counts too
            check_new_run_folder(folder)
        for stale in [*folder.glob(".*.tmp"), *folder.glob("checkpoints/.*.tmp")]:
            stale.unlink(missing_ok=True)
    except BaseException:
        lock.release()
        raise
    lock.claim(script)
    return folder, lock


def check_new_run_folder(folder: Path):
    if holds_a_run(folder):
        raise UserError(f"--out {folder} already holds a run; continue it with --resume {folder}, or choose "
                        f"another --out")
    others = sorted(p.name for p in folder.iterdir() if not is_run_leftover(p))
    if others:
        raise UserError(f"--out {folder} is not empty ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) "
                        f"and is not a run folder; choose a new or empty --out")


# ---------------------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------------------

def resume_checkpoint(run_args: dict, model_args: dict, allowed, kind: str) -> tuple[Path, dict]:
    """The checkpoint that --resume names (a run folder: its last.pt), loaded with what a resume reads, once it is
    clear that no flag but those in `allowed` was given with it: everything else comes from the checkpoint."""
    path = checkpoint_file(run_args["resume"], resume=True)
    changed = sorted(set(run_args) - set(allowed)) + sorted(model_args)
    if changed:
        raise UserError(f"--resume continues a run with its saved config; these flags cannot change: "
                        f"{', '.join(flag(c) for c in changed)} (start a new run instead)")
    return path, load_checkpoint(path, kind, resume=True)


def resumed_config(saved_cfg, run_args: dict, path: Path, state: dict):
    """The saved training config with the flags a resume may change, checked like any flag; UserError if the run
    already finished the epochs asked for, or spent its --max-minutes. Without a new --max-minutes, a run that had
    one gets the rest of it (the checkpoint's time_budget, TimeBudget.state)."""
    cfg = config_or_error(type(saved_cfg), **{**vars(saved_cfg), **run_args, "resume": str(path),
                                               "out": str(run_dir_of(path))})
    if state["epoch"] >= cfg.epochs:
        raise UserError(f"{path} already finished epoch {state['epoch']} of {cfg.epochs}; pass a larger --epochs to "
                        f"train further")
    budget = state.get("time_budget")
    if budget and budget["seconds_left"] is not None and "max_minutes" not in run_args:
        if budget["done"]:
            raise UserError(f"{path} stopped when its --max-minutes {saved_cfg.max_minutes:g} were spent; pass "
                            f"--max-minutes M with --resume to train M minutes more")
        cfg = replace(cfg, max_minutes=max(1.0, budget["seconds_left"]) / 60)
    return cfg


def restore_training(state: dict, model, opt, scheduler, total_steps: int, path, aux_opt=None):
    """Weights, optimiser and schedule (if any) of a resumed run, and an auxiliary optimiser (hyperprior.py's) if
    given; UserError if they do not fit this model and optimiser."""
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if aux_opt is not None:
            aux_opt.load_state_dict(state["aux_optimizer"])
        if scheduler is not None:
            restore_scheduler(scheduler, state["scheduler"], total_steps)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} cannot be resumed: its optimiser or schedule does not fit its model ({e}); resume "
                        f"from another checkpoint of the run, or start a new run") from None
