"""The pieces both trainers (train.py, train_prior.py) run on: flags <-> configs, run folders with one writer each,
resuming, the learning-rate schedule and --max-minutes, the optimiser step, and an epoch's save."""
import argparse
import fcntl
import functools
import inspect
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.checkpoints import checkpoint_file, load_checkpoint, run_dir_of, save_checkpoint
from imaging.slices import to_float
from modules import VQVAE, ConfigError, VQVAEConfig, broadcast_from_rank0
from utils import (ArgumentParser, UserError, append_csv, interrupts_deferred, keep_freed_memory, rng_state,
                   trim_csvs)


# ---------------------------------------------------------------------------------------------------------
# Flags <-> configs
# ---------------------------------------------------------------------------------------------------------

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def command_flags(values: dict) -> list[str]:
    """{config field: value} -> the flags that set them, as a command line takes them (None left out, booleans as
    --field / --no-field): how ablate.py and bench.py start train.py."""
    flags = []
    for name, value in values.items():
        if isinstance(value, bool):
            flags.append(flag(name) if value else "--no-" + flag(name)[2:])
        elif value is not None:
            flags += [flag(name), str(value)]
    return flags


def run_script(script: str, values: dict, threads: int | None, failure: str):
    """python <script next to this file> with the flags of `values`, as a user would run it (a subprocess: one run,
    one process, one folder); `threads` as OMP_NUM_THREADS. UserError(failure) if it fails (its error is above)."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    command = [sys.executable, str(Path(__file__).resolve().parent.parent / script), *command_flags(values)]
    if subprocess.run(command, env=env).returncode != 0:
        raise UserError(failure)


def add_trainer_data_flags(parser, member: str):
    """The data flags of a command that trains a family of runs (ablate.py's variants, ladder.py's points), passed
    to train.py for every `member`."""
    parser.add_argument("--dataset", default="demo", choices=("OASIS", "ADNI", "demo"),
                        help="the dataset (default: demo)")
    parser.add_argument("--data-root", help="where the dataset is (train.py's --data-root)")
    parser.add_argument("--image-size", type=int, help=f"train.py's --image-size for every {member}")


def chosen_members(text: str, known, flag: str) -> list[str]:
    """A comma-separated subset of `known` as given to `flag`, or a UserError naming what is unknown."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in known]
    if unknown or not names:
        raise UserError(f"unknown {flag} {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}")
    return names


def family_folder(out: Path) -> Path:
    """The folder of a family of runs, made if new; UserError if it is a file."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def training_finished(state: dict, epochs: int) -> bool:
    """Whether a run's last checkpoint ends its training: all its epochs done, or its --max-minutes spent (the
    checkpoint says so: TimeBudget.state). Anything else, a Ctrl-C or a crash, is to be resumed."""
    return state["epoch"] >= epochs or bool(state.get("time_budget", {}).get("done"))


@functools.cache
def field_help(cls) -> dict[str, str]:
    """{field: the comment after it} from the dataclass's source: the one place each setting is explained."""
    comments = re.findall(r"^\s+(\w+): [^=]+=.*?#\s*(.+)$", inspect.getsource(cls), re.MULTILINE)
    return dict(comments)


def add_config_flags(group, cls, show_defaults: bool = True, exclude=()):
    """One flag per field of the dataclass `cls` (--field-name; booleans also get --no-field-name), its help the
    field's comment. Used with argument_default=SUPPRESS, so only the flags given come back from parse_args."""
    helps, choices = field_help(cls), getattr(cls, "CHOICES", {})
    for f in fields(cls):
        if f.name in exclude:
            continue
        kind = next(t for t in (bool, int, float, str) if t is f.type or t in getattr(f.type, "__args__", ()))
        text = helps[f.name] + (f" (default: {f.default})" if show_defaults and f.default is not None else "")
        if kind is bool:
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=text)
        else:
            group.add_argument(flag(f.name), type=kind, choices=choices.get(f.name),
                               metavar=f.name.upper() if f.name not in choices else None, help=text)


def parse_config_flags(argv, prog: str, doc: str, run_cls, model_cls, model_title: str,
                       exclude=()) -> tuple[dict, dict]:
    """The flags given explicitly, split into `run_cls` and `model_cls` fields."""
    p = ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                       argument_default=argparse.SUPPRESS)
    add_config_flags(p.add_argument_group(f"training ({run_cls.__name__})"), run_cls)
    add_config_flags(p.add_argument_group(model_title), model_cls, show_defaults=False, exclude=exclude)
    args = vars(p.parse_args(argv))
    run_names = {f.name for f in fields(run_cls)}
    return {k: v for k, v in args.items() if k in run_names}, {k: v for k, v in args.items() if k not in run_names}


