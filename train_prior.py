"""Train an autoregressive prior over the code maps of a trained VQ-VAE (the VQ-VAE paper's second stage): its
samples decode to new slices, and compress.py codes maps with its conditionals. --arch pixelcnn (default) is a gated
PixelCNN, --arch transformer a causal transformer over the raster sequence of codes; both decode a map one code at
a time. --arch multiscale codes a map in 1 + levels * phases parallel passes, coarse lattices first (a network run
per pass, not per code), so that files decode and slices are sampled in a few network runs.

    python train_prior.py --vqvae runs/demo-vqvae/best.pt
    python train_prior.py --vqvae runs/X/best.pt --arch transformer --max-minutes 30  # 128 channels, 4 blocks
    python train_prior.py --vqvae runs/X/best.pt --arch multiscale --levels 4 --phases 2  # 9 passes a map
    python train_prior.py --vqvae runs/ADNI-default-000/best.pt --conditional       # p(codes | AD or NC)
    python train_prior.py --vqvae runs/OASIS-default-000/best.pt --mirror rows      # + train slices upside down
    python train_prior.py --resume runs/demo-vqvae/prior/last.pt --epochs 60         # continue, or train longer

The VQ-VAE's train and validate splits (as its checkpoint records them; --data-root if they moved) are encoded
to code maps once; --mirror adds the train slices' mirror images across the brain's midline (rows for OASIS): twice
the maps, for a prior that would otherwise overfit them. The run folder (default: prior/ in the VQ-VAE's run folder)
holds config.json, metrics.csv (train and validation NLL in bits per code), loss.png, best.pt (lowest validation
NLL), last.pt and samples/epoch_NNN.png (slices decoded from maps drawn with the same seed every epoch).
Then sample and score with: python sample.py --num-samples 64 --prior <run folder>/best.pt
"""
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from evaluation.generation import prior_bits
from evaluation.metrics import apply_in_batches, encode_images
from modules import PriorConfig, build_prior, prior_config
from training.checkpoints import (
    MIRRORS,
    PriorTrainConfig,
    check_prior_fits,
    default_prior,
    load_split,
    load_vqvae,
    rebuild_prior,
)
from training.flags import config_or_error, parse_config_flags
from training.protocol import EpochRun, SavedEpochs, TensorBoardLog, run_epochs, tensorboard_writer_class
from training.runs import reserve_run_folder, restore_training, resume_checkpoint, resumed_config
from training.schedule import TimeBudget, schedule_done
from training.steps import adam_and_schedule, compile_model, prior_train_step, require_compiler
from utils import (
    UserError,
    autocast,
    choose_device,
    exits_with_one_line,
    plot_curves,
    read_csv,
    save_image_grid,
    seed_everything,
    set_rng_state,
    stop_on_interrupts,
    use_bf16,
    write_json,
)


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
    samples = apply_in_batches(vqvae.decode_indices, codes, device)
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


def train_prior(cfg: PriorTrainConfig, prior_cfg: PriorConfig, resume_state: dict | None = None,
                started: float | None = None) -> Path:
    """`started`: time.monotonic() when the command started, where --max-minutes' clock starts (default: now)."""
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
    steps_per_epoch = math.ceil(len(codes["train"]) / cfg.batch_size)
    prior, opt, scheduler = prior_and_optimiser(cfg, prior_cfg, shape, device, cfg.epochs * steps_per_epoch)
    start_epoch, best_val = 1, None
    if resume_state is not None:
        check_prior_fits(resume_state, vqvae, cfg.resume, cfg.vqvae)  # the VQ-VAE may have been trained further
        restore_training(resume_state, prior, opt, scheduler, cfg.epochs * steps_per_epoch, cfg.resume)
        start_epoch, best_val = resume_state["epoch"] + 1, resume_state["best_val_bits"]
        set_rng_state(resume_state["rng"])

    # Run folder, reserved and locked only now
    writer_class = tensorboard_writer_class(cfg.tensorboard)  # checked before the folder is made
    cfg, lock = open_run_folder(cfg, prior, vqvae_state, codes, device, start_epoch)

    # Loop: the epoch protocol
    run = PriorRun(cfg, prior, opt, scheduler, vqvae, vqvae_state, class_names, codes, labels, amp,
                   saved=SavedEpochs("train_prior.py", Path(cfg.out), start_epoch, cfg.resume),
                   lock=lock, budget=TimeBudget(cfg.max_minutes, len(codes["validate"]), cfg.batch_size, verbose=True,
                                                started=started),
                   best=best_val, tensorboard=TensorBoardLog(writer_class, cfg.out))
    run_epochs(run)
    return Path(cfg.out)


def prior_and_optimiser(cfg: PriorTrainConfig, prior_cfg: PriorConfig, shape, device, total_steps: int):
    """A new prior on `device` (UserError if it cannot model maps of `shape`), its Adam optimiser and LR schedule."""
    prior = build_prior(prior_cfg).to(device)
    if not prior.fits(*shape):
        raise UserError(f"the code maps are {shape[0]}x{shape[1]}, but --max-grid {prior_cfg.max_grid} covers at most "
                        f"{prior_cfg.max_grid} a side; pass --max-grid {max(shape)}")
    return (prior, *adam_and_schedule(prior, cfg, total_steps))


