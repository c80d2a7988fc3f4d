"""predict.py --noise: a VQ-VAE as a denoiser, scored beside the classical denoisers on the same noisy slices.

The split's slices are corrupted (seeded by --seed), reconstructed by the model and by each classical denoiser (its
strength factor chosen on validation slices carrying the same noise, by their mean in-brain SSIM: the score a
denoiser of brain tissue is judged by), and every output is scored against the clean slice, whole and inside the
brain (anatomy/brain.py's masks), beside the noisy input's own score: per_image.csv, summary.json and denoising.png.
The functions take predict.py's flags as `args` (noise, seed, baselines, slow_baseline_slices, workers, the runtime
and data flags)."""
import math
import time
from pathlib import Path

import torch

from anatomy.brain import computed_brain_masks
from anatomy.tissues import anatomy_line, judge_reconstructions
from dataset import WHERE_SHIPPED
from denoising.classical import CLASSICAL_DENOISERS, available_denoisers, denoiser_pool, run_denoiser
from denoising.noise import add_noise
from evaluation.metrics import score_split, summarise
from imaging.quality import psnr, ssim
from imaging.slices import to_float, to_unit, unit_to_float
from training.checkpoints import load_split
from utils import autocast, save_image_grid, use_bf16, write_csv, write_json

DENOISING_OUTPUTS = ("per_image.csv", "summary.json", "denoising.png")  # in predict.py's --out


def score_denoising(args, model, checkpoint, data, out: Path, device, segmenter, brain_and_rule) -> dict:
    """--noise: the split's slices corrupted (seeded by --seed), reconstructed by the model and by each classical
    denoiser, every output scored against the clean slice, the noisy input's own score beside them; per_image.csv,
    summary.json and denoising.png. With a `segmenter` (load_segmenter's) also the tissue Dice of the model's
    denoised slices beside the clean slices' (anatomy.tissues.judge_reconstructions: its columns and
    worst_anatomy.png). `brain_and_rule`: anatomy.brain.brain_masks of `data`."""
    path, cfg, state = checkpoint
    amp = autocast(args.precision, device)
    clean = to_unit(to_float(data.images.unsqueeze(1)))  # (N, 1, H, W) in [0, 1]
    noisy = noisy_slices(data.images, args.noise, args.seed)  # (N, 1, H, W) in [-1, 1]
    brain, brain_rule = brain_and_rule
    brain = brain.unsqueeze(1)  # (N, 1, H, W) bool

    # The model, and the noisy input as it is
    start = time.perf_counter()
    ours = score_split(model, data.images, device, amp, args.batch_size, compiled_ssim=args.compile,
                       keep=len(data) if segmenter else 0, progress="denoising",
                       corrupt=lambda x, rows: noisy[rows.start:rows.stop].to(x.device), brain=brain[:, 0])
    results = {"noisy": image_scores(to_unit(noisy), clean, brain),
               "ours": dict(zip(METRICS, (ours.ssim, ours.psnr, ours.ssim_brain, ours.psnr_brain)))}
    seconds = {"ours": (time.perf_counter() - start) / len(data)}

    # Classical denoisers on the same noisy slices, each set on validation slices carrying the same noise
    methods = available_denoisers(args.baselines)
    common = slow_subset(len(data), args) if any(m.slow for m in methods) else torch.arange(len(data))
    picks = common[torch.linspace(0, len(common) - 1, min(4, len(common))).long()]  # the figure's slices
    val = load_split(cfg, "validate", args.data_root, args.skip_bad, state["demo_settings"], args.dataset,
                     masks=WHERE_SHIPPED)
    tuning, shown = {}, {}
    with denoiser_pool(args.workers) as pool:
        for method in methods:
            rows = common if method.slow else torch.arange(len(data))
            tuning[method.name] = choose_factor(method, val, args, pool)
            denoised, seconds[method.name] = run_denoiser(method, to_unit(noisy[rows, 0]).numpy(),
                                                          tuning[method.name]["factor"],
                                                          desc=f"{method.name} ({len(rows)} slices)", pool=pool)
            denoised = torch.from_numpy(denoised).unsqueeze(1)  # (len(rows), 1, H, W) in [0, 1]
            results[method.name] = scores_on_rows(denoised, clean, brain, rows)
            shown[method.name] = denoised[torch.searchsorted(rows, picks)]

    # Tables and the figures
    columns, anatomy = (judge_reconstructions(segmenter, data, ours, device, args, out) if segmenter
                        else ([{}] * len(data), None))
    write_csv(out / "per_image.csv", [{**r, **c} for r, c in zip(per_image_rows(data.files, results), columns)])
    bf16 = use_bf16(args.precision, device)
    summary = {**denoising_summary(args, checkpoint, data, results, seconds, tuning, common, bf16),
               "brain_mask": brain_rule}
    if anatomy:
        summary["anatomy"] = anatomy
    write_json(out / "summary.json", summary)
    best = summary["best_classical"]
    best_label = CLASSICAL_DENOISERS[best].label if best else "no classical"
    save_denoising_grid(model, noisy[picks], clean[picks], shown.get(best), amp, out / "denoising.png",
                        f"{args.noise}: noisy | ours | {best_label} | clean")
    print(denoising_line(summary, out))
    if anatomy:
        print(anatomy_line(anatomy, f"denoised by ours (from {args.noise})"))
    return summary


