"""Reconstruct a split with a trained VQ-VAE, score it (SSIM, PSNR) and draw the figures.

    python predict.py                                   # newest run's best.pt, its dataset, the test split
    python predict.py --checkpoint runs/OASIS-default-000/best.pt --split test --out results/
    python predict.py --checkpoint runs/OASIS-default-000 --dataset ADNI --data-root ~/data/AD_NC --split validate

Writes per_image.csv and summary.json (SSIM, PSNR, the nominal bits of the code map and the measured size of each
slice's .vqz file under the static coder, what `compress.py encode` writes without a prior), reconstructions.png
(8x8 inputs beside reconstructions),
triplets.png (input / code-index map / reconstruction), ssim_hist.png and, when the run's metrics.csv
is beside the checkpoint, the training curves.

On NIfTI volumes (a model trained with --dataset nifti, or --volumes with any model) it also writes each volume's
reconstruction as volumes/<name>_recon.nii.gz, on the input's affine and header, and per_volume.csv:

    python predict.py --checkpoint runs/nifti-default-000                     # the test split's volumes
    python predict.py --checkpoint runs/nifti-default-000 --volumes scan1.nii.gz scan2.nii

With --segmenter (a tissue segmenter trained by segment.py) it also judges the anatomy of each reconstruction: the
segmenter's Dice against the true tissue masks on the original and on the reconstruction, and between the two
segmentations, in per_image.csv and summary.json, and worst_anatomy.png (the slices whose reconstruction
segments worst: original, reconstruction, true mask, both segmentations):

    python predict.py --checkpoint runs/OASIS-default-000 --segmenter runs/segmenter-OASIS-000/best.pt

With --noise it denoises: the split's slices corrupted (rician:SIGMA or gaussian:SIGMA, seeded by --seed), the
model's output and classical denoisers' (non-local means, total variation, wavelet, BM3D when installed) scored
against the clean slices, beside the noisy input's own score; per_image.csv, summary.json and denoising.png:

    python predict.py --checkpoint runs/OASIS-default-000 --noise rician:0.1 --slow-baseline-slices 16

With --sample N it samples instead of reconstructing, from a prior trained by train_prior.py:

    python predict.py --sample 64                       # the newest run's prior/best.pt
    python predict.py --sample 64 --prior runs/ADNI-default-000/prior/best.pt --class AD --temperature 0.9

and writes (default: <prior run>/predict_samples/) samples.png (the first 64 of N new slices), completions.png (slices
of --split whose top half of codes is kept and bottom half sampled, beside the originals) and
sample_scores.json (validation NLL, nearest-train SSIM, Frechet distance, each beside a real-data reference; with
--segmenter also the Frechet distance in the segmenter's features and the samples' tissue fractions).
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from anatomy.tissues import (dice_columns, dice_summary, dice_table, segment_images, segmenter_features,
    tissue_fractions, wasserstein_1d, worst_first)
from training.checkpoints import (check_prior_fits, checkpoint_file, default_prior, load_prior, load_segmenter,
    load_split, load_vqvae, newest_checkpoint, run_dir_of)
from codec.vqz import Codec
from dataset import DATASETS, MASKED, TISSUES
from denoising.noise import CLASSICAL, add_noise, available_classical, parse_noise, run_classical
from imaging.slices import SPLITS, to_float, to_uint8, to_unit
from imaging.quality import psnr, ssim
from evaluation.metrics import (SplitScores, batched, encode_images, encoder_features, frechet_distance,
    nearest_ssim, prior_bits, score_split)
from volumes.nifti import SliceOptions, check_replaceable, load_files, volume_stem, write_reconstruction
from utils import (ArgumentParser, UserError, add_runtime_flags, apply_runtime_flags, autocast, exits_with_one_line,
                   plot_histograms, plot_image_rows, plot_training_curves, plot_triplets, save_image_grid,
                   save_side_by_side, use_bf16, write_csv, write_json)

SSIM_BAR = 0.6  # the course's pass mark for mean SSIM


def summarise(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max())}


def parse_args(argv=None):
    p = ArgumentParser(prog="predict.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="a .pt written by train.py, or its run folder (its best.pt) "
                   "(default: the newest runs/*/best.pt)")
    p.add_argument("--split", default="test", choices=SPLITS, help="the split to reconstruct (default: test)")
    p.add_argument("--dataset", choices=DATASETS, help="score on this dataset's split instead of the one the model "
                   "was trained on (with --data-root)")
    p.add_argument("--data-root", help="where the dataset is now, if not where training read it")
    p.add_argument("--volumes", nargs="+", type=Path, metavar="FILE", help="reconstruct these NIfTI volumes "
                   "(.nii, .nii.gz) instead of a split, sliced as the model's training config says (its slice axis)")
    p.add_argument("--skip-bad", action=argparse.BooleanOptionalAction,
                   help="skip unreadable or odd-sized images, or bad volumes, and report how many (default: as in "
                   "training)")
    p.add_argument("--out", type=Path, help="output folder (default: <run>/predict_<split>; with --sample, "
                   "predict_samples/ in the prior checkpoint's folder)")
    add_runtime_flags(p, batch_size=32)
    p.add_argument("--compile", action="store_true", help="torch.compile the SSIM on the CPU: faster once compiled, "
                   "worth it for large splits (ADNI's test set) and --sample's nearest-neighbour search")
    p.add_argument("--segmenter", type=Path, help="a tissue segmenter .pt written by segment.py train, or its run "
                   "folder: adds the Dice of the tissues on originals and reconstructions (with --sample: the "
                   "Frechet distance in its features and the samples' tissue fractions)")
    sampling = p.add_argument_group("sampling (--sample N: sample from a prior instead of reconstructing)")
    sampling.add_argument("--sample", type=int, metavar="N", help="number of new slices to sample and score (>= 2)")
    sampling.add_argument("--prior", type=Path, help="a prior .pt written by train_prior.py, or its run folder (its "
                          "best.pt) (default: prior/best.pt in the --checkpoint's run folder)")
    sampling.add_argument("--class", dest="class_name", help="the class to sample from a conditional prior, e.g. AD "
                          "(default: every class in turn)")
    sampling.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default: 1.0)")
    sampling.add_argument("--reference-slices", type=int, metavar="N", help="compare the samples with a fixed random "
                          "subset of N train slices, drawn by --seed (nearest-train SSIM, Frechet distances): "
                          "faster and smaller for large splits (default: every train slice)")
    sampling.add_argument("--seed", type=int, default=0, help="seed of the sampling, and of --noise (default: 0)")
    denoising = p.add_argument_group("denoising (--noise: corrupt the split, reconstruct, score against the clean "
                                     "slices beside classical denoisers)")
    denoising.add_argument("--noise", help="noise added to every slice, seeded by --seed: rician:SIGMA or "
                           "gaussian:SIGMA, SIGMA a fraction of the intensity range (e.g. rician:0.1)")
    denoising.add_argument("--baselines", nargs="*", choices=tuple(CLASSICAL), default=list(CLASSICAL),
                           help="classical denoisers run on the same noisy slices; none when given no names "
                           f"(default: {' '.join(CLASSICAL)}; bm3d only where the bm3d package is installed)")
    denoising.add_argument("--slow-baseline-slices", type=int, metavar="N", help="run the slow classical denoisers "
                           "(BM3D: ~10 s a 256x256 slice on one core) on a fixed random subset of N slices, drawn "
                           "with --seed (default: every slice)")
    args = p.parse_args(argv)
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if args.dataset and not args.data_root:
        raise UserError(f"--dataset {args.dataset} needs --data-root: where that dataset is")
    if args.volumes and (args.dataset or args.data_root or args.sample is not None):
        raise UserError("--volumes reconstructs the files given; it does not go with --dataset, --data-root or "
                        "--sample")
    if args.segmenter and args.volumes:
        raise UserError("--segmenter judges slices with true tissue masks; it does not go with --volumes")
    if args.volumes:
        args.split = "volumes"  # names the output folder (predict_volumes) and the summary's split
    if args.sample is not None and not 2 <= args.sample <= 100000:
        raise UserError(f"--sample must be between 2 and 100000 (the Frechet distance needs two), got {args.sample}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UserError(f"--temperature must be a positive number, got {args.temperature}")
    if args.noise is not None:
        if args.volumes or args.sample is not None:
            raise UserError("--noise corrupts and scores a split; it does not go with --volumes or --sample")
        args.noise = parse_noise(args.noise, "--noise")
    if args.slow_baseline_slices is not None and args.slow_baseline_slices < 1:
        raise UserError(f"--slow-baseline-slices must be at least 1, got {args.slow_baseline_slices}")
    return args


def main(argv=None):
    with exits_with_one_line(interrupted="interrupted; the outputs written so far may be incomplete"):
        args = parse_args(argv)
        return generate(args) if args.sample is not None else run(args)


def run(args):
    path = checkpoint_file(args.checkpoint or newest_checkpoint())
    device = apply_runtime_flags(args)
    model, cfg, state = load_vqvae(path, device)
    segmenter = load_segmenter(args.segmenter, device) if args.segmenter else None
    data = (load_volume_files(args, cfg) if args.volumes else
            load_split(cfg, args.split, args.data_root, args.skip_bad, state["demo_settings"], args.dataset,
                       masks=segmenter is not None))
    try:
        model.config.latent_grid(*data.image_shape)
    except ValueError as e:
        raise UserError(f"{data.name} {args.split}: {e}") from None
    run_dir = run_dir_of(path)
    out = args.out or run_dir / ((f"predict_{args.split}" if data.name == cfg.dataset
                                  else f"predict_{data.name}_{args.split}")
                                 + (f"_{args.noise}".replace(":", "-") if args.noise else ""))
    out.mkdir(parents=True, exist_ok=True)
    if args.noise is not None:
        return score_denoising(args, model, (path, cfg, state), data, out, device)

    if data.volumes is None:
        scores = score_split(model, data.images, device, autocast(args.precision, device), args.batch_size,
                             compiled_ssim=args.compile, keep=len(data) if segmenter else 64,
                             progress="reconstructing")
    else:
        scores, per_volume = score_volumes(model, data, device, args, out)
    ssims, psnrs = scores.ssim.cpu().numpy(), scores.psnr.cpu().numpy()
    file_bytes = static_file_bytes(model, scores.indices, data.image_shape)
    columns, anatomy = (judge_reconstructions(segmenter, data, scores, device, args, out) if segmenter
                        else ([{}] * len(data), None))
    write_csv(out / "per_image.csv", [{"file": name, "ssim": float(s), "psnr": float(q), "static_vqz_bytes": int(b),
                                       **c} for name, s, q, b, c in zip(data.files, ssims, psnrs, file_bytes, columns)])
    summary = {"checkpoint": str(path), "epoch": state["epoch"], "dataset": data.name, "trained_on": cfg.dataset,
               "split": args.split, "images": len(data), "precision": "bf16" if use_bf16(args.precision, device)
               else "fp32", "ssim": summarise(ssims), "psnr": summarise(psnrs),
               f"fraction_ssim_ge_{SSIM_BAR}": float((ssims >= SSIM_BAR).mean()),
               "bits_per_image": model.config.bits_per_image(*data.image_shape),
               "static_vqz_bytes": summarise(file_bytes)}
    if data.volumes is not None:
        summary["volumes"] = per_volume
    if segmenter:
        summary["anatomy"] = anatomy
    write_json(out / "summary.json", summary)

    save_side_by_side(scores.inputs[:64], scores.outputs[:64], out / "reconstructions.png")
    kept = ssims[:len(scores.inputs)]
    worst_first_best = [int(np.argmin(kept)), 0, int(np.argmax(kept))]
    plot_triplets(scores.inputs[worst_first_best], scores.indices[worst_first_best],
                  scores.outputs[worst_first_best], out / "triplets.png", scores=kept[worst_first_best])
    plot_histograms({"SSIM": ssims}, out / "ssim_hist.png", f"SSIM on {data.name} {args.split}", "SSIM",
                    threshold=SSIM_BAR)
    if (run_dir / "metrics.csv").exists():
        plot_training_curves(run_dir / "metrics.csv", out)
    s = summary["ssim"]
    print(f"{data.name} {args.split}: {len(data)} images | SSIM mean {s['mean']:.4f} std {s['std']:.4f} "
          f"min {s['min']:.4f} max {s['max']:.4f} | >= {SSIM_BAR}: {100 * summary[f'fraction_ssim_ge_{SSIM_BAR}']:.1f}% "
          f"| PSNR {summary['psnr']['mean']:.2f} dB | {summary['bits_per_image'] / 8:.0f} B of codes, "
          f"{summary['static_vqz_bytes']['mean']:.0f} B per .vqz file (static coder) | written to {out}")
    if segmenter:
        a = summary["anatomy"]
        print(f"tissue Dice (mean of CSF/GM/WM) against the true masks: originals "
              f"{a['original']['dice_mean']['mean']:.4f}, reconstructions {a['reconstruction']['dice_mean']['mean']:.4f} (difference "
              f"{a['reconstruction_minus_original']:+.4f}); between the two segmentations "
              f"{a['between']['dice_mean']['mean']:.4f}")
    return summary


def static_file_bytes(model, codes: torch.Tensor, image_shape) -> np.ndarray:
    """The size of each slice's .vqz file under the static coder (the codebook's training frequencies, no prior):
    what `compress.py encode` without a prior writes, header included."""
    files = Codec(model).encode_codes(codes, tuple(image_shape), coder="static")
    return np.array([len(f) for f in files], dtype=np.float64)


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
    plot_image_rows(rows, out / "worst_anatomy.png")
    return columns, anatomy


def load_volume_files(args, cfg):
    """--volumes: the files, sliced as the model's training config says (a model trained on slice images: along
    the default axial axis), with --skip-bad as given or as in training."""
    options = SliceOptions(cfg.slice_axis, cfg.clip_percentile, cfg.min_brain_fraction, cfg.image_size)
    return load_files(args.volumes, options, cfg.skip_bad if args.skip_bad is None else args.skip_bad)


def score_volumes(model, data, device, args, out: Path) -> tuple[SplitScores, list[dict]]:
    """Reconstruct and score NIfTI slices volume by volume: each volume is written to out/volumes/ as a .nii.gz on
    the input's affine and header (nifti.write_reconstruction), its mean SSIM and PSNR over its slices go to
    per_volume.csv. Returns the slices' scores and the first 64 slices for the figures, as score_split would, and
    the rows of per_volume.csv."""
    amp = autocast(args.precision, device)
    paths = [out / "volumes" / f"{name}_recon.nii.gz" for name in output_names(data.volumes)]
    for path in paths:  # before the first is written
        check_replaceable(path)
    ssims, psnrs, codes, shown, rows = [], [], [], {"inputs": [], "outputs": []}, []
    for volume, path in zip(data.volumes, paths):
        scores = score_split(model, data.images[volume.rows], device, amp, args.batch_size,
                             compiled_ssim=args.compile, keep=len(volume.kept), progress=f"reconstructing {path.name}")
        images = to_uint8(scores.outputs[:, 0]).numpy()
        write_reconstruction(volume, images, path)
        ssims.append(scores.ssim.cpu())
        psnrs.append(scores.psnr.cpu())
        codes.append(scores.indices)
        for key, kept in shown.items():
            kept.append(getattr(scores, key)[:64 - sum(len(k) for k in kept)])
        rows.append({"volume": volume.path, "subject": volume.subject, "slices": len(volume.kept),
                     "ssim": float(ssims[-1].mean()), "psnr": float(psnrs[-1].mean()), "reconstruction": str(path)})
        print(f"{volume.path}: {len(volume.kept)} {volume.axis} slices | SSIM {rows[-1]['ssim']:.4f} | PSNR "
              f"{rows[-1]['psnr']:.2f} dB | written to {path}")
    write_csv(out / "per_volume.csv", rows)
    return SplitScores(torch.cat(ssims), torch.cat(psnrs), {}, *(torch.cat(v) for v in shown.values()),
                       torch.cat(codes)), rows


def output_names(volumes) -> list[str]:
    """A file name stem per volume: its file name without the extension, numbered where two volumes share one."""
    names, taken = [], set()
    for volume in volumes:
        stem = volume_stem(Path(volume.path).name)
        name, n = stem, 1
        while name in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name)
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------------------
# Denoising (--noise)
# ---------------------------------------------------------------------------------------------------------

def score_denoising(args, model, checkpoint, data, out: Path, device) -> dict:
    """--noise: the split's slices corrupted (seeded by --seed), reconstructed by the model and by each classical
    denoiser, every output scored against the clean slice, the noisy input's own score beside them; per_image.csv,
    summary.json and denoising.png."""
    path, cfg, state = checkpoint
    amp = autocast(args.precision, device)
    clean = to_unit(to_float(data.images.unsqueeze(1)))  # (N, 1, H, W) in [0, 1]
    noisy = noisy_slices(data.images, args.noise, args.seed)  # (N, 1, H, W) in [-1, 1]

    # The model, and the noisy input as it is
    start = time.perf_counter()
    ours = score_split(model, data.images, device, amp, args.batch_size, compiled_ssim=args.compile,
                       progress="denoising", corrupt=lambda x, rows: noisy[rows.start:rows.stop].to(x.device))
    results = {"noisy": image_scores(to_unit(noisy), clean), "ours": (ours.ssim.cpu(), ours.psnr.cpu())}
    seconds = {"ours": (time.perf_counter() - start) / len(data)}

    # Classical denoisers on the same noisy slices, each set on validation slices carrying the same noise
    methods = available_classical(args.baselines)
    common = slow_subset(len(data), args) if any(m.slow for m in methods) else torch.arange(len(data))
    picks = common[torch.linspace(0, len(common) - 1, min(4, len(common))).long()]  # the figure's slices
    val = load_split(cfg, "validate", args.data_root, args.skip_bad, state["demo_settings"], args.dataset)
    tuning, shown = {}, {}
    for method in methods:
        rows = common if method.slow else torch.arange(len(data))
        tuning[method.name] = choose_factor(method, val, args)
        denoised, seconds[method.name] = run_classical(method, to_unit(noisy[rows, 0]).numpy(),
                                                       tuning[method.name]["factor"],
                                                       desc=f"{method.name} ({len(rows)} slices)")
        denoised = torch.from_numpy(denoised).unsqueeze(1)  # (len(rows), 1, H, W) in [0, 1]
        results[method.name] = scores_on_rows(denoised, clean, rows)
        shown[method.name] = denoised[torch.searchsorted(rows, picks)]

    # Tables and the figure
    write_csv(out / "per_image.csv", per_image_rows(data.files, results))
    bf16 = use_bf16(args.precision, device)
    summary = denoising_summary(args, checkpoint, data, results, seconds, tuning, common, bf16)
    write_json(out / "summary.json", summary)
    best = summary["best_classical"]
    save_denoising_grid(model, noisy[picks], clean[picks], shown.get(best), amp, out / "denoising.png",
                        f"{args.noise}: noisy | ours | {CLASSICAL[best].label if best else 'no classical'} | clean")
    print(denoising_line(summary, out))
    return summary


def noisy_slices(images: torch.Tensor, noise, seed: int, chunk: int = 64) -> torch.Tensor:
    """uint8 (N, H, W) -> noisy (N, 1, H, W) in [-1, 1]; slice i's noise drawn from the seed (seed, i)."""
    return torch.cat([add_noise(to_float(images[i:i + chunk].unsqueeze(1)), noise, (seed,), range(i, i + chunk))
                      for i in range(0, len(images), chunk)])


