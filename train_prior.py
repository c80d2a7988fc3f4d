"""Train a gated PixelCNN prior over the code maps of a trained VQ-VAE (the VQ-VAE paper's second stage): its
samples decode to new slices.

    python train_prior.py --vqvae runs/demo-vqvae/best.pt
    python train_prior.py --vqvae runs/ADNI-default-000/best.pt --conditional       # p(codes | AD or NC)
    python train_prior.py --resume runs/demo-vqvae/prior/last.pt --epochs 60         # continue, or train longer

The VQ-VAE's train and validate splits (as its checkpoint records them; --data-root if they moved) are encoded
to code maps once. The run folder (default: prior/ in the VQ-VAE's run folder) holds config.json, metrics.csv
(train and validation NLL in bits per code), loss.png, best.pt (lowest validation NLL), last.pt and
samples/epoch_NNN.png (slices decoded from maps drawn with the same seed every epoch).
Then sample and score with: python predict.py --sample 64 --prior <run folder>/best.pt
"""
import argparse
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from modules import PixelCNNConfig, PixelCNNPrior
from predict import batched, encode_images, load_model, load_split, prior_bits, run_dir_of, sample_labels
from train import (add_config_flags, exits_with_one_line, load_resume, lr_scheduler, optimizer_step, refuse_finished,
                   restore_scheduler, use_bf16)
from utils import (ArgumentParser, SavedEpochs, UserError, append_csv, choose_device, drop_epochs_after,
                   interrupts_deferred, plot_curves, read_csv, rng_state, save_checkpoint, save_image_grid,
                   seed_everything, set_rng_state, stop_on_sigterm, write_json)


