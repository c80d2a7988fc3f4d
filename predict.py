"""Reconstruct a split with a trained VQ-VAE, score it (SSIM, PSNR) and draw the figures.

    python predict.py                                   # newest run's best.pt, its dataset, the test split
    python predict.py --checkpoint runs/OASIS-default-000/best.pt --split test --out results/

Writes per_image.csv, summary.json, reconstructions.png (8x8 inputs beside reconstructions),
triplets.png (input / code-index map / reconstruction), ssim_hist.png and, when the run's metrics.csv
is beside the checkpoint, the training curves.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dataset import SPLITS, DataError, build_dataset, to_float
from modules import VQVAE, VQVAEConfig
from utils import (UserError, choose_device, load_checkpoint, plot_histogram, plot_training_curves,
                   plot_triplets, psnr, save_side_by_side, ssim, to_unit, write_json)

SSIM_BAR = 0.6  # the course's pass mark for mean SSIM


def newest_checkpoint(runs: Path = Path("runs")) -> Path:
    candidates = sorted(runs.glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(f"no {runs}/*/best.pt found; train first (python train.py ...) or pass --checkpoint")
    return candidates[-1]


def load_model(path: Path, device: torch.device) -> tuple[VQVAE, dict]:
    """Rebuild the exact model from the checkpoint's own config."""
    state = load_checkpoint(path)
    try:
        model = VQVAE(VQVAEConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["model"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not match the model it describes ({str(e).splitlines()[0][:120]}); "
                        f"use a checkpoint written by this project's train.py") from None
    return model.to(device).eval(), state


@torch.no_grad()
def reconstruct(model: VQVAE, data, device: torch.device, batch_size: int = 32):
    """Per-image SSIM and PSNR over the whole split, plus the first 64 inputs/reconstructions/indices."""
    scores, keep = {"ssim": [], "psnr": []}, {"inputs": [], "outputs": [], "indices": []}
    for start in tqdm(range(0, len(data), batch_size), desc="reconstructing", leave=False):
        x = to_float(data.images[start:start + batch_size].unsqueeze(1).to(device))
        out = model(x)
        rec, ref = to_unit(out.reconstruction), to_unit(x)
        scores["ssim"].append(ssim(rec, ref).cpu())
        scores["psnr"].append(psnr(rec, ref).cpu())
        if start < 64:
            keep["inputs"].append(x.cpu())
            keep["outputs"].append(out.reconstruction.cpu())
            keep["indices"].append(out.indices.cpu())
    scores = {k: torch.cat(v).numpy() for k, v in scores.items()}
    keep = {k: torch.cat(v)[:64] for k, v in keep.items()}
    return scores, keep


def summarise(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="a .pt written by train.py (default: newest runs/*/best.pt)")
    p.add_argument("--split", default="test", help=f"one of {', '.join(SPLITS)} (default: test)")
    p.add_argument("--data-root", help="where the dataset is now, if not where training read it")
    p.add_argument("--out", type=Path, help="output folder (default: <run>/predict_<split>)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    try:
        run(args)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def run(args):
    if args.split not in SPLITS:
        raise UserError(f"unknown --split {args.split!r}; choose one of {', '.join(SPLITS)}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    path = args.checkpoint or newest_checkpoint()
    device = choose_device(args.device)
    model, state = load_model(path, device)
    cfg = state["train_config"]
    data_root = args.data_root or cfg["data_root"]
    try:
        data = build_dataset(cfg["dataset"], data_root, args.split, image_size=cfg["image_size"],
                             val_fraction=cfg["val_fraction"], seed=cfg["seed"], skip_bad=cfg["skip_bad"])
    except DataError as e:
        raise UserError(f"the {cfg['dataset']} data this checkpoint was trained on is not readable: {e} "
                        f"(point at it with --data-root)") from None
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    out = args.out or run_dir / f"predict_{args.split}"
    out.mkdir(parents=True, exist_ok=True)

    scores, keep = reconstruct(model, data, device, args.batch_size)
    with open(out / "per_image.csv", "w") as f:
        f.write("file,ssim,psnr\n")
        for name, s, q in zip(data.files, scores["ssim"], scores["psnr"]):
            f.write(f"\"{name}\",{s:.6f},{q:.4f}\n")
    summary = {"checkpoint": str(path), "epoch": state["epoch"], "dataset": cfg["dataset"], "split": args.split,
               "images": len(data), "ssim": summarise(scores["ssim"]), "psnr": summarise(scores["psnr"]),
               f"fraction_ssim_ge_{SSIM_BAR}": float((scores["ssim"] >= SSIM_BAR).mean()),
               "bits_per_image": model.config.bits_per_image(*data.image_shape)}
    write_json(out / "summary.json", summary)

    save_side_by_side(keep["inputs"], keep["outputs"], out / "reconstructions.png")
    worst_best = [int(np.argmin(scores["ssim"][:len(keep["inputs"])])), 0,
                  int(np.argmax(scores["ssim"][:len(keep["inputs"])]))]
    plot_triplets(keep["inputs"][worst_best], keep["indices"][worst_best], keep["outputs"][worst_best],
                  out / "triplets.png", scores=scores["ssim"][worst_best])
    plot_histogram(scores["ssim"], out / "ssim_hist.png", f"SSIM on {cfg['dataset']} {args.split}", "SSIM",
                   threshold=SSIM_BAR)
    if (run_dir / "metrics.csv").exists():
        plot_training_curves(run_dir / "metrics.csv", out)
    s = summary["ssim"]
    print(f"{cfg['dataset']} {args.split}: {len(data)} images | SSIM mean {s['mean']:.4f} std {s['std']:.4f} "
          f"min {s['min']:.4f} max {s['max']:.4f} | >= {SSIM_BAR}: {100 * summary[f'fraction_ssim_ge_{SSIM_BAR}']:.1f}% "
          f"| PSNR {summary['psnr']['mean']:.2f} dB | written to {out}")
    return summary


if __name__ == "__main__":
    main()
