"""Train an autoregressive prior over the code maps of a trained VQ-VAE (the VQ-VAE paper's second stage): its
samples decode to new slices, and compress.py codes maps with its conditionals. --arch pixelcnn (default) is a gated
PixelCNN, --arch transformer a causal transformer over the raster sequence of codes.

    python train_prior.py --vqvae runs/demo-vqvae/best.pt
    python train_prior.py --vqvae runs/X/best.pt --arch transformer --max-minutes 30  # 128 channels, 4 blocks
    python train_prior.py --vqvae runs/ADNI-default-000/best.pt --conditional       # p(codes | AD or NC)
    python train_prior.py --vqvae runs/OASIS-default-000/best.pt --mirror rows      # + train slices upside down
    python train_prior.py --resume runs/demo-vqvae/prior/last.pt --epochs 60         # continue, or train longer

The VQ-VAE's train and validate splits (as its checkpoint records them; --data-root if they moved) are encoded
to code maps once; --mirror adds the train slices' mirror images across the brain's midline (rows for OASIS): twice
the maps, for a prior that would otherwise overfit them. The run folder (default: prior/ in the VQ-VAE's run folder)
holds config.json, metrics.csv (train and validation NLL in bits per code), loss.png, best.pt (lowest validation
NLL), last.pt and samples/epoch_NNN.png (slices decoded from maps drawn with the same seed every epoch).
Then sample and score with: python predict.py --sample 64 --prior <run folder>/best.pt
"""
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from training.checkpoints import (MIRRORS, PriorTrainConfig, check_prior_fits, default_prior, load_split, load_vqvae,
    rebuild_prior)
from training.engine import (SavedEpochs, TensorBoardLog, TimeBudget, compile_model, config_or_error, lr_scheduler,
    parse_config_flags, prior_train_step, require_compiler, reserve_run_folder, restore_training, resume_checkpoint,
    resumed_config, schedule_done, tensorboard_writer_class)
from evaluation.metrics import batched, encode_images, prior_bits
from modules import PriorConfig, build_prior, prior_config
from utils import (UserError, autocast, choose_device, exits_with_one_line, ignore_further_interrupts, plot_curves,
                   read_csv, save_image_grid, seed_everything, set_rng_state, stop_on_interrupts, use_bf16, write_json)


def train_epoch(prior, stepped, opt, scheduler, codes, labels, cfg, amp, budget, progress) -> tuple[float, int]:
    """One shuffled pass over the (N, h, w) train code maps (cut short where --max-minutes' plan ends), each step
    through `stepped` (the prior, or its torch.compile); returns their mean NLL in bits per code and the maps
    trained on."""
    prior.train()
    order = torch.randperm(len(codes)).to(codes.device)
    nats, seen = torch.zeros((), device=codes.device), 0
    steps_per_epoch = math.ceil(len(codes) / cfg.batch_size)
    for start in range(0, len(codes), cfg.batch_size):
        batch = order[start:start + cfg.batch_size]
        x = codes[batch]
        loss = prior_train_step(prior, stepped, opt, scheduler, x, labels[batch] if labels is not None else None,
                                amp, cfg.grad_clip)
        nats += loss.detach() * x.numel()
        seen += len(x)
        progress.update(1)
        budget.observe(scheduler, steps_per_epoch, codes.device)
        if schedule_done(scheduler) or budget.up(codes.device):
            break
    return float(nats) / (seen * codes[0].numel()) / math.log(2), seen


@torch.no_grad()
def save_samples(prior, vqvae, shape, cfg, device, path: Path, title: str):
    """cfg.epoch_samples slices decoded from sampled maps (returned, and drawn to `path`); the same seed every
    epoch, so epochs compare."""
    prior.eval()
    generator = torch.Generator(device).manual_seed(cfg.seed)
    codes = prior.sample(cfg.epoch_samples, shape, prior.labels_for(cfg.epoch_samples), generator=generator)
    samples = batched(vqvae.decode_indices, codes, device)
    save_image_grid(samples, path, nrow=8, title=title)
    return samples


def encode_splits(cfg: PriorTrainConfig, device, amp):
    """The VQ-VAE, its train and validate splits encoded to (N, h, w) code maps on `device`, and their labels."""
    vqvae, vqvae_cfg, vqvae_state = load_vqvae(cfg.vqvae, device)
    splits = [load_split(vqvae_cfg, split, cfg.data_root, demo=vqvae_state["demo_settings"])
              for split in ("train", "validate")]
    if cfg.conditional and len(splits[0].class_names) < 2:
        raise UserError(f"--conditional needs a dataset with classes (ADNI: AD / NC); {splits[0].name} has none")
    codes = {d.split: encode_images(vqvae, d.images, device, desc=f"encoding {d.split}", amp=amp).to(device)
             for d in splits}
    labels = {d.split: d.labels.to(device) if cfg.conditional else None for d in splits}
    if MIRRORS[cfg.mirror] is not None:  # the train slices' mirror images: twice the maps, each a plausible brain
        mirrored = encode_images(vqvae, splits[0].images.flip(MIRRORS[cfg.mirror]), device,
                                 desc="encoding train, mirrored", amp=amp)
        codes["train"] = torch.cat([codes["train"], mirrored.to(device)])
        labels["train"] = labels["train"].repeat(2) if cfg.conditional else None
    return vqvae, vqvae_state, splits[0].class_names, codes, labels


