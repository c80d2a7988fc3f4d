"""Shared plumbing of every command: the errors a user can fix (UserError, DataError) and the one-line way they end a
command; the flags every model-running command shares (add_runtime_flags); seeding, devices and bf16 autocast
(torchrun's processes: training/distributed.py); Ctrl-C and SIGTERM handling; files written atomically, CSV (one
writer, one appender, one reader) and JSON; and the plots and image grids."""
import argparse
import csv
import ctypes
import io
import json
import math
import os
import random
import secrets
import shutil
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from anatomy.vocabulary import TISSUE_COLOURS
from imaging.slices import SPLITS, to_unit


class UserError(Exception):
    """Something the user can fix; str(e) is one line saying what was wrong and how to fix it."""


class DataError(Exception):
    """A problem with the user's data; str(e) is one line naming the path and the fix."""


# ---------------------------------------------------------------------------------------------------------
# Seeding and devices
# ---------------------------------------------------------------------------------------------------------

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")
MAX_BATCH_SIZE = 65536


def add_runtime_flags(parser: argparse.ArgumentParser, batch_size: int, batch_help: str = "slices per forward pass"):
    """--device, --precision, --batch-size and --threads, the flags of every command that runs a model (the trainers
    take the first three as fields of their configs, from the same choices); apply_runtime_flags checks them."""
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="where to run: auto is cuda where a GPU is visible, else cpu (default: auto)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="the models' arithmetic: auto is bf16 where the hardware has it, as in training "
                             "(default: auto)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"{batch_help} (default: {batch_size})")
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's, one per core)")


SHARED_FLAGS = {  # the flags several commands take, each with one help text (add_shared_flag)
    "--checkpoint": dict(type=Path, help="a checkpoint .pt, or its run folder (its best.pt)"),
    "--prior": dict(type=Path, help="a prior .pt written by train_prior.py, or its run folder (its best.pt)"),
    "--split": dict(choices=SPLITS, help="the split of the checkpoint's dataset to read"),
    "--data-root": dict(help="where the dataset is now, if it moved since training"),
    "--out": dict(type=Path, help="output folder"),
}


def add_shared_flag(parser: argparse.ArgumentParser, flag: str, note: str = "", **overrides):
    """Add `flag`, one of SHARED_FLAGS, with its one help text and `note` after it (what it means to this command,
    its default); `overrides` are argparse's keywords for this command (default, required, dest, action)."""
    spec = {**SHARED_FLAGS[flag], **overrides}
    spec["help"] = SHARED_FLAGS[flag]["help"] + (f"; {note}" if note else "")
    return parser.add_argument(flag, **spec)


def apply_runtime_flags(args) -> torch.device:
    """The device add_runtime_flags' flags ask for, with PyTorch's CPU threads set; UserError for a bad value."""
    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        raise UserError(f"--batch-size must be between 1 and {MAX_BATCH_SIZE}, got {args.batch_size}")
    set_threads(args.threads)
    return choose_device(args.device)


def check_at_least(flag: str, value: int | None, least: int = 1):
    """UserError for a count flag below `least`; None (the flag not given) passes."""
    if value is not None and value < least:
        raise UserError(f"{flag} must be at least {least}, got {value}")


def set_threads(threads: int | None):
    """--threads: PyTorch's CPU threads (None: PyTorch's default); UserError below 1."""
    check_at_least("--threads", threads)
    if threads is not None:
        torch.set_num_threads(threads)


def check_seed(seed: int):
    """UserError for a --seed outside what numpy and torch's generators take (a command's own seed flag)."""
    if not 0 <= seed < 2**63:
        raise UserError(f"--seed must be between 0 and 2**63 - 1, got {seed}")


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def choose_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                            f"start at most that many processes per node (torchrun --nproc_per_node)")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise UserError(f"unknown --device {name!r}; choose auto, cpu or cuda")
    return torch.device("cpu")


