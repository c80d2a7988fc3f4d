"""Train a VQ-VAE on OASIS, ADNI or the built-in demo slices.

    python train.py --dataset OASIS --data-root /data/keras_png_slices_data
    python train.py --dataset demo --epochs 3
    python train.py --resume runs/OASIS-default-000/last.pt        # continue an interrupted run
    torchrun --nproc_per_node=4 train.py --dataset OASIS ...         # several GPUs (DDP)

A run folder holds config.json, metrics.csv, code_usage.csv, checkpoints/epoch_NNN.pt, best.pt (lowest
validation loss), last.pt, loss.png, ssim.png, codebook.png, code_usage.png and recon/epoch_NNN.png.
"""
import argparse
import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from dataset import DATASETS, DataError, build_dataset, demo_settings, to_float
from modules import PRESETS, VQVAE, VQVAEConfig, all_reduce_sum, broadcast_from_rank0
from utils import (ArgumentParser, SavedEpochs, UserError, append_csv, choose_device, distributed_env,
                   drop_epochs_after, fail_together, interrupts_deferred, is_distributed, keep_freed_memory,
                   load_checkpoint, one_line_reason, plot_bars, plot_training_curves, psnr, rng_state,
                   save_checkpoint, save_side_by_side, seed_everything, set_rng_state, ssim, stop_on_sigterm,
                   to_unit, unwrap, write_json)

# The figures (curves, code usage, reconstructions) take ~1 s to draw: with short epochs (a GPU) they are drawn
# for an epoch that ends at least this long after the last drawing, and always for the last epoch.
FIGURES_EVERY_S = 30.0

