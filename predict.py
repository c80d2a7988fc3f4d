"""Reconstruct a split with a trained VQ-VAE, score it (SSIM, PSNR) and draw the figures.

    python predict.py                                   # newest run's best.pt, its dataset, the test split
    python predict.py --checkpoint runs/OASIS-default-000/best.pt --split test --out results/

Writes per_image.csv, summary.json, reconstructions.png (8x8 inputs beside reconstructions),
triplets.png (input / code-index map / reconstruction), ssim_hist.png and, when the run's metrics.csv
is beside the checkpoint, the training curves.

With --sample N it samples instead of reconstructing, from a prior trained by train_prior.py:

    python predict.py --sample 64                       # the newest run's prior/best.pt
    python predict.py --sample 64 --prior runs/ADNI-default-000/prior/best.pt --class AD --temperature 0.9

and writes (default: <prior run>/predict_samples/) samples.png (the first 64 of N new slices), completions.png (slices
of --split whose top half of codes is kept and bottom half sampled, beside the originals) and
sample_scores.json (validation NLL, nearest-train SSIM, Frechet distance, each beside a real-data reference).
"""
import argparse
import math
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataset import DEMO_MARKER, SPLITS, DataError, build_dataset, default_demo_root, generate_demo, to_float
from modules import VQVAE, PixelCNNConfig, PixelCNNPrior, VQVAEConfig
from utils import (ArgumentParser, UserError, choose_device, frechet_distance, load_checkpoint, nearest_ssim,
                   one_line_reason, plot_histogram, plot_training_curves, plot_triplets, psnr, save_image_grid,
                   save_side_by_side, ssim, to_unit, write_json)

SSIM_BAR = 0.6  # the course's pass mark for mean SSIM


def newest_checkpoint(runs: Path = Path("runs")) -> Path:
    candidates = sorted(runs.glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(f"no {runs}/*/best.pt found; train first (python train.py ...) or pass --checkpoint")
    return candidates[-1]


MODEL_BUILDERS = {  # checkpoint kind -> (model from its "model_config", the script that writes it)
    "vqvae": (lambda c: VQVAE(VQVAEConfig.from_dict(c)), "train.py"),
    "prior": (lambda c: PixelCNNPrior(PixelCNNConfig(**c)), "train_prior.py"),
}


def load_model(path: Path, device: torch.device, kind: str = "vqvae") -> tuple[torch.nn.Module, dict]:
    """Rebuild the exact model (a VQ-VAE or a prior) from the checkpoint's own config."""
    state = load_checkpoint(path, kind)
    build, script = MODEL_BUILDERS[kind]
    try:
        model = build(state["model_config"])
        model.load_state_dict(state["model"])
        if kind == "vqvae":  # what load_split and the summary read
            missing = [k for k in TRAIN_CONFIG_KEYS if k not in state["train_config"]]
            missing += [k for k in ("epoch",) if k not in state]
            if missing:
                raise KeyError(", ".join(missing))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not match the model it describes ({one_line_reason(e)}); "
                        f"use a checkpoint written by this project's {script}") from None
    return model.to(device).eval(), state


