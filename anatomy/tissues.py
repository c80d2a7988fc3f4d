"""The tissue segmenter as an independent judge: segment slices, score the segmentations with Dice against the true
masks (or each other), and the tissue measures of a set of slices (segment.py, predict.py, sample.py and compress.py
use these); judge_reconstructions is predict.py --segmenter. Images are uint8 (N, H, W) slices unless said otherwise;
masks are uint8 (N, H, W) tissue classes 0..3 (anatomy/vocabulary.py names them)."""
from pathlib import Path

import numpy as np
import torch

from anatomy.vocabulary import DICE_COLUMNS, TISSUE_CLASSES
from evaluation.metrics import apply_in_batches
from imaging.slices import to_float, to_uint8
from utils import UserError, autocast, plot_image_rows


@torch.no_grad()
def segment_images(model, images: torch.Tensor, device: torch.device, amp, batch_size: int = 32,
                   desc: str | None = None) -> torch.Tensor:
    """The segmenter's tissue classes of each slice, under `amp` (utils.autocast) as in training."""
    def segment(x):  # (B, H, W) uint8 -> (B, H, W) uint8
        x = to_float(x.unsqueeze(1)).contiguous(memory_format=torch.channels_last)
        with amp:
            return model(x).argmax(1).to(torch.uint8)
    return apply_in_batches(segment, images, device, batch_size, desc)


def check_segmenter_fits(model, image_shape, what: str):
    """UserError unless the segmenter `model` takes slices of `image_shape` (every level halves their sides
    cleanly); every command that segments checks this before its first output. `what`: the slices, e.g. 'OASIS
    test'."""
    try:
        model.config.check_fits(*image_shape)
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, classes=TISSUE_CLASSES) -> torch.Tensor:
    """Per-image Dice 2|P & T| / (|P| + |T|) of each class in `classes`, from integer label maps (B, H, W) ->
    (B, len(classes)). A class absent from both the prediction and the truth of an image scores 1: nothing was
    there and nothing was found, which is perfect agreement (0/0 would be undefined, and 0 would punish a
    segmenter for a slice that simply has no such tissue). Present in one of them only, it scores 0."""
    pred, target = pred.flatten(1), target.flatten(1)
    scores = []
    for c in classes:
        p, t = pred == c, target == c
        both = (p & t).sum(1).double()
        total = (p.sum(1) + t.sum(1)).double()
        scores.append(torch.where(total > 0, 2 * both / total.clamp(min=1), torch.ones_like(total)))
    return torch.stack(scores, 1)


def dice_table(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, 4) per slice: Dice of CSF, GM and WM (dice_per_class) and their mean."""
    dice = dice_per_class(pred, target)
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
    counts = torch.stack([(masks == c).flatten(1).sum(1) for c in TISSUE_CLASSES], 1).double()
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
    return apply_in_batches(pooled, images, device, batch_size, desc)


def worst_first(table: torch.Tensor, n: int) -> list[int]:
    """Indices of the `n` slices with the lowest mean Dice (last column), worst first."""
    return table[:, -1].argsort()[:n].tolist()


ANATOMY_FIGURE = "worst_anatomy.png"  # judge_reconstructions' figure, in predict.py's --out


def judge_reconstructions(segmenter, data, scores, device, args, out: Path) -> tuple[list[dict], dict]:
    """The segmenter's tissues on each original and on its reconstruction (as the 8-bit image it would be saved
    as), scored against the true masks and against each other; the per-image columns, the summary and
    worst_anatomy.png (the 6 reconstructions that segment worst)."""
    model, _, state = segmenter
    amp = autocast(args.precision, device)
    recon = to_uint8(scores.outputs[:, 0])  # (N, H, W)
    seg_original = segment_images(model, data.images, device, amp, args.batch_size, desc="segmenting originals")
    seg_recon = segment_images(model, recon, device, amp, args.batch_size, desc="segmenting reconstructions")
    tables = {"original": dice_table(seg_original, data.masks), "reconstruction": dice_table(seg_recon, data.masks),
              "between": dice_table(seg_recon, seg_original)}
    columns = [{k: v for t in row for k, v in t.items()}
               for row in zip(*(dice_columns(table, f"{name}_") for name, table in tables.items()))]
    anatomy = {"segmenter": str(args.segmenter), "segmenter_epoch": state["epoch"],
               **{name: dice_summary(table) for name, table in tables.items()},
               "reconstruction_minus_original": float(tables["reconstruction"][:, -1].mean()
                                                      - tables["original"][:, -1].mean())}
    rows = [[(to_float(data.images[i]), Path(data.files[i]).name[:24]), (to_float(recon[i]), "reconstruction"),
             (data.masks[i], "true mask"), (seg_original[i], f"of original ({tables['original'][i, -1]:.3f})"),
             (seg_recon[i], f"of reconstruction ({tables['reconstruction'][i, -1]:.3f})")]
            for i in worst_first(tables["reconstruction"], min(6, len(data)))]
    plot_image_rows(rows, out / ANATOMY_FIGURE)
    return columns, anatomy


def anatomy_line(anatomy: dict, what: str = "reconstructions") -> str:
    """judge_reconstructions' summary on one line; `what`: the model's outputs (reconstructions, denoised)."""
    mean = {name: anatomy[name]["dice_mean"]["mean"] for name in ("original", "reconstruction", "between")}
    return (f"tissue Dice (mean of CSF/GM/WM) against the true masks: originals {mean['original']:.4f}, {what} "
            f"{mean['reconstruction']:.4f} (difference {anatomy['reconstruction_minus_original']:+.4f}); between "
            f"the two segmentations {mean['between']:.4f}")
