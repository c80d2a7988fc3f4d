"""Sample new slices from a prior trained by train_prior.py, through the VQ-VAE whose codes it models, and score them.

    python sample.py                                    # the newest run's prior/best.pt, 64 samples
    python sample.py --prior runs/ADNI-default-000/prior/best.pt --num-samples 64 --class AD --temperature 0.9
    python sample.py --checkpoint runs/OASIS-default-000 --segmenter runs/segmenter-OASIS-000/best.pt

Writes (default: <prior run>/predict_samples/) samples.png (the first 64 of N new slices), completions.png (slices
of --split whose top half of codes is kept and bottom half sampled, beside the originals) and sample_scores.json
(validation NLL, nearest-train SSIM, Frechet distance, each beside a real-data reference; with --segmenter also the
Frechet distance in the segmenter's features and the samples' tissue fractions).
"""
import argparse
import math
from pathlib import Path

import torch

from anatomy.tissues import check_segmenter_fits
from anatomy.vocabulary import MASKED_DATASETS, TISSUES
from dataset import class_index
from evaluation.generation import prior_bits, sample_scores, save_completions
from evaluation.metrics import apply_in_batches, encode_images
from training.checkpoints import (
    check_prior_fits,
    checkpoint_file,
    default_prior,
    load_prior,
    load_segmenter,
    load_split,
    load_vqvae,
    newest_checkpoint,
    run_dir_of,
)
from utils import (
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
    save_image_grid,
    write_json,
)

OUTPUTS = ("samples.png", "completions.png", "sample_scores.json")  # in --out


def parse_args(argv=None):
    p = ArgumentParser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_flag(p, "--prior", "the prior to sample from (default: prior/best.pt in the --checkpoint's run folder)")
    add_shared_flag(p, "--checkpoint", "the VQ-VAE whose codes the prior models (default: the one the prior was "
                    "trained on; without --prior, the newest runs/*/best.pt)")
    p.add_argument("--num-samples", type=int, default=64, metavar="N",
                   help="number of new slices to sample and score, 2 to 100000 (default: 64)")
    p.add_argument("--class", dest="class_name", help="the class to sample from a conditional prior, e.g. AD "
                   "(default: every class in turn)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    p.add_argument("--reference-slices", type=int, metavar="N", help="compare the samples with a fixed random "
                   "subset of N train slices, drawn by --seed (nearest-train SSIM, Frechet distances): faster and "
                   "smaller for large splits (default: every train slice)")
    p.add_argument("--segmenter", type=Path, help="a tissue segmenter .pt written by segment.py train, or its run "
                   "folder: adds the Frechet distance in its features and the samples' tissue fractions")
    add_shared_flag(p, "--split", "the slices completions.png completes (default: test)", default="test")
    add_shared_flag(p, "--data-root")
    p.add_argument("--skip-bad", action=argparse.BooleanOptionalAction,
                   help="skip unreadable or odd-sized images and report how many (default: as in training)")
    add_shared_flag(p, "--out", "where the samples and their scores go (default: predict_samples/ in the prior "
                    "checkpoint's folder)")
    add_runtime_flags(p, batch_size=32)
    p.add_argument("--compile", action="store_true", help="torch.compile the SSIM on the CPU: faster once compiled, "
                   "worth it for the nearest-neighbour search over a large train split")
    args = p.parse_args(argv)
    check_seed(args.seed)
    if not 2 <= args.num_samples <= 100000:
        raise UserError(f"--num-samples must be between 2 and 100000 (the Frechet distance needs two), got "
                        f"{args.num_samples}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UserError(f"--temperature must be a positive number, got {args.temperature}")
    check_at_least("--reference-slices", args.reference_slices, 2)
    return args


def main(argv=None):
    with exits_with_one_line(interrupted="interrupted; the outputs written so far may be incomplete"):
        return sample(parse_args(argv))


def sampling_models(args, device):
    """The prior and the VQ-VAE whose codes it models, checked to belong together; the --class's index."""
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
    index = class_index(args.class_name, prior_state["class_names"], bool(prior.config.num_classes))
    return (prior, prior_path, prior_state), (model, vqvae_path, cfg, state), index


def load_splits(args, cfg, state, segmenter):
    """train (the samples' reference, or --reference-slices of it), validate (with its tissue masks where the
    segmenter judges and the dataset has them) and --split (whose slices completions.png completes)."""
    masked = segmenter is not None and cfg.dataset in MASKED_DATASETS
    train, val, held = (load_split(cfg, split, args.data_root, args.skip_bad, state["demo_settings"],
                                   masks=masked and split == "validate") for split in ("train", "validate", args.split))
    if args.reference_slices is not None:
        if args.reference_slices > len(train):
            raise UserError(f"--reference-slices {args.reference_slices} is more than the {len(train)} slices of the "
                            f"train split; pass at most {len(train)}, or leave it out for all of them")
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
                             [:args.reference_slices].sort().values)
    return train, val, held


