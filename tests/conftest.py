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


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """A tiny demo tree: 10 patients x 4 slices of 32x32 (32 train, 4 validate, 4 test); one per test module."""
    return generate_demo(tmp_path_factory.mktemp("data") / "demo", size=32, n_patients=10, slices_per_patient=4)


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """A trainer's main installs its own Ctrl-C / SIGTERM handler (utils.stop_on_interrupts), and one that handled
    an interrupt ignores further signals, as its process is about to end; in this process the next test gets the
    handlers back."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)