def train_prior(cfg: PriorTrainConfig, prior_cfg: PriorConfig, resume_state: dict | None = None) -> Path:
    device = choose_device(cfg.device)
    if cfg.compile:
        require_compiler()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)
    amp = autocast(cfg.precision, device)

    # Data: the VQ-VAE's code maps
    vqvae, vqvae_state, class_names, codes, labels = encode_splits(cfg, device, amp)
    shape, k = tuple(codes["train"].shape[1:]), vqvae.config.codebook_size

    # Prior, optimiser and schedule; a resumed run's state
    prior_cfg = replace(prior_cfg, codebook_size=k, num_classes=len(class_names) if cfg.conditional else 0)
    prior = build_prior(prior_cfg).to(device)
    if not prior.fits(*shape):
        raise UserError(f"the code maps are {shape[0]}x{shape[1]}, but --max-grid {prior_cfg.max_grid} covers at most "
                        f"{prior_cfg.max_grid} a side; pass --max-grid {max(shape)}")
    stepped = compile_model(prior, device, distributed=False) if cfg.compile else prior
    opt = torch.optim.Adam(prior.parameters(), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(codes["train"]) / cfg.batch_size)
    scheduler = lr_scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
    start_epoch, best_val = 1, math.inf
    if resume_state is not None:
        check_prior_fits(resume_state, vqvae, cfg.resume, cfg.vqvae)  # the VQ-VAE may have been trained further
        restore_training(resume_state, prior, opt, scheduler, cfg.epochs * steps_per_epoch, cfg.resume)
        start_epoch, best_val = resume_state["epoch"] + 1, resume_state["best_val_bits"]
        set_rng_state(resume_state["rng"])

    # Run folder, reserved and locked only now
    writer_class = tensorboard_writer_class(cfg.tensorboard)  # checked before the folder is made
    run_dir, lock = reserve_run_folder(cfg.out or str(default_prior(cfg.vqvae).parent), Path("runs"), "prior",
                                       "train_prior.py", resuming=resume_state is not None)
    cfg = replace(cfg, out=str(run_dir))
    (run_dir / "samples").mkdir(exist_ok=True)
    write_json(run_dir / "config.json", {"train": asdict(cfg), "prior": asdict(prior_cfg),
                                         "vqvae_model": vqvae_state["model_config"]})
    print(f"prior run {run_dir}: {len(codes['train'])} train / {len(codes['validate'])} validate code maps of "
          f"{shape[0]}x{shape[1]}, K={k} (uniform: {math.log2(k):.2f} bits/code); "
          f"{sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M parameters; {device}, "
          f"{'bf16' if use_bf16(cfg.precision, device) else 'fp32'}, epochs {start_epoch}..{cfg.epochs}")

    # Loop
    tensorboard = TensorBoardLog(writer_class, run_dir)
    saved = SavedEpochs("train_prior.py", run_dir, start_epoch, cfg.resume)
    budget = TimeBudget(cfg.max_minutes, len(codes["validate"]), cfg.batch_size, verbose=True)
    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            row, timing = run_epoch(prior, stepped, opt, scheduler, codes, labels, cfg, amp, budget, saved, epoch,
                                    steps_per_epoch)
            best, best_val = row["val_bits_per_code"] < best_val, min(best_val, row["val_bits_per_code"])
            stopping = schedule_done(scheduler) or budget.up(device)
            if not stopping:  # before the save: a resumed run continues this plan
                budget.replan(scheduler, steps_per_epoch, *timing, cfg.epochs * steps_per_epoch, device)
            saved.save(checkpoint_state(prior, opt, scheduler, best_val, cfg, vqvae, vqvae_state, class_names, row,
                                        budget, stopping), epoch, best, {"metrics.csv": row})
            tensorboard.epoch(row)
            plot_curves(read_csv(run_dir / "metrics.csv"), "epoch",
                        {"train_bits_per_code": "train", "val_bits_per_code": "validation"}, run_dir / "loss.png",
                        f"Prior NLL (uniform over K={k}: {math.log2(k):.2f} bits/code)", "bits / code")
            if cfg.epoch_samples:
                samples = save_samples(prior, vqvae, shape, cfg, device, run_dir / "samples" / f"epoch_{epoch:03d}.png",
                                       f"epoch {epoch}: validation NLL {row['val_bits_per_code']:.3f} bits/code")
                tensorboard.image("samples", samples, epoch, nrow=8)
            tqdm.write(f"epoch {epoch:3d} | train {row['train_bits_per_code']:.4f} | val {row['val_bits_per_code']:.4f} "
                       f"bits/code | lr {row['lr']:.2e} | {row['epoch_seconds']:.1f}s "
                       f"{row['train_codes_per_s']:.0f} codes/s" + (" *" if best else ""))
            if stopping:
                print(f"stopping after epoch {epoch}: --max-minutes {cfg.max_minutes:g}")
                break
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see __main__)
        ignore_further_interrupts()
        print(saved.interrupted(epoch), file=sys.stderr)
        raise SystemExit(130)
    finally:
        tensorboard.close()
        lock.release()
    return run_dir