def noisy_slices(images: torch.Tensor, noise, seed: int, chunk: int = 64) -> torch.Tensor:
    """uint8 (N, H, W) -> noisy (N, 1, H, W) in [-1, 1]; slice i's noise drawn from the seed (seed, i)."""
    return torch.cat([add_noise(to_float(images[i:i + chunk].unsqueeze(1)), noise, (seed,), range(i, i + chunk))
                      for i in range(0, len(images), chunk)])


METRICS = ("ssim", "psnr", "ssim_brain", "psnr_brain")  # each method's per-slice scores, in per_image.csv's order


def image_scores(x: torch.Tensor, clean: torch.Tensor, brain: torch.Tensor) -> dict:
    """Per-image METRICS of (N, 1, H, W) images in [0, 1] against the clean ones, as score_split scores; the
    in-brain ones inside the bool (N, 1, H, W) `brain` masks."""
    return dict(zip(METRICS, (ssim(x, clean), psnr(x, clean), ssim(x, clean, mask=brain),
                              psnr(x, clean, mask=brain))))


def scores_on_rows(denoised: torch.Tensor, clean: torch.Tensor, brain: torch.Tensor, rows: torch.Tensor) -> dict:
    """METRICS per slice of the split, NaN where the method did not run (outside `rows`)."""
    scores = {metric: torch.full((len(clean),), math.nan) for metric in METRICS}
    for metric, values in image_scores(denoised, clean[rows], brain[rows]).items():
        scores[metric][rows] = values
    return scores