def image_scores(x: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image SSIM and PSNR of (N, 1, H, W) images in [0, 1] against the clean ones, as score_split scores."""
    return ssim(x, clean), psnr(x, clean)


def scores_on_rows(denoised: torch.Tensor, clean: torch.Tensor, rows: torch.Tensor):
    """SSIM and PSNR per slice of the split, NaN where the method did not run (outside `rows`)."""
    ssims, psnrs = torch.full((len(clean),), math.nan), torch.full((len(clean),), math.nan)
    ssims[rows], psnrs[rows] = image_scores(denoised, clean[rows])
    return ssims, psnrs


def slow_subset(n: int, args) -> torch.Tensor:
    """The rows the slow denoisers run on: all, or --slow-baseline-slices of them drawn with --seed, in order."""
    if args.slow_baseline_slices is None or args.slow_baseline_slices >= n:
        return torch.arange(n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    return order[:args.slow_baseline_slices].sort().values


def choose_factor(method, val, args) -> dict:
    """The method's strength factor (of denoise.FACTORS) with the highest mean SSIM on a few validation slices
    (drawn with --seed) carrying the same noise, and the mean SSIM of each factor tried."""
    rows = torch.randperm(len(val), generator=torch.Generator().manual_seed(args.seed))[:method.tuning_slices]
    clean = to_float(val.images[rows].unsqueeze(1))  # (n, 1, H, W) in [-1, 1]
    noisy = to_unit(add_noise(clean, args.noise, (args.seed,), rows.tolist()))  # as predict --split validate adds it
    clean = to_unit(clean)
    tried = {}
    for factor in method.factors:
        denoised, _ = run_classical(method, noisy[:, 0].numpy(), factor)
        tried[factor] = float(ssim(torch.from_numpy(denoised).unsqueeze(1), clean).mean())
    return {"factor": max(tried, key=tried.get), "validation_slices": len(rows),
            "validation_ssim_by_factor": tried}


def per_image_rows(files, results: dict) -> list[dict]:
    """One row per slice: SSIM and PSNR of the noisy input, the model and each classical denoiser (empty where it
    did not run)."""
    def cell(x: float, digits: int):
        return None if math.isnan(x) else f"{x:.{digits}f}"
    return [{"file": name, **{f"{key}_{metric}": cell(float(values[i]), digits) for key, pair in results.items()
                              for (metric, digits), values in zip((("ssim", 6), ("psnr", 4)), pair)}}
            for i, name in enumerate(files)]


def denoising_summary(args, checkpoint, data, results: dict, seconds: dict, tuning: dict, common, bf16: bool
                      ) -> dict:
    """summary.json of --noise: each of noisy / ours / classical on the slices it ran on, beside ours on the same
    slices; the best classical denoiser is the one with the highest mean SSIM on the slices every one ran on."""
    path, cfg, state = checkpoint
    ours_ssim = results["ours"][0]

    def entry(key):
        s, q = results[key]
        ran = ~torch.isnan(s)
        return {"slices": int(ran.sum()), "ssim": summarise(s[ran].numpy()), "psnr": summarise(q[ran].numpy()),
                "ours_ssim_on_these_slices": float(ours_ssim[ran].mean()),
                "ssim_on_common_slices": float(s[common].mean()), "seconds_per_slice": seconds.get(key)}
    classical = {name: {"label": CLASSICAL[name].label, **entry(name), **tuning[name]} for name in tuning}
    return {"checkpoint": str(path), "epoch": state["epoch"], "trained_with_noise": cfg.train_noise,
            "dataset": data.name, "split": args.split, "images": len(data), "noise": str(args.noise),
            "noise_seed": args.seed, "precision": "bf16" if bf16 else "fp32",
            "noisy": entry("noisy"), "ours": entry("ours"), "classical": classical,
            "best_classical": max(classical, key=lambda k: classical[k]["ssim_on_common_slices"], default=None),
            "common_slices": {"slices": len(common), "of": len(data), "drawn_with_seed": args.seed,
                              "about": "the slices every denoiser ran on: all, or --slow-baseline-slices of them "
                                       "for the slow ones (BM3D)"},
            "about": "SSIM and PSNR against the clean slice; classical strength = factor x skimage estimate_sigma "
                     "of the noisy slice, the factor chosen on validation slices with the same noise; seconds per "
                     "slice on this machine's threads (ours includes scoring)"}


def save_denoising_grid(model, noisy, clean, classical, amp, path: Path, title: str):
    """Rows of noisy / ours / best classical / clean for a few slices; (k, 1, H, W) noisy in [-1, 1], clean and
    classical in [0, 1] (classical None: that column left out)."""
    with torch.no_grad(), amp:
        device = next(model.parameters()).device
        ours = model(noisy.to(device)).reconstruction.float().cpu()
    columns = [noisy, ours] + ([classical * 2 - 1] if classical is not None else []) + [clean * 2 - 1]
    save_image_grid(torch.stack(columns, 1).flatten(0, 1), path, nrow=len(columns), title=title)


def denoising_line(summary: dict, out: Path) -> str:
    parts = [f"{key} {summary[key]['ssim']['mean']:.4f}" for key in ("noisy", "ours")]
    parts += [f"{name} {c['ssim']['mean']:.4f} ({c['slices']} slices, ours there {c['ours_ssim_on_these_slices']:.4f},"
              f" {c['seconds_per_slice']:.2f} s/slice)" for name, c in summary["classical"].items()]
    return (f"{summary['dataset']} {summary['split']} + {summary['noise']}: {summary['images']} images | SSIM "
            + " | ".join(parts) + f" | written to {out}")


def sampling_models(args, device):
    """The prior and the VQ-VAE whose codes it models, checked to belong together; the prior's class index."""
    vqvae_path, prior_path = args.checkpoint, args.prior and checkpoint_file(args.prior)
    if prior_path is None:
        vqvae_path = checkpoint_file(vqvae_path or newest_checkpoint())
        prior_path = default_prior(vqvae_path)
        if not prior_path.is_file():
            raise UserError(f"no prior at {prior_path}; train one with python train_prior.py --vqvae {vqvae_path}, "
                            f"or pass --prior")
    prior, _, prior_state = load_prior(prior_path, device)
    vqvae_path = vqvae_path or Path(prior_state["vqvae_checkpoint"])
    model, cfg, state = load_vqvae(vqvae_path, device)
    check_prior_fits(prior_state, model, prior_path, vqvae_path)
    class_names, class_index = prior_state["class_names"], None
    if args.class_name is not None:
        if not prior.config.num_classes:
            raise UserError("--class needs a class-conditional prior (train_prior.py --conditional); this one is not")
        lowered = [c.lower() for c in class_names]
        if args.class_name.lower() not in lowered:
            raise UserError(f"unknown --class {args.class_name!r}; choose one of {', '.join(class_names)}")
        class_index = lowered.index(args.class_name.lower())
    return (prior, prior_path, prior_state), (model, vqvae_path, cfg, state), class_index


def generate(args):
    """--sample: new slices from the prior, completions of real slices' bottom halves, and their scores."""
    device = apply_runtime_flags(args)
    if args.reference_slices is not None and args.reference_slices < 2:
        raise UserError(f"--reference-slices must be at least 2, got {args.reference_slices}")
    (prior, prior_path, prior_state), (model, vqvae_path, cfg, state), class_index = sampling_models(args, device)
    amp = autocast(args.precision, device)
    segmenter = load_segmenter(args.segmenter, device) if args.segmenter else None
    train, val, held = (load_split(cfg, split, args.data_root, args.skip_bad, state["demo_settings"],
                                   masks=segmenter is not None and split == "validate" and cfg.dataset in MASKED)
                        for split in ("train", "validate", args.split))
    if args.reference_slices is not None:
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
                             [:args.reference_slices].sort().values)
    out = args.out or run_dir_of(prior_path) / "predict_samples"
    out.mkdir(parents=True, exist_ok=True)
    shape = model.config.latent_grid(*train.image_shape)
    generator = torch.Generator(device).manual_seed(args.seed)
    decode = lambda codes: batched(model.decode_indices, codes, device, args.batch_size)  # noqa: E731

    # New slices.
    sample_labels = prior.labels_for(args.sample, class_index)
    codes = prior.sample(args.sample, shape, sample_labels, args.temperature, generator)
    samples = decode(codes)
    what = f"class {prior_state['class_names'][class_index]}, " if class_index is not None else ""
    save_image_grid(samples[:64], out / "samples.png", nrow=8,
                    title=f"{args.sample} samples ({what}temperature {args.temperature}, seed {args.seed})")
    save_completions(prior, model, held, shape, args, generator, amp, out / "completions.png")

    # Scores, each beside the same measurement on real validation slices.
    conditional = bool(prior.config.num_classes)
    val_codes = encode_images(model, val.images, device, args.batch_size, desc="encoding validate", amp=amp)
    bits = prior_bits(prior, val_codes, val.labels if conditional else None, args.batch_size)
    scores = {"prior": str(prior_path), "prior_epoch": prior_state["epoch"], "vqvae": str(vqvae_path),
              "dataset": cfg.dataset, "samples": args.sample,
              "class": prior_state["class_names"][class_index] if class_index is not None else None,
              "temperature": args.temperature, "seed": args.seed, "latent_grid": list(shape),
              "train_reference_slices": len(train),
              "validation_nll_bits_per_code": bits, "log2_codebook_size": math.log2(model.config.codebook_size),
              **sample_scores(model, samples, train, val, args, device, segmenter,
                              classes=(sample_labels, prior_state["class_names"]) if conditional else None)}
    write_json(out / "sample_scores.json", scores)
    s, fd = scores["nearest_train_ssim"], scores["frechet_distance"]
    print(f"validation NLL {bits:.3f} bits/code (log2 K = {scores['log2_codebook_size']:.0f}) | nearest-train SSIM "
          f"samples mean {s['samples']['mean']:.3f} max {s['samples']['max']:.3f}, real validate mean "
          f"{s['validate_real']['mean']:.3f} max {s['validate_real']['max']:.3f} | Frechet samples "
          f"{fd['samples_vs_train']:.3g}, real validate {fd['validate_real_vs_train']:.3g}, validate "
          f"reconstructions {fd['validate_reconstructions_vs_train']:.3g} | written to {out}")
    if segmenter:
        sd, tf = scores["segmenter_frechet_distance"], scores["tissue_fractions"]
        print(f"segmenter's judge | Frechet samples {sd['samples_vs_train']:.3g}, real validate "
              f"{sd['validate_real_vs_train']:.3g}, validate reconstructions "
              f"{sd['validate_reconstructions_vs_train']:.3g} | tissue fractions (share of brain) W1 samples vs "
              f"validate: " + ", ".join(f"{t} {tf[t]['wasserstein_samples_vs_validate']:.4f}" for t in TISSUES))
        for key, difference in scores.get("tissue_fractions_by_class", {}).items():
            if " - " in key:
                print(f"CSF share {key}: samples {difference['samples']['CSF']:+.4f}, real validate "
                      f"{difference['validate_real']['CSF']:+.4f}")
    return scores