def open_run_folder(cfg: PriorTrainConfig, prior, vqvae_state: dict, codes: dict, device, start_epoch: int):
    """Reserve and lock the run folder (training/runs.py; default: prior/ in the VQ-VAE's run folder), write
    config.json and say what the run is. Returns the config with its folder, and the lock."""
    run_dir, lock = reserve_run_folder(cfg.out or str(default_prior(cfg.vqvae).parent), Path("runs"), "prior",
                                       "train_prior.py", resuming=cfg.resume is not None)
    cfg = replace(cfg, out=str(run_dir))
    (run_dir / "samples").mkdir(exist_ok=True)
    write_json(run_dir / "config.json", {"train": asdict(cfg), "prior": asdict(prior.config),
                                         "vqvae_model": vqvae_state["model_config"]})
    (h, w), k = codes["train"].shape[1:], prior.config.codebook_size
    print(f"prior run {run_dir}: {len(codes['train'])} train / {len(codes['validate'])} validate code maps of "
          f"{h}x{w}, K={k} (uniform: {math.log2(k):.2f} bits/code), decoded "
          f"{'one code at a time' if prior.raster_order else f'in {prior.passes(h, w)} passes'}; "
          f"{sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M parameters; {device}, "
          f"{'bf16' if use_bf16(cfg.precision, device) else 'fp32'}, epochs {start_epoch}..{cfg.epochs}")
    return cfg, lock


class PriorRun(EpochRun):
    """The prior's epochs, as the epoch protocol (training/protocol.py) runs them."""
    BEST_COLUMN = "val_bits_per_code"
    SETUP = "loading the VQ-VAE, encoding the splits to code maps, building the prior"

    def __init__(self, cfg, prior, opt, scheduler, vqvae, vqvae_state, class_names, codes, labels, amp, **protocol):
        super().__init__(scheduler=scheduler, steps_per_epoch=math.ceil(len(codes["train"]) / cfg.batch_size),
                         device=codes["train"].device, epochs=cfg.epochs, **protocol)
        self.cfg, self.prior, self.opt, self.amp = cfg, prior, opt, amp
        self.stepped = compile_model(prior, self.device, distributed=False) if cfg.compile else prior
        self.vqvae, self.vqvae_state, self.class_names, self.codes, self.labels = (vqvae, vqvae_state, class_names,
                                                                                   codes, labels)

    def train_and_validate(self, epoch: int):
        cfg, scheduler, codes, labels = self.cfg, self.scheduler, self.codes, self.labels
        t0, first_step = time.perf_counter(), scheduler.last_epoch
        with tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                  dynamic_ncols=True) as progress:
            train_bits, seen = train_epoch(self.prior, self.stepped, self.opt, scheduler, codes["train"],
                                           labels["train"], cfg, self.amp, self.budget, progress)
        train_seconds = time.perf_counter() - t0
        self.saved.check_finite(epoch, "train NLL", train_bits, cfg)  # before anything of this epoch is saved
        t_val = time.perf_counter()
        val_bits = prior_bits(self.prior, codes["validate"], labels["validate"], amp=self.amp)
        self.saved.check_finite(epoch, "validation NLL", val_bits, cfg)
        timing = (train_seconds / max(1, scheduler.last_epoch - first_step), time.perf_counter() - t_val)
        return {"epoch": epoch, "train_bits_per_code": train_bits, "val_bits_per_code": val_bits,
                "lr": scheduler.get_last_lr()[0], "epoch_seconds": time.perf_counter() - t0,
                "train_codes_per_s": seen * codes["train"][0].numel() / train_seconds}, timing

    def checkpoint(self, row: dict, stopping: bool) -> dict:
        """The VQ-VAE's codebook among it: a prior models the codes of that one VQ-VAE only."""
        return {"kind": "prior", "model": self.prior.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.scheduler.state_dict(), "best_val_bits": self.best,
                "model_config": asdict(self.prior.config), "train_config": asdict(self.cfg),
                "vqvae_checkpoint": str(self.cfg.vqvae), "vqvae_epoch": self.vqvae_state["epoch"],
                "vqvae_model_config": self.vqvae_state["model_config"],
                "vqvae_codebook": self.vqvae.quantizer.codebook.detach().cpu(), "class_names": list(self.class_names),
                "metrics": row, "time_budget": self.budget.state(done=stopping)}

    def report(self, row: dict, best: bool, stopping: bool):
        epoch, run_dir, k = row["epoch"], self.saved.run_dir, self.prior.config.codebook_size
        self.tensorboard.epoch(row)
        plot_curves(read_csv(run_dir / "metrics.csv"), "epoch",
                    {"train_bits_per_code": "train", "val_bits_per_code": "validation"}, run_dir / "loss.png",
                    f"Prior NLL (uniform over K={k}: {math.log2(k):.2f} bits/code)", "bits / code")
        if self.cfg.epoch_samples:
            samples = save_samples(self.prior, self.vqvae, tuple(self.codes["train"].shape[1:]), self.cfg,
                                   self.device, run_dir / "samples" / f"epoch_{epoch:03d}.png",
                                   f"epoch {epoch}: validation NLL {row['val_bits_per_code']:.3f} bits/code")
            self.tensorboard.image("samples", samples, epoch, nrow=8)
        tqdm.write(f"epoch {epoch:3d} | train {row['train_bits_per_code']:.4f} | val {row['val_bits_per_code']:.4f} "
                   f"bits/code | lr {row['lr']:.2e} | {row['epoch_seconds']:.1f}s "
                   f"{row['train_codes_per_s']:.0f} codes/s" + (" *" if best else ""))


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
    started = time.monotonic()  # --max-minutes' clock: the encoding pass and a resume's reload are spent from it
    stop_on_interrupts()  # a scheduler's SIGTERM stops like Ctrl-C, and a second signal cannot change what it reports
    with exits_with_one_line(interrupted="interrupted before training started; no checkpoint was written or changed"):
        train_prior(*configs_from_args(*parse_config_flags(argv, "train_prior.py", __doc__, PriorTrainConfig,
                                                           PriorConfig, "prior (PriorConfig)", exclude=DERIVED)),
                    started=started)


if __name__ == "__main__":
    main()
