"""The learned peer of the rate-distortion study: CompressAI's scale-hyperprior model (Balle et al. 2018, "Variational
image compression with a scale hyperprior"; compressai.models.ScaleHyperprior, N=128 and M=192 as in its model zoo)
for one-channel slices, trained on the same train split for a CPU budget with CompressAI's RateDistortionLoss (one
lambda per rate point), and measured on a split with the byte strings of its own entropy coder.

    python hyperprior.py train --dataset OASIS --data-root ~/data/keras_png_slices_data --lmbda 0.0035 \\
        --max-minutes 30 --out runs/hyperprior-0.0035
    python hyperprior.py train --resume runs/hyperprior-0.0035 --max-minutes 60     # train on, with a new budget
    python hyperprior.py rd runs/hyperprior-0.0035 runs/hyperprior-0.0130 --split test --out runs/rd-hyperprior

train writes last.pt (every --save-minutes, at the end, and on Ctrl-C) and metrics.csv to its run folder; rd writes
rd_hyperprior.csv (rd.csv's columns) and rd_hyperprior.json, which `compress.py rd --peer` adds to its table,
curves and BD-rates (measure both with the same --split and --max-images). compressai is an optional dependency of
the study only (README, Compression: how to install it without its numpy<2 pin).
"""
import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.checkpoints import load_checkpoint, save_checkpoint
from dataset import DATASETS, build_dataset
from training.engine import config_or_error, reserve_run_folder
from modules import config_from_dict, first_failure
from codec.study import RATE_POINT, rd_slices, scores
from utils import (ArgumentParser, UserError, append_csv, exits_with_one_line, rng_state, seed_everything,
                   set_rng_state, stop_on_interrupts, write_csv, write_json)

STRIDE = 64  # the analysis transform and the hyperprior's together downsample 64x: images are padded to multiples
HEADER_BYTES = 4  # a file's two uint16 side lengths (the image size), beside the two byte strings
NAME = "CompressAI scale hyperprior"


@dataclass(frozen=True)
class HyperpriorConfig:
    dataset: str = "OASIS"        # OASIS, ADNI or demo
    data_root: str = ""           # the dataset's folder
    lmbda: float = 0.0035         # RateDistortionLoss's lambda: the weight of 255^2 x MSE against bits per pixel
    n: int = 128                  # channels of the transforms (CompressAI's N)
    m: int = 192                  # channels of the latent (CompressAI's M)
    lr: float = 1e-4              # Adam on the transforms
    aux_lr: float = 1e-3          # Adam on the entropy bottleneck's quantiles (the auxiliary loss)
    batch_size: int = 8           # slices per step
    max_minutes: float = 30.0     # training time of this run (a resumed run: of its continuation)
    save_minutes: float = 5.0     # write last.pt at least this often
    seed: int = 0                 # initial weights and the order of the slices

    def __post_init__(self):
        first_failure(self, {"dataset": self.dataset in DATASETS, "lmbda": self.lmbda > 0, "n": 1 <= self.n <= 1024,
                             "m": 1 <= self.m <= 1024, "lr": self.lr > 0, "aux_lr": self.aux_lr > 0,
                             "batch_size": 1 <= self.batch_size <= 1024, "max_minutes": self.max_minutes > 0,
                             "save_minutes": self.save_minutes > 0, "seed": self.seed >= 0}, "hyperprior config")


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
    x = images.unsqueeze(1).float() / 255
    return torch.nn.functional.pad(x, (0, -w % STRIDE, 0, -h % STRIDE))


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

def optimizers(model, cfg: HyperpriorConfig):
    """CompressAI's two optimisers: the quantiles of the entropy bottleneck apart from everything else."""
    main = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    return torch.optim.Adam(main, lr=cfg.lr), torch.optim.Adam(aux, lr=cfg.aux_lr)