def keep_freed_memory():
    """Make glibc keep freed memory for reuse instead of returning it to the OS (Linux; elsewhere a no-op).

    CPU tensors come from plain malloc, and glibc serves each block over 32 MB with a fresh mmap that it unmaps
    again on free, so every large activation is page-faulted in anew at every step: ~25 ms per 64 MB here, about
    a third of a seed-model training step at 256x256 on the CPU. The price is a higher peak RSS (+20-50 %)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-4, 0)        # M_MMAP_MAX: serve large blocks from the heap, where freed ones are reused
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap instead of returning it


def rng_state() -> dict:
    """Every random stream a run draws from, in a form torch.load(weights_only=True) reads back."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def use_bf16(precision: str, device: torch.device) -> bool:
    """precision "auto": bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast(precision: str, device: torch.device):
    """The context every forward pass runs in: bf16 autocast (see use_bf16) or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(precision, device) else nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and/or torch.compile wrappers, whose state_dict has no prefixes."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------------------------------------------------
# Interruptions and command lines
# ---------------------------------------------------------------------------------------------------------

def stop_on_interrupts():
    """Ctrl-C and SIGTERM (`kill`, a cluster scheduler's time limit or pre-emption) both raise KeyboardInterrupt, and
    only once: the handler ignores every later one before anything else runs, so a second signal, however soon
    after the first (an impatient double Ctrl-C), cannot cut short what the first one's handling saves and reports.
    The trainers' main() calls it; in the main thread only, where handlers can be set. exits_with_one_line disarms
    them as the command ends (disarm_interrupt_handlers)."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _interrupt_once)


def _interrupt_once(signum, frame):
    ignore_further_interrupts()
    raise KeyboardInterrupt


@contextmanager
def interrupts_deferred():
    """Hold back Ctrl-C (and SIGTERM after stop_on_interrupts) inside the block and raise KeyboardInterrupt at its
    end, so that what the block writes (an epoch's checkpoints and CSV rows) is written in full or not at all."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        yield
        return
    received = []
    held = [s for s in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(s) in (signal.default_int_handler, _interrupt_once)]
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if received else handler)
    if received:
        raise KeyboardInterrupt


def one_line_reason(e: BaseException, limit: int = 200) -> str:
    """The informative part of an exception's message on one line: its first line, or the first detail line when
    the first only announces them (load_state_dict's "Error(s) in loading state_dict for VQVAE:")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    text = lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    if isinstance(e, KeyError):
        text = f"missing {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def ignore_further_interrupts():
    """Called first when Ctrl-C or SIGTERM is being handled: a second signal (an impatient double Ctrl-C) must not
    interrupt the handler itself and change what the run reports or keeps."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)


