"""Plain helpers shared by several test modules (fixtures are in conftest.py)."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


# A VQ-VAE of a few thousand weights, for every test that trains or builds one (K is each test's choice).
TINY_MODEL = dict(hidden_channels=16, residual_channels=8, embedding_dim=8)
# The tests that compile (torch.compile on the CPU): run by one worker under `pytest -n 2 --dist loadgroup`, so that
# the C++ toolchain's first, slowest compile is paid once.
INDUCTOR = pytest.mark.xdist_group("inductor")
# Children use one thread: light on a shared 2-core machine, and the same arithmetic in every child.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_script(*args, cwd=REPO, env=ONE_THREAD, timeout=300, **kwargs):
    """`python ARGS...` in the repository as a user runs it, finished: for what needs a process of its own (signals,
    torchrun, resource limits, two writers, the import of a script); everything else runs in-process (run_main)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def scripts_run_in_this_process(monkeypatch):
    """training.families.run_script (how ablate.py, ladder.py and bench.py --quality start train.py) calls
    SCRIPT.main(FLAGS) in this process instead of `python SCRIPT.py FLAGS` in a new one: the same code, without a
    new interpreter's start-up of seconds for each run."""
    from training import families

    def run(command, **kwargs):
        script = importlib.import_module(Path(command[1]).stem)
        try:
            script.main([str(a) for a in command[2:]])
        except SystemExit as stop:
            return subprocess.CompletedProcess(command, stop.code or 0)
        return subprocess.CompletedProcess(command, 0)
    monkeypatch.setattr(families.subprocess, "run", run)


def held_at_second_epoch(script: str) -> list[str]:
    """`python -c ...` arguments that run `script`.main(sys.argv[1:]) with its train_epoch held for two minutes as
    the second epoch begins: a signal sent once epoch 1 is saved lands mid-training however fast the epochs are."""
    return ["-c", f"""import sys, time, {script}
real, calls = {script}.train_epoch, []
def held(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        time.sleep(120)
    return real(*args, **kwargs)
{script}.train_epoch = held
{script}.main(sys.argv[1:])
"""]


def tiny_args(data_root, out, *extra, dataset="demo"):
    """train.py flags for a TINY_MODEL (batch 8) on the slices at `data_root`, writing to `out`."""
    from training.flags import command_flags
    return [*command_flags({"dataset": dataset, "data_root": data_root, "batch_size": 8, **TINY_MODEL, "out": out}),
            *map(str, extra)]


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


def interrupted_in_second_call(real_epoch):
    """A stand-in for a script's train_epoch that raises KeyboardInterrupt (Ctrl-C) as the second epoch begins."""
    calls = []

    def epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)
    return epoch


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


def vqvae_state(epoch=1, **train_config):
    """A complete VQ-VAE checkpoint state of a tiny untrained model, as train.py saves it (without format)."""
    from dataclasses import asdict

    from modules import VQVAEConfig
    from training.checkpoints import TrainConfig
    from training.steps import vqvae_and_optimiser
    from utils import rng_state
    cfg = TrainConfig(dataset="demo", **train_config).resolved()
    model_cfg = VQVAEConfig(**TINY_MODEL, codebook_size=16)
    model, opt, scheduler = vqvae_and_optimiser(cfg, model_cfg, torch.device("cpu"), 10)
    model(torch.zeros(2, 1, 16, 16)).losses["reconstruction"].backward()
    opt.step()
    return {"kind": "vqvae", "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "best_val_loss": 0.5, "rng": rng_state(),
            "model_config": asdict(model_cfg), "train_config": asdict(cfg), "world_size": 1, "metrics": {},
            "demo_settings": None}


def assert_one_line_error(outcome, *fragments):
    """One line holding every fragment, and no traceback. `outcome`: a finished subprocess (which must also have
    failed; its stderr is read), an ExceptionInfo of a one-line error (its message), or captured stderr text."""
    if isinstance(outcome, subprocess.CompletedProcess):
        assert outcome.returncode != 0, outcome.stdout
        text = outcome.stderr
    else:
        text = outcome if isinstance(outcome, str) else str(outcome.value)
    assert "Traceback" not in text, text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]


def run_main(main, argv, capsys):
    """A script's main(argv) in this process, as a finished subprocess would report it: no torch import to pay."""
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def incremental_logits(prior, codes, labels=None, dtype=torch.float64):
    """Teacher forcing through prior.incremental: (n, h, w) codes -> (n, K, h, w) logits in `dtype`."""
    from modules import fill_in_raster_order
    n, h, w = codes.shape
    out = torch.empty(n, prior.config.codebook_size, h, w, dtype=dtype)

    def record(pos, logits):
        out[:, :, pos // w, pos % w] = logits
        return codes[:, pos // w, pos % w]
    with torch.no_grad():
        fill_in_raster_order(prior.incremental(n, h, w, labels, dtype), h * w, record)
    return out
