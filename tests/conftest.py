"""Fixtures shared by several test modules; plain helpers shared by them are in helpers.py."""
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the flat repo root: modules, dataset, ...

import torch  # noqa: E402

from dataset import generate_demo  # noqa: E402

# One thread, as in the scripts the tests start (helpers.ONE_THREAD): the tests' tiny tensors gain nothing from a
# second one, and a run in this process then computes exactly what the same run in a child does.
torch.set_num_threads(1)


def pytest_configure(config):
    # pytest-xdist's marker, known also when the suite runs without it (helpers.INDUCTOR)
    config.addinivalue_line("markers", "xdist_group(name): tests one xdist worker runs together")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """A tiny demo tree: 10 patients x 4 slices of 32x32 (32 train, 4 validate, 4 test); one per test module."""
    return generate_demo(tmp_path_factory.mktemp("data") / "demo", size=32, n_patients=10, slices_per_patient=4)


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory):
    """A tiny VQ-VAE (32x32 demo slices -> 8x8 codes, K=16) and a tiny prior trained on its codes, trained once per
    test session: (vqvae best.pt, prior best.pt), the prior in prior/ of the VQ-VAE's run folder, where the commands
    look for it. Tests read them or copy them; none changes them."""
    import train
    import train_prior
    from codec.vqz import load_codec
    from helpers import tiny_args
    from training.checkpoints import load_checkpoint, load_split, rebuild_prior, save_checkpoint
    root = tmp_path_factory.mktemp("trained")
    data = generate_demo(root / "demo", size=32, n_patients=10, slices_per_patient=4)
    vqvae, prior = root / "vq" / "best.pt", root / "vq" / "prior" / "best.pt"
    train.main(tiny_args(data, root / "vq", "--epochs", "1", "--codebook-size", "16", "--downsamplings", "2"))
    train_prior.main(["--vqvae", str(vqvae), "--epochs", "1", "--batch-size", "8", "--channels", "8", "--layers", "2",
                      "--kernel-size", "3", "--epoch-samples", "0"])
    # One epoch of 4 steps leaves the prior near uniform: 60 more steps here (seconds fewer than more epochs).
    codec, cfg, state = load_codec(vqvae, None, torch.device("cpu"), 64, "auto")
    codes = codec.codes(load_split(cfg, "train", None, demo=state["demo_settings"], verbose=False).images)
    prior_state = load_checkpoint(prior, "prior")
    model, _ = rebuild_prior(prior_state, prior)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(codes), codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint({**prior_state, "model": model.state_dict()}, prior)
    return vqvae, prior


@pytest.fixture(scope="session")
def trained_codec(trained_models):
    """The session's tiny models as a Codec on the CPU, with their demo test and train slices (uint8) attached."""
    from codec.vqz import load_codec
    from training.checkpoints import load_split
    c, cfg, state = load_codec(*trained_models, torch.device("cpu"), 64, "auto")
    c.test_images = load_split(cfg, "test", None, demo=state["demo_settings"], verbose=False).images
    c.train_images = load_split(cfg, "train", None, demo=state["demo_settings"], verbose=False).images
    return c


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """A trainer's main installs its own Ctrl-C / SIGTERM handler (utils.stop_on_interrupts), and one that handled
    an interrupt ignores further signals, as its process is about to end; in this process the next test gets the
    handlers back."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)