def checkpoint_state(prior, opt, scheduler, best_val, cfg, vqvae, vqvae_state, class_names, row, budget,
                     stopping) -> dict:
    """What a prior checkpoint holds besides the epoch and the random streams (SavedEpochs.save adds those),
    the VQ-VAE's codebook among it: a prior models the codes of that one VQ-VAE only."""
    return {"kind": "prior", "model": prior.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": scheduler.state_dict(), "best_val_bits": best_val, "model_config": asdict(prior.config),
            "train_config": asdict(cfg), "vqvae_checkpoint": str(cfg.vqvae), "vqvae_epoch": vqvae_state["epoch"],
            "vqvae_model_config": vqvae_state["model_config"],
            "vqvae_codebook": vqvae.quantizer.codebook.detach().cpu(), "class_names": list(class_names),
            "metrics": row, "time_budget": budget.state(done=stopping)}


def run_epoch(prior, stepped, opt, scheduler, codes, labels, cfg, amp, budget, saved, epoch, steps_per_epoch):
    """Train one epoch and validate; returns its metrics.csv row and (seconds per training step, seconds of
    validation), which --max-minutes plans with."""
    t0, first_step = time.perf_counter(), scheduler.last_epoch
    with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True) as progress:
        train_bits, seen = train_epoch(prior, stepped, opt, scheduler, codes["train"], labels["train"], cfg, amp,
                                       budget, progress)
    train_seconds = time.perf_counter() - t0
    saved.check_finite(epoch, "train NLL", train_bits, cfg)  # before anything of this epoch is saved
    t_val = time.perf_counter()
    val_bits = prior_bits(prior, codes["validate"], labels["validate"], amp=amp)
    saved.check_finite(epoch, "validation NLL", val_bits, cfg)
    timing = (train_seconds / max(1, scheduler.last_epoch - first_step), time.perf_counter() - t_val)
    return {"epoch": epoch, "train_bits_per_code": train_bits, "val_bits_per_code": val_bits,
            "lr": scheduler.get_last_lr()[0], "epoch_seconds": time.perf_counter() - t0,
            "train_codes_per_s": seen * codes["train"][0].numel() / train_seconds}, timing


# Flags that may change when a run is resumed; everything else comes from the checkpoint.
RESUMABLE_OVERRIDES = ("epochs", "max_minutes", "device", "compile", "data_root", "epoch_samples", "tensorboard",
                       "resume")
DERIVED = ("codebook_size", "num_classes")  # prior config fields set from the VQ-VAE and --conditional


def configs_from_args(run_args: dict, prior_args: dict):
    if "resume" in run_args:
        path, state = resume_checkpoint(run_args, prior_args, RESUMABLE_OVERRIDES, "prior")
        prior, saved_cfg = rebuild_prior(state, path)
        return resumed_config(saved_cfg, run_args, path, state), prior.config, state
    cfg = config_or_error(PriorTrainConfig, **run_args)
    if cfg.vqvae is None:
        raise UserError("--vqvae is required: the VQ-VAE checkpoint (e.g. runs/X/best.pt) whose codes the prior models")
    return cfg, config_or_error(prior_config, **prior_args), None


def main(argv=None):
    stop_on_interrupts()  # a scheduler's SIGTERM stops like Ctrl-C, and a second signal cannot change what it reports
    with exits_with_one_line(interrupted="interrupted before training started; no checkpoint was written or changed"):
        train_prior(*configs_from_args(*parse_config_flags(argv, "train_prior.py", __doc__, PriorTrainConfig,
                                                           PriorConfig, "prior (PriorConfig)", exclude=DERIVED)))


if __name__ == "__main__":
    main()