# Optimiser settings that belong to each model preset (the seed report used Adam at 2e-3, constant).
PRESET_TRAINING = {
    "seed": {"lr": 2e-3, "lr_schedule": "constant"},
    "default": {"lr": 2e-3, "lr_schedule": "cosine"},
    "hq": {"lr": 2e-3, "lr_schedule": "cosine"},
}


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "OASIS"
    data_root: str | None = None      # default: the demo data folder for --dataset demo; required otherwise
    image_size: int | None = None     # centre-crop to square and resize; None keeps the files' size
    val_fraction: float = 0.1         # ADNI: share of train patients held out for validation
    skip_bad: bool = False            # skip unreadable or odd-sized image files instead of stopping
    preset: str = "default"
    epochs: int = 40
    batch_size: int = 16              # per process
    lr: float | None = None           # None: the preset's
    lr_schedule: str | None = None    # "constant" or "cosine" (after warmup); None: the preset's
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 0.0            # 0: no clipping
    precision: str = "auto"           # "auto" (bf16 where the hardware has it), "bf16" or "fp32"
    channels_last: bool = True
    compile: bool = False             # torch.compile the model (on one CUDA GPU with CUDA graphs) and, on the CPU,
                                      # the validation SSIM
    images_on_device: bool = True     # CUDA: keep the decoded uint8 images on the GPU (else pinned host copies)
    sync_bn: bool = False             # SyncBatchNorm under DDP on CUDA
    max_minutes: float = 0.0          # stop training after this many minutes (0: no limit)
    seed: int = 0
    device: str = "auto"
    out: str | None = None            # run folder; default runs/<dataset>-<preset>-NNN
    resume: str | None = None         # a last.pt (or any epoch checkpoint) to continue from

    def resolved(self) -> "TrainConfig":
        """Fill the preset-dependent fields and check every value; raises UserError."""
        if self.preset not in PRESETS:
            raise UserError(f"unknown --preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        cfg = replace(self, **{k: v for k, v in PRESET_TRAINING[self.preset].items() if getattr(self, k) is None})
        checks = [
            (cfg.dataset in DATASETS, f"unknown --dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}"),
            (cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}"),
            (cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}"),
            (cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
            (cfg.lr_schedule in ("constant", "cosine"), f"--lr-schedule must be constant or cosine"),
            (cfg.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {cfg.warmup_steps}"),
            (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
            (cfg.grad_clip >= 0, f"--grad-clip must be >= 0, got {cfg.grad_clip}"),
            (cfg.precision in ("auto", "bf16", "fp32"), f"--precision must be auto, bf16 or fp32"),
            (cfg.image_size is None or cfg.image_size >= 8, f"--image-size must be at least 8, got {cfg.image_size}"),
            (0 < cfg.val_fraction < 1, f"--val-fraction must be between 0 and 1, got {cfg.val_fraction}"),
            (cfg.max_minutes >= 0, f"--max-minutes must be >= 0, got {cfg.max_minutes}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return cfg


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------

def use_bf16(precision: str, device: torch.device) -> bool:
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def speed_settings(device: torch.device):
    """The process-wide part of the fast path: TF32 on CUDA; on the CPU, glibc keeps freed memory for reuse
    (utils.keep_freed_memory). bench.py times the yardstick before applying these."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # the shapes repeat every step, so the fastest kernels are worth finding
    else:
        keep_freed_memory()


def build_training(cfg: TrainConfig, model_cfg: VQVAEConfig, device: torch.device, total_steps: int):
    """The model (on `device`, channels_last unless --no-channels-last), its Adam optimiser and LR schedule."""
    model = VQVAE(model_cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                           weight_decay=cfg.weight_decay)
    return model, opt, lr_scheduler(opt, cfg, total_steps)


def new_run_dir(cfg: TrainConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    root = Path("runs")
    n = sum(1 for _ in root.glob(f"{cfg.dataset}-{cfg.preset}-*")) if root.exists() else 0
    while (root / f"{cfg.dataset}-{cfg.preset}-{n:03d}").exists():
        n += 1
    return root / f"{cfg.dataset}-{cfg.preset}-{n:03d}"


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


class TimeBudget:
    """--max-minutes: a hard deadline by rank 0's clock, and a plan that fits the LR schedule to it.

    Early in a new run (global steps FROM_STEP..AT_STEP) the step time is measured, and the schedule's total is cut
    to the steps that fit before the deadline, with each epoch's validation and saving estimated as well; the run
    then ends at that step, annealed, instead of being stopped with the learning rate still high."""
    FROM_STEP, AT_STEP = 10, 40
    EVAL_COST = 0.5        # a validation image costs about this share of a training image (forward only, SSIM)
    EPOCH_OVERHEAD_S = 3.0  # checkpoint, CSV rows and figures
    SAFETY = 0.97          # plan for this share of the time left

    def __init__(self, minutes: float, val_images: int, batch_size: int, verbose: bool):
        self.minutes, self.val_images, self.batch_size, self.verbose = minutes, val_images, batch_size, verbose
        self.deadline = time.monotonic() + 60 * minutes if minutes else 0.0
        self._started = None

    def __bool__(self):
        return bool(self.deadline)

    def up(self, device) -> bool:
        return bool(self.deadline) and time_is_up(self.deadline, device)

    def observe(self, scheduler, steps_per_epoch: int, device):
        """Call after every optimiser step; fits the schedule once, at global step AT_STEP, if not fitted yet."""
        schedule, step = scheduler.lr_lambdas[0], scheduler.last_epoch
        if not self.deadline or schedule.fitted_to_deadline or step not in (self.FROM_STEP, self.AT_STEP):
            return
        now = time.perf_counter() if device.type != "cuda" else (torch.cuda.synchronize(device), time.perf_counter())[1]
        if step == self.FROM_STEP:
            self._started = now
            return
        if self._started is None:
            return
        step_seconds = (now - self._started) / (self.AT_STEP - self.FROM_STEP)
        eval_seconds = self.val_images / self.batch_size * step_seconds * self.EVAL_COST + self.EPOCH_OVERHEAD_S
        fit = steps_that_fit(self.SAFETY * (self.deadline - time.monotonic()), step_seconds, steps_per_epoch,
                             step % steps_per_epoch, eval_seconds, schedule.total_steps - step)
        total = int(broadcast_from_rank0(torch.tensor([step + fit], device=device, dtype=torch.float64)).item())
        schedule.fitted_to_deadline = True
        if total < schedule.total_steps:
            schedule.total_steps = total
            if self.verbose:
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


def stage_images(cfg: TrainConfig, device: torch.device, *splits, verbose: bool):
    """On CUDA, move each split's decoded uint8 images to the GPU once (the OASIS train split is 0.6 GB), so that a
    batch is one gather there: at small batches the step is bound by what the host does, and a pinned copy per
    batch cost ~20 % of it on an H100. Splits that do not fit stay in host memory."""
    if device.type != "cuda" or not cfg.images_on_device:
        return
    for data in splits:
        try:
            data.images = data.images.to(device)
        except torch.OutOfMemoryError:
            if verbose:
                print(f"note: the {data.split} images ({data.images.nbytes / 2**30:.1f} GiB) do not fit on {device}; "
                      f"they stay in host memory")


def compile_model(model: torch.nn.Module, device: torch.device, distributed: bool) -> torch.nn.Module:
    """torch.compile. On a single CUDA GPU also with CUDA graphs ("reduce-overhead"): at the seed's batch of 16 the
    step is bound by kernel launches, which graphs remove (about 2x on an H100, README "Speed"). Under DDP the
    gradient all-reduce runs between graph segments, so there the default mode."""
    single_gpu = device.type == "cuda" and not distributed
    return torch.compile(model, mode="reduce-overhead" if single_gpu else None)


def time_is_up(deadline: float, device: torch.device) -> bool:
    """Whether the --max-minutes deadline has passed by rank 0's clock. Every rank gets the same answer and so
    stops after the same step: a rank that stopped alone would leave the others blocked in the quantiser's
    collectives."""
    return bool(broadcast_from_rank0(torch.tensor([float(time.monotonic() > deadline)], device=device)).item())


@torch.no_grad()
def average_batchnorm_stats(model: torch.nn.Module):
    """Average BatchNorm running statistics over the ranks (each rank's saw only its own batches), so that every
    rank validates, and rank 0 saves, the same model."""
    if not is_distributed():
        return
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # SyncBatchNorm is not a BatchNorm2d: its statistics agree already
            for t in (m.running_mean, m.running_var):
                all_reduce_sum(t).div_(dist.get_world_size())


def codebook_stats(counts: torch.Tensor) -> dict:
    """Usage of the K codes over an epoch, from per-code assignment counts (K,)."""
    p = counts.double() / counts.sum().clamp(min=1)
    used = int((counts > 0).sum())
    return {"codes_used": used, "codes_used_pct": 100.0 * used / counts.numel(),
            "perplexity": float(torch.exp(-(p * torch.log(p + 1e-12)).sum()))}


LOSS_NAMES = ("reconstruction", "codebook", "commitment")


def diverged_anywhere(loss_value: float, device: torch.device) -> bool:
    """Whether the loss is NaN or infinite on any rank; every rank gets the same answer, so all stop together."""
    bad = torch.tensor([float(not math.isfinite(loss_value))], device=device)
    return bool(all_reduce_sum(bad).item())


def train_step(model, opt, scheduler, x, cfg, autocast):
    """One optimisation step on a (B, 1, H, W) uint8 batch; returns the model output and the loss. Nothing in it
    waits for the device. bench.py times exactly this."""
    x = to_float(x)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast:
        out = model(x)
    loss = sum(out.losses.values())
    optimizer_step(loss, model, opt, scheduler, cfg.grad_clip)
    return out, loss


def optimizer_step(loss, model, opt, scheduler, grad_clip: float):
    """Backward, optional gradient clipping, then one step of the optimiser and of the LR schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    scheduler.step()


def train_epoch(model, opt, scheduler, data, sampler, cfg, device, autocast, budget, progress):
    """One pass over the training split; returns epoch-mean losses over all ranks and the code counts."""
    model.train()
    sums = torch.zeros(len(LOSS_NAMES) + 1, device=device)  # loss terms, images
    counts = torch.zeros(unwrap(model).config.codebook_size, device=device, dtype=torch.long)
    wait = 0.0
    it = batches(data, sampler, cfg.batch_size, device, drop_last=True)
    for step in range(len(sampler) // cfg.batch_size):
        t = time.perf_counter()
        x = next(it)
        wait += time.perf_counter() - t
        out, loss = train_step(model, opt, scheduler, x, cfg, autocast)
        with torch.no_grad():
            sums += torch.stack([*(out.losses[k].detach().float() for k in LOSS_NAMES), sums.new_ones(())]) * x.shape[0]
            counts += out.code_counts
        progress.update(1)
        if step % 25 == 0:  # the host waits for the loss here anyway, so the divergence check costs nothing extra
            value = loss.item()
            progress.set_postfix(loss=f"{value:.4f}")
            if diverged_anywhere(value, device):
                break  # a NaN/inf loss: stop now rather than at the end of the epoch; train() reports it
        budget.observe(scheduler, len(sampler) // cfg.batch_size, device)
        if schedule_done(scheduler) or (budget and step % 10 == 9 and budget.up(device)):  # a collective: not every step
            break
    all_reduce_sum(sums)
    all_reduce_sum(counts)
    n = sums[-1].clamp(min=1)
    means = {f"train_{k}": float(sums[i] / n) for i, k in enumerate(LOSS_NAMES)}
    means["train_loss"] = sum(means.values())
    return means, counts, int(sums[-1]), wait


@torch.no_grad()
def evaluate(model, data, cfg, device, autocast) -> dict:
    """Validation losses, SSIM and PSNR over every validation image exactly once (shared across ranks)."""
    model.eval()  # BatchNorm uses its running statistics; the codebook is not updated
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    sums = torch.zeros(len(LOSS_NAMES) + 3, device=device, dtype=torch.float64)  # losses, ssim, psnr, images
    for x in batches(data, range(rank, len(data), world), 32, device, drop_last=False):
        x = to_float(x)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            out = model(x)
        b = x.shape[0]
        ref, rec = to_unit(x), to_unit(out.reconstruction)
        sums += torch.stack([*(out.losses[k].double() * b for k in LOSS_NAMES),
                             ssim(rec, ref, compiled=cfg.compile).double().sum(), psnr(rec, ref).double().sum(),
                             torch.tensor(float(b), device=device, dtype=torch.float64)])
    all_reduce_sum(sums)
    n = sums[-1].clamp(min=1)
    metrics = {f"val_{k}": float(sums[i] / n) for i, k in enumerate(LOSS_NAMES)}
    metrics["val_loss"] = sum(metrics.values())
    metrics["val_ssim"], metrics["val_psnr"] = float(sums[-3] / n), float(sums[-2] / n)
    return metrics


@torch.no_grad()
def save_reconstructions(model, data, cfg, device, autocast, path: Path, n: int = 8):
    model.eval()
    x = to_float(data.images[:n].unsqueeze(1).to(device))
    with autocast:
        rec = model(x).reconstruction.float()
    save_side_by_side(x, rec, path, nrow=4)


def load_datasets(cfg: TrainConfig, verbose: bool):
    kwargs = dict(image_size=cfg.image_size, val_fraction=cfg.val_fraction, seed=cfg.seed,
                  skip_bad=cfg.skip_bad, verbose=verbose)
    train = build_dataset(cfg.dataset, cfg.data_root, "train", **kwargs)
    val = build_dataset(cfg.dataset, cfg.data_root, "validate", **kwargs)
    return train, val


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, model_cfg: VQVAEConfig, resume_state: dict | None = None):
    rank, world, local_rank = distributed_env()
    device = choose_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    speed_settings(device)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    device_id=device if device.type == "cuda" else None)
        out = [cfg.out]  # rank 0's run folder: ranks that looked in runs/ at different moments could disagree
        dist.broadcast_object_list(out, src=0)
        cfg = replace(cfg, out=out[0])
    main_process = rank == 0
    seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)

    # Every rank holds the whole dataset in memory. Demo data: rank 0 first, as it may have to write the files.
    first = main_process or cfg.dataset != "demo"
    for turn in (True, False):
        with fail_together(device):
            if first == turn:
                train_data, val_data = load_datasets(cfg, verbose=main_process)
    height, width = train_data.image_shape
    try:
        model_cfg.latent_grid(height, width)
    except ValueError as e:
        raise UserError(str(e)) from None
    if len(train_data) < cfg.batch_size * world:
        raise UserError(f"the train split has {len(train_data)} images, fewer than one batch "
                        f"({cfg.batch_size} x {world} processes); lower --batch-size")
    stage_images(cfg, device, train_data, val_data, verbose=main_process)

    sampler = DistributedSampler(train_data, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    steps_per_epoch = len(sampler) // cfg.batch_size
    model, opt, scheduler = build_training(cfg, model_cfg, device, cfg.epochs * steps_per_epoch)

    start_epoch, best_val = 1, float("inf")
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        restore_scheduler(scheduler, resume_state["scheduler"], cfg.epochs * steps_per_epoch)
        start_epoch, best_val = resume_state["epoch"] + 1, resume_state["best_val_loss"]
        if main_process:
            set_rng_state(resume_state["rng"])
            if resume_state.get("world_size", 1) != world:
                print(f"note: {cfg.resume} comes from a run of {resume_state.get('world_size', 1)} processes, this "
                      f"one has {world}: the global batch and the steps per epoch change, so the result will "
                      f"differ from an uninterrupted run")
    if rank:
        # Per-rank streams. Nothing a rank > 0 draws reaches the model: what the ranks must agree on (k-means
        # init, dead-code restarts) is broadcast from rank 0, whose RNG state is the one checkpoints keep.
        seed_everything(cfg.seed + 1000 * rank + start_epoch)

    if world > 1:
        if cfg.sync_bn and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
        # Buffers are broadcast from rank 0 once, here, but not before every forward: the quantiser keeps its
        # buffers identical on every rank itself (all-reduced EMA statistics, restarts broadcast from rank 0), and
        # BatchNorm running statistics are averaged over the ranks once per epoch (average_batchnorm_stats).
        # (Set as an attribute: the constructor argument is deprecated in newer torch and would also skip the
        # broadcast at construction.)
        model.broadcast_buffers = False
    if cfg.compile:
        model = compile_model(model, device, distributed=world > 1)
    bf16 = use_bf16(cfg.precision, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    run_dir = Path(cfg.out)
    with fail_together(device):
        if main_process:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run_dir / "recon").mkdir(exist_ok=True)
            write_json(run_dir / "config.json", {"train": asdict(cfg), "model": asdict(model_cfg)})
            h, w = model_cfg.latent_grid(height, width)
            print(f"run {run_dir}: {cfg.dataset} {height}x{width}, train {len(train_data)} / validate "
                  f"{len(val_data)} slices; preset {cfg.preset}, latent grid {h}x{w}, K={model_cfg.codebook_size} "
                  f"({model_cfg.bits_per_image(height, width):.0f} bits/slice); {device} x {world}, "
                  f"{'bf16' if bf16 else 'fp32'}, epochs {start_epoch}..{cfg.epochs}")

    budget = TimeBudget(cfg.max_minutes, len(val_data), cfg.batch_size, verbose=main_process)
    epoch = start_epoch - 1
    figures_at = -math.inf  # when the figures were last drawn
    saved = SavedEpochs("train.py", run_dir, start_epoch, cfg.resume,
                        "(under the same torchrun command)" if world > 1 else "")

    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", disable=not main_process,
                      leave=False, dynamic_ncols=True) as progress:
                train_metrics, counts, seen, wait = train_epoch(model, opt, scheduler, train_data, sampler, cfg,
                                                                device, autocast, budget, progress)
            train_seconds = time.perf_counter() - t0
            if not math.isfinite(train_metrics["train_loss"]):  # checked before anything of this epoch is saved
                raise saved.diverged(epoch, "train loss", train_metrics["train_loss"], cfg)
            average_batchnorm_stats(unwrap(model))
            val_metrics = evaluate(unwrap(model), val_data, cfg, device, autocast)
            if not math.isfinite(val_metrics["val_loss"]):  # e.g. the epoch's very last step broke the weights
                raise saved.diverged(epoch, "validation loss", val_metrics["val_loss"], cfg)
            quantizer = unwrap(model).quantizer
            row = {"epoch": epoch, **train_metrics, **val_metrics, **codebook_stats(counts.cpu()),
                   "dead_codes": int((quantizer.usage < max(quantizer.dead_code_threshold, 1e-3)).sum()),
                   "lr": opt.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - t0,
                   "train_img_per_s": seen / train_seconds, "data_wait_pct": 100 * wait / train_seconds}
            best = row["val_loss"] < best_val
            best_val = min(best_val, row["val_loss"])
            stopping = schedule_done(scheduler) or budget.up(device)
            last_epoch = stopping or epoch == cfg.epochs
            with fail_together(device):  # also the barrier: no rank goes on before rank 0 has saved
                if main_process:
                    state = {"kind": "vqvae", "model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": scheduler.state_dict(), "epoch": epoch, "best_val_loss": best_val,
                             "rng": rng_state(), "model_config": asdict(model_cfg), "train_config": asdict(cfg),
                             "world_size": world, "metrics": row,
                             "demo_settings": demo_settings(cfg.data_root) if cfg.dataset == "demo" else None}
                    with interrupts_deferred():  # Ctrl-C here lands after the epoch's checkpoints and CSV rows
                        save_checkpoint(state, run_dir / "checkpoints" / f"epoch_{epoch:03d}.pt",
                                        *([run_dir / "best.pt"] if best else []), run_dir / "last.pt")
                        if resume_state is not None and epoch == start_epoch:  # rows of a run that went further
                            drop_epochs_after(epoch - 1, [run_dir / "metrics.csv", run_dir / "code_usage.csv"])
                        append_csv(run_dir / "metrics.csv", row)
                        append_csv(run_dir / "code_usage.csv", {"epoch": epoch, **{f"code_{i}": int(c)
                                                                                  for i, c in enumerate(counts)}})
                        saved.epoch = epoch
                    if last_epoch or time.monotonic() - figures_at >= FIGURES_EVERY_S:
                        plot_training_curves(run_dir / "metrics.csv", run_dir)
                        plot_bars(counts.cpu(), run_dir / "code_usage.png", f"Code usage, epoch {epoch}",
                                  "code index", "assignments")
                        save_reconstructions(unwrap(model), val_data, cfg, device, autocast,
                                             run_dir / "recon" / f"epoch_{epoch:03d}.png")
                        figures_at = time.monotonic()
                    tqdm.write(f"epoch {epoch:3d} | train loss {row['train_loss']:.4f} (rec {row['train_reconstruction']:.4f}) "
                               f"| val loss {row['val_loss']:.4f} SSIM {row['val_ssim']:.4f} PSNR {row['val_psnr']:.2f} "
                               f"| codes {row['codes_used']}/{model_cfg.codebook_size} ppl {row['perplexity']:.1f} "
                               f"| lr {row['lr']:.2e} | {row['epoch_seconds']:.1f}s {row['train_img_per_s']:.1f} img/s"
                               + (" *" if best else ""))
            saved.epoch = epoch  # on every rank: fail_together returned, so rank 0 has saved
            if stopping:
                if main_process:
                    print(f"stopping after epoch {epoch}: " + ("the steps planned for --max-minutes "
                          f"{cfg.max_minutes:g} are done" if schedule_done(scheduler) else
                          f"--max-minutes {cfg.max_minutes:g} reached"))
                break
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see main)
        if main_process:
            print(saved.interrupted(epoch), file=sys.stderr)
        raise SystemExit(130)
    return run_dir


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(group, cls, show_defaults: bool = True, exclude=()):
    """One flag per field of the dataclass `cls` (--field-name; booleans also get --no-field-name). Used with
    argument_default=SUPPRESS, so only the flags given explicitly come back from parse_args."""
    for f in fields(cls):
        if f.name in exclude:
            continue
        kind = next(t for t in (bool, int, float, str) if t is f.type or t in getattr(f.type, "__args__", ()))
        default = f.default if show_defaults else None
        text = f"(default: {default})" if default is not None else None
        if kind is bool:
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=text)
        else:
            group.add_argument(flag(f.name), type=kind, metavar=f.name.upper(), help=text)


def parse_args(argv=None) -> tuple[dict, dict]:
    """Returns the flags given explicitly, split into TrainConfig and VQVAEConfig fields."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       argument_default=argparse.SUPPRESS)
    add_config_flags(p.add_argument_group("training (TrainConfig)"), TrainConfig)
    add_config_flags(p.add_argument_group("model overrides (VQVAEConfig; default: the preset's value)"), VQVAEConfig,
                     show_defaults=False)
    args = vars(p.parse_args(argv))
    train_names = {f.name for f in fields(TrainConfig)}
    return ({k: v for k, v in args.items() if k in train_names},
            {k: v for k, v in args.items() if k not in train_names})


# Flags that may change when a run is resumed; everything else comes from the checkpoint.
RESUMABLE_OVERRIDES = ("epochs", "device", "compile", "max_minutes", "data_root", "resume")
# What train() reads from a checkpoint it resumes.
RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "best_val_loss", "rng", "model_config", "train_config")


def resumable_configs(state: dict, path) -> tuple[TrainConfig, VQVAEConfig]:
    """The configs saved in a checkpoint, once it is clear that this code can continue from it: UserError if
    it lacks something, or its weights do not fit the model its own config describes."""
    try:
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            raise KeyError(", ".join(missing))
        cfg, model_cfg = TrainConfig(**state["train_config"]), VQVAEConfig.from_dict(state["model_config"])
        VQVAE(model_cfg).load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} cannot be resumed: it does not match the run it describes ({one_line_reason(e)}); "
                        f"resume from another checkpoint of the run, or start a new run") from None
    return cfg, model_cfg


def holds_a_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("last.pt", "best.pt", "metrics.csv"))


def load_resume(train_args: dict, model_args: dict, allowed, kind: str = "vqvae") -> tuple[Path, dict]:
    """The checkpoint that --resume names (a run folder: its last.pt), loaded, once it is clear that no flag but
    those in `allowed` was given with it: everything else comes from the checkpoint. Also train_prior.py's."""
    path = Path(train_args["resume"])
    path = path / "last.pt" if path.is_dir() else path
    state = load_checkpoint(path, kind)
    changed = sorted(set(train_args) - set(allowed)) + sorted(model_args)
    if changed:
        raise UserError(f"--resume continues a run with its saved config; these flags cannot change: "
                        f"{', '.join(flag(c) for c in changed)} (start a new run instead)")
    return path, state


def refuse_finished(path, state: dict, epochs: int):
    if state["epoch"] >= epochs:
        raise UserError(f"{path} already finished epoch {state['epoch']} of {epochs}; pass a larger --epochs to "
                        f"train further")


def configs_from_args(train_args: dict, model_args: dict) -> tuple[TrainConfig, VQVAEConfig, dict | None]:
    if "resume" in train_args:
        path, state = load_resume(train_args, model_args, RESUMABLE_OVERRIDES)
        run_dir = path.resolve().parent
        if run_dir.name == "checkpoints":
            run_dir = run_dir.parent
        saved_cfg, model_cfg = resumable_configs(state, path)
        cfg = replace(saved_cfg, **{**train_args, "resume": str(path)}, out=str(run_dir)).resolved()
        refuse_finished(path, state, cfg.epochs)
        return cfg, model_cfg, state
    cfg = TrainConfig(**train_args).resolved()
    try:
        model_cfg = replace(PRESETS[cfg.preset], **model_args)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.out and holds_a_run(Path(cfg.out)):  # a new run there would overwrite its checkpoints
        raise UserError(f"--out {cfg.out} already holds a run; continue it with --resume {cfg.out}, or choose "
                        f"another --out")
    cfg = replace(cfg, out=str(new_run_dir(cfg)))
    return cfg, model_cfg, None


@contextmanager
def exits_with_one_line(prefix: str = "error"):
    """Around a training script's main (train.py, train_prior.py): what the user can fix stops it with one line
    and exit status 2, and Ctrl-C or SIGTERM before training started (the training loops handle their own) with
    status 130."""
    try:
        yield
    except (UserError, DataError) as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        raise SystemExit(2)
    except OSError as e:  # the run folder cannot be written: a file where a folder should be, permissions, disk full
        print(f"{prefix}: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:  # loading data, building the model: nothing to keep
        print("\ninterrupted before training started; no checkpoint was written or changed", file=sys.stderr)
        raise SystemExit(130)


def main(argv=None):
    rank, world, _ = distributed_env()
    try:
        with exits_with_one_line(f"error (rank {rank})" if world > 1 else "error"):
            cfg, model_cfg, state = configs_from_args(*parse_args(argv))
            train(cfg, model_cfg, state)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    stop_on_sigterm()  # a scheduler's SIGTERM stops like Ctrl-C: train() says what was saved and how to resume
    main()
