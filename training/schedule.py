"""The learning rate: its schedule (warmup, then constant or cosine) and --max-minutes, which fits the schedule to
a deadline and re-plans it at every epoch's end."""
import math
import time

import torch
from tqdm import tqdm

from training.distributed import broadcast_from_rank0


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

    The budget covers everything the command does: its clock starts when the command starts (`started`, taken at
    the top of the trainer's main), so loading and decoding the data, building the model, the prior's encoding
    pass and a resumed run's reload are spent from it, and the plan fits the training to what they left
    (`begin` says how much that was). What the budget cannot hold, the time past the deadline (the rest of a
    step, the last epoch's validation, checkpoint and figures), is named by the line a run ends with (`account`).

    The plan lives in the LR schedule (a resumed run continues it) and the time left in every checkpoint
    (`state()`): a resumed run without a new --max-minutes gets the rest of its budget, not a new one, and spends
    its own setup from it."""
    PLAN_AT = (10, 40)      # steps of a new run after which it plans, from the steps since the previous one (or 1)
    EVAL_COST = 0.5         # a validation image costs about this share of a training image (forward only, SSIM)
    EPOCH_OVERHEAD_S = 3.0  # checkpoint, CSV rows and figures
    SAFETY = 0.97           # plan for this share of the time left
    WARMUP_SHARE = 0.1      # of a planned run's steps, at most

    def __init__(self, minutes: float, eval_items: int, batch_size: int, verbose: bool, started: float | None = None):
        """`started`: time.monotonic() when the command started (default: now); the deadline is `minutes` after it."""
        self.minutes, self.eval_items, self.batch_size, self.verbose = minutes, eval_items, batch_size, verbose
        self.started = time.monotonic() if started is None else started
        self.deadline = self.started + 60 * minutes if minutes else 0.0
        self.setup_seconds = 0.0  # from `started` to the first epoch (begin)
        self._timed, self._most = None, None  # (step, time) of the last timing point; the plan's largest total

    def __bool__(self):
        return bool(self.deadline)

    def up(self, device) -> bool:
        return bool(self.deadline) and time_is_up(self.deadline, device)

    def begin(self, setup: str) -> str:
        """Call as the first epoch begins: the line that says how much of the budget the setup before it took
        (`setup`: what that was), and what is left for the epochs."""
        now = time.monotonic()
        self.setup_seconds = now - self.started
        spent = f"--max-minutes {self.minutes:g}: the setup ({setup}) used {duration(self.setup_seconds)}"
        if now >= self.deadline:
            return f"{spent}, the whole budget: the first epoch stops at its first look at the clock"
        return f"{spent}; the epochs get the other {duration(self.deadline - now)}"

    def account(self) -> str:
        """The line a run that ends (not interrupted) closes with: its time since the command started, the setup's
        share, and the time past the deadline, which the budget did not hold."""
        now = time.monotonic()
        line = (f"--max-minutes {self.minutes:g}: {duration(now - self.started)} since the command started, "
                f"{duration(self.setup_seconds)} of it setup")
        if now <= self.deadline:
            return f"{line}; all within the budget"
        return (f"{line}; {duration(now - self.deadline)} of it ran past the deadline, outside the budget (the rest of "
                f"the step under way, the last epoch's validation, checkpoint and figures)")

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


def duration(seconds: float) -> str:
    """Seconds for a log line: "12.3 s", or "4.1 minutes" from two minutes up."""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} minutes"