def sample(args):
    """New slices from the prior, completions of real slices' bottom halves, and their scores."""
    device = apply_runtime_flags(args)
    (prior, prior_path, prior_state), (model, vqvae_path, cfg, state), chosen_class = sampling_models(args, device)
    amp = autocast(args.precision, device)
    segmenter = load_segmenter(args.segmenter, device) if args.segmenter else None
    train, val, held = load_splits(args, cfg, state, segmenter)
    if segmenter:
        check_segmenter_fits(segmenter[0], train.image_shape, f"{cfg.dataset} train")
    out = claim_outputs(args.out or run_dir_of(prior_path) / "predict_samples", OUTPUTS, "sample.py")
    shape = model.config.latent_grid(*train.image_shape)
    generator = torch.Generator(device).manual_seed(args.seed)

    # New slices.
    sample_labels = prior.labels_for(args.num_samples, chosen_class)
    codes = prior.sample(args.num_samples, shape, sample_labels, args.temperature, generator)
    samples = apply_in_batches(model.decode_indices, codes, device, args.batch_size)
    what = f"class {prior_state['class_names'][chosen_class]}, " if chosen_class is not None else ""
    save_image_grid(samples[:64], out / OUTPUTS[0], nrow=8, title=f"{args.num_samples} samples ({what}"
                    f"temperature {args.temperature}, seed {args.seed})")
    save_completions(prior, model, held, shape, args.temperature, generator, amp, args.batch_size,
                     out / OUTPUTS[1])

    # Scores, each beside the same measurement on real validation slices.
    conditional = bool(prior.config.num_classes)
    val_codes = encode_images(model, val.images, device, args.batch_size, desc="encoding validate", amp=amp)
    bits = prior_bits(prior, val_codes, val.labels if conditional else None, args.batch_size)
    scores = {"prior": str(prior_path), "prior_epoch": prior_state["epoch"], "vqvae": str(vqvae_path),
              "dataset": cfg.dataset, "samples": args.num_samples,
              "class": prior_state["class_names"][chosen_class] if chosen_class is not None else None,
              "temperature": args.temperature, "seed": args.seed, "latent_grid": list(shape),
              "prior_arch": prior.config.arch, "prior_passes": prior.passes(*shape),
              "train_reference_slices": len(train),
              "validation_nll_bits_per_code": bits, "log2_codebook_size": math.log2(model.config.codebook_size),
              **sample_scores(model, samples, train, val, args, device, segmenter,
                              classes=(sample_labels, prior_state["class_names"]) if conditional else None)}
    write_json(out / OUTPUTS[2], scores)
    print_scores(scores, out)
    return scores


def print_scores(scores: dict, out: Path):
    """The scores in a few lines: the prior's NLL, the samples' and the real references' nearest-train SSIM and
    Frechet distances, and the segmenter's judgement where sample_scores.json has it."""
    s, fd = scores["nearest_train_ssim"], scores["frechet_distance"]
    print(f"validation NLL {scores['validation_nll_bits_per_code']:.3f} bits/code (log2 K = "
          f"{scores['log2_codebook_size']:.0f}) | nearest-train SSIM samples mean {s['samples']['mean']:.3f} max "
          f"{s['samples']['max']:.3f}, real validate mean {s['validate_real']['mean']:.3f} max "
          f"{s['validate_real']['max']:.3f} | Frechet samples {fd['samples_vs_train']:.3g}, real validate "
          f"{fd['validate_real_vs_train']:.3g}, validate reconstructions "
          f"{fd['validate_reconstructions_vs_train']:.3g} | written to {out}")
    if "segmenter_frechet_distance" in scores:
        sd, tf = scores["segmenter_frechet_distance"], scores["tissue_fractions"]
        print(f"segmenter's judge | Frechet samples {sd['samples_vs_train']:.3g}, real validate "
              f"{sd['validate_real_vs_train']:.3g}, validate reconstructions "
              f"{sd['validate_reconstructions_vs_train']:.3g} | tissue fractions (share of brain) W1 samples vs "
              f"validate: " + ", ".join(f"{t} {tf[t]['wasserstein_samples_vs_validate']:.4f}" for t in TISSUES))
        for key, difference in scores.get("tissue_fractions_by_class", {}).items():
            if " - " in key:
                print(f"CSF share {key}: samples {difference['samples']['CSF']:+.4f}, real validate "
                      f"{difference['validate_real']['CSF']:+.4f}")


if __name__ == "__main__":
    main()
