"""Scoring reconstructions: score_split (the one function that reconstructs and scores a split, for training's
validation, predict.py and ablate.py alike), a score's summary over the images (summarise), code maps
(encode_images), and any function over a tensor in batches (apply_in_batches). SSIM and PSNR themselves are in
imaging/quality.py; the judges of a prior and its samples in evaluation/generation.py."""
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from imaging.quality import psnr, ssim
from imaging.slices import to_float, to_unit
from modules import VQVAE


def summarise(values: np.ndarray) -> dict:
    """Mean, std, min and max of a score over the images, for a summary.json; images scored NaN (an in-brain score
    of a slice with an empty brain mask) are left out and counted."""
    values = np.asarray(values, dtype=np.float64)
    scored = values[~np.isnan(values)]
    if not len(scored):
        return {**dict.fromkeys(("mean", "std", "min", "max"), float("nan")), "unscored": len(values)}
    summary = {"mean": float(scored.mean()), "std": float(scored.std()), "min": float(scored.min()),
               "max": float(scored.max())}
    return summary if len(scored) == len(values) else {**summary, "unscored": len(values) - len(scored)}


class SplitScores(NamedTuple):
    ssim: torch.Tensor         # (N,) per image
    psnr: torch.Tensor         # (N,) per image, dB
    ssim_brain: torch.Tensor   # (N,) per image inside its brain mask (NaN for an empty mask); (0,) without masks
    psnr_brain: torch.Tensor   # (N,) likewise, dB
    loss_sums: dict            # each loss term summed over the images (batch mean x batch size)
    inputs: torch.Tensor       # (keep, 1, H, W) the first `keep` inputs in [-1, 1], as the model read them
    outputs: torch.Tensor      # (keep, 1, H, W) their reconstructions
    indices: torch.Tensor      # (N, h, w) every image's code map


@torch.no_grad()
def score_split(model, images: torch.Tensor, device: torch.device, autocast, batch_size: int = 32,
                channels_last: bool = True, compiled_ssim: bool = False, keep: int = 0, progress: str | None = None,
                corrupt=None, brain: torch.Tensor | None = None) -> SplitScores:
    """Reconstruct uint8 (N, H, W) `images` with `model` (a VQVAE, in eval mode) and score every one. Validation
    during training, predict.py and ablate.py all score through this, in the same precision (`autocast`) and memory
    format as training, so their figures agree. Denoising: `corrupt(x, rows)` gives the noisy version of the batch
    x of `images[rows]`; the model reads it, and its output is scored against the clean x (`inputs` keeps the
    noisy ones). `brain`: bool (N, H, W) brain masks (anatomy/brain.py), for the in-brain scores too."""
    model.eval()
    ssims, psnrs, sums, indices, kept = [], [], {}, [], {"inputs": [], "outputs": []}
    in_brain = {"ssim": [], "psnr": []}
    for start in tqdm(range(0, len(images), batch_size), desc=progress, leave=False, disable=progress is None):
        x = to_float(images[start:start + batch_size].unsqueeze(1).to(device, non_blocking=True))  # (B, 1, H, W)
        inputs = x if corrupt is None else corrupt(x, range(start, start + len(x)))
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast:
            out = model(inputs, None if corrupt is None else x)
        rec, ref = to_unit(out.reconstruction), to_unit(x)
        ssims.append(ssim(rec, ref, compiled=compiled_ssim))
        psnrs.append(psnr(rec, ref))
        if brain is not None:
            mask = brain[start:start + len(x)].unsqueeze(1).to(rec.device)  # (B, 1, H, W)
            in_brain["ssim"].append(ssim(rec, ref, mask=mask))
            in_brain["psnr"].append(psnr(rec, ref, mask=mask))
        for name, value in out.losses.items():
            sums[name] = sums.get(name, 0.0) + value.double() * len(x)
        indices.append(out.indices.cpu())
        if start < keep:
            kept["inputs"].append(inputs.float().cpu())
            kept["outputs"].append(out.reconstruction.float().cpu())
    empty = torch.zeros(0)
    per_image = (ssims, psnrs, in_brain["ssim"], in_brain["psnr"])
    return SplitScores(*(torch.cat(v).cpu() if v else empty for v in per_image),
                       sums,
                       *(torch.cat(v)[:keep] if v else empty for v in kept.values()),
                       torch.cat(indices) if indices else empty)


@torch.no_grad()
def apply_in_batches(fn, x: torch.Tensor, device: torch.device, batch_size: int = 64,
                     desc: str | None = None) -> torch.Tensor:
    """fn over x in batches on `device`; the results concatenated on the CPU."""
    return torch.cat([fn(b.to(device)).cpu() for b in tqdm(x.split(batch_size), desc=desc, leave=False,
                                                              disable=desc is None)])


def encode_images(model: VQVAE, images: torch.Tensor, device, batch_size: int = 64, desc=None,
                  amp=None) -> torch.Tensor:
    """uint8 (N, H, W) slices -> (N, h, w) code maps, under `amp` (utils.autocast) if given, as score_split runs."""
    def encode(x):
        with amp or torch.autocast(device.type, enabled=False):
            return model.encode(to_float(x.unsqueeze(1)))
    return apply_in_batches(encode, images, device, batch_size, desc)
