"""Train the codec's rate ladder: a family of VQ-VAEs from ~150 bytes to ~4 KB per slice, each with its own prior,
so that `compress.py encode --ladder` can pick, per slice, the best file within any byte budget.

    python ladder.py --dataset OASIS --data-root /data/keras_png_slices_data --max-minutes 20 --prior-minutes 8
    python compress.py rd --ladder runs/ladder --split test             # the ladder against the classical codecs
    python compress.py encode --ladder runs/ladder --max-bytes 1024 --split test --out coded/

Each operating point (codec/ladder.py's POINTS) is a latent grid and a codebook size (the bits of a fixed-length
file: grid cells x log2 K) on an existing preset's recipe; the prior then codes its maps in fewer bytes. Each point
is a normal train.py run in <out>/<point>/ and a train_prior.py run in <out>/<point>/prior/; a finished run (its
epochs done or its minutes spent) is not trained again and an unfinished one is resumed, so an interrupted ladder
can be re-run. <out>/ladder.json lists the points trained, in order of size.
"""
import argparse
from pathlib import Path

from codec.ladder import LADDER_FILE, POINTS
from modules import ConfigError
from training.checkpoints import PriorTrainConfig, load_checkpoint
from training.families import (
    add_trainer_data_flags,
    check_trainer_flags,
    chosen_members,
    run_script,
    training_finished,
)
from utils import DEVICES, PRECISIONS, ArgumentParser, UserError, claim_outputs, exits_with_one_line, write_json


def train_point(name: str, args) -> dict:
    """The VQ-VAE of one point, then its prior, each trained unless its run already finished."""
    preset, overrides, prior_overrides = POINTS[name]
    run_dir = args.out / name
    stages = [("train.py", run_dir, args.epochs, {
        "dataset": args.dataset, "data_root": args.data_root, "image_size": args.image_size, "preset": preset,
        "epochs": args.epochs, "max_minutes": args.max_minutes, "precision": args.precision, "seed": args.seed,
        "device": args.device, "out": run_dir, **overrides})]
    stages.append(("train_prior.py", run_dir / "prior", args.prior_epochs, {
        "vqvae": run_dir / "best.pt", "epochs": args.prior_epochs, "max_minutes": args.prior_minutes,
        "precision": args.precision, "seed": args.seed, "device": args.device, "out": run_dir / "prior",
        **prior_overrides}))
    for script, folder, epochs, values in stages:
        last = folder / "last.pt"
        if last.is_file() and training_finished(load_checkpoint(last), epochs):
            continue
        if last.is_file():
            values = {"resume": folder, "epochs": epochs, "device": args.device}
        print(f"\n=== {name}: {script} (preset {preset} {overrides or ''}){' resumed' if last.is_file() else ''}",
              flush=True)
        run_script(script, values, args.threads, f"{script} for ladder point {name} failed (its error is above); "
                                                 f"fix it and run ladder.py again: finished runs are kept")
    return {"name": name, "preset": preset, "overrides": overrides, "prior_overrides": prior_overrides}


def check_flags(args) -> list[str]:
    """The points asked for, every flag passed to the trainers checked before the first point trains (a bad
    --prior-epochs is not found after a VQ-VAE's training)."""
    names = chosen_members(args.points, POINTS, "--points")
    check_trainer_flags(args)
    try:
        PriorTrainConfig(epochs=args.prior_epochs, max_minutes=args.prior_minutes)
    except ConfigError as e:
        flag = {"epochs": "--prior-epochs", "max_minutes": "--prior-minutes"}[e.field]
        raise UserError(f"invalid {flag} {e.value!r}; see --help for what it takes") from None
    return names


def main(argv=None):
    p = ArgumentParser(prog="ladder.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trainer_data_flags(p, "point")
    p.add_argument("--epochs", type=int, default=40, help="train.py's --epochs for every point (default: 40)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="train.py's --max-minutes for every point "
                   "(default: 0, none)")
    p.add_argument("--prior-epochs", type=int, default=30, help="train_prior.py's --epochs (default: 30)")
    p.add_argument("--prior-minutes", type=float, default=0.0, help="train_prior.py's --max-minutes for every "
                   "point (default: 0, none)")
    p.add_argument("--points", default=",".join(POINTS), help=f"comma-separated subset of {', '.join(POINTS)}")
    p.add_argument("--seed", type=int, default=0, help="both trainers' --seed (default: 0)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="both trainers' --device")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="both trainers' --precision")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the trainers (default: PyTorch's)")
    p.add_argument("--out", type=Path, default=Path("runs/ladder"), help="one run folder per point in here, and "
                   "ladder.json (default: runs/ladder)")
    with exits_with_one_line():
        args = p.parse_args(argv)
        names = check_flags(args)
        claim_outputs(args.out, [LADDER_FILE], "ladder.py")
        points = []
        for name in sorted(names, key=list(POINTS).index):
            points.append(train_point(name, args))
            write_json(args.out / LADDER_FILE, {"dataset": args.dataset, "points": points})
        print(f"\nladder of {len(points)} points: {args.out / LADDER_FILE}\n"
              f"python compress.py rd --ladder {args.out} --split test")


if __name__ == "__main__":
    main()
