"""The learned peer of the rate-distortion study: CompressAI's scale-hyperprior model (Balle et al. 2018, "Variational
image compression with a scale hyperprior"; compressai.models.ScaleHyperprior, N=128 and M=192 as in its model zoo)
for one-channel slices, trained on the same train split for a CPU budget with CompressAI's RateDistortionLoss (one
lambda per rate point), and measured on a split with the byte strings of its own entropy coder.

    python hyperprior.py train --dataset OASIS --data-root ~/data/keras_png_slices_data --lmbda 0.0035 \\
        --max-minutes 30 --out runs/hyperprior-0.0035
    python hyperprior.py train --resume runs/hyperprior-0.0035 --max-minutes 60     # train on, with a new budget
    python hyperprior.py rd runs/hyperprior-0.0035 runs/hyperprior-0.0130 --split test --out runs/rd-hyperprior

train runs the trainers' epoch protocol (training/protocol.py), an epoch being --save-minutes of training: its run
folder holds config.json, metrics.csv (a row per epoch), checkpoints/epoch_NNN.pt, last.pt and best.pt (the newest
epoch: there is no validation score to pick another). rd writes rd_hyperprior.csv (rd.csv's columns) and
rd_hyperprior.json, which `compress.py rd --peer` adds to its table, curves and BD-rates (measure both with the same
--split and --max-images). compressai is an optional dependency of the study only (README, Compression: how to
install it without its numpy<2 pin).
"""
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from codec.study import RATE_POINT, rd_slices, scores
from dataset import DATASETS, build_dataset
from imaging.slices import uint8_to_unit, unit_to_uint8
from modules import config_from_dict, first_failure
from training.checkpoints import load_checkpoint
from training.flags import config_or_error, parse_config_flags, split_subcommand
from training.protocol import EpochRun, SavedEpochs, run_epochs
from training.runs import reserve_run_folder, restore_training, resume_checkpoint, resumed_config
from training.schedule import TimeBudget
from training.steps import check_one_batch, optimizer_step
from utils import (
    DEVICES,
    MAX_BATCH_SIZE,
    ArgumentParser,
    UserError,
    add_shared_flag,
    check_at_least,
    choose_device,
    claim_outputs,
    exits_with_one_line,
    seed_everything,
    set_rng_state,
    set_threads,
    stop_on_interrupts,
    write_csv,
    write_json,
)

STRIDE = 64  # the analysis transform and the hyperprior's together downsample 64x: images are padded to multiples
HEADER_BYTES = 4  # a file's two uint16 side lengths (the image size), beside the two byte strings
NAME = "CompressAI scale hyperprior"
LOSSES = {"loss": "loss", "mse": "mse_loss", "bpp": "bpp_loss"}  # metrics.csv column: RateDistortionLoss's key
# Flags that may change when a run is resumed; everything else comes from the checkpoint.
RESUMABLE_OVERRIDES = ("epochs", "max_minutes", "save_minutes", "device", "data_root", "resume")


@dataclass(frozen=True)
class HyperpriorConfig:
    """The model: CompressAI's ScaleHyperprior for one-channel slices."""
    n: int = 128                  # channels of the transforms (CompressAI's N; default: 128)
    m: int = 192                  # channels of the latent (CompressAI's M; default: 192)

    def __post_init__(self):
        first_failure(self, {"n": 1 <= self.n <= 1024, "m": 1 <= self.m <= 1024}, "hyperprior config")


@dataclass(frozen=True)
class HyperpriorTrainConfig:
    """Everything hyperprior.py train needs besides the model's config; one flag per field."""
    dataset: str = "OASIS"        # OASIS, ADNI, demo or nifti
    data_root: str | None = None  # the dataset's folder (required)
    lmbda: float = 0.0035         # RateDistortionLoss's lambda: the weight of 255^2 x MSE against bits per pixel
    lr: float = 1e-4              # Adam on the transforms
    aux_lr: float = 1e-3          # Adam on the entropy bottleneck's quantiles (the auxiliary loss)
    batch_size: int = 8           # slices per step
    grad_clip: float = 1.0        # clip the gradient norm of the transforms to this (0: no clipping)
    epochs: int = 1000            # epochs to train, each --save-minutes long (at most: --max-minutes ends it first)
    max_minutes: float = 30.0     # the command's time, setup included (--resume without it: the run's time left)
    save_minutes: float = 5.0     # an epoch: this much training, then a checkpoint and a metrics.csv row
    seed: int = 0                 # initial weights and the order of the slices
    device: str = "auto"          # auto, cpu or cuda
    out: str | None = None        # run folder; default runs/hyperprior-<lambda>-NNN
    resume: str | None = None     # a checkpoint to continue from, or its run folder (its last.pt)

    CHOICES = {"dataset": DATASETS, "device": DEVICES}

    def __post_init__(self):
        first_failure(self, {
            "dataset": self.dataset in DATASETS, "lmbda": 0 < self.lmbda < math.inf, "lr": 0 < self.lr < math.inf,
            "aux_lr": 0 < self.aux_lr < math.inf, "batch_size": 1 <= self.batch_size <= MAX_BATCH_SIZE,
            "grad_clip": 0 <= self.grad_clip < math.inf, "epochs": 1 <= self.epochs <= 100000,
            "max_minutes": 0 < self.max_minutes < math.inf, "save_minutes": 0 < self.save_minutes < math.inf,
            "seed": 0 <= self.seed < 2**63, "device": self.device in DEVICES}, "hyperprior training config")


