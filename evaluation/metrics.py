"""Scoring models: score_split (the one function that reconstructs and scores a split, for training's validation
and predict.py alike), code maps and their bits under the prior (encode_images, prior_bits, batched), and the
measures of generated slices (encoder_features, nearest_ssim, frechet_distance). SSIM and PSNR themselves are in
images.py."""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from imaging.slices import to_float, to_unit
from imaging.quality import psnr, ssim
from modules import VQVAE, Prior


class SplitScores(NamedTuple):
    ssim: torch.Tensor         # (N,) per image
    psnr: torch.Tensor         # (N,) per image, dB
    loss_sums: dict            # each loss term summed over the images (batch mean x batch size)
    inputs: torch.Tensor       # (keep, 1, H, W) the first `keep` inputs in [-1, 1], as the model read them
    outputs: torch.Tensor      # (keep, 1, H, W) their reconstructions
    indices: torch.Tensor      # (N, h, w) every image's code map


@torch.no_grad()
def score_split(model, images: torch.Tensor, device: torch.device, autocast, batch_size: int = 32,
                channels_last: bool = True, compiled_ssim: bool = False, keep: int = 0, progress: str | None = None,
                corrupt=None) -> SplitScores:
    """Reconstruct uint8 (N, H, W) `images` with `model` (a VQVAE, in eval mode) and score every one. Validation
    during training, predict.py and ablate.py all score through this, in the same precision (`autocast`) and memory
    format as training, so their figures agree. Denoising: `corrupt(x, rows)` gives the noisy version of the batch
    x of `images[rows]`; the model reads it, and its output is scored against the clean x (`inputs` keeps the
    noisy ones)."""
    model.eval()
    ssims, psnrs, sums, indices, kept = [], [], {}, [], {"inputs": [], "outputs": []}
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
        for name, value in out.losses.items():
            sums[name] = sums.get(name, 0.0) + value.double() * len(x)
        indices.append(out.indices.cpu())
        if start < keep:
            kept["inputs"].append(inputs.float().cpu())
            kept["outputs"].append(out.reconstruction.float().cpu())
    empty = torch.zeros(0)
    return SplitScores(torch.cat(ssims) if ssims else empty, torch.cat(psnrs) if psnrs else empty, sums,
                       *(torch.cat(v)[:keep] if v else empty for v in kept.values()),
                       torch.cat(indices) if indices else empty)


@torch.no_grad()
def batched(fn, x: torch.Tensor, device: torch.device, batch_size: int = 64, desc: str | None = None) -> torch.Tensor:
    """fn over x in batches on `device`; the results concatenated on the CPU."""
    return torch.cat([fn(b.to(device)).cpu() for b in tqdm(x.split(batch_size), desc=desc, leave=False,
                                                              disable=desc is None)])


def encode_images(model: VQVAE, images: torch.Tensor, device, batch_size: int = 64, desc=None,
                  amp=None) -> torch.Tensor:
    """uint8 (N, H, W) slices -> (N, h, w) code maps, under `amp` (utils.autocast) if given, as score_split runs."""
    def encode(x):
        with amp or torch.autocast(device.type, enabled=False):
            return model.encode(to_float(x.unsqueeze(1)))
    return batched(encode, images, device, batch_size, desc)


@torch.no_grad()
def prior_bits(prior: Prior, codes: torch.Tensor, labels=None, batch_size: int = 64,
               amp=None) -> float:
    """Negative log-likelihood of (N, h, w) code maps under the prior, in bits per code."""
    prior.eval()
    device, nats = next(prior.parameters()).device, 0.0
    for start in range(0, len(codes), batch_size):
        x = codes[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device) if labels is not None else None
        with amp or torch.autocast(device.type, enabled=False):
            logits = prior(x, y)
        nats += F.cross_entropy(logits.float(), x, reduction="sum")
    return float(nats) / codes.numel() / math.log(2)


def encoder_features(model: VQVAE, images: torch.Tensor, device, batch_size: int = 64,
                     desc: str | None = None) -> torch.Tensor:
    """(N, 1, H, W) images in [-1, 1] -> (N, 2D): mean and std over space of the encoder's output, the fixed
    feature space of the Frechet distance."""
    def pooled(x):
        z = model.encoder(x).float().flatten(2)  # (B, D, h*w)
        return torch.cat([z.mean(2), z.std(2)], 1)
    return batched(pooled, images, device, batch_size, desc)


def nearest_ssim(queries: torch.Tensor, gallery: torch.Tensor, candidates: int = 64,
                 compiled: bool = False) -> torch.Tensor:
    """For each (1, H, W) image of `queries`, its highest SSIM to any image of `gallery` (all in [0, 1]) -> (Nq,).

    SSIM is computed against the `candidates` gallery images nearest in pixel L2 distance (exact when the
    gallery is no larger), which keeps a search over a whole training split of thousands of slices cheap."""
    distances = torch.cdist(queries.flatten(1).float(), gallery.flatten(1).float())  # (Nq, Ng)
    nearest = distances.topk(min(candidates, len(gallery)), dim=1, largest=False).indices  # (Nq, candidates)
    return torch.stack([ssim(q.expand(len(i), *q.shape), gallery[i], compiled=compiled).max()
                        for q, i in zip(queries, nearest)])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, F) and (M, F), as in FID:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2).

    tr((S_a S_b)^1/2) is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    S_a^1/2 S_b S_a^1/2 (same spectrum), which needs only symmetric eigendecompositions."""
    a, b = a.double().cpu(), b.double().cpu()
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    trace_root = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + s_a.trace() + s_b.trace() - 2 * trace_root)




def dice_per_class(pred: torch.Tensor, target: torch.Tensor, classes=(1, 2, 3)) -> torch.Tensor:
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
