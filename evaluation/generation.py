"""Judging a prior and its samples: the bits of code maps under the prior (prior_bits); the measures of generated
slices (encoder_features, nearest_ssim, frechet_distance); and what sample.py writes: the completions figure
(save_completions) and sample_scores.json (sample_scores, the segmenter's judge_samples, fractions_by_class)."""
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from anatomy.tissues import segment_images, segmenter_features, tissue_fractions, wasserstein_1d
from anatomy.vocabulary import TISSUES
from evaluation.metrics import apply_in_batches, encode_images
from imaging.quality import ssim
from imaging.slices import to_float, to_uint8, to_unit
from modules import VQVAE, Prior
from utils import autocast, save_image_grid


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
    return apply_in_batches(pooled, images, device, batch_size, desc)


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


def save_completions(prior, model, held, shape, temperature: float, generator, amp, batch_size: int, path: Path):
    """Keep the top half of the codes of a few slices of `held` (a split), sample the rest 3 times; one figure."""
    device = next(model.parameters()).device
    decode = lambda codes: apply_in_batches(model.decode_indices, codes, device, batch_size)  # noqa: E731
    picks = torch.linspace(0, len(held) - 1, min(8, len(held))).long()
    originals = to_float(held.images[picks].unsqueeze(1))
    given = encode_images(model, held.images[picks], device, batch_size, amp=amp)
    top_half = torch.zeros(shape, dtype=torch.bool)
    top_half[:shape[0] // 2] = True
    labels = held.labels[picks].repeat_interleave(3) if prior.config.num_classes else None
    completed = prior.sample(3 * len(picks), shape, labels, temperature, generator,
                             given=given.repeat_interleave(3, 0), given_mask=top_half)
    rows = torch.cat([originals.unsqueeze(1), decode(given).unsqueeze(1),
                      decode(completed).view(len(picks), 3, *originals.shape[1:])], 1)
    save_image_grid(rows.flatten(0, 1), path, nrow=5, title=f"{held.split} slice | its reconstruction | 3 samples of "
                                                            f"the bottom half given the top half's codes")


def sample_scores(model, samples, train, val, args, device, segmenter=None, classes=None) -> dict:
    """Nearest-train SSIM and the Frechet distance to the train slices, of the samples and, as references, of as
    many random real validation slices and of their reconstructions; with a segmenter also its judgement
    (judge_samples), per class where `classes` gives the samples' labels and the class names.

    The references have the samples' count because the Frechet distance of a set of N slices is biased upwards the
    more the smaller N (its mean term alone by tr(covariance) / N): a set of 64 and one of 1120 do not compare.
    `args`: sample.py's flags (seed, batch_size, compile, precision)."""
    train_images, val_images = (to_float(d.images.unsqueeze(1)) for d in (train, val))
    reference = torch.randperm(len(val), generator=torch.Generator().manual_seed(args.seed))[:len(samples)]
    sets = {"samples": samples, "validate_real": val_images[reference],
            "validate_reconstructions": apply_in_batches(lambda x: model(x).reconstruction, val_images[reference],
                                                         device, args.batch_size, desc="reconstructing validate")}
    gallery = to_unit(train_images).to(device)
    nearest = {name: nearest_ssim(to_unit(x).to(device), gallery, compiled=args.compile).cpu().numpy()
               for name, x in sets.items()}
    features = {name: encoder_features(model, x, device, args.batch_size, desc=f"encoder features: {name}")
                for name, x in {"train": train_images, **sets}.items()}
    return {
        "reference_slices": {"about": "validate_* sets: this many random validate slices, as many as the samples "
                                      "(or the whole split if smaller), for every score but the tissue fractions",
                             "validate": len(reference)},
        "nearest_train_ssim": {"about": "per image, the highest SSIM to any train slice (1.0: a copy)",
                               **{name: {"mean": float(v.mean()), "max": float(v.max()), "images": len(v)}
                                  for name, v in nearest.items()}},
        "frechet_distance": {"about": "between the train slices and each set, on the VQ-VAE encoder's output "
                                      "pooled to its mean and std over space: the features of the model under "
                                      "test, so not an independent judge (see segmenter_frechet_distance)",
                             **{f"{name}_vs_train": frechet_distance(f, features["train"])
                                for name, f in features.items() if name != "train"}},
        **(judge_samples(segmenter[0], train_images, sets, val_images, val.masks, args, device,
                         None if classes is None else ({"samples": classes[0], "validate_real": val.labels},
                                                       classes[1]))
           if segmenter else {}),
    }


def judge_samples(segmenter, train_images, sets: dict, val_images, val_masks, args, device, classes=None) -> dict:
    """The segmenter's view of the samples: the Frechet distance to the train slices in its bottleneck features
    (anatomy.tissues.segmenter_features) of each of `sets` (the samples and the equal-sized real references); and each
    tissue's share of the brain pixels per slice, as it segments the samples and all real validation slices
    (`val_images`), with the true masks' shares as a reference where the dataset has masks, and the 1-D
    Wasserstein distance of the samples' shares to the real. `classes` ({"samples": labels, "validate_real":
    labels}, class names): also the shares per class and each class's difference from the first (e.g. AD - NC),
    in the samples and in the real slices."""
    features = {name: segmenter_features(segmenter, x, device, args.batch_size, desc=f"segmenter features: {name}")
                for name, x in {"train": train_images, **sets}.items()}
    amp = autocast(args.precision, device)
    fractions = {name: tissue_fractions(segment_images(segmenter, to_uint8(x[:, 0]), device, amp,
                                                       args.batch_size)).numpy()
                 for name, x in (("samples", sets["samples"]), ("validate_real", val_images))}
    if val_masks is not None:
        fractions["validate_true_masks"] = tissue_fractions(val_masks).numpy()
    by_class = {} if classes is None else {"tissue_fractions_by_class": fractions_by_class(fractions, *classes)}
    return {
        "segmenter_frechet_distance": {
            "about": "between the train slices and each set, on the tissue segmenter's bottleneck pooled to its "
                     "mean and std over space: a judge trained apart from the VQ-VAE and its prior",
            **{f"{name}_vs_train": frechet_distance(f, features["train"])
               for name, f in features.items() if name != "train"}},
        "tissue_fractions": {
            "about": "each tissue's share of the brain pixels (CSF + GM + WM) per slice: the samples and every "
                     "validate slice (validate_real) as the segmenter sees them, validate_true_masks from the masks",
            **{t: {**{name: {"mean": float(f[:, k].mean()), "std": float(f[:, k].std())}
                      for name, f in fractions.items()},
                   "wasserstein_samples_vs_validate": wasserstein_1d(fractions["samples"][:, k],
                                                                     fractions["validate_real"][:, k])}
               for k, t in enumerate(TISSUES)}},
        **by_class,
    }


def fractions_by_class(fractions: dict, labels: dict, class_names) -> dict:
    """Each class's tissue shares (mean, std, slices) in the samples and the real validation slices, and each
    class's mean minus the first class's in both: does the prior reproduce the real difference between classes?"""
    sets = ("samples", "validate_real")
    shares = {c: {name: {t: fractions[name][labels[name].numpy() == i, k] for k, t in enumerate(TISSUES)}
                 for name in sets} for i, c in enumerate(class_names)}
    out = {"about": "each tissue's share of the brain pixels as the segmenter sees them, per class; a difference is "
                    "a class's mean minus the first class's mean"}
    for c, per_set in shares.items():
        out[c] = {name: {t: {"mean": float(v.mean()) if len(v) else None, "std": float(v.std()) if len(v) else None,
                             "slices": len(v)} for t, v in per_tissue.items()}
                  for name, per_tissue in per_set.items()}
    first = class_names[0]
    for c in class_names[1:]:
        out[f"{c} - {first}"] = {name: {t: (out[c][name][t]["mean"] - out[first][name][t]["mean"])
                                        if out[c][name][t]["slices"] and out[first][name][t]["slices"] else None
                                        for t in TISSUES} for name in sets}
    return out