def compressai():
    try:
        import compressai.losses
        import compressai.models
    except ImportError:
        raise UserError("the learned peer needs the compressai package, an optional dependency of the study: "
                        "pip install compressai (README, Compression: how to keep numpy 2)") from None
    return compressai


def build_model(cfg: HyperpriorConfig) -> torch.nn.Module:
    """ScaleHyperprior with a one-channel input and output in place of RGB: the rest as CompressAI builds it."""
    from compressai.models.utils import conv, deconv
    model = compressai().models.ScaleHyperprior(cfg.n, cfg.m)
    model.g_a[0], model.g_s[-1] = conv(1, cfg.n), deconv(cfg.n, 1)
    return model


def padded(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 1, H', W') in [0, 1], zero-padded at the bottom and right to multiples of 64."""
    h, w = images.shape[1:]
    x = uint8_to_unit(images.unsqueeze(1))
    return torch.nn.functional.pad(x, (0, -w % STRIDE, 0, -h % STRIDE))


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

def optimizers(model, cfg: HyperpriorTrainConfig):
    """CompressAI's two optimisers: the quantiles of the entropy bottleneck apart from everything else."""
    main = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    return torch.optim.Adam(main, lr=cfg.lr), torch.optim.Adam(aux, lr=cfg.aux_lr)


def train_epoch(model, opt, aux_opt, loss_fn, data, cfg: HyperpriorTrainConfig, until: float, device,
                progress) -> tuple[np.ndarray, int]:
    """Steps on batches of shuffled train slices (a fresh order each pass) until time.monotonic() reaches `until`,
    at least one; returns the sums of LOSSES over the steps, and the steps."""
    model.train()
    sums, steps = np.zeros(len(LOSSES)), 0
    while steps == 0 or time.monotonic() < until:
        order = torch.randperm(len(data))
        for first in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            x = padded(data.images[order[first:first + cfg.batch_size]]).to(device)
            out = loss_fn(model(x), x)
            optimizer_step(out["loss"], model, opt, None, cfg.grad_clip)
            optimizer_step(model.aux_loss(), model, aux_opt, None, 0)
            values = [float(out[k].detach()) for k in LOSSES.values()]
            sums, steps = sums + values, steps + 1
            progress.update(1)
            progress.set_postfix(loss=f"{values[0]:.4f}", bpp=f"{values[2]:.3f}")
            if time.monotonic() >= until:
                break
    return sums, steps


class HyperpriorRun(EpochRun):
    """The hyperprior's epochs, as the epoch protocol (training/protocol.py) runs them: each --save-minutes of
    training, ended early by --max-minutes' deadline, which also ends the run. No validation score: every epoch is
    the best so far (best.pt is the newest model), and no LR schedule to fit to the deadline."""
    BEST_COLUMN = None

    def __init__(self, cfg, model_cfg, model, opt, aux_opt, data, step: int, seconds: float, **protocol):
        super().__init__(epochs=cfg.epochs, **protocol)
        self.cfg, self.model_cfg, self.model, self.opt, self.aux_opt, self.data = (cfg, model_cfg, model, opt,
                                                                                   aux_opt, data)
        self.loss_fn = compressai().losses.RateDistortionLoss(lmbda=cfg.lmbda)
        self.step, self.seconds = step, seconds  # over the whole run, resumed parts included

    def train_and_validate(self, epoch: int):
        t0 = time.monotonic()
        until = min(t0 + 60 * self.cfg.save_minutes, self.budget.deadline)
        with tqdm(desc=f"epoch {epoch}: lambda {self.cfg.lmbda:g}", unit="step", leave=False) as progress:
            sums, steps = train_epoch(self.model, self.opt, self.aux_opt, self.loss_fn, self.data, self.cfg, until,
                                      self.device, progress)
        self.step, self.seconds = self.step + steps, self.seconds + time.monotonic() - t0
        means = (sums / max(steps, 1)).tolist()
        return {"epoch": epoch, "step": self.step, "seconds": round(self.seconds, 1), **dict(zip(LOSSES, means))}, None

    def checkpoint(self, row: dict, stopping: bool) -> dict:
        return {"kind": "hyperprior", "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "aux_optimizer": self.aux_opt.state_dict(), "scheduler": {}, "model_config": asdict(self.model_cfg),
                "train_config": asdict(self.cfg), "step": self.step, "seconds": self.seconds, "metrics": row,
                "time_budget": self.budget.state(done=stopping)}

    def report(self, row: dict, best: bool, stopping: bool):
        tqdm.write(f"epoch {row['epoch']:3d} | step {row['step']} | loss {row['loss']:.4f} mse {row['mse']:.5f} "
                   f"bpp {row['bpp']:.3f} | {row['seconds'] / 60:.1f} minutes of training")