@dataclass(frozen=True)
class PriorTrainConfig:
    vqvae: str | None = None          # the VQ-VAE checkpoint whose code maps are modelled (required)
    data_root: str | None = None      # where the VQ-VAE's dataset is now, if it moved after training
    conditional: bool = False         # condition on the class (needs a dataset with classes: ADNI's AD / NC)
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "cosine"       # "constant" or "cosine" (after warmup)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0            # 0: no clipping
    precision: str = "auto"           # "auto" (bf16 where the hardware has it), "bf16" or "fp32"
    epoch_samples: int = 16           # slices sampled for samples/epoch_NNN.png (0: none)
    seed: int = 0
    device: str = "auto"
    out: str | None = None            # run folder; default: prior/ in the VQ-VAE's run folder
    resume: str | None = None         # a last.pt to continue from

    def checked(self) -> "PriorTrainConfig":
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.lr_schedule in ("constant", "cosine"), "--lr-schedule must be constant or cosine"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}"),
            (self.precision in ("auto", "bf16", "fp32"), "--precision must be auto, bf16 or fp32"),
            (self.epoch_samples >= 0, f"--epoch-samples must be >= 0, got {self.epoch_samples}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self


def train_epoch(prior, opt, scheduler, codes, labels, cfg, autocast, progress) -> float:
    """One shuffled pass over the (N, h, w) train code maps; returns their mean NLL in bits per code."""
    prior.train()
    order = torch.randperm(len(codes)).to(codes.device)
    nats = torch.zeros((), device=codes.device)
    for start in range(0, len(codes), cfg.batch_size):
        batch = order[start:start + cfg.batch_size]
        x = codes[batch]
        with autocast:
            logits = prior(x, labels[batch] if labels is not None else None)  # (B, K, h, w)
        loss = F.cross_entropy(logits.float(), x)
        optimizer_step(loss, prior, opt, scheduler, cfg.grad_clip)
        nats += loss.detach() * x.numel()
        progress.update(1)
    return float(nats) / codes.numel() / math.log(2)


@torch.no_grad()
def save_samples(prior, vqvae, shape, cfg, device, path: Path, title: str):
    """cfg.epoch_samples slices decoded from sampled maps; the same seed every epoch, so epochs compare."""
    prior.eval()
    generator = torch.Generator(device).manual_seed(cfg.seed)
    codes = prior.sample(cfg.epoch_samples, shape, sample_labels(prior.config, cfg.epoch_samples),
                         generator=generator)
    save_image_grid(batched(vqvae.decode_indices, codes, device), path, nrow=8, title=title)


def train_prior(cfg: PriorTrainConfig, prior_cfg: PixelCNNConfig, resume_state: dict | None = None) -> Path:
    device = choose_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)
    vqvae, vqvae_state = load_model(cfg.vqvae, device)
    train_data, val_data = (load_split(vqvae_state["train_config"], split, cfg.data_root,
                                       demo=vqvae_state.get("demo_settings")) for split in ("train", "validate"))
    if cfg.conditional and len(train_data.class_names) < 2:
        raise UserError(f"--conditional needs a dataset with classes (ADNI: AD / NC); {train_data.name} has none")
    codes = {d.split: encode_images(vqvae, d.images, device, desc=f"encoding {d.split}").to(device)
             for d in (train_data, val_data)}  # (N, h, w) each
    labels = {d.split: d.labels.to(device) if cfg.conditional else None for d in (train_data, val_data)}
    shape, k = tuple(codes["train"].shape[1:]), vqvae.config.codebook_size

    prior_cfg = replace(prior_cfg, codebook_size=k, num_classes=len(train_data.class_names) if cfg.conditional else 0)
    prior = PixelCNNPrior(prior_cfg).to(device)
    opt = torch.optim.Adam(prior.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    scheduler = lr_scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
    start_epoch, best_val = 1, float("inf")
    if resume_state is not None:
        prior.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        restore_scheduler(scheduler, resume_state["scheduler"], cfg.epochs * steps_per_epoch)
        start_epoch, best_val = resume_state["epoch"] + 1, resume_state["best_val_bits"]
        set_rng_state(resume_state["rng"])
    bf16 = use_bf16(cfg.precision, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    run_dir = Path(cfg.out)
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", {"train": asdict(cfg), "prior": asdict(prior_cfg),
                                         "vqvae_model": vqvae_state["model_config"]})
    print(f"prior run {run_dir}: {len(train_data)} train / {len(val_data)} validate code maps of "
          f"{shape[0]}x{shape[1]}, K={k} (uniform: {math.log2(k):.2f} bits/code); "
          f"{sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M parameters; {device}, "
          f"{'bf16' if bf16 else 'fp32'}, epochs {start_epoch}..{cfg.epochs}")
    epoch = start_epoch - 1
    saved = SavedEpochs("train_prior.py", run_dir, start_epoch, cfg.resume)
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                      dynamic_ncols=True) as progress:
                train_bits = train_epoch(prior, opt, scheduler, codes["train"], labels["train"], cfg, autocast,
                                         progress)
            train_seconds = time.perf_counter() - t0
            if not math.isfinite(train_bits):  # checked before anything of this epoch is saved
                raise saved.diverged(epoch, "train NLL", train_bits, cfg)
            val_bits = prior_bits(prior, codes["validate"], labels["validate"], autocast=autocast)
            if not math.isfinite(val_bits):
                raise saved.diverged(epoch, "validation NLL", val_bits, cfg)
            row = {"epoch": epoch, "train_bits_per_code": train_bits, "val_bits_per_code": val_bits,
                   "lr": opt.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - t0,
                   "train_codes_per_s": codes["train"].numel() / train_seconds}
            best = val_bits < best_val
            best_val = min(best_val, val_bits)
            state = {"kind": "prior", "model": prior.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "best_val_bits": best_val,
                     "rng": rng_state(), "model_config": asdict(prior_cfg), "train_config": asdict(cfg),
                     "vqvae_checkpoint": str(cfg.vqvae), "vqvae_epoch": vqvae_state["epoch"],
                     "vqvae_model_config": vqvae_state["model_config"],
                     "vqvae_codebook": vqvae.quantizer.codebook.detach().cpu(),
                     "class_names": list(train_data.class_names), "metrics": row}
            with interrupts_deferred():  # Ctrl-C here lands after the epoch's checkpoints and CSV row
                if best:
                    save_checkpoint(state, run_dir / "best.pt")
                save_checkpoint(state, run_dir / "last.pt")
                if resume_state is not None and epoch == start_epoch:  # rows of a run that went further
                    drop_epochs_after(epoch - 1, [run_dir / "metrics.csv"])
                append_csv(run_dir / "metrics.csv", row)
                saved.epoch = epoch
            plot_curves(read_csv(run_dir / "metrics.csv"), "epoch",
                        {"train_bits_per_code": "train", "val_bits_per_code": "validation"}, run_dir / "loss.png",
                        f"Prior NLL (uniform over K={k}: {math.log2(k):.2f} bits/code)", "bits / code")
            if cfg.epoch_samples:
                save_samples(prior, vqvae, shape, cfg, device, run_dir / "samples" / f"epoch_{epoch:03d}.png",
                             f"epoch {epoch}: validation NLL {val_bits:.3f} bits/code")
            tqdm.write(f"epoch {epoch:3d} | train {train_bits:.4f} | val {val_bits:.4f} bits/code | lr {row['lr']:.2e} "
                       f"| {row['epoch_seconds']:.1f}s {row['train_codes_per_s']:.0f} codes/s" + (" *" if best else ""))
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see __main__)
        print(saved.interrupted(epoch), file=sys.stderr)
        raise SystemExit(130)
    return run_dir


