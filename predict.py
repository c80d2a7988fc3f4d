"""Reconstruct a split with a trained VQ-VAE, score it (SSIM, PSNR) and draw the figures.

    python predict.py                                   # newest run's best.pt, its dataset, the test split
    python predict.py --checkpoint runs/OASIS-default-000/best.pt --split test --out results/
    python predict.py --checkpoint runs/OASIS-default-000 --dataset ADNI --data-root ~/data/AD_NC --split validate

Writes per_image.csv and summary.json (SSIM and PSNR of whole slices and inside the brain, the nominal bits of
the code map and the measured size of each slice's .vqz file under the static coder, what `compress.py encode`
writes without a prior), reconstructions.png (8x8 inputs beside reconstructions),
triplets.png (input / code-index map / reconstruction), ssim_hist.png and, when the run's metrics.csv
is beside the checkpoint, the training curves. The brain mask is the true tissue masks' nonzero pixels where the
dataset ships them (OASIS, demo), else computed from the original slice (anatomy/brain.py); summary.json names
which.

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
model's output and classical denoisers' (non-local means, total variation, wavelet, BM3D when installed, and the
Rician-aware non-local means and BM3D-in-a-stabilising-transform) scored against the clean slices, beside the noisy
input's own score; per_image.csv, summary.json and denoising.png (with --segmenter also the tissue Dice of the
model's denoised slices beside the clean slices', as above):

    python predict.py --checkpoint runs/OASIS-default-000 --noise rician:0.1 --slow-baseline-slices 64 --workers 2

--out may be a folder of other files: predict.py writes over only the files it wrote there itself (as every command
does), and refuses, in one line, to write over any other.

New slices from a prior trained by train_prior.py: sample.py.
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from anatomy.brain import brain_masks
from anatomy.tissues import ANATOMY_FIGURE, anatomy_line, check_segmenter_fits, judge_reconstructions
from codec.vqz import Codec
from dataset import DATASETS, WHERE_SHIPPED
from denoising.benchmark import DENOISING_OUTPUTS, score_denoising
from denoising.classical import CLASSICAL_DENOISERS
from denoising.noise import parse_noise
from evaluation.metrics import score_split, summarise
from training.checkpoints import checkpoint_file, load_segmenter, load_split, load_vqvae, newest_checkpoint, run_dir_of
from utils import (
    TRAINING_CURVES,
    ArgumentParser,
    UserError,
    add_runtime_flags,
    add_shared_flag,
    apply_runtime_flags,
    autocast,
    check_at_least,
    check_seed,
    claim_outputs,
    exits_with_one_line,
    plot_histograms,
    plot_training_curves,
    plot_triplets,
    save_side_by_side,
    use_bf16,
    write_csv,
    write_json,
)
from volumes.reconstruction import VOLUME_TABLE, load_volume_files, reconstruction_paths, score_volumes

SSIM_BAR = 0.6  # the course's pass mark for mean SSIM


def parse_args(argv=None):
    p = ArgumentParser(prog="predict.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_flag(p, "--checkpoint", "the VQ-VAE to score (default: the newest runs/*/best.pt)")
    add_shared_flag(p, "--split", "the split to reconstruct (default: test)")
    p.add_argument("--dataset", choices=DATASETS, help="score on this dataset's split instead of the one the model "
                   "was trained on (with --data-root)")
    add_shared_flag(p, "--data-root", "with --dataset, where that dataset is")
    p.add_argument("--volumes", nargs="+", type=Path, metavar="FILE", help="reconstruct these NIfTI volumes "
                   "(.nii, .nii.gz) instead of a split, sliced as the model's training config says (its slice axis)")
    p.add_argument("--skip-bad", action=argparse.BooleanOptionalAction,
                   help="skip unreadable or odd-sized images, or bad volumes, and report how many (default: as in "
                   "training)")
    add_shared_flag(p, "--out", "where the tables and figures go (default: <run>/predict_<split>)")
    add_runtime_flags(p, batch_size=32)
    p.add_argument("--compile", action="store_true", help="torch.compile the SSIM on the CPU: faster once compiled, "
                   "worth it for large splits (ADNI's test set)")
    p.add_argument("--segmenter", type=Path, help="a tissue segmenter .pt written by segment.py train, or its run "
                   "folder: adds the Dice of the tissues on originals and reconstructions")
    denoising = p.add_argument_group("denoising (--noise: corrupt the split, reconstruct, score against the clean "
                                     "slices beside classical denoisers)")
    denoising.add_argument("--noise", help="noise added to every slice, seeded by --seed: rician:SIGMA or "
                           "gaussian:SIGMA, SIGMA a fraction of the intensity range (e.g. rician:0.1)")
    denoising.add_argument("--seed", type=int, help="seed of --noise (default: 0)")
    denoising.add_argument("--baselines", nargs="*", choices=tuple(CLASSICAL_DENOISERS),
                           help="classical denoisers run on the same noisy slices; none when given no names "
                           f"(default: {' '.join(CLASSICAL_DENOISERS)}; bm3d and bm3d-vst only where the bm3d "
                           "package is installed)")
    denoising.add_argument("--slow-baseline-slices", type=int, metavar="N", help="run the slow classical denoisers "
                           "(bm3d, bm3d-vst: ~6-10 s a 256x256 slice on one core) on a fixed random subset of N "
                           "slices, drawn with --seed (default: every slice)")
    denoising.add_argument("--workers", type=int, help="processes the classical denoisers run in, one core each "
                           "(default: 1)")
    return checked(p.parse_args(argv))


def checked(args):
    """The flags' combinations and values that argparse cannot check, and the defaults that depend on them;
    UserError in one line."""
    if args.seed is not None:
        check_seed(args.seed)
    given = [flag for flag, value in (("--seed", args.seed), ("--baselines", args.baselines),
                                      ("--slow-baseline-slices", args.slow_baseline_slices),
                                      ("--workers", args.workers)) if value is not None]
    if given and args.noise is None:
        raise UserError(f"{given[0]} is a setting of --noise's denoising; pass --noise too, or leave it out")
    args.seed = 0 if args.seed is None else args.seed
    args.baselines = list(CLASSICAL_DENOISERS) if args.baselines is None else args.baselines
    if args.dataset and not args.data_root:
        raise UserError(f"--dataset {args.dataset} needs --data-root: where that dataset is")
    if args.volumes and (args.dataset or args.data_root):
        raise UserError("--volumes reconstructs the files given; it does not go with --dataset or --data-root")
    if args.segmenter and args.volumes:
        raise UserError("--segmenter judges slices with true tissue masks; it does not go with --volumes")
    if args.volumes and args.split:
        raise UserError("--volumes reconstructs the files given; it does not go with --split")
    args.split = "volumes" if args.volumes else args.split or "test"  # volumes: the output folder's and summary's
    if args.noise is not None:
        if args.volumes:
            raise UserError("--noise corrupts and scores a split; it does not go with --volumes")
        args.noise = parse_noise(args.noise, "--noise")
    check_at_least("--slow-baseline-slices", args.slow_baseline_slices)
    check_at_least("--workers", args.workers)
    args.workers = args.workers or 1
    return args


def main(argv=None):
    with exits_with_one_line(interrupted="interrupted; the outputs written so far may be incomplete"):
        return reconstruct(parse_args(argv))


def reconstruct(args):
    """Reconstruct the split (or --volumes) and score it: per_image.csv, summary.json and the figures; with --noise,
    denoise it instead (denoising.benchmark)."""
    path = checkpoint_file(args.checkpoint or newest_checkpoint())
    device = apply_runtime_flags(args)
    model, cfg, state = load_vqvae(path, device)
    segmenter = load_segmenter(args.segmenter, device) if args.segmenter else None
    data = (load_volume_files(args, cfg) if args.volumes else
            load_split(cfg, args.split, args.data_root, args.skip_bad, state["demo_settings"], args.dataset,
                       masks=True if segmenter else WHERE_SHIPPED))
    brain, brain_rule = brain_masks(data)  # (N, H, W) bool
    try:
        model.config.latent_grid(*data.image_shape)
    except ValueError as e:
        raise UserError(f"{data.name} {args.split}: {e}") from None
    if segmenter:
        check_segmenter_fits(segmenter[0], data.image_shape, f"{data.name} {args.split}")
    out = args.out or run_dir_of(path) / ((f"predict_{args.split}" if data.name == cfg.dataset
                                           else f"predict_{data.name}_{args.split}")
                                          + (f"_{args.noise}".replace(":", "-") if args.noise else ""))
    volume_paths = reconstruction_paths(out, data.volumes) if data.volumes is not None else None
    claim_outputs(out, output_names(args, data, run_dir_of(path), segmenter is not None), "predict.py")
    if args.noise is not None:
        return score_denoising(args, model, (path, cfg, state), data, out, device, segmenter, (brain, brain_rule))

    if data.volumes is None:
        scores = score_split(model, data.images, device, autocast(args.precision, device), args.batch_size,
                             compiled_ssim=args.compile, keep=len(data) if segmenter else 64,
                             progress="reconstructing", brain=brain)
    else:
        scores, per_volume = score_volumes(model, data, brain, device, args, out, volume_paths)
    ssims, psnrs = scores.ssim.cpu().numpy(), scores.psnr.cpu().numpy()
    in_brain = {"ssim_brain": scores.ssim_brain.numpy(), "psnr_brain": scores.psnr_brain.numpy()}
    file_bytes = static_file_bytes(model, scores.indices, data.image_shape)
    columns, anatomy = (judge_reconstructions(segmenter, data, scores, device, args, out) if segmenter
                        else ([{}] * len(data), None))
    write_csv(out / "per_image.csv", [{"file": name, "ssim": float(s), "psnr": float(q), "static_vqz_bytes": int(b),
                                       "ssim_brain": float(sb), "psnr_brain": float(qb), **c}
                                      for name, s, q, b, sb, qb, c in zip(data.files, ssims, psnrs, file_bytes,
                                                                          *in_brain.values(), columns)])
    summary = {"checkpoint": str(path), "epoch": state["epoch"], "dataset": data.name, "trained_on": cfg.dataset,
               "split": args.split, "images": len(data), "precision": "bf16" if use_bf16(args.precision, device)
               else "fp32", "ssim": summarise(ssims), "psnr": summarise(psnrs),
               **{key: summarise(values) for key, values in in_brain.items()}, "brain_mask": brain_rule,
               f"fraction_ssim_ge_{SSIM_BAR}": float((ssims >= SSIM_BAR).mean()),
               "bits_per_image": model.config.bits_per_image(*data.image_shape),
               "static_vqz_bytes": summarise(file_bytes)}
    if data.volumes is not None:
        summary["volumes"] = per_volume
    if segmenter:
        summary["anatomy"] = anatomy
    write_json(out / "summary.json", summary)
    draw_figures(scores, ssims, f"{data.name} {args.split}", run_dir_of(path), out)
    print_summary(summary, out)
    return summary


FIGURES = ("reconstructions.png", "triplets.png", "ssim_hist.png")  # draw_figures', besides the training curves


def output_names(args, data, run_dir: Path, judged: bool) -> list[str]:
    """The files this run writes into its --out, besides volumes/ (its NIfTI files carry their own mark): what
    utils.claim_outputs records as predict.py's."""
    if args.noise is not None:
        names = list(DENOISING_OUTPUTS)
    else:
        names = ["per_image.csv", "summary.json", *FIGURES]
        names += list(TRAINING_CURVES) if (run_dir / "metrics.csv").exists() else []
        names += [VOLUME_TABLE] if data.volumes is not None else []
    return names + ([ANATOMY_FIGURE] if judged else [])