@contextmanager
def exits_with_one_line(prefix: str = "error", interrupted: str = "interrupted; nothing was saved"):
    """Around every command's main: what the user can fix (UserError, DataError, an OSError such as a full disk or
    a file where a folder should be) stops it with one line and exit status 2, and Ctrl-C or SIGTERM that nothing
    inside handled with `interrupted` and status 130; on every way out, stop_on_interrupts' handlers are disarmed."""
    try:
        yield
    except (UserError, DataError) as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        raise SystemExit(2)
    except OSError as e:
        print(f"{prefix}: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        ignore_further_interrupts()
        print(f"\n{interrupted}", file=sys.stderr)
        raise SystemExit(130)
    finally:
        disarm_interrupt_handlers()


def disarm_interrupt_handlers():
    """As a command ends, however it ends (exits_with_one_line): stop_on_interrupts' handlers become SIG_IGN, since
    the process is ending. A signal that lands later, during the process group's teardown or the interpreter's
    shutdown (torchrun's SIGTERM to the ranks still alive once one died, a late Ctrl-C), would otherwise raise
    KeyboardInterrupt where nothing catches it and print a traceback after the command's last line. Python's own
    handlers, in the commands that install none, are left as they are."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) is _interrupt_once:
                signal.signal(s, signal.SIG_IGN)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag gets one line (not the usage of every flag) and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message}; see python {self.prog} --help\n")


# ---------------------------------------------------------------------------------------------------------
# CSV, JSON and plots
# ---------------------------------------------------------------------------------------------------------

def write_atomically(path: Path, data, link_from: Path | None = None):
    """Replace `path` by `data` (bytes, or str written as UTF-8) or, with `link_from`, by another name of that file,
    so that a reader or a crash sees the old file or the new one, never a mix: a hidden temp file beside the target
    (`.<name>.<random>.tmp`), fsynced, renamed over it, and the folder fsynced. The temp name is this writer's alone,
    so two writers never remove each other's; a kill mid-write can leave one behind, which no later save touches.
    OSError on failure, with the temp file removed."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if link_from is not None:
            try:
                os.link(link_from, tmp)
            except OSError:  # another file system, or one without hard links
                shutil.copyfile(link_from, tmp)
        else:
            with open(tmp, "xb") as f:  # not tempfile.mkstemp: its files are 0600 whatever the umask says
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. its folder is not a folder: then there is nothing to remove
            pass
        raise


def _fsync_folder(folder: Path):
    """Make a rename inside `folder` survive a power cut (POSIX); a no-op where a folder cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _csv_line(values) -> str:
    text = io.StringIO()
    csv.writer(text).writerow(values)  # csv.DictWriter's dialect: "\r\n" line ends
    return text.getvalue()


def write_csv(path: Path, rows: list[dict]):
    """A whole table, atomically: the columns are every key of the rows in first-seen order, a missing value is
    empty, floats are written in full (repr), and text is quoted where the CSV dialect needs it."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    write_atomically(path, "".join(_csv_line(r) for r in [columns, *([r.get(c, "") for c in columns] for r in rows)]))


def append_csv(path: Path, row: dict):
    """Append one row. A new or empty file gets the header first; a file whose header is not this row's columns is
    refused (UserError: it is another run's, or was edited); a last line without its line end gets one, so the
    row never glues onto it (trim_csv, run on resume, then drops such a half-written line)."""
    path = Path(path)
    header = _csv_line(row.keys())
    existing = path.read_bytes() if path.exists() else b""
    if existing and not existing.startswith(header.encode()):
        raise UserError(f"{path} does not have the columns this run writes (its first line is "
                        f"{existing.splitlines()[0][:80]!r}); move it away and resume, or start a new run")
    with open(path, "a", newline="") as f:
        f.write(("" if existing else header) + ("\r\n" if existing and not existing.endswith(b"\n") else "")
                + _csv_line(row.values()))


def trim_csv(path: Path, epoch: int) -> list[int]:
    """Keep the header and the complete rows of epochs up to `epoch` in a run's CSV (metrics.csv, code_usage.csv);
    returns the epochs of the rows removed. For a resumed run: rows of epochs it trains again, and a line cut short
    by a crash, go. The file is replaced atomically, and only if something changes."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        text = f.read()
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or "epoch" not in rows[0]:
        return []
    header, column = rows[0], rows[0].index("epoch")
    complete = [r for r in rows[1:] if len(r) == len(header) and _is_number(r[column])]
    kept = [r for r in complete if float(r[column]) <= epoch]
    removed = [int(float(r[column])) for r in complete if float(r[column]) > epoch]
    new_text = "".join(_csv_line(r) for r in [header, *kept])
    if new_text != text:
        write_atomically(path, new_text)
    return removed


def trim_csvs(epoch: int, paths) -> list[int]:
    """trim_csv on each of `paths` as a resumed run saves its first epoch, saying in one line what went; returns
    the epochs whose rows were removed (a run resumed from an earlier epoch trains them again)."""
    dropped = {Path(p).name: trim_csv(p, epoch) for p in paths}
    epochs = sorted({e for removed in dropped.values() for e in removed})
    if epochs:
        span = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}"
        print(f"resumed from epoch {epoch}: removed the rows of {span}, which this run trains again, from "
              f"{', '.join(name for name, removed in dropped.items() if removed)}")
    return epochs


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) if _is_number(v) else v for k, v in r.items()} for r in csv.DictReader(f)]


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except (TypeError, ValueError):
        return False


def write_json(path: Path, data):
    """Atomically; NaN or infinity (not JSON) are written as null."""
    write_atomically(path, json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")


def read_json(path: Path):
    """A JSON file's contents; OSError if it cannot be read, ValueError if it is not JSON (text nested too deeply
    for the parser, where json raises RecursionError, included), so that a reader of a user's file catches both."""
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("it is nested too deeply to be read") from None