def run_dir_of(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


TRAIN_CONFIG_KEYS = ("dataset", "data_root", "image_size", "val_fraction", "seed", "skip_bad")
DATA_ROOT_HINTS = {
    "OASIS": "the folder holding keras_png_slices_train/_validate/_test, its parent, or keras_png_slices_data.zip",
    "ADNI": "the AD_NC folder (holding train/ and test/), its parent, or the AD_NC zip",
}


def load_split(train_config: dict, split: str, data_root: str | None = None, skip_bad: bool | None = None,
               demo: dict | None = None):
    """One split of the dataset a VQ-VAE was trained on, as its checkpoint's train_config records it. Demo data
    that is gone is made again, with the generate_demo settings `demo` (the checkpoint's "demo_settings") if known."""
    cfg = train_config
    name, root = cfg["dataset"], data_root or cfg["data_root"]
    if name == "demo":
        folder = Path(root).expanduser() if root else default_demo_root()
        if not (folder / DEMO_MARKER).is_file():
            how = (f"with the settings it was made with ({', '.join(f'{k} {v}' for k, v in demo.items())})" if demo
                   else "with the default settings (300 slices of 128x128; this checkpoint does not record its own)")
            print(f"the demo data this checkpoint was trained on is not at {folder}; making it again there {how}")
            generate_demo(folder, **(demo or {}))
    if name in DATA_ROOT_HINTS and (root is None or not Path(root).expanduser().exists()):
        where = (f"--data-root {data_root} does not exist" if data_root else
                 f"this checkpoint was trained on {name} at {root}, which is not there now" if root else
                 f"this checkpoint does not record where its {name} data is")
        raise UserError(f"{where}; pass --data-root pointing at {DATA_ROOT_HINTS[name]}")
    try:
        return build_dataset(name, root, split, image_size=cfg["image_size"], val_fraction=cfg["val_fraction"],
                             seed=cfg["seed"], skip_bad=cfg["skip_bad"] if skip_bad is None else skip_bad)
    except DataError as e:
        raise UserError(f"the {name} data this checkpoint was trained on is not readable: {e}") from None


@torch.no_grad()
def batched(fn, x: torch.Tensor, device: torch.device, batch_size: int = 64, desc: str | None = None) -> torch.Tensor:
    """fn over x in batches on `device`; the results concatenated on the CPU."""
    return torch.cat([fn(b.to(device)).cpu() for b in tqdm(x.split(batch_size), desc=desc, leave=False,
                                                              disable=desc is None)])


def encode_images(model: VQVAE, images: torch.Tensor, device, batch_size: int = 64, desc=None) -> torch.Tensor:
    """uint8 (N, H, W) slices -> (N, h, w) code maps."""
    return batched(lambda x: model.encode(to_float(x.unsqueeze(1))), images, device, batch_size, desc)


@torch.no_grad()
def prior_bits(prior: PixelCNNPrior, codes: torch.Tensor, labels=None, batch_size: int = 64,
               autocast=nullcontext()) -> float:
    """Negative log-likelihood of (N, h, w) code maps under the prior, in bits per code."""
    prior.eval()
    device, nats = next(prior.parameters()).device, 0.0
    for start in range(0, len(codes), batch_size):
        x = codes[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device) if labels is not None else None
        with autocast:
            logits = prior(x, y)
        nats += F.cross_entropy(logits.float(), x, reduction="sum")
    return float(nats) / codes.numel() / math.log(2)


def encoder_features(model: VQVAE, images: torch.Tensor, device, batch_size: int = 64) -> torch.Tensor:
    """(N, 1, H, W) images in [-1, 1] -> (N, 2D): mean and std over space of the encoder's output, the fixed
    feature space of the Frechet distance."""
    def pooled(x):
        z = model.encoder(x).float().flatten(2)  # (B, D, h*w)
        return torch.cat([z.mean(2), z.std(2)], 1)
    return batched(pooled, images, device, batch_size)


def sample_labels(prior_config: PixelCNNConfig, n: int, class_index: int | None = None):
    """(n,) labels for a class-conditional prior: `class_index` for all, or every class in turn; None otherwise."""
    if not prior_config.num_classes:
        return None
    return torch.full((n,), class_index) if class_index is not None else torch.arange(n) % prior_config.num_classes


@torch.no_grad()
def reconstruct(model: VQVAE, data, device: torch.device, batch_size: int = 32, compiled_ssim: bool = False):
    """Per-image SSIM and PSNR over the whole split, plus the first 64 inputs/reconstructions/indices."""
    scores, keep = {"ssim": [], "psnr": []}, {"inputs": [], "outputs": [], "indices": []}
    for start in tqdm(range(0, len(data), batch_size), desc="reconstructing", leave=False):
        x = to_float(data.images[start:start + batch_size].unsqueeze(1).to(device))
        out = model(x)
        rec, ref = to_unit(out.reconstruction), to_unit(x)
        scores["ssim"].append(ssim(rec, ref, compiled=compiled_ssim).cpu())
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
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="a .pt written by train.py (default: newest runs/*/best.pt)")
    p.add_argument("--split", default="test", help=f"one of {', '.join(SPLITS)} (default: test)")
    p.add_argument("--data-root", help="where the dataset is now, if not where training read it")
    p.add_argument("--skip-bad", action=argparse.BooleanOptionalAction,
                   help="skip unreadable or odd-sized images and report how many (default: as in training)")
    p.add_argument("--out", type=Path, help="output folder (default: <run>/predict_<split>; with --sample, "
                   "predict_samples/ in the prior checkpoint's folder)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="torch.compile the SSIM on the CPU: ~5x faster once "
                   "compiled (a few seconds), worth it from about ten thousand images")
    sampling = p.add_argument_group("sampling (--sample N: sample from a prior instead of reconstructing)")
    sampling.add_argument("--sample", type=int, metavar="N", help="number of new slices to sample and score")
    sampling.add_argument("--prior", type=Path, help="a prior .pt written by train_prior.py "
                          "(default: prior/best.pt in the --checkpoint's run folder)")
    sampling.add_argument("--class", dest="class_name", help="the class to sample from a conditional prior, e.g. AD "
                          "(default: every class in turn)")
    sampling.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default: 1.0)")
    sampling.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        if args.split not in SPLITS:
            raise UserError(f"unknown --split {args.split!r}; choose one of {', '.join(SPLITS)}")
        if args.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.checkpoint is not None and args.checkpoint.is_dir():  # a run folder: its best.pt
            args.checkpoint = args.checkpoint / "best.pt"
        generate(args) if args.sample is not None else run(args)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except OSError as e:  # the output folder cannot be written: a file in the way, permissions, disk full
        print(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("\ninterrupted; the outputs written so far may be incomplete", file=sys.stderr)
        raise SystemExit(130)


def run(args):
    path = args.checkpoint or newest_checkpoint()
    device = choose_device(args.device)
    model, state = load_model(path, device)
    cfg = state["train_config"]
    data = load_split(cfg, args.split, args.data_root, args.skip_bad, state.get("demo_settings"))
    run_dir = run_dir_of(path)
    out = args.out or run_dir / f"predict_{args.split}"
    out.mkdir(parents=True, exist_ok=True)

    scores, keep = reconstruct(model, data, device, args.batch_size, args.compile)
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



def generate(args):
    """--sample: new slices from the prior, completions of real slices' bottom halves, and their scores."""
    if args.sample < 1:
        raise UserError(f"--sample must be at least 1, got {args.sample}")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be positive, got {args.temperature}")
    device = choose_device(args.device)
    vqvae_path, prior_path = args.checkpoint, args.prior
    if prior_path is None:
        vqvae_path = vqvae_path or newest_checkpoint()
        prior_path = run_dir_of(vqvae_path) / "prior" / "best.pt"
        if not prior_path.is_file():
            raise UserError(f"no prior at {prior_path}; train one with python train_prior.py --vqvae {vqvae_path}, "
                            f"or pass --prior")
    prior, prior_state = load_model(prior_path, device, kind="prior")
    vqvae_path = vqvae_path or Path(prior_state["vqvae_checkpoint"])
    model, state = load_model(vqvae_path, device)
    if not torch.equal(model.quantizer.codebook.cpu(), prior_state["vqvae_codebook"]):
        raise UserError(f"{prior_path} was trained on the codes of another VQ-VAE ({prior_state['vqvae_checkpoint']}, "
                        f"epoch {prior_state['vqvae_epoch']}); pass that one as --checkpoint")
    class_names, class_index = prior_state["class_names"], None
    if args.class_name is not None:
        if not prior.config.num_classes:
            raise UserError("--class needs a class-conditional prior (train_prior.py --conditional); this one is not")
        lowered = [c.lower() for c in class_names]
        if args.class_name.lower() not in lowered:
            raise UserError(f"unknown --class {args.class_name!r}; choose one of {', '.join(class_names)}")
        class_index = lowered.index(args.class_name.lower())
    cfg = state["train_config"]
    train, val, held = (load_split(cfg, split, args.data_root, args.skip_bad, state.get("demo_settings"))
                        for split in ("train", "validate", args.split))
    out = args.out or run_dir_of(prior_path) / "predict_samples"
    out.mkdir(parents=True, exist_ok=True)
    shape = model.config.latent_grid(*train.image_shape)
    generator = torch.Generator(device).manual_seed(args.seed)
    decode = lambda codes: batched(model.decode_indices, codes, device, args.batch_size)  # noqa: E731
    conditional = bool(prior.config.num_classes)

    # New slices.
    codes = prior.sample(args.sample, shape, sample_labels(prior.config, args.sample, class_index),
                         args.temperature, generator)
    samples = decode(codes)
    what = f"class {class_names[class_index]}, " if class_index is not None else ""
    save_image_grid(samples[:64], out / "samples.png", nrow=8,
                    title=f"{args.sample} samples ({what}temperature {args.temperature}, seed {args.seed})")

    # Completions: keep the top half of the codes of a few held-out slices, sample the rest 3 times.
    picks = torch.linspace(0, len(held) - 1, min(8, len(held))).long()
    originals = to_float(held.images[picks].unsqueeze(1))
    given = encode_images(model, held.images[picks], device, args.batch_size)
    top_half = torch.zeros(shape, dtype=torch.bool)
    top_half[:shape[0] // 2] = True
    completed = prior.sample(3 * len(picks), shape, held.labels[picks].repeat_interleave(3) if conditional else None,
                             args.temperature, generator, given=given.repeat_interleave(3, 0), given_mask=top_half)
    rows = torch.cat([originals.unsqueeze(1), decode(given).unsqueeze(1),
                      decode(completed).view(len(picks), 3, *originals.shape[1:])], 1)
    save_image_grid(rows.flatten(0, 1), out / "completions.png", nrow=5,
                    title=f"{args.split} slice | its reconstruction | 3 samples of the bottom half given the top "
                          f"half's codes")

    # Scores, each beside the same measurement on real validation slices.
    val_codes = encode_images(model, val.images, device, args.batch_size, desc="encoding validate")
    bits = prior_bits(prior, val_codes, val.labels if conditional else None, args.batch_size)
    train_images, val_images = (to_float(d.images.unsqueeze(1)) for d in (train, val))
    val_recon = batched(lambda x: model(x).reconstruction, val_images, device, args.batch_size)
    reference = torch.randperm(len(val), generator=torch.Generator().manual_seed(args.seed))[:args.sample]
    gallery = to_unit(train_images).to(device)
    nearest = {name: nearest_ssim(to_unit(x).to(device), gallery, compiled=args.compile).cpu().numpy()
               for name, x in (("samples", samples), ("validate_real", val_images[reference]),
                               ("validate_reconstructions", val_recon[reference]))}
    features = {name: encoder_features(model, x, device, args.batch_size) for name, x in
                (("train", train_images), ("samples", samples), ("validate_real", val_images),
                 ("validate_reconstructions", val_recon))}
    scores = {
        "prior": str(prior_path), "prior_epoch": prior_state["epoch"], "vqvae": str(vqvae_path),
        "dataset": cfg["dataset"], "samples": args.sample,
        "class": class_names[class_index] if class_index is not None else None,
        "temperature": args.temperature, "seed": args.seed, "latent_grid": list(shape),
        "validation_nll_bits_per_code": bits, "log2_codebook_size": math.log2(model.config.codebook_size),
        "nearest_train_ssim": {"about": "per image, the highest SSIM to any train slice (1.0: a copy); validate_* "
                                        f"use {len(reference)} random validate slices",
                               **{name: {"mean": float(v.mean()), "max": float(v.max()), "images": len(v)}
                                  for name, v in nearest.items()}},
        "frechet_distance": {"about": "between the train slices and each set, on the VQ-VAE encoder's output "
                                      "pooled to its mean and std over space",
                             **{f"{name}_vs_train": frechet_distance(f, features["train"])
                                for name, f in features.items() if name != "train"}},
    }
    write_json(out / "sample_scores.json", scores)
    s, fd = scores["nearest_train_ssim"], scores["frechet_distance"]
    print(f"validation NLL {bits:.3f} bits/code (log2 K = {scores['log2_codebook_size']:.0f}) | nearest-train SSIM "
          f"samples mean {s['samples']['mean']:.3f} max {s['samples']['max']:.3f}, real validate mean "
          f"{s['validate_real']['mean']:.3f} max {s['validate_real']['max']:.3f} | Frechet samples "
          f"{fd['samples_vs_train']:.3g}, real validate {fd['validate_real_vs_train']:.3g}, validate "
          f"reconstructions {fd['validate_reconstructions_vs_train']:.3g} | written to {out}")
    return scores


if __name__ == "__main__":
    main()