def train(args):
    if args.resume:
        run, lock = reserve_run_folder(str(args.resume), None, None, "hyperprior.py train", resuming=True)
        state = load_checkpoint(run / "last.pt", kind="hyperprior")
        try:
            cfg = config_from_dict(HyperpriorConfig, state["config"])
        except ValueError as e:
            raise UserError(f"{run / 'last.pt'} holds a bad config ({e}); resume a run written by hyperprior.py") from None
        if args.max_minutes is not None:
            cfg = config_or_error(HyperpriorConfig, **{**asdict(cfg), "max_minutes": args.max_minutes})
    else:
        if not args.data_root:
            raise UserError("--data-root is required: the dataset's folder")
        cfg = config_or_error(HyperpriorConfig, dataset=args.dataset, data_root=args.data_root, lmbda=args.lmbda,
                              n=args.n, m=args.m, lr=args.lr, aux_lr=args.aux_lr, batch_size=args.batch_size,
                              max_minutes=args.max_minutes or 30.0, save_minutes=args.save_minutes, seed=args.seed)
        run, lock = reserve_run_folder(args.out, Path("runs"), f"hyperprior-{cfg.lmbda:g}", "hyperprior.py train")
        state = None
    seed_everything(cfg.seed)
    data = build_dataset(cfg.dataset, cfg.data_root, "train")
    model = build_model(cfg)
    opt, aux_opt = optimizers(model, cfg)
    loss_fn = compressai().losses.RateDistortionLoss(lmbda=cfg.lmbda)
    step, seconds = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        aux_opt.load_state_dict(state["aux_optimizer"])
        set_rng_state(state["rng"])
        step, seconds = state["step"], state["seconds"]
    print(f"hyperprior run {run}: {len(data)} train slices, lambda {cfg.lmbda:g}, N={cfg.n} M={cfg.m}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {cfg.max_minutes:g} minutes")

    def save(mean_losses: np.ndarray):
        metrics = dict(zip(("loss", "mse", "bpp"), mean_losses.tolist()))
        save_checkpoint({"kind": "hyperprior", "config": asdict(cfg), "model": model.state_dict(),
                         "optimizer": opt.state_dict(), "aux_optimizer": aux_opt.state_dict(), "scheduler": {},
                         "rng": rng_state(), "step": step, "seconds": seconds, "metrics": metrics}, run / "last.pt")
        append_csv(run / "metrics.csv", {"step": step, "seconds": round(seconds, 1), **metrics})

    stop_on_interrupts()
    start, last_save, sums, count = time.monotonic(), time.monotonic(), np.zeros(3), 0
    deadline = start + 60 * cfg.max_minutes
    model.train()
    with tqdm(desc=f"hyperprior lambda {cfg.lmbda:g}", unit="step", initial=step) as bar:
        try:
            while time.monotonic() < deadline:
                order = torch.randperm(len(data))
                for first in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
                    x = padded(data.images[order[first:first + cfg.batch_size]])
                    out = loss_fn(model(x), x)
                    opt.zero_grad()
                    out["loss"].backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    aux = model.aux_loss()
                    aux_opt.zero_grad()
                    aux.backward()
                    aux_opt.step()
                    step += 1
                    values = [float(out[k].detach()) for k in ("loss", "mse_loss", "bpp_loss")]
                    sums += values
                    count += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{values[0]:.4f}", bpp=f"{values[2]:.3f}")
                    now = time.monotonic()
                    if now - last_save > 60 * cfg.save_minutes or now >= deadline:
                        seconds += now - start
                        start, last_save = now, now
                        save(sums / count)
                        sums, count = np.zeros(3), 0
                    if now >= deadline:
                        break
        except KeyboardInterrupt:
            if count:
                seconds += time.monotonic() - start
                save(sums / count)
            print(f"interrupted: saved step {step} to {run / 'last.pt'}; continue with --resume {run}")
            raise SystemExit(130)
    lock.release()
    print(f"done: {step} steps in {seconds / 60:.1f} minutes | written to {run / 'last.pt'}")


# ---------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------

