"""Train each model variant on the same data and the same budget (epochs, or minutes), score it on one split
(validate by default: recipes are chosen there) on whole slices and inside the brain (anatomy/brain.py's masks),
and write one table (ablation.csv, ablation.json, ablation.md).

    python ablate.py --dataset OASIS --data-root /data/keras_png_slices_data --epochs 40 --max-minutes 10
    python ablate.py --dataset demo --epochs 10 --variants seed,default

Each variant is a normal train.py run under <out>/<variant>/ (metrics.csv, checkpoints, plots); a variant whose run
already finished its epochs or spent its --max-minutes is scored again without retraining, and an unfinished one
(interrupted, or crashed) is resumed with the rest of its budget, so an interrupted ablation can be re-run.
--device and --precision go to train.py as they are, --threads as OMP_NUM_THREADS; each variant trains with its
preset's batch size (a variant may override it), and --batch-size is the scoring's.
"""
import argparse
from pathlib import Path

from anatomy.brain import brain_masks
from dataset import WHERE_SHIPPED
from evaluation.metrics import score_split
from training.checkpoints import load_checkpoint, load_split, load_vqvae
from training.families import (
    add_trainer_data_flags,
    check_trainer_flags,
    chosen_members,
    run_script,
    training_finished,
)
from utils import (
    ArgumentParser,
    add_runtime_flags,
    add_shared_flag,
    apply_runtime_flags,
    autocast,
    claim_outputs,
    exits_with_one_line,
    read_csv,
    write_atomically,
    write_csv,
    write_json,
)

# name -> (preset, overrides of its model or optimiser settings)
VARIANTS = {
    "seed": ("seed", {}),
    "default": ("default", {}),
    "hq": ("hq", {}),
    "default-no-ema": ("default", {"codebook_update": "loss"}),
    "default-no-restart": ("default", {"dead_code_threshold": 0.0}),
    "default-4x-down": ("default", {"downsamplings": 2}),
    "default-mse-only": ("default", {"ssim_weight": 0.0}),
    "default-tissue": ("default", {"tissue_weight": 2.0}),
    "default-gradient": ("default", {"gradient_weight": 1.0}),
    "default-tissue-gradient": ("default", {"tissue_weight": 2.0, "gradient_weight": 1.0}),
    "default-wide": ("default", {"hidden_channels": 128, "residual_channels": 128}),
    "default-no-warmup-no-clip": ("default", {"warmup_steps": 0, "grad_clip": 0.0}),
    "default-batch-16": ("default", {"batch_size": 16}),
    "default-crop-128": ("default", {"train_crop": 128}),
    "hq-whole-slices": ("hq", {"train_crop": 0}),
}
TABLES = ("ablation.json", "ablation.csv", "ablation.md")  # in --out, beside the variants' run folders


def train_variant(name: str, args, run_dir: Path, resume: bool):
    """train.py for one variant; an unfinished run of it is resumed."""
    preset_name, overrides = VARIANTS[name]
    if resume:
        values = {"resume": run_dir, "epochs": args.epochs, "device": args.device}
    else:
        values = {"dataset": args.dataset, "data_root": args.data_root, "image_size": args.image_size,
                  "preset": preset_name, "epochs": args.epochs, "max_minutes": args.max_minutes,
                  "precision": args.precision, "seed": args.seed, "device": args.device, "out": run_dir, **overrides}
    print(f"\n=== {name}: preset {preset_name} {overrides or ''}{' (resumed)' if resume else ''}", flush=True)
    run_script("train.py", values, args.threads,
               f"training variant {name} failed (its error is above); fix it and run ablate.py again: finished "
               f"variants are not trained again, an unfinished one is resumed")


