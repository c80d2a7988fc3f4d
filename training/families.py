"""What the commands that train a family of runs (ablate.py's variants, ladder.py's points) share: each member is
a normal train.py run in a process of its own, started with the flags of its values, and resumed or left alone as
its last checkpoint says."""
import os
import subprocess
import sys
from pathlib import Path

from training.checkpoints import TrainConfig
from training.flags import command_flags, config_or_error
from utils import UserError, check_at_least


def run_script(script: str, values: dict, threads: int | None, failure: str):
    """python <script next to this file> with the flags of `values`, as a user would run it (a subprocess: one run,
    one process, one folder); `threads` as OMP_NUM_THREADS. UserError(failure) if it fails (its error is above)."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    command = [sys.executable, str(Path(__file__).resolve().parent.parent / script), *command_flags(values)]
    if subprocess.run(command, env=env).returncode != 0:
        raise UserError(failure)


def add_trainer_data_flags(parser, member: str):
    """The data flags of a command that trains a family of runs (ablate.py's variants, ladder.py's points), passed
    to train.py for every `member`."""
    parser.add_argument("--dataset", default="demo", choices=("OASIS", "ADNI", "demo"),
                        help="the dataset (default: demo)")
    parser.add_argument("--data-root", help="where the dataset is (train.py's --data-root)")
    parser.add_argument("--image-size", type=int, help=f"train.py's --image-size for every {member}")


def chosen_members(text: str, known, flag: str) -> list[str]:
    """A comma-separated subset of `known` as given to `flag`, or a UserError naming what is unknown."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in known]
    if unknown or not names:
        raise UserError(f"unknown {flag} {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}")
    return names


def check_trainer_flags(args):
    """The flags a family's command passes to train.py for every member (add_trainer_data_flags', --epochs,
    --max-minutes, --seed, --device, --precision, --threads), checked as train.py checks them: before the first
    member trains, not when one fails."""
    config_or_error(TrainConfig, dataset=args.dataset, image_size=args.image_size, epochs=args.epochs,
                    max_minutes=args.max_minutes, seed=args.seed, device=args.device, precision=args.precision)
    check_at_least("--threads", args.threads)


def training_finished(state: dict, epochs: int) -> bool:
    """Whether a run's last checkpoint ends its training: all its epochs done, or its --max-minutes spent (the
    checkpoint says so: TimeBudget.state). Anything else, a Ctrl-C or a crash, is to be resumed."""
    return state["epoch"] >= epochs or bool(state.get("time_budget", {}).get("done"))