def save_completions(prior, model, held, shape, args, generator, amp, path: Path):
    """Keep the top half of the codes of a few held-out slices, sample the rest 3 times; one figure."""
    device = next(model.parameters()).device
    decode = lambda codes: batched(model.decode_indices, codes, device, args.batch_size)  # noqa: E731
    picks = torch.linspace(0, len(held) - 1, min(8, len(held))).long()
    originals = to_float(held.images[picks].unsqueeze(1))
    given = encode_images(model, held.images[picks], device, args.batch_size, amp=amp)
    top_half = torch.zeros(shape, dtype=torch.bool)
    top_half[:shape[0] // 2] = True
    labels = held.labels[picks].repeat_interleave(3) if prior.config.num_classes else None
    completed = prior.sample(3 * len(picks), shape, labels, args.temperature, generator,
                             given=given.repeat_interleave(3, 0), given_mask=top_half)
    rows = torch.cat([originals.unsqueeze(1), decode(given).unsqueeze(1),
                      decode(completed).view(len(picks), 3, *originals.shape[1:])], 1)
    save_image_grid(rows.flatten(0, 1), path, nrow=5, title=f"{args.split} slice | its reconstruction | 3 samples of "
                                                            f"the bottom half given the top half's codes")


def sample_scores(model, samples, train, val, args, device, segmenter=None, classes=None) -> dict:
    """Nearest-train SSIM and the Frechet distance to the train slices, of the samples and, as references, of as
    many random real validation slices and of their reconstructions; with a segmenter also its judgement
    (judge_samples), per class where `classes` gives the samples' labels and the class names.

    The references have the samples' count because the Frechet distance of a set of N slices is biased upwards the
    more the smaller N (its mean term alone by tr(covariance) / N): a set of 64 and one of 1120 do not compare."""
    train_images, val_images = (to_float(d.images.unsqueeze(1)) for d in (train, val))
    reference = torch.randperm(len(val), generator=torch.Generator().manual_seed(args.seed))[:len(samples)]
    sets = {"samples": samples, "validate_real": val_images[reference],
            "validate_reconstructions": batched(lambda x: model(x).reconstruction, val_images[reference], device,
                                                args.batch_size, desc="reconstructing validate")}
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
    (anatomy.segmenter_features) of each of `sets` (the samples and the equal-sized real references); and each
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


if __name__ == "__main__":
    main()