def config_or_error(cls, **values):
    """cls(**values), a value its __post_init__ refuses turned into the one-line UserError of its flag."""
    try:
        return cls(**values)
    except ConfigError as e:
        raise UserError(f"invalid {flag(e.field)} {e.value!r}; see --help for what it takes") from None


# ---------------------------------------------------------------------------------------------------------
# Run folders: one writer each
# ---------------------------------------------------------------------------------------------------------

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


def restore_training(state: dict, model, opt, scheduler, total_steps: int, path):
    """Weights, optimiser and schedule of a resumed run; UserError if they do not fit this model and optimiser."""
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        restore_scheduler(scheduler, state["scheduler"], total_steps)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} cannot be resumed: its optimiser or schedule does not fit its model ({e}); resume "
                        f"from another checkpoint of the run, or start a new run") from None


# ---------------------------------------------------------------------------------------------------------
# Learning rate: schedule and --max-minutes
# ---------------------------------------------------------------------------------------------------------

class LRSchedule:
    """The LambdaLR factor: a linear warmup over `warmup_steps`, then constant, or a cosine down to zero at
    `total_steps`. An object rather than a closure because LambdaLR's state_dict saves an object's fields: a total
    fitted to a --max-minutes deadline (TimeBudget) comes back on resume, so the resumed run anneals exactly as the
    uninterrupted one would have."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int):
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, total_steps
        self.fitted_to_deadline = False

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_scheduler(opt, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule(cfg.lr_schedule, cfg.warmup_steps, total_steps))


def restore_scheduler(scheduler, state: dict, total_steps: int):
    """Load a resumed LR schedule. Unless it was fitted to a --max-minutes deadline, its cosine ends at
    `total_steps`, which a larger --epochs given with --resume moves further out."""
    scheduler.load_state_dict(state)
    schedule = scheduler.lr_lambdas[0]
    if not schedule.fitted_to_deadline:
        schedule.total_steps = total_steps


def schedule_done(scheduler) -> bool:
    """Whether a schedule fitted to a --max-minutes deadline has taken its last step."""
    schedule = scheduler.lr_lambdas[0]
    return schedule.fitted_to_deadline and scheduler.last_epoch >= schedule.total_steps


def time_is_up(deadline: float, device: torch.device) -> bool:
    """Whether the deadline has passed by rank 0's clock. Every rank gets the same answer and so stops after the
    same step: a rank that stopped alone would leave the others blocked in the quantiser's collectives."""
    return bool(broadcast_from_rank0(torch.tensor([float(time.monotonic() > deadline)], device=device)).item())


