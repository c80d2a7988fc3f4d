"""Train a VQ-VAE on OASIS, ADNI or the built-in demo slices.

    python train.py --dataset OASIS --data-root /data/keras_png_slices_data
    python train.py --dataset demo --epochs 3
    python train.py --dataset OASIS --data-root ... --max-minutes 30   # the best model 30 minutes give: annealed
    python train.py --resume runs/OASIS-default-000                    # continue an interrupted run
    python train.py --dataset OASIS --data-root ... --train-noise rician:0.03-0.25   # a denoiser (noisy in, clean out)
    torchrun --nproc_per_node=4 train.py --dataset OASIS ...           # several GPUs (DDP)

A run folder holds config.json, metrics.csv, code_usage.csv, checkpoints/epoch_NNN.pt, best.pt (lowest
validation loss), last.pt, loss.png, ssim.png, codebook.png, code_usage.png and recon/epoch_NNN.png.
"""
import math
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from anatomy.brain import brain_masks
from dataset import WHERE_SHIPPED, build_dataset, check_compatible, demo_settings, random_crops
from denoising.noise import Noise, add_noise, parse_noise
from evaluation.metrics import score_split
from modules import PRESETS, VQVAEConfig
from training.checkpoints import TrainConfig, rebuild_vqvae
from training.distributed import (
    RankPlace,
    all_reduce_sum,
    average_batchnorm_stats,
    check_same_flags,
    ddp_model,
    distributed_env,
    diverged_anywhere,
    fail_together,
    join_process_group,
    leave_process_group,
    rank0_value,
)
from training.flags import config_or_error, parse_config_flags
from training.protocol import EpochRun, SavedEpochs, TensorBoardLog, run_epochs, tensorboard_writer_class
from training.runs import reserve_run_folder, restore_training, resume_checkpoint, resumed_config
from training.schedule import TimeBudget, schedule_done
from training.steps import (
    batches,
    check_one_batch,
    compile_model,
    require_compiler,
    speed_settings,
    stage_images,
    train_step,
    vqvae_and_optimiser,
)
from utils import (
    UserError,
    autocast,
    choose_device,
    exits_with_one_line,
    one_line_reason,
    plot_bars,
    plot_training_curves,
    save_side_by_side,
    seed_everything,
    set_rng_state,
    stop_on_interrupts,
    unwrap,
    use_bf16,
    write_json,
)

# The figures (curves, code usage, reconstructions) take ~1 s to draw: with short epochs (a GPU) they are drawn
# for an epoch that ends at least this long after the last drawing, and always for the last epoch.
FIGURES_EVERY_S = 30.0
# Flags that may change when a run is resumed; everything else comes from the checkpoint.
RESUMABLE_OVERRIDES = ("epochs", "device", "compile", "max_minutes", "data_root", "tensorboard", "resume")
LOSS_NAMES = ("reconstruction", "codebook", "commitment")
CROP_STREAM = 1  # --train-crop's corners are drawn from (seed, epoch, CROP_STREAM, image), apart from the noise's


# ---------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------

def setup_rank(cfg: TrainConfig) -> RankPlace:
    """This process's place in the run, its device, the process-wide speed settings and, under torchrun, the
    process group."""
    rank, world, local_rank = distributed_env()
    device = choose_device(cfg.device, local_rank)
    if cfg.compile:
        require_compiler()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    speed_settings(device)
    place = RankPlace(rank, world, local_rank, device)
    join_process_group(place)
    return place


def check_same_config(cfg: TrainConfig, model_cfg: VQVAEConfig, place: RankPlace):
    """Under DDP: every rank started with rank 0's flags, or every rank stops (distributed.check_same_flags)."""
    check_same_flags({**asdict(cfg), "out": None, **{f"model.{k}": v for k, v in asdict(model_cfg).items()}}, place)


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------

