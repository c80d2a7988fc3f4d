"""Train each model variant on the same data and the same epoch budget, score it on the test split, and
write one table (ablation.csv, ablation.json, ablation.md) for the README.

    python ablate.py --dataset OASIS --data-root ../shared/data/mni152-dev --epochs 20
    python ablate.py --dataset demo --epochs 10 --variants seed,default

Each variant is a normal run under <out>/<variant>/ (metrics.csv, checkpoints, plots); a variant whose run
already finished its epochs is scored again without retraining, so an interrupted ablation can be re-run.
"""
import argparse
import sys
from dataclasses import replace
from pathlib import Path

from dataset import DataError
from modules import PRESETS
from predict import load_model, load_split, reconstruct
from train import TrainConfig, train
from utils import ArgumentParser, UserError, choose_device, load_checkpoint, read_csv, write_json

# name -> (preset, model overrides)
VARIANTS = {
    "seed": ("seed", {}),
    "default": ("default", {}),
    "hq": ("hq", {}),
    "default-no-ema": ("default", {"codebook_update": "loss"}),
    "default-no-restart": ("default", {"dead_code_threshold": 0.0}),
    "default-4x-down": ("default", {"downsamplings": 2}),
}


def run_variant(name: str, args) -> dict:
    preset_name, overrides = VARIANTS[name]
    run_dir = args.out / name
    cfg = TrainConfig(dataset=args.dataset, data_root=args.data_root, image_size=args.image_size,
                      preset=preset_name, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                      device=args.device, out=str(run_dir)).resolved()
    model_cfg = replace(PRESETS[preset_name], **overrides)
    finished = (run_dir / "last.pt").is_file() and load_checkpoint(run_dir / "last.pt")["epoch"] >= args.epochs
    if not finished:
        if (run_dir / "metrics.csv").exists():  # an unfinished earlier attempt: start it again from scratch
            for stale in [run_dir / "metrics.csv", run_dir / "code_usage.csv"]:
                stale.unlink()
        print(f"\n=== {name}: preset {preset_name} {overrides or ''}")
        train(cfg, model_cfg)
    device = choose_device(args.device)
    model, state = load_model(run_dir / "best.pt", device)
    test = load_split(state["train_config"], "test", demo=state.get("demo_settings"))
    scores, _ = reconstruct(model, test, device)
    rows = read_csv(run_dir / "metrics.csv")
    last = rows[-1]
    h, w = test.image_shape
    grid = model_cfg.latent_grid(h, w)
    return {"variant": name, "preset": preset_name, "overrides": overrides, "latent_grid": f"{grid[0]}x{grid[1]}",
            "codebook_size": model_cfg.codebook_size, "bits_per_slice": round(model_cfg.bits_per_image(h, w)),
            "epochs": int(last["epoch"]), "best_epoch": state["epoch"],
            "test_ssim": float(scores["ssim"].mean()), "test_ssim_std": float(scores["ssim"].std()),
            "test_psnr": float(scores["psnr"].mean()), "codes_used_pct": last["codes_used_pct"],
            "perplexity": last["perplexity"],
            "train_img_per_s": sum(r["train_img_per_s"] for r in rows) / len(rows),
            "train_minutes": sum(r["epoch_seconds"] for r in rows) / 60}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| variant | latent grid | K | bits/slice | test SSIM | test PSNR (dB) | codes used (last epoch) "
             "| perplexity | train img/s | minutes |", "|---" * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['latent_grid']} | {r['codebook_size']} | {r['bits_per_slice']} "
                     f"| {r['test_ssim']:.4f} ± {r['test_ssim_std']:.3f} | {r['test_psnr']:.2f} "
                     f"| {r['codes_used_pct']:.0f} % | {r['perplexity']:.1f} | {r['train_img_per_s']:.1f} "
                     f"| {r['train_minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="demo", help="OASIS, ADNI or demo (default: demo)")
    p.add_argument("--data-root")
    p.add_argument("--image-size", type=int)
    p.add_argument("--epochs", type=int, default=20, help="the same budget for every variant (default: 20)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    args = p.parse_args(argv)
    try:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown or not names:
            raise UserError(f"unknown --variants {', '.join(unknown) or '(none)'}; choose from {', '.join(VARIANTS)}")
        rows = []
        for name in names:
            rows.append(run_variant(name, args))
            args.out.mkdir(parents=True, exist_ok=True)
            write_json(args.out / "ablation.json", {"dataset": args.dataset, "data_root": args.data_root,
                                                    "epochs": args.epochs, "rows": rows})
            with open(args.out / "ablation.csv", "w") as f:
                keys = [k for k in rows[0] if k != "overrides"]
                f.write(",".join(keys) + "\n")
                f.writelines(",".join(str(r[k]) for k in keys) + "\n" for r in rows)
            (args.out / "ablation.md").write_text(markdown_table(rows))
        print("\n" + markdown_table(rows))
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