class TimeBudget:
    """--max-minutes: a hard deadline by rank 0's clock, and a plan that fits the LR schedule to it.

    Early in a new run (after global steps 10 and 40) the step time is measured, and the schedule's total is cut
    to the steps that fit before the deadline, with each epoch's validation and saving estimated as well; at every
    epoch's end the plan is made again from that epoch's own step time and validation time, so a host that slows
    down or speeds up still ends on time. A plan also shortens the warmup to at most WARMUP_SHARE of its steps (or
    ends it at once, if already past that), so even a budget shorter than the preset's warmup ends annealed. The
    run then ends at the planned step, annealed, instead of being stopped with the learning rate still high.

    The plan lives in the LR schedule (a resumed run continues it) and the time left in every checkpoint
    (`state()`): a resumed run without a new --max-minutes gets the rest of its budget, not a new one."""
    PLAN_AT = (10, 40)      # steps of a new run after which it plans, from the steps since the previous one (or 1)
    EVAL_COST = 0.5         # a validation image costs about this share of a training image (forward only, SSIM)
    EPOCH_OVERHEAD_S = 3.0  # checkpoint, CSV rows and figures
    SAFETY = 0.97           # plan for this share of the time left
    WARMUP_SHARE = 0.1      # of a planned run's steps, at most

    def __init__(self, minutes: float, eval_items: int, batch_size: int, verbose: bool):
        self.minutes, self.eval_items, self.batch_size, self.verbose = minutes, eval_items, batch_size, verbose
        self.deadline = time.monotonic() + 60 * minutes if minutes else 0.0
        self._timed, self._most = None, None  # (step, time) of the last timing point; the plan's largest total

    def __bool__(self):
        return bool(self.deadline)

    def up(self, device) -> bool:
        return bool(self.deadline) and time_is_up(self.deadline, device)

    def state(self, done: bool) -> dict:
        """What a checkpoint records of the budget: the seconds left (None without --max-minutes) and whether the
        run stopped because its budget was spent (its planned steps done, or the deadline passed)."""
        return {"seconds_left": max(0.0, self.deadline - time.monotonic()) if self.deadline else None,
                "done": bool(done)}

    def observe(self, scheduler, steps_per_epoch: int, device):
        """Call after every optimiser step of a new run: times steps 1-10 and plans at step 10 (a first guess, for
        budgets of few steps), then times steps 10-40 and plans again at step 40."""
        schedule, step = scheduler.lr_lambdas[0], scheduler.last_epoch
        if not self.deadline or step not in (1, *self.PLAN_AT):
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        if self._timed is not None:
            since_step, since = self._timed
            step_seconds = (now - since) / (step - since_step)
            eval_seconds = self.eval_items / self.batch_size * step_seconds * self.EVAL_COST + self.EPOCH_OVERHEAD_S
            self.plan(scheduler, steps_per_epoch, step_seconds, eval_seconds, self._most, device)
        elif step == 1:
            self._most = schedule.total_steps  # the --epochs' worth: no plan goes beyond it
        else:
            return  # not timed from step 1 (a resumed run): its epoch ends plan
        self._timed = (step, now)

    def replan(self, scheduler, steps_per_epoch: int, step_seconds: float, eval_seconds: float, most: int, device):
        """At an epoch's end: plan again from the step time and the validation time that epoch measured (at most
        `most` steps in all, the --epochs' worth); a run not yet planned (it has not reached step 10) is left."""
        if self.deadline and scheduler.lr_lambdas[0].fitted_to_deadline:
            self.plan(scheduler, steps_per_epoch, step_seconds, eval_seconds + self.EPOCH_OVERHEAD_S, most, device)

    def plan(self, scheduler, steps_per_epoch: int, step_seconds: float, eval_seconds: float, most: int, device):
        """Fit the schedule to the steps that fit before the deadline (rank 0's plan, for every rank)."""
        schedule, step = scheduler.lr_lambdas[0], scheduler.last_epoch
        fit = steps_that_fit(self.SAFETY * (self.deadline - time.monotonic()), step_seconds, steps_per_epoch,
                             step % steps_per_epoch, eval_seconds, most - step)
        total = int(broadcast_from_rank0(torch.tensor([step + fit], device=device, dtype=torch.float64)).item())
        changed = not schedule.fitted_to_deadline or total != schedule.total_steps
        schedule.fitted_to_deadline = True
        schedule.total_steps = total
        schedule.warmup_steps = min(schedule.warmup_steps, max(step, int(self.WARMUP_SHARE * total)))
        if self.verbose and changed:
            tqdm.write(f"--max-minutes {self.minutes:g}: {total} steps ({total / steps_per_epoch:.2f} epochs) fit "
                       f"before the deadline at {step_seconds:.3f} s/step; the learning rate schedule ends there")


