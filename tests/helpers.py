"""Plain helpers shared by several test modules (fixtures are in conftest.py)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def run_script(*args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def tiny_args(demo_root, out, *extra):
    """train.py flags for a tiny model on the data at `demo_root`, writing to `out`."""
    return ["--dataset", "demo", "--data-root", str(demo_root), "--batch-size", "8", "--hidden-channels", "16",
            "--residual-channels", "8", "--embedding-dim", "8", "--out", str(out), *extra]


def write_image(path, pixels, mode=None, **save_kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path, **save_kwargs)
    return path


def make_adni(ad_nc, train_patients=10, test_patients=2, n_slices=2):
    """AD_NC/{train,test}/{AD,NC}/<patient>_<slice>.jpeg, 256 wide x 240 high; AD patients 1000+, NC 2000+."""
    for split, n in (("train", train_patients), ("test", test_patients)):
        for cls, base in (("AD", 1000), ("NC", 2000)):
            for p in range(n):
                for s in range(n_slices):
                    pixels = np.full((240, 256), 60 if cls == "AD" else 180, np.uint8)
                    write_image(ad_nc / split / cls / f"{base + p}_{s}.jpeg", pixels)
    return ad_nc


def nan_weights_on_second_call(real_epoch):
    """A stand-in for a script's train_epoch(model, ...) that fills a weight with NaN before the second epoch."""
    calls = []

    def epoch(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return real_epoch(model, *args, **kwargs)
    return epoch