def load_data(cfg: TrainConfig, model_cfg: VQVAEConfig, place: RankPlace):
    """The train and validation splits, every rank holding both whole, checked against the model before anything
    is trained: same image size in both, divisible by the downsampling, at least one batch; and the validation
    slices' brain masks, for the in-brain validation scores (anatomy/brain.py: the true masks where the dataset
    ships them)."""
    # Demo data: rank 0 first, as it may have to write the files.
    first = place.main or cfg.dataset != "demo"
    for turn in (True, False):
        with fail_together(place.device):
            if first == turn:
                kwargs = dict(**cfg.data_options(), verbose=place.main)
                train_data = build_dataset(cfg.dataset, cfg.data_root, "train", **kwargs)
                val_data = build_dataset(cfg.dataset, cfg.data_root, "validate", **kwargs,
                                         masks=WHERE_SHIPPED if cfg.image_size is None else False)
                check_compatible(train_data.image_shape, val_data)
                check_fits_model(cfg, model_cfg, train_data.image_shape, place.world)
                check_one_batch("the train split's images", len(train_data), cfg.batch_size * place.world,
                                "lower --batch-size" + (f" (per process; {place.world} processes)"
                                                        if place.world > 1 else ""))
    val_brain, _ = brain_masks(val_data)  # (N, H, W) bool
    stage_images(cfg, place.device, train_data, val_data, verbose=place.main)
    return train_data, val_data, val_brain


def check_fits_model(cfg: TrainConfig, model_cfg: VQVAEConfig, image_shape, world: int):
    try:
        h, w = model_cfg.latent_grid(*image_shape)
    except ValueError as e:
        raise UserError(str(e)) from None
    side = crop_side(cfg, image_shape)
    if side:
        if side % model_cfg.downsampling_factor:
            raise UserError(f"--train-crop {side} is not a multiple of the model's downsampling "
                            f"({model_cfg.downsampling_factor}); choose such a side, or pass --train-crop 0")
        h = w = side // model_cfg.downsampling_factor
    if model_cfg.norm == "batch" and cfg.batch_size * h * w == 1:
        raise UserError(f"BatchNorm needs more than one value per channel, but a batch of {cfg.batch_size} on a "
                        f"{h}x{w} latent grid gives one; raise --batch-size, or use --norm none")


def crop_side(cfg: TrainConfig, image_shape) -> int | None:
    """The side of the square crops training steps on, or None for whole images: --train-crop (or the preset's)
    where it is smaller than the images' shorter side."""
    return cfg.train_crop if cfg.train_crop and cfg.train_crop < min(image_shape) else None


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------

def parallel_model(model: torch.nn.Module, cfg: TrainConfig, place: RankPlace) -> torch.nn.Module:
    """The model as the loop runs it: DDP over several processes, then torch.compile if asked for."""
    model = ddp_model(model, place, cfg.sync_bn)
    if cfg.compile:
        model = compile_model(model, place.device, distributed=place.world > 1)
    return model


# ---------------------------------------------------------------------------------------------------------
# One epoch: batches, the step (training/steps.py: bench.py times the same one), the loop
# ---------------------------------------------------------------------------------------------------------