def slow_subset(n: int, args) -> torch.Tensor:
    """The rows the slow denoisers run on: all, or --slow-baseline-slices of them drawn with --seed, in order."""
    if args.slow_baseline_slices is None or args.slow_baseline_slices >= n:
        return torch.arange(n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    return order[:args.slow_baseline_slices].sort().values


def choose_factor(method, val, args, pool=None) -> dict:
    """The method's strength factor (of its `factors`) with the highest mean in-brain SSIM on a few validation
    slices (drawn with --seed) carrying the same noise, the mean in-brain and whole-slice SSIM of each factor tried,
    and the noise-level estimate the method used. `val`: loaded with its masks where shipped."""
    rows = torch.randperm(len(val), generator=torch.Generator().manual_seed(args.seed))[:method.tuning_slices]
    clean = to_float(val.images[rows].unsqueeze(1))  # (n, 1, H, W) in [-1, 1]
    noisy = to_unit(add_noise(clean, args.noise, (args.seed,), rows.tolist()))  # as predict --split validate adds it
    clean = to_unit(clean)
    brain = (val.masks[rows] > 0 if val.masks is not None else computed_brain_masks(val.images[rows])).unsqueeze(1)
    in_brain, whole = {}, {}
    for factor in method.factors:
        denoised, _ = run_denoiser(method, noisy[:, 0].numpy(), factor, pool=pool)
        denoised = torch.from_numpy(denoised).unsqueeze(1)
        in_brain[factor] = float(ssim(denoised, clean, mask=brain).nanmean())
        whole[factor] = float(ssim(denoised, clean).mean())
    return {"factor": max(in_brain, key=in_brain.get), "validation_slices": len(rows),
            "chosen_by": "mean in-brain SSIM on the validation slices", "sigma_estimate": method.sigma.__name__,
            "validation_ssim_brain_by_factor": in_brain, "validation_ssim_by_factor": whole}


def per_image_rows(files, results: dict) -> list[dict]:
    """One row per slice: METRICS of the noisy input, the model and each classical denoiser (empty where it did
    not run, or, in the brain, where the slice's brain mask is empty)."""
    def cell(x: float, metric: str):
        return None if math.isnan(x) else f"{x:.{4 if metric.startswith('psnr') else 6}f}"
    return [{"file": name, **{f"{key}_{metric}": cell(float(scores[metric][i]), metric)
                              for key, scores in results.items() for metric in METRICS}}
            for i, name in enumerate(files)]


def denoising_summary(args, checkpoint, data, results: dict, seconds: dict, tuning: dict, common, bf16: bool
                      ) -> dict:
    """summary.json of --noise: each of noisy / ours / classical on the slices it ran on, beside ours on the same
    slices; the best classical denoiser is the one with the highest mean in-brain SSIM on the slices every one ran
    on."""
    path, cfg, state = checkpoint
    ours = results["ours"]

    def entry(key):
        scores = results[key]
        ran = ~torch.isnan(scores["ssim"])
        return {"slices": int(ran.sum()), **{metric: summarise(scores[metric][ran].numpy()) for metric in METRICS},
                "ours_ssim_on_these_slices": float(ours["ssim"][ran].mean()),
                "ours_ssim_brain_on_these_slices": float(ours["ssim_brain"][ran].nanmean()),
                "ssim_on_common_slices": float(scores["ssim"][common].mean()),
                "ssim_brain_on_common_slices": float(scores["ssim_brain"][common].nanmean()),
                "seconds_per_slice": seconds.get(key)}
    classical = {name: {"label": CLASSICAL_DENOISERS[name].label, **entry(name), **tuning[name]} for name in tuning}
    return {"checkpoint": str(path), "epoch": state["epoch"], "trained_with_noise": cfg.train_noise,
            "dataset": data.name, "split": args.split, "images": len(data), "noise": str(args.noise),
            "noise_seed": args.seed, "precision": "bf16" if bf16 else "fp32",
            "noisy": entry("noisy"), "ours": entry("ours"), "classical": classical,
            "best_classical": max(classical, key=lambda k: classical[k]["ssim_brain_on_common_slices"],
                                  default=None),
            "common_slices": {"slices": len(common), "of": len(data), "drawn_with_seed": args.seed,
                              "about": "the slices every denoiser ran on: all, or --slow-baseline-slices of them "
                                       "for the slow ones (bm3d, bm3d-vst)"},
            "about": "SSIM and PSNR against the clean slice, whole and inside its brain mask (brain_mask); each "
                     "classical denoiser set from the noise level it estimates on the noisy slice (sigma_estimate: "
                     "wavelet_sigma, skimage estimate_sigma; rician_sigma, the Rayleigh background) and a factor "
                     "chosen on validation slices with the same noise (chosen_by); seconds per slice: ours on this "
                     "machine's threads including scoring, classical on one core each (--workers processes)"}


def save_denoising_grid(model, noisy, clean, classical, amp, path: Path, title: str):
    """Rows of noisy / ours / best classical / clean for a few slices; (k, 1, H, W) noisy in [-1, 1], clean and
    classical in [0, 1] (classical None: that column left out)."""
    with torch.no_grad(), amp:
        device = next(model.parameters()).device
        ours = model(noisy.to(device)).reconstruction.float().cpu()
    columns = [noisy, ours] + ([unit_to_float(classical)] if classical is not None else []) + [unit_to_float(clean)]
    save_image_grid(torch.stack(columns, 1).flatten(0, 1), path, nrow=len(columns), title=title)


def denoising_line(summary: dict, out: Path) -> str:
    parts = [f"{key} {summary[key]['ssim']['mean']:.4f} (brain {summary[key]['ssim_brain']['mean']:.4f})"
             for key in ("noisy", "ours")]
    parts += [f"{name} {c['ssim']['mean']:.4f} (brain {c['ssim_brain']['mean']:.4f}; {c['slices']} slices, ours there "
              f"{c['ours_ssim_on_these_slices']:.4f}, brain {c['ours_ssim_brain_on_these_slices']:.4f}, "
              f"{c['seconds_per_slice']:.2f} s/slice)" for name, c in summary["classical"].items()]
    return (f"{summary['dataset']} {summary['split']} + {summary['noise']}: {summary['images']} images | SSIM "
            + " | ".join(parts) + f" | written to {out}")