def load_model(path: Path):
    """(model in eval mode with its entropy coders' tables built, config, checkpoint) from a last.pt or run
    folder."""
    path = path / "last.pt" if path.is_dir() else path
    state = load_checkpoint(path, kind="hyperprior")
    try:
        cfg = config_from_dict(HyperpriorConfig, state["config"])
        model = build_model(cfg)
        model.load_state_dict(state["model"])
    except (ValueError, RuntimeError, KeyError) as e:
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
        s, p = scores((decoded.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), image.numpy())
        ssims.append(s)
        psnrs.append(p)
    return {"sizes": np.array(sizes, float), "ssim": np.array(ssims), "psnr": np.array(psnrs),
            "slices_per_s": len(images) / (time.perf_counter() - t0)}


def rd(args):
    out = args.out
    outputs = [out / "rd_hyperprior.csv", out / "rd_hyperprior.json"]
    if any(p.exists() for p in outputs):
        raise UserError(f"{out} already holds rd_hyperprior.csv or .json; hyperprior.py never overwrites: choose a "
                        f"new --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, data = [], None
    for checkpoint in args.checkpoints:
        model, cfg, state = load_model(checkpoint)
        if data is None:
            data = build_dataset(cfg.dataset, args.data_root or cfg.data_root, args.split)
            images, _, files = rd_slices(data, args.max_images)
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
    out.mkdir(parents=True, exist_ok=True)
    write_csv(outputs[0], rows)
    write_json(outputs[1], {"split": args.split, "rows": rows, "checkpoints": [str(c) for c in args.checkpoints],
                            "files": [str(f) for f in files],
                            "about": "bytes: the y and z byte strings of CompressAI's entropy coder and a 4-byte "
                                     "image-size header per slice"})
    print(f"written to {out}")


def main(argv=None):
    p = ArgumentParser(prog="hyperprior.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    t = sub.add_parser("train", help="train one rate point", description="Train the scale hyperprior on a train split.")
    defaults = HyperpriorConfig()
    t.add_argument("--dataset", default=defaults.dataset, choices=DATASETS, help="the dataset (default: OASIS)")
    t.add_argument("--data-root", help="the dataset's folder")
    t.add_argument("--lmbda", type=float, default=defaults.lmbda, help="RateDistortionLoss's lambda: larger is more "
                   f"bytes and quality (default: {defaults.lmbda})")
    t.add_argument("--n", type=int, default=defaults.n, help=f"channels of the transforms (default: {defaults.n})")
    t.add_argument("--m", type=int, default=defaults.m, help=f"channels of the latent (default: {defaults.m})")
    t.add_argument("--lr", type=float, default=defaults.lr, help=f"Adam's learning rate (default: {defaults.lr})")
    t.add_argument("--aux-lr", type=float, default=defaults.aux_lr,
                   help=f"the auxiliary (quantile) optimiser's learning rate (default: {defaults.aux_lr})")
    t.add_argument("--batch-size", type=int, default=defaults.batch_size, help="slices per step (default: 8)")
    t.add_argument("--max-minutes", type=float, help="training time (default: 30; with --resume: the run's own)")
    t.add_argument("--save-minutes", type=float, default=defaults.save_minutes,
                   help="write last.pt at least this often (default: 5)")
    t.add_argument("--seed", type=int, default=0, help="initial weights and slice order (default: 0)")
    t.add_argument("--out", help="run folder (default: runs/hyperprior-<lambda>-NNN)")
    t.add_argument("--resume", type=Path, help="continue this run folder")
    r = sub.add_parser("rd", help="measure trained rate points", description="Bytes, SSIM and PSNR per rate point.")
    r.add_argument("checkpoints", nargs="+", type=Path, help="last.pt files or run folders of hyperprior.py train")
    r.add_argument("--split", default="test", help="the split to measure (default: test)")
    r.add_argument("--data-root", help="where the dataset is now, if it moved")
    r.add_argument("--max-images", type=int, help="this many slices spread over the split (default: all)")
    r.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's)")
    r.add_argument("--out", type=Path, required=True, help="folder for rd_hyperprior.csv and rd_hyperprior.json")
    with exits_with_one_line():
        args = p.parse_args(argv)
        compressai()
        (train if args.command == "train" else rd)(args)


if __name__ == "__main__":
    main()