def train_epoch(model, opt, scheduler, data, sampler, cfg, device, autocast, budget, progress, tensorboard=None):
    """One pass over the training split; returns epoch-mean losses over all ranks, the code counts, the images seen
    and the seconds spent waiting for batches."""
    model.train()
    sums = torch.zeros(len(LOSS_NAMES) + 1, device=device)  # loss terms, images
    counts = torch.zeros(unwrap(model).config.codebook_size, device=device, dtype=torch.long)
    wait, noise = 0.0, training_noise(cfg)
    it = batches(data, sampler, cfg.batch_size, device, drop_last=True)
    rows = list(sampler)  # the dataset rows of the batches, in order: the keys of their noise and crops
    crop = crop_side(cfg, data.image_shape)
    for step in range(len(sampler) // cfg.batch_size):
        t = time.perf_counter()
        x = next(it)
        wait += time.perf_counter() - t
        keys = rows[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        if crop:
            x = random_crops(x, crop, seed=(cfg.seed, sampler.epoch, CROP_STREAM), keys=keys)
        corrupt = None if noise is None else partial(add_noise, noise=noise, seed=(cfg.seed, sampler.epoch), keys=keys)
        out, loss = train_step(model, opt, scheduler, x, cfg, autocast, corrupt)
        with torch.no_grad():
            sums += torch.stack([*(out.losses[k].detach().float() for k in LOSS_NAMES), sums.new_ones(())]) * x.shape[0]
            counts += out.code_counts
        progress.update(1)
        if step % 25 == 0:  # the host waits for the loss here anyway, so the divergence check costs nothing extra
            value = loss.item()
            progress.set_postfix(loss=f"{value:.4f}")
            if tensorboard is not None:
                tensorboard.step_loss(scheduler.last_epoch, value)
            if diverged_anywhere(value, device):
                break  # a NaN/inf loss: stop now rather than at the end of the epoch; the epoch's check reports it
        budget.observe(scheduler, len(sampler) // cfg.batch_size, device)
        if schedule_done(scheduler) or (budget and step % 10 == 9 and budget.up(device)):  # up(): a collective
            break
    all_reduce_sum(sums)
    all_reduce_sum(counts)
    n = sums[-1].clamp(min=1)
    means = {f"train_{k}": float(sums[i] / n) for i, k in enumerate(LOSS_NAMES)}
    means["train_loss"] = sum(means.values())
    return means, counts, int(sums[-1]), wait


def training_noise(cfg: TrainConfig) -> Noise | None:
    """--train-noise, parsed. Training draws image i's noise in epoch e from the seed (seed, e, i): the same for any
    batch order or number of processes, and again on resume. Validation draws it from (seed, i), fixed, so that
    every epoch is scored on the same noisy slices, and predict.py --split validate --noise NOISE --seed SEED
    scores exactly those."""
    return parse_noise(cfg.train_noise, "--train-noise") if cfg.train_noise else None


@torch.no_grad()
def evaluate(model, data, brain, cfg, place: RankPlace, autocast, keep: int = 0):
    """Validation losses, SSIM and PSNR, whole-slice and inside the `brain` masks, over every validation image
    exactly once (split across ranks), scored by
    metrics.score_split as predict.py scores; also the first `keep` inputs and reconstructions of this rank. With
    --train-noise: the denoising of fixed noisy validation slices, scored against the clean ones."""
    rank, world, device = place.rank, place.world, place.device
    noise = training_noise(cfg)
    corrupt = None if noise is None else lambda x, rows: add_noise(x, noise, (cfg.seed,),  # noqa: E731
                                                                    [rank + world * r for r in rows])
    scores = score_split(model, data.images[rank::world], device, autocast, channels_last=cfg.channels_last,
                         compiled_ssim=cfg.compile, keep=keep, corrupt=corrupt, brain=brain[rank::world])
    zero = torch.zeros((), dtype=torch.float64, device=device)
    scored = ~scores.ssim_brain.isnan()  # slices with an empty brain mask have no in-brain score
    sums = torch.stack([*(scores.loss_sums.get(k, zero).to(device) for k in LOSS_NAMES),
                        *(v.double().sum().to(device) for v in (scores.ssim, scores.psnr)),
                        *(v[scored].double().sum().to(device) for v in (scores.ssim_brain, scores.psnr_brain)),
                        torch.tensor(float(scored.sum()), dtype=torch.float64, device=device),
                        torch.tensor(float(len(scores.ssim)), dtype=torch.float64, device=device)])
    all_reduce_sum(sums)
    n, in_brain = sums[-1].clamp(min=1), sums[-2]
    metrics = {f"val_{k}": float(sums[i] / n) for i, k in enumerate(LOSS_NAMES)}
    metrics["val_loss"] = sum(metrics.values())
    metrics["val_ssim"], metrics["val_psnr"] = float(sums[-6] / n), float(sums[-5] / n)
    metrics["val_ssim_brain"], metrics["val_psnr_brain"] = ((float(sums[-4] / in_brain), float(sums[-3] / in_brain))
                                                            if in_brain else (math.nan, math.nan))
    return metrics, scores


def codebook_stats(counts: torch.Tensor, quantizer) -> dict:
    """Usage of the K codes over an epoch, from per-code assignment counts (K,), and the codes the quantiser counts
    as dead (EMA usage under its restart threshold)."""
    p = counts.double() / counts.sum().clamp(min=1)
    used = int((counts > 0).sum())
    dead = int((quantizer.usage < max(quantizer.dead_code_threshold, 1e-3)).sum())
    return {"codes_used": used, "codes_used_pct": 100.0 * used / counts.numel(),
            "perplexity": float(torch.exp(-(p * torch.log(p + 1e-12)).sum())),
            "dead_codes": dead, "dead_codes_pct": 100.0 * dead / counts.numel()}


# ---------------------------------------------------------------------------------------------------------
# The run, as the epoch protocol (training/protocol.py) runs it
# ---------------------------------------------------------------------------------------------------------

class VQVAERun(EpochRun):
    """The VQ-VAE's epochs: train and validate on every rank; rank 0 saves, draws and logs."""
    BEST_COLUMN = "val_loss"

    def __init__(self, cfg, model_cfg, place, model, opt, scheduler, sampler, train_data, val_data, val_brain,
                 **protocol):
        super().__init__(scheduler=scheduler, steps_per_epoch=len(sampler) // cfg.batch_size, device=place.device,
                         epochs=cfg.epochs, main=place.main, **protocol)
        self.cfg, self.model_cfg, self.place, self.model, self.opt = cfg, model_cfg, place, model, opt
        self.sampler, self.train_data, self.val_data, self.val_brain = sampler, train_data, val_data, val_brain
        self.amp, self.figures_at = autocast(cfg.precision, place.device), -math.inf

    def train_and_validate(self, epoch: int):
        cfg, model, scheduler = self.cfg, self.model, self.scheduler
        self.sampler.set_epoch(epoch)
        t0, first_step = time.perf_counter(), scheduler.last_epoch
        with tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", disable=not self.main,
                  leave=False, dynamic_ncols=True) as progress:
            train_metrics, counts, seen, wait = train_epoch(model, self.opt, scheduler, self.train_data, self.sampler,
                                                            cfg, self.device, self.amp, self.budget, progress,
                                                            self.tensorboard)
        train_seconds = time.perf_counter() - t0
        self.saved.check_finite(epoch, "train loss", train_metrics["train_loss"], cfg)  # before anything is saved
        average_batchnorm_stats(unwrap(model))
        t_val = time.perf_counter()
        val_metrics, self.val_scores = evaluate(unwrap(model), self.val_data, self.val_brain, cfg, self.place,
                                                 self.amp, keep=8)
        timing = (train_seconds / max(1, scheduler.last_epoch - first_step), time.perf_counter() - t_val)
        self.saved.check_finite(epoch, "validation loss", val_metrics["val_loss"], cfg)  # the last step broke it
        self.counts = counts.cpu()
        row = {"epoch": epoch, **train_metrics, **val_metrics, **codebook_stats(self.counts, unwrap(model).quantizer),
               "lr": scheduler.get_last_lr()[0], "epoch_seconds": time.perf_counter() - t0,
               "train_img_per_s": seen / train_seconds, "data_wait_pct": 100 * wait / train_seconds}
        return row, timing

    def checkpoint(self, row: dict, stopping: bool) -> dict:
        cfg = self.cfg
        return {"kind": "vqvae", "model": unwrap(self.model).state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.scheduler.state_dict(), "best_val_loss": self.best,
                "model_config": asdict(self.model_cfg), "train_config": asdict(cfg), "world_size": self.place.world,
                "metrics": row, "time_budget": self.budget.state(done=stopping),
                "demo_settings": demo_settings(cfg.data_root) if cfg.dataset == "demo" else None}

    def csv_rows(self, row: dict) -> dict:
        return {"metrics.csv": row,
                "code_usage.csv": {"epoch": row["epoch"], **{f"code_{i}": int(c) for i, c in enumerate(self.counts)}}}

    def report(self, row: dict, best: bool, stopping: bool):
        if stopping or row["epoch"] == self.epochs or time.monotonic() - self.figures_at >= FIGURES_EVERY_S:
            draw_figures(self.saved.run_dir, row, self.counts, self.val_scores, self.saved, self.tensorboard)
            self.figures_at = time.monotonic()
        log_epoch(row, self.model_cfg.codebook_size, best, self.tensorboard)


def draw_figures(run_dir: Path, row: dict, counts: torch.Tensor, val_scores, saved: SavedEpochs, tensorboard):
    """The run's figures; a figure that cannot be written (a full disk) stops the run saying which, and what the
    epoch's checkpoint, already written, keeps."""
    epoch = row["epoch"]
    try:
        plot_training_curves(run_dir / "metrics.csv", run_dir)
        plot_bars(counts, run_dir / "code_usage.png", f"Code usage, epoch {epoch}", "code index", "assignments")
        save_side_by_side(val_scores.inputs, val_scores.outputs, run_dir / "recon" / f"epoch_{epoch:03d}.png", nrow=4)
        tensorboard.image("validation/inputs_then_reconstructions", torch.cat([val_scores.inputs, val_scores.outputs]),
                          epoch)
    except OSError as e:
        raise UserError(f"could not write a figure of epoch {epoch} ({e.filename or run_dir}: {e.strerror or e}); "
                        f"{saved.kept()}; free disk space, then resume") from None


def log_epoch(row: dict, codebook_size: int, best: bool, tensorboard):
    tensorboard.epoch(row)
    tqdm.write(f"epoch {row['epoch']:3d} | train loss {row['train_loss']:.4f} (rec {row['train_reconstruction']:.4f}) "
               f"| val loss {row['val_loss']:.4f} SSIM {row['val_ssim']:.4f} (brain {row['val_ssim_brain']:.4f}) "
               f"PSNR {row['val_psnr']:.2f} "
               f"| codes {row['codes_used']}/{codebook_size} ppl {row['perplexity']:.1f} "
               f"| lr {row['lr']:.2e} | {row['epoch_seconds']:.1f}s {row['train_img_per_s']:.1f} img/s"
               + (" *" if best else ""))


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

def open_run_folder(cfg: TrainConfig, model_cfg: VQVAEConfig, place: RankPlace, train_data, val_data, start_epoch: int):
    """Rank 0 reserves and locks the run folder (training/runs.py), writes config.json and says what the
    run is; every rank gets the folder's name. Done only once data and model are known to work, so a bad flag or
    file leaves nothing behind. Returns the config with its folder, the lock and the TensorBoard log."""
    writer_class = tensorboard_writer_class(cfg.tensorboard and place.main)  # checked before the folder is made
    with fail_together(place.device):
        folder, lock = (reserve_run_folder(cfg.out, Path("runs"), f"{cfg.dataset}-{cfg.preset}", "train.py",
                                           resuming=cfg.resume is not None) if place.main else (None, None))
    # ranks that looked at runs/ at different moments could disagree: rank 0's name holds
    cfg = replace(cfg, out=rank0_value(str(folder)))
    if place.main:
        (Path(cfg.out) / "checkpoints").mkdir(exist_ok=True)
        (Path(cfg.out) / "recon").mkdir(exist_ok=True)
        write_json(Path(cfg.out) / "config.json", {"train": asdict(cfg), "model": asdict(model_cfg)})
        shape = train_data.image_shape
        h, w = model_cfg.latent_grid(*shape)
        print(f"run {cfg.out}: {cfg.dataset} {'x'.join(map(str, shape))}, train {len(train_data)} / validate "
              f"{len(val_data)} slices; preset {cfg.preset}, latent grid {h}x{w}, K={model_cfg.codebook_size} "
              f"({model_cfg.bits_per_image(*shape):.0f} bits/slice); {place.device} x {place.world}, "
              f"{'bf16' if use_bf16(cfg.precision, place.device) else 'fp32'}, epochs {start_epoch}..{cfg.epochs}")
    return cfg, lock, TensorBoardLog(writer_class, cfg.out)


def train(cfg: TrainConfig, model_cfg: VQVAEConfig, resume_state: dict | None = None,
          started: float | None = None) -> Path:
    """`started`: time.monotonic() when the command started, where --max-minutes' clock starts (default: now)."""
    place = setup_rank(cfg)
    check_same_config(cfg, model_cfg, place)
    seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)

    # Data
    train_data, val_data, val_brain = load_data(cfg, model_cfg, place)
    sampler = DistributedSampler(train_data, num_replicas=place.world, rank=place.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    steps_per_epoch = len(sampler) // cfg.batch_size

    # Model, optimiser and schedule; a resumed run's state
    model, opt, scheduler = vqvae_and_optimiser(cfg, model_cfg, place.device, cfg.epochs * steps_per_epoch)
    start_epoch, best_val = resume(resume_state, model, opt, scheduler, cfg, place, steps_per_epoch)
    model = parallel_model(model, cfg, place)

    # Run folder, reserved and locked only now
    cfg, lock, tensorboard = open_run_folder(cfg, model_cfg, place, train_data, val_data, start_epoch)

    # Loop: the epoch protocol
    saved = SavedEpochs("train.py", Path(cfg.out), start_epoch, cfg.resume,
                        "(under the same torchrun command)" if place.world > 1 else "")
    budget = TimeBudget(cfg.max_minutes, len(val_data), cfg.batch_size, verbose=place.main, started=started)
    run = VQVAERun(cfg, model_cfg, place, model, opt, scheduler, sampler, train_data, val_data, val_brain,
                   saved=saved,
                   lock=lock, budget=budget, best=best_val, tensorboard=tensorboard)
    try:
        run_epochs(run)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        raise UserError(runtime_failure(e, cfg, place, saved)) from None
    return Path(cfg.out)


def resume(state: dict | None, model, opt, scheduler, cfg: TrainConfig, place: RankPlace, steps_per_epoch: int):
    """(first epoch, best validation loss so far), the resumed run's weights, optimiser, schedule and random
    streams restored when `state` is a checkpoint."""
    if state is None:
        return 1, math.inf
    restore_training(state, model, opt, scheduler, cfg.epochs * steps_per_epoch, cfg.resume)
    start_epoch = state["epoch"] + 1
    if place.main:
        set_rng_state(state["rng"])
        if state["world_size"] != place.world:
            print(f"note: {cfg.resume} comes from a run of {state['world_size']} processes, this one has "
                  f"{place.world}: the global batch and the steps per epoch change, so the result will differ from "
                  f"an uninterrupted run")
    else:
        # Per-rank streams. Nothing a rank > 0 draws reaches the model: what the ranks must agree on (k-means
        # init, dead-code restarts) is broadcast from rank 0, whose RNG state is the one checkpoints keep.
        seed_everything(cfg.seed + 1000 * place.rank + start_epoch)
    return start_epoch, state["best_val_loss"]


def runtime_failure(e: BaseException, cfg: TrainConfig, place: RankPlace, saved: SavedEpochs) -> str:
    """One line for what can stop a step from outside the code: memory, or a lost peer process under DDP."""
    text = str(e)
    if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text:
        return (f"out of memory on {place.device} ({one_line_reason(e, 120)}); {saved.kept()}; lower --batch-size "
                f"(now {cfg.batch_size}), --image-size or the model's widths")
    if place.world > 1:
        return (f"rank {place.rank} lost contact with the other processes ({one_line_reason(e, 120)}), most likely "
                f"one of them died; {saved.kept()}")
    raise e


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def configs_from_args(run_args: dict, model_args: dict) -> tuple[TrainConfig, VQVAEConfig, dict | None]:
    """The configs of a new run, or of a resumed one (its saved configs, with the flags a resume may change)."""
    if "resume" in run_args:
        path, state = resume_checkpoint(run_args, model_args, RESUMABLE_OVERRIDES, "vqvae")
        _, saved_cfg = rebuild_vqvae(state, path)
        return (resumed_config(saved_cfg, run_args, path, state), VQVAEConfig.from_dict(state["model_config"]),
                state)
    if run_args.get("train_noise") is not None:  # its own one-line error; saved in the config as parsed
        run_args = {**run_args, "train_noise": str(parse_noise(run_args["train_noise"], "--train-noise"))}
    cfg = config_or_error(TrainConfig, **run_args).resolved()
    model_cfg = config_or_error(VQVAEConfig, **{**asdict(PRESETS[cfg.preset].model), **model_args})
    return cfg, model_cfg, None


def main(argv=None):
    started = time.monotonic()  # --max-minutes' clock: decoding the data and a resume's reload are spent from it
    stop_on_interrupts()  # a scheduler's SIGTERM stops like Ctrl-C, and a second signal cannot change what it reports
    rank, world, _ = distributed_env()
    finished = False
    try:
        with exits_with_one_line(f"error (rank {rank})" if world > 1 else "error",
                                 "interrupted before training started; no checkpoint was written or changed"):
            cfg, model_cfg, state = configs_from_args(*parse_config_flags(
                argv, "train.py", __doc__, TrainConfig, VQVAEConfig,
                "model overrides (VQVAEConfig; default: the preset's value)"))
            train(cfg, model_cfg, state, started)
            finished = True
    finally:
        leave_process_group(finished)


if __name__ == "__main__":
    main()
