"""Shared plumbing: seeding, devices, distributed setup, checkpoints, SSIM/PSNR, CSV and plots."""
import csv
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

CHECKPOINT_FORMAT = "vqvae-mri/1"


class UserError(Exception):
    """Something the user can fix; str(e) is one line saying what was wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------------------
# Seeding, devices, distributed
# ---------------------------------------------------------------------------------------------------------

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def choose_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise UserError(f"unknown --device {name!r}; choose auto, cpu or cuda")
    return torch.device("cpu")


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) for a plain `python` run."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier():
    if is_distributed():
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------

def save_checkpoint(state: dict, path: Path):
    """Write atomically: a temp file in the same folder, fsync, then rename over the target.

    A crash or kill mid-write leaves the previous file intact; a full disk is reported, never left behind
    as a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"could not write checkpoint {path}: {e.strerror or e}; free disk space or choose "
                        f"another --out, then resume from the last checkpoint") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path, kind: str = "vqvae") -> dict:
    """Load a checkpoint with weights_only=True, so a file someone hands you cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass --checkpoint with a .pt file written by train.py")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code in it, not a torch file at all
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it contains objects other than tensors and plain data, which could run code when loaded"
        raise UserError(f"cannot load checkpoint {path}: {reason}; use a checkpoint written by this "
                        f"project's train.py") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint of this project (format {CHECKPOINT_FORMAT}); "
                        f"use one written by train.py")
    if state.get("kind", "vqvae") != kind:
        raise UserError(f"{path} holds a {state.get('kind')} checkpoint, but a {kind} checkpoint is needed here")
    return state


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and/or torch.compile wrappers, whose state_dict has no prefixes."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------------------------------------------------
# Metrics: SSIM and PSNR on images in [0, 1]
# ---------------------------------------------------------------------------------------------------------

def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 7) -> torch.Tensor:
    """Per-image mean SSIM of (B, 1, H, W) batches, equal to skimage.metrics.structural_similarity
    with its defaults (7x7 uniform window, sample covariance, K1=0.01, K2=0.03) -> (B,).

    skimage averages over the image minus a (win_size-1)/2 border, which is exactly the 'valid' region
    of a stride-1 average pool, so no cropping is needed."""
    x, y = x.float(), y.float()
    pool = lambda t: F.avg_pool2d(t, win_size, stride=1)  # noqa: E731
    n = win_size * win_size
    cov_norm = n / (n - 1)
    ux, uy = pool(x), pool(y)
    vx = cov_norm * (pool(x * x) - ux * ux)
    vy = cov_norm * (pool(y * y) - uy * uy)
    vxy = cov_norm * (pool(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) batches -> (B,); capped at 100 dB for identical images."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-10))).clamp(max=100)


# ---------------------------------------------------------------------------------------------------------
# CSV, JSON and plots
# ---------------------------------------------------------------------------------------------------------

def append_csv(path: Path, row: dict):
    path = Path(path)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) if _is_number(v) else v for k, v in r.items()} for r in csv.DictReader(f)]


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except (TypeError, ValueError):
        return False


def write_json(path: Path, data):
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(rows: list[dict], x: str, series: dict[str, str], path: Path, title: str, ylabel: str,
                logy: bool = False):
    """One line per {column: label} in `series`, against column `x`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, label in series.items():
        points = [(r[x], r[column]) for r in rows if isinstance(r.get(column), float)]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, label=label)
    ax.set(xlabel=x, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training_curves(metrics_csv: Path, out_dir: Path):
    """loss.png, ssim.png and codebook.png from a run's metrics.csv."""
    rows, out_dir = read_csv(metrics_csv), Path(out_dir)
    plot_curves(rows, "epoch", {"train_reconstruction": "train", "val_reconstruction": "validation"},
                out_dir / "loss.png", "Reconstruction loss", "loss", logy=True)
    plot_curves(rows, "epoch", {"val_ssim": "validation SSIM"}, out_dir / "ssim.png", "Validation SSIM", "SSIM")
    plot_curves(rows, "epoch", {"codes_used_pct": "codes used (%)", "dead_codes_pct": "dead codes (%)"},
                out_dir / "codebook.png", "Codebook health", "% of K")


def save_image_grid(images: torch.Tensor, path: Path, nrow: int = 8, title: str | None = None):
    """(B, 1, H, W) images in [-1, 1] -> one PNG grid."""
    from torchvision.utils import make_grid
    plt = _pyplot()
    grid = make_grid(to_unit(images.detach().cpu()), nrow=nrow, padding=2, pad_value=1.0)[0]
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 100, grid.shape[0] / 100 + (0.3 if title else 0)), dpi=100)
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_side_by_side(inputs: torch.Tensor, outputs: torch.Tensor, path: Path, titles=("input", "reconstruction"),
                      nrow: int = 8):
    """Two grids, inputs beside outputs, in one figure."""
    from torchvision.utils import make_grid
    plt = _pyplot()
    grids = [make_grid(to_unit(t.detach().cpu()), nrow=nrow, padding=2, pad_value=1.0)[0] for t in (inputs, outputs)]
    h, w = grids[0].shape
    fig, axes = plt.subplots(1, 2, figsize=(2 * w / 100 + 0.4, h / 100 + 0.5), dpi=100)
    for ax, grid, title in zip(axes, grids, titles):
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_triplets(inputs: torch.Tensor, indices: torch.Tensor, outputs: torch.Tensor, path: Path, scores=None):
    """Rows of input / code-index map / reconstruction."""
    plt = _pyplot()
    n = inputs.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for i in range(n):
        panels = [(to_unit(inputs[i, 0]).cpu(), "gray", "input"),
                  (indices[i].cpu(), "viridis", f"codes {tuple(indices[i].shape)}"),
                  (to_unit(outputs[i, 0]).cpu(), "gray", "reconstruction"
                   + (f" (SSIM {scores[i]:.3f})" if scores is not None else ""))]
        for ax, (img, cmap, title) in zip(axes[i], panels):
            ax.imshow(img.numpy(), cmap=cmap, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_histogram(values, path: Path, title: str, xlabel: str, threshold: float | None = None):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(np.asarray(values), bins=40, color="steelblue")
    if threshold is not None:
        ax.axvline(threshold, color="red", ls="--", label=f"{threshold}")
        ax.legend()
    ax.set(title=title, xlabel=xlabel, ylabel="images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(values, path: Path, title: str, xlabel: str, ylabel: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(np.arange(len(values)), np.asarray(values), width=1.0, color="steelblue")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