def train(cfg: HyperpriorTrainConfig, model_cfg: HyperpriorConfig, state: dict | None = None,
          started: float | None = None) -> Path:
    """`started`: time.monotonic() when the command started, where --max-minutes' clock starts (default: now)."""
    device = choose_device(cfg.device)
    seed_everything(cfg.seed)
    data = build_dataset(cfg.dataset, cfg.data_root, "train")
    check_one_batch("the train split's slices", len(data), cfg.batch_size)
    model = build_model(model_cfg).to(device)
    opt, aux_opt = optimizers(model, cfg)
    start_epoch, step, seconds = 1, 0, 0.0
    if state is not None:
        restore_training(state, model, opt, None, 0, cfg.resume, aux_opt=aux_opt)
        set_rng_state(state["rng"])
        start_epoch, step, seconds = state["epoch"] + 1, state["step"], state["seconds"]

    run_dir, lock = reserve_run_folder(cfg.out, Path("runs"), f"hyperprior-{cfg.lmbda:g}", "hyperprior.py train",
                                       resuming=state is not None)
    cfg = replace(cfg, out=str(run_dir))
    write_json(run_dir / "config.json", {"train": asdict(cfg), "model": asdict(model_cfg)})
    print(f"hyperprior run {run_dir}: {len(data)} train slices, lambda {cfg.lmbda:g}, N={model_cfg.n} "
          f"M={model_cfg.m}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {device}, "
          f"{cfg.max_minutes:g} minutes, epochs {start_epoch}..{cfg.epochs}")
    run_epochs(HyperpriorRun(cfg, model_cfg, model, opt, aux_opt, data, step, seconds, device=device,
                             saved=SavedEpochs("hyperprior.py train", run_dir, start_epoch, cfg.resume), lock=lock,
                             budget=TimeBudget(cfg.max_minutes, 0, cfg.batch_size, verbose=False, started=started)))
    return run_dir


def saved_configs(state: dict, path) -> tuple[HyperpriorTrainConfig, HyperpriorConfig]:
    """The training and model configs a hyperprior checkpoint holds; UserError if they are not such configs."""
    try:
        return (config_from_dict(HyperpriorTrainConfig, state["train_config"]),
                config_from_dict(HyperpriorConfig, state["model_config"]))
    except ValueError as e:
        raise UserError(f"{path} holds a bad config ({e}); use a checkpoint written by hyperprior.py train") from None


def configs_from_args(run_args: dict, model_args: dict):
    """The configs of a new run, or of a resumed one (its saved configs, with the flags a resume may change)."""
    if "resume" in run_args:
        path, state = resume_checkpoint(run_args, model_args, RESUMABLE_OVERRIDES, "hyperprior")
        saved_cfg, model_cfg = saved_configs(state, path)
        return resumed_config(saved_cfg, run_args, path, state), model_cfg, state
    if not run_args.get("data_root"):
        raise UserError("--data-root is required: the dataset's folder")
    return config_or_error(HyperpriorTrainConfig, **run_args), config_or_error(HyperpriorConfig, **model_args), None


# ---------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------

def load_model(path: Path):
    """(model in eval mode with its entropy coders' tables built, training config, checkpoint) from a .pt file or a
    run folder (its best.pt: training/checkpoints.checkpoint_file)."""
    state = load_checkpoint(path, kind="hyperprior")
    cfg, model_cfg = saved_configs(state, path)
    try:
        model = build_model(model_cfg)
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path} does not match the hyperprior model it describes ({e}); use a checkpoint written "
                        f"by hyperprior.py train") from None
    model.eval().update(force=True)
    return model, cfg, state