OUTPUT_RECORD = ".written_by.json"  # in an --out folder: {file name: the command that wrote it} (claim_outputs)


def claim_outputs(folder: Path, names, command: str) -> Path:
    """Make `folder` (a command's --out) ready for `command` to write the fixed-name files `names` into: UserError if
    one of them is there and the folder's OUTPUT_RECORD does not say `command` wrote it (a user's file, another
    command's), else they are recorded as `command`'s and the folder is returned. A rerun thus writes over its own
    files and never over anything else. Call it once every input is checked, in place of the first write."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file, not a folder; choose another --out")
    try:
        owners = read_json(folder / OUTPUT_RECORD) if (folder / OUTPUT_RECORD).is_file() else {}
    except (OSError, ValueError):
        owners = {}
    owners = owners if isinstance(owners, dict) else {}
    for name in names:
        if (folder / name).exists() and owners.get(name) != command:
            raise UserError(f"{folder / name} is there and was not written by {command}, which never writes over a "
                            f"file it did not create; choose another --out, or remove it")
    write_json(folder / OUTPUT_RECORD, {**owners, **dict.fromkeys(names, command)})
    return folder


def _finite(data):
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def pyplot():
    """matplotlib.pyplot on the Agg backend (no screen needed), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# Where the axes of a one-panel chart sit, as fractions of the figure: fixed, because tight_layout or
# bbox_inches="tight" lays the figure out a second time, which costs more than drawing it.
CHART_MARGINS = dict(left=0.16, right=0.97, bottom=0.13, top=0.91)


def save_chart(fig, path: Path, dpi: int = 120):
    """A one-panel chart to PNG with CHART_MARGINS, and the figure closed."""
    fig.subplots_adjust(**CHART_MARGINS)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_curves(rows: list[dict], x: str, series: dict[str, str], path: Path, title: str, ylabel: str,
                logy: bool = False):
    """One line per {column: label} in `series`, against column `x`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, label in series.items():
        points = [(r[x], r[column]) for r in rows if isinstance(r.get(column), float)]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, label=label)
    ax.set(xlabel=x, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    save_chart(fig, path)


# The figures of a run's metrics.csv: file -> what plot_curves draws. Each series is a column train.py writes.
TRAINING_CURVES = {
    "loss.png": {"series": {"train_reconstruction": "train", "val_reconstruction": "validation"},
                 "title": "Reconstruction loss", "ylabel": "loss", "logy": True},
    "ssim.png": {"series": {"val_ssim": "validation SSIM"}, "title": "Validation SSIM", "ylabel": "SSIM"},
    "codebook.png": {"series": {"codes_used_pct": "codes used (%)", "dead_codes_pct": "dead codes (%)"},
                     "title": "Codebook health", "ylabel": "% of K"},
}


def plot_training_curves(metrics_csv: Path, out_dir: Path):
    """TRAINING_CURVES from a run's metrics.csv into out_dir."""
    rows = read_csv(metrics_csv)
    for name, spec in TRAINING_CURVES.items():
        plot_curves(rows, "epoch", spec["series"], Path(out_dir) / name, spec["title"], spec["ylabel"],
                    logy=spec.get("logy", False))