def static_file_bytes(model, codes: torch.Tensor, image_shape) -> np.ndarray:
    """The size of each slice's .vqz file under the static coder (the codebook's training frequencies, no prior):
    what `compress.py encode` without a prior writes, header included."""
    files = Codec(model).encode_codes(codes, tuple(image_shape), coder="static")
    return np.array([len(f) for f in files], dtype=np.float64)


def draw_figures(scores, ssims: np.ndarray, what: str, run_dir: Path, out: Path):
    """reconstructions.png (the first 64), triplets.png (the worst, the first and the best slice), ssim_hist.png,
    and the training curves where the run's metrics.csv is beside the checkpoint."""
    save_side_by_side(scores.inputs[:64], scores.outputs[:64], out / FIGURES[0])
    kept = ssims[:len(scores.inputs)]
    worst_first_best = [int(np.argmin(kept)), 0, int(np.argmax(kept))]
    plot_triplets(scores.inputs[worst_first_best], scores.indices[worst_first_best],
                  scores.outputs[worst_first_best], out / FIGURES[1], scores=kept[worst_first_best])
    plot_histograms({"SSIM": ssims}, out / FIGURES[2], f"SSIM on {what}", "SSIM", threshold=SSIM_BAR)
    if (run_dir / "metrics.csv").exists():
        plot_training_curves(run_dir / "metrics.csv", out)


def print_summary(summary: dict, out: Path):
    s = summary["ssim"]
    print(f"{summary['dataset']} {summary['split']}: {summary['images']} images | SSIM mean {s['mean']:.4f} std "
          f"{s['std']:.4f} min {s['min']:.4f} max {s['max']:.4f} | >= {SSIM_BAR}: "
          f"{100 * summary[f'fraction_ssim_ge_{SSIM_BAR}']:.1f}% | PSNR {summary['psnr']['mean']:.2f} dB | in the "
          f"brain SSIM {summary['ssim_brain']['mean']:.4f} PSNR {summary['psnr_brain']['mean']:.2f} dB | "
          f"{summary['bits_per_image'] / 8:.0f} B of codes, {summary['static_vqz_bytes']['mean']:.0f} B per .vqz "
          f"file (static coder) | written to {out}")
    if "anatomy" in summary:
        print(anatomy_line(summary["anatomy"]))


if __name__ == "__main__":
    main()
