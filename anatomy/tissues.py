"""The tissue segmenter as an independent judge: segment slices, score the segmentations with Dice against the true
masks (or each other), and the tissue measures of a set of slices (segment.py, predict.py and compress.py use
these). Images are uint8 (N, H, W) slices unless said otherwise; masks are uint8 (N, H, W) tissue classes 0..3."""
import numpy as np
import torch

from dataset import TISSUES
from imaging.slices import to_float
from evaluation.metrics import batched, dice_per_class

DICE_COLUMNS = tuple(f"dice_{t.lower()}" for t in TISSUES) + ("dice_mean",)


@torch.no_grad()
def segment_images(model, images: torch.Tensor, device: torch.device, amp, batch_size: int = 32,
                   desc: str | None = None) -> torch.Tensor:
    """The segmenter's tissue classes of each slice, under `amp` (utils.autocast) as in training."""
    def segment(x):  # (B, H, W) uint8 -> (B, H, W) uint8
        x = to_float(x.unsqueeze(1)).contiguous(memory_format=torch.channels_last)
        with amp:
            return model(x).argmax(1).to(torch.uint8)
    return batched(segment, images, device, batch_size, desc)


def dice_table(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, 4) per slice: Dice of CSF, GM and WM (metrics.dice_per_class) and their mean."""
    dice = dice_per_class(pred, target, classes=(1, 2, 3))
    return torch.cat([dice, dice.mean(1, keepdim=True)], 1)


def dice_columns(table: torch.Tensor, prefix: str = "") -> list[dict]:
    """One {prefix + dice_csf: ..., ...} dict per row of a dice_table, for a per-image CSV."""
    return [{f"{prefix}{c}": round(float(v), 6) for c, v in zip(DICE_COLUMNS, row)} for row in table]


def dice_summary(table: torch.Tensor, pred: torch.Tensor | None = None, target: torch.Tensor | None = None) -> dict:
    """Mean, std and min over the slices of each dice_table column; with the masks also the pooled Dice (every
    pixel of the split counted as one image), which slices with little of a tissue sway less."""
    summary = {c: {"mean": float(v.mean()), "std": float(v.std(unbiased=False)), "min": float(v.min())}
               for c, v in zip(DICE_COLUMNS, table.T)}
    if pred is not None:
        pooled = dice_per_class(pred.reshape(1, -1), target.reshape(1, -1))[0]
        summary["pooled"] = {**{c: float(v) for c, v in zip(DICE_COLUMNS, pooled)}, "dice_mean": float(pooled.mean())}
    return summary


def tissue_fractions(masks: torch.Tensor) -> torch.Tensor:
    """(N, 3): each tissue's (CSF, GM, WM) share of the brain pixels (classes 1..3) of each slice; a slice without
    brain pixels gets zeros."""
    counts = torch.stack([(masks == c).flatten(1).sum(1) for c in (1, 2, 3)], 1).double()
    return counts / counts.sum(1, keepdim=True).clamp(min=1)


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> float:
    """The 1-D Wasserstein (earth mover's) distance between two samples: the area between their empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(grid)))


@torch.no_grad()
def segmenter_features(model, images: torch.Tensor, device: torch.device, batch_size: int = 32,
                       desc: str | None = None) -> torch.Tensor:
    """(N, 1, H, W) images in [-1, 1] -> (N, 2C): the mean and std over space of the U-Net's bottleneck, a feature
    space for the Frechet distance that owes nothing to the VQ-VAE being judged."""
    def pooled(x):
        z = model.skips(x)[-1].float().flatten(2)  # (B, C, h*w)
        return torch.cat([z.mean(2), z.std(2)], 1)
    return batched(pooled, images, device, batch_size, desc)


def worst_first(table: torch.Tensor, n: int) -> list[int]:
    """Indices of the `n` slices with the lowest mean Dice (last column), worst first."""
    return table[:, -1].argsort()[:n].tolist()