def save_image_grid(images: torch.Tensor, path: Path, nrow: int = 8, title: str | None = None):
    """(B, 1, H, W) images in [-1, 1] -> one PNG grid."""
    from torchvision.utils import make_grid
    plt = pyplot()
    grid = make_grid(to_unit(images.detach().cpu()), nrow=nrow, padding=2, pad_value=1.0)[0]
    height = grid.shape[0] / 100 + (0.3 if title else 0)  # inches: one grid pixel per figure pixel, a title band
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 100, height), dpi=100)
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=grid.shape[0] / 100 / height)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_side_by_side(inputs: torch.Tensor, outputs: torch.Tensor, path: Path, titles=("input", "reconstruction"),
                      nrow: int = 8):
    """Two grids, inputs beside outputs, in one figure."""
    from torchvision.utils import make_grid
    plt = pyplot()
    grids = [make_grid(to_unit(t.detach().cpu()), nrow=nrow, padding=2, pad_value=1.0)[0] for t in (inputs, outputs)]
    h, w = grids[0].shape
    fig, axes = plt.subplots(1, 2, figsize=(2 * w / 100 + 0.4, h / 100 + 0.5), dpi=100)
    for ax, grid, title in zip(axes, grids, titles):
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    height = h / 100 + 0.5
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.1 / height, top=1 - 0.35 / height, wspace=0.04)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_triplets(inputs: torch.Tensor, indices: torch.Tensor, outputs: torch.Tensor, path: Path, scores=None):
    """Rows of input / code-index map / reconstruction."""
    plt = pyplot()
    n = inputs.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for i in range(n):
        panels = [(to_unit(inputs[i, 0]).cpu(), "gray", "input"),
                  (indices[i].cpu(), "viridis", f"codes {tuple(indices[i].shape)}"),
                  (to_unit(outputs[i, 0]).cpu(), "gray", "reconstruction"
                   + (f" (SSIM {scores[i]:.3f})" if scores is not None else ""))]
        for ax, (img, cmap, title) in zip(axes[i], panels):
            ax.imshow(img.numpy(), cmap=cmap, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.1 / (3 * n), top=1 - 0.3 / (3 * n), wspace=0.05, hspace=0.12)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_bars(values, path: Path, title: str, xlabel: str, ylabel: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(np.arange(len(values)), np.asarray(values), width=1.0, color="steelblue")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    save_chart(fig, path)


def plot_image_rows(rows: list[list[tuple]], path: Path):
    """A grid with one row per list of (picture, title) panels: a float picture (H, W) in [-1, 1] is drawn grey, a
    uint8 one as tissue classes 0..3 (TISSUE_COLOURS)."""
    from matplotlib.colors import ListedColormap
    plt = pyplot()
    n, m = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n, m, figsize=(2.4 * m, 2.5 * n), squeeze=False)
    for ax_row, row in zip(axes, rows):
        for ax, (picture, title) in zip(ax_row, row):
            if picture.dtype == torch.uint8:
                ax.imshow(picture.numpy(), cmap=ListedColormap(TISSUE_COLOURS), vmin=0, vmax=3,
                          interpolation="nearest")
            else:
                ax.imshow(to_unit(picture).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=8)
        for ax in ax_row:
            ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / (2.5 * n), wspace=0.05,
                        hspace=0.3)  # fixed margins: tight_layout costs seconds on a grid of panels
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_histograms(series: dict, path: Path, title: str, xlabel: str, threshold: float | None = None):
    """One histogram per {label: values}, overlaid on the same bins; a dashed line at `threshold` if given."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    values = {k: np.asarray(v, dtype=float) for k, v in series.items()}
    everything = np.concatenate(list(values.values()))
    bins = np.linspace(everything.min(), max(everything.max(), everything.min() + 1e-6), 41)
    for label, v in values.items():
        ax.hist(v, bins=bins, alpha=0.5 if len(values) > 1 else 1.0, label=label)
    if threshold is not None:
        ax.axvline(threshold, color="red", ls="--", label=f"{threshold}")
    ax.set(title=title, xlabel=xlabel, ylabel="images")
    ax.legend()
    save_chart(fig, path)