# Flags that may change when a run is resumed; everything else comes from the checkpoint.
RESUMABLE_OVERRIDES = ("epochs", "device", "data_root", "epoch_samples", "resume")
DERIVED = ("codebook_size", "num_classes")  # prior config fields set from the VQ-VAE and --conditional


def parse_args(argv=None) -> tuple[dict, dict]:
    """Returns the flags given explicitly, split into PriorTrainConfig and PixelCNNConfig fields."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       argument_default=argparse.SUPPRESS)
    add_config_flags(p.add_argument_group("training (PriorTrainConfig)"), PriorTrainConfig)
    add_config_flags(p.add_argument_group("prior (PixelCNNConfig)"), PixelCNNConfig, exclude=DERIVED)
    args = vars(p.parse_args(argv))
    train_names = {f.name for f in fields(PriorTrainConfig)}
    return ({k: v for k, v in args.items() if k in train_names},
            {k: v for k, v in args.items() if k not in train_names})


def configs_from_args(train_args: dict, prior_args: dict):
    if "resume" in train_args:
        path, state = load_resume(train_args, prior_args, RESUMABLE_OVERRIDES, kind="prior")
        cfg = replace(PriorTrainConfig(**state["train_config"]), **{**train_args, "resume": str(path)},
                      out=str(run_dir_of(path))).checked()
        refuse_finished(path, state, cfg.epochs)
        return cfg, PixelCNNConfig(**state["model_config"]), state
    cfg = PriorTrainConfig(**train_args).checked()
    if cfg.vqvae is None:
        raise UserError("--vqvae is required: the VQ-VAE checkpoint (e.g. runs/X/best.pt) whose codes the prior models")
    try:
        prior_cfg = PixelCNNConfig(**prior_args)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = Path(cfg.out) if cfg.out else run_dir_of(cfg.vqvae) / "prior"
    if (out / "last.pt").exists():
        raise UserError(f"{out} already holds a prior run; continue it with --resume {out / 'last.pt'} or choose "
                        f"another --out")
    return replace(cfg, out=str(out)), prior_cfg, None


def main(argv=None):
    with exits_with_one_line():
        train_prior(*configs_from_args(*parse_args(argv)))


if __name__ == "__main__":
    stop_on_sigterm()  # a scheduler's SIGTERM stops like Ctrl-C: train_prior() says what was saved and how to resume
    main()