def run_variant(name: str, args, device) -> dict:
    """Train the variant unless its run already finished (its epochs, or its minutes), then score its best.pt on
    args.split."""
    run_dir = args.out / name
    last = run_dir / "last.pt"
    if not (last.is_file() and training_finished(load_checkpoint(last), args.epochs)):
        train_variant(name, args, run_dir, resume=last.is_file())
    model, cfg, state = load_vqvae(run_dir / "best.pt", device)
    scored = load_split(cfg, args.split, demo=state["demo_settings"], masks=WHERE_SHIPPED)
    brain, brain_rule = brain_masks(scored)
    scores = score_split(model, scored.images, device, autocast(cfg.precision, device), args.batch_size, brain=brain)
    rows = read_csv(run_dir / "metrics.csv")
    last_row, model_cfg = rows[-1], model.config
    h, w = scored.image_shape
    grid = model_cfg.latent_grid(h, w)
    preset_name, overrides = VARIANTS[name]
    return {"variant": name, "preset": preset_name, "overrides": overrides, "latent_grid": f"{grid[0]}x{grid[1]}",
            "codebook_size": model_cfg.codebook_size, "bits_per_slice": round(model_cfg.bits_per_image(h, w)),
            "epochs": int(last_row["epoch"]), "best_epoch": state["epoch"],
            "split": args.split, "ssim": float(scores.ssim.mean()), "ssim_std": float(scores.ssim.std(unbiased=False)),
            "psnr": float(scores.psnr.mean()), "ssim_brain": float(scores.ssim_brain.nanmean()),
            "psnr_brain": float(scores.psnr_brain.nanmean()), "brain_mask": brain_rule,
            "codes_used_pct": last_row["codes_used_pct"],
            "perplexity": last_row["perplexity"],
            "train_img_per_s": sum(r["train_img_per_s"] for r in rows) / len(rows),
            "train_minutes": sum(r["epoch_seconds"] for r in rows) / 60}


def markdown_table(rows: list[dict]) -> str:
    split = rows[0]["split"]
    lines = [f"| variant | latent grid | K | bits/slice | {split} SSIM | {split} PSNR (dB) | SSIM in the brain "
             "| PSNR in the brain (dB) | codes used (last epoch) | perplexity | train img/s | minutes |",
             "|---" * 12 + "|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['latent_grid']} | {r['codebook_size']} | {r['bits_per_slice']} "
                     f"| {r['ssim']:.4f} ± {r['ssim_std']:.3f} | {r['psnr']:.2f} "
                     f"| {r['ssim_brain']:.4f} | {r['psnr_brain']:.2f} "
                     f"| {r['codes_used_pct']:.0f} % | {r['perplexity']:.1f} | {r['train_img_per_s']:.1f} "
                     f"| {r['train_minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = ArgumentParser(prog="ablate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trainer_data_flags(p, "variant")
    p.add_argument("--epochs", type=int, default=20, help="the same budget for every variant (default: 20)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="train.py's --max-minutes for every variant: a "
                   "time budget instead of (or below) --epochs (default: 0, none)")
    add_shared_flag(p, "--split", "the split every variant is scored on (default: validate; score test once, at the "
                    "end)", default="validate", choices=("validate", "test"))
    p.add_argument("--seed", type=int, default=0, help="train.py's --seed (default: 0)")
    add_runtime_flags(p, batch_size=16, batch_help="slices per forward pass in scoring")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    add_shared_flag(p, "--out", "one run folder per variant in here, and the tables (default: runs/ablation)",
                    default=Path("runs/ablation"))
    with exits_with_one_line():
        args = p.parse_args(argv)
        device = apply_runtime_flags(args)
        names = chosen_members(args.variants, VARIANTS, "--variants")
        check_trainer_flags(args)
        claim_outputs(args.out, TABLES, "ablate.py")
        rows = []
        for name in names:
            rows.append(run_variant(name, args, device))
            write_json(args.out / TABLES[0], {"dataset": args.dataset, "data_root": args.data_root,
                                              "epochs": args.epochs, "max_minutes": args.max_minutes, "rows": rows})
            write_csv(args.out / TABLES[1], [{k: v for k, v in r.items() if k != "overrides"} for r in rows])
            write_atomically(args.out / TABLES[2], markdown_table(rows))
        print("\n" + markdown_table(rows))


if __name__ == "__main__":
    main()