@torch.no_grad()
def measure(model, images: torch.Tensor) -> dict:
    """Each slice compressed to its byte strings and decompressed: bytes (strings + a 4-byte size header), SSIM and
    PSNR of the decoded slice."""
    h, w = images.shape[1:]
    sizes, ssims, psnrs = [], [], []
    t0 = time.perf_counter()
    for image in tqdm(images, desc="compress and decompress", unit="slice", leave=False):
        coded = model.compress(padded(image[None]))
        decoded = model.decompress(coded["strings"], coded["shape"])["x_hat"][0, 0, :h, :w]
        sizes.append(HEADER_BYTES + sum(len(s[0]) for s in coded["strings"]))
        s, p = scores(unit_to_uint8(decoded).numpy(), image.numpy())
        ssims.append(s)
        psnrs.append(p)
    return {"sizes": np.array(sizes, float), "ssim": np.array(ssims), "psnr": np.array(psnrs),
            "slices_per_s": len(images) / (time.perf_counter() - t0)}


OUTPUTS = ("rd_hyperprior.csv", "rd_hyperprior.json")  # rd's, in its --out


def rd(args):
    """Every rate point of args.checkpoints measured on the same slices -> OUTPUTS in args.out; every input is
    checked before the first is measured."""
    check_at_least("--max-images", args.max_images)
    set_threads(args.threads)
    models = [load_model(checkpoint) for checkpoint in args.checkpoints]
    cfg = models[0][1]
    for checkpoint, (_, other, _) in zip(args.checkpoints, models):
        if other.dataset != cfg.dataset:
            raise UserError(f"{checkpoint} was trained on {other.dataset}, {args.checkpoints[0]} on {cfg.dataset}: "
                            f"the rate points of one study are measured on one dataset; pass those of one")
    images, _, files = rd_slices(build_dataset(cfg.dataset, args.data_root or cfg.data_root, args.split),
                                 args.max_images)
    out = claim_outputs(args.out, OUTPUTS, "hyperprior.py rd")
    rows = []
    for model, cfg, state in models:
        m = measure(model, images)
        rows.append({"codec": NAME, "setting": f"lambda {cfg.lmbda:g}", "budget_bytes": RATE_POINT,
                     "images": len(images),
                     "images_fit": len(images), "images_over_budget": 0, "mean_bytes": m["sizes"].mean(),
                     "mean_payload_bytes": m["sizes"].mean() - HEADER_BYTES, "bits_per_slice": 8 * m["sizes"].mean(),
                     "payload_bits_per_code": "", "mean_ssim": float(m["ssim"].mean()),
                     "std_ssim": float(m["ssim"].std()), "mean_psnr": float(m["psnr"].mean()), "latent_grid": "",
                     "K": "", "train_minutes": state["seconds"] / 60, "train_steps": state["step"],
                     "slices_per_s": m["slices_per_s"]})
        print(f"{NAME} lambda {cfg.lmbda:g}: {m['sizes'].mean():.1f} bytes per slice, SSIM {m['ssim'].mean():.4f}, "
              f"PSNR {m['psnr'].mean():.2f} dB, {m['slices_per_s']:.2f} slices/s (encode + decode)")
    write_csv(out / OUTPUTS[0], rows)
    write_json(out / OUTPUTS[1], {"split": args.split, "rows": rows, "checkpoints": [str(c) for c in args.checkpoints],
                                  "files": [str(f) for f in files],
                                  "about": "bytes: the y and z byte strings of CompressAI's entropy coder and a 4-byte "
                                           "image-size header per slice"})
    print(f"written to {out}")


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

COMMANDS = {"train": "train one rate point (one --lmbda)",
            "rd": "measure trained rate points for compress.py rd --peer"}


def parse_rd_args(argv):
    p = ArgumentParser(prog="hyperprior.py rd", description="Bytes, SSIM and PSNR per rate point.")
    p.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints or run folders of hyperprior.py train")
    add_shared_flag(p, "--split", "the one measured (default: test)", default="test")
    add_shared_flag(p, "--data-root")
    p.add_argument("--max-images", type=int, help="this many slices spread over the split (default: all)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's)")
    add_shared_flag(p, "--out", "for rd_hyperprior.csv and rd_hyperprior.json", required=True)
    return p.parse_args(argv)


def main(argv=None):
    started = time.monotonic()  # --max-minutes' clock: loading the data and a resume's reload are spent from it
    stop_on_interrupts()  # a scheduler's SIGTERM stops like Ctrl-C, and a second signal cannot change what it reports
    argv = sys.argv[1:] if argv is None else list(argv)
    with exits_with_one_line(interrupted="interrupted before training started; no checkpoint was written or changed"):
        command, flags = split_subcommand(argv, "hyperprior.py", COMMANDS, "train --dataset demo --data-root data/demo")
        if command == "rd":
            args = parse_rd_args(flags)
            compressai()
            return rd(args)
        run_args, model_args = parse_config_flags(flags, "hyperprior.py train", __doc__, HyperpriorTrainConfig,
                                                  HyperpriorConfig, "model (HyperpriorConfig)")
        compressai()
        return train(*configs_from_args(run_args, model_args), started=started)


if __name__ == "__main__":
    main()