def steps_that_fit(seconds: float, step_seconds: float, steps_per_epoch: int, step_in_epoch: int,
                   eval_seconds: float, most: int) -> int:
    """How many more optimiser steps fit in `seconds` (at most `most`), when every epoch that is begun, the
    current one included, also pays `eval_seconds` at its end."""
    steps = 0
    while steps < most:
        epoch_steps = steps_per_epoch - step_in_epoch
        cost = epoch_steps * step_seconds + eval_seconds
        if cost > seconds:
            return min(most, steps + max(0, int((seconds - eval_seconds) // step_seconds)))
        steps, seconds, step_in_epoch = steps + epoch_steps, seconds - cost, 0
    return most


def optimizer_step(loss, model, opt, scheduler, grad_clip: float):
    """Backward, optional gradient clipping, then one step of the optimiser and of the LR schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    scheduler.step()


def prior_train_step(prior, stepped, opt, scheduler, codes, labels, amp, grad_clip: float) -> torch.Tensor:
    """One step of a prior on (B, h, w) code maps [+ (B,) labels], the forward through `stepped` (the prior, or its
    torch.compile); returns the loss, mean nats per code (train_prior.py runs it, bench.py times it)."""
    with amp:
        logits = stepped(codes, labels)  # (B, K, h, w)
    loss = F.cross_entropy(logits.float(), codes)
    optimizer_step(loss, prior, opt, scheduler, grad_clip)
    return loss


# ---------------------------------------------------------------------------------------------------------
# The VQ-VAE's training step (train.py runs it, bench.py times it)
# ---------------------------------------------------------------------------------------------------------

def speed_settings(device: torch.device):
    """The process-wide part of the fast path: TF32 on CUDA; on the CPU, glibc keeps freed memory for reuse
    (utils.keep_freed_memory). bench.py times the yardstick before applying these."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # the shapes repeat every step, so the fastest kernels are worth finding
    else:
        keep_freed_memory()


def stage_images(cfg, device: torch.device, *splits, verbose: bool):
    """On CUDA, move each split's decoded uint8 images to the GPU once (the OASIS train split is 0.6 GB), so that a
    batch is one gather there: at small batches the step is bound by what the host does, and a pinned copy per
    batch costs a large share of it. Splits that do not fit stay in host memory."""
    if device.type != "cuda" or not cfg.images_on_device:
        return
    for data in splits:
        try:
            data.images = data.images.to(device)
        except torch.OutOfMemoryError:
            if verbose:
                print(f"note: the {data.split} images ({data.images.nbytes / 2**30:.1f} GiB) do not fit on "
                      f"{device}; they stay in host memory")


def batches(data, sampler, batch_size: int, device: torch.device, drop_last: bool):
    """Yield (B, 1, H, W) uint8 batches on `device`. Images were decoded once into memory (host or, after
    stage_images, the GPU), so this is an index into a tensor: no decoding, no worker processes."""
    order = torch.tensor(list(sampler), dtype=torch.long, device=data.images.device)
    stop = len(order) - batch_size + 1 if drop_last else len(order)
    for start in range(0, max(stop, 0), batch_size):
        x = data.images[order[start:start + batch_size]].unsqueeze(1)  # (B, 1, H, W) uint8
        if x.device != device:
            x = (x.pin_memory() if device.type == "cuda" else x).to(device, non_blocking=True)
        yield x


def build_training(cfg, model_cfg: VQVAEConfig, device: torch.device, total_steps: int):
    """The model (on `device`, channels_last unless --no-channels-last), its Adam optimiser and LR schedule."""
    model = VQVAE(model_cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    return model, opt, lr_scheduler(opt, cfg, total_steps)


def require_compiler():
    """--compile's precondition, checked before a run folder is made."""
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise UserError("--compile needs a C++ compiler (torch.compile generates and builds C++/Triton code) and "
                        "none was found; install g++ or drop --compile")


def compile_model(model: torch.nn.Module, device: torch.device, distributed: bool) -> torch.nn.Module:
    """torch.compile. On a single CUDA GPU also with CUDA graphs ("reduce-overhead"): at the seed's batch of 16 the
    step is bound by kernel launches, which graphs remove. Under DDP the gradient all-reduce runs between graph
    segments, so there the default mode. On the CPU, random ops (the priors' dropout) draw from ATen's generator
    instead of inductor's, which fills dropout masks element by element; so the compiled model is faster with
    dropout, and draws the eager model's random numbers and trains to its weights."""
    if device.type == "cpu":
        from torch._inductor import config as inductor_config  # loaded only by a compiled run
        inductor_config.fallback_random = True
    single_gpu = device.type == "cuda" and not distributed
    return torch.compile(model, mode="reduce-overhead" if single_gpu else None)


def train_step(model, opt, scheduler, x, cfg, autocast, corrupt=None):
    """One optimisation step on a (B, 1, H, W) uint8 batch; returns the model output and the loss. Nothing in it
    waits for the device. bench.py times exactly this. With `corrupt` (denoising), the model reads corrupt(x) and
    its reconstruction loss is taken against the clean x."""
    x = to_float(x)
    target = None if corrupt is None else x
    inputs = x if corrupt is None else corrupt(x)
    if cfg.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with autocast:
        out = model(inputs, target)
    loss = sum(out.losses.values())
    optimizer_step(loss, model, opt, scheduler, cfg.grad_clip)
    return out, loss


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
            self.writer.add_image(name, make_grid(((images.float() + 1) / 2).clamp(0, 1), nrow=nrow), epoch)

    def close(self):
        if self.writer:
            self.writer.close()


# ---------------------------------------------------------------------------------------------------------
# An epoch's save, and what a stopped run says
# ---------------------------------------------------------------------------------------------------------

class SavedEpochs:
    """The newest epoch whose checkpoints and CSV rows are complete on disk, the one sequence that writes them, and
    what a run that stops early says about them. Both trainers save through `save`."""

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
            save_checkpoint({**state, "epoch": epoch, "rng": rng_state()}, folder / "checkpoints" / f"epoch_{epoch:03d}.pt",
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
