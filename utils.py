"""Shared plumbing: seeding, devices, distributed setup, checkpoints, SSIM/PSNR, CSV and plots."""
import argparse
import csv
import ctypes
import functools
import glob
import io
import json
import os
import random
import secrets
import signal
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINT_FORMAT = "vqvae-mri/1"


class UserError(Exception):
    """Something the user can fix; str(e) is one line saying what was wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------------------
# Seeding, devices, distributed
# ---------------------------------------------------------------------------------------------------------

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


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) for a plain `python` run."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def fail_together(device: torch.device):
    """Around a block that may fail on some ranks only (rank 0 saving, loading data): if it raises on any rank,
    every rank raises, instead of the others waiting forever in their next collective. Also a barrier; a
    no-op in a single process. Ctrl-C and SIGTERM pass straight through: they reach every rank anyway."""
    def anyone(failed: bool) -> bool:
        if not is_distributed():
            return failed
        flag = torch.tensor([float(failed)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    try:
        yield
    except Exception:
        anyone(True)
        raise
    if anyone(False):
        raise UserError("another rank failed (its error is printed above), so this one stops too")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------

def save_checkpoint(state: dict, path: Path, *also: Path):
    """Write atomically: serialise in memory, write a temp file in the same folder, fsync, rename over the target.
    Each path in `also` (same file system) then becomes another name of the same file, again by an atomic rename,
    so an epoch's epoch/best/last checkpoints cost one write.

    A crash or kill mid-write leaves the previous file intact, plus at most a hidden `.<name>.<random>.tmp`
    file, which the next save of the same path removes; a full disk is reported as a UserError, never left
    behind as a truncated checkpoint. One writer per path (under DDP only rank 0 saves)."""
    path = Path(path)
    buffer = io.BytesIO()  # serialised first: torch.save into a file reports a failed write as a vague RuntimeError
    try:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    except OSError as e:
        raise _write_failed(path, e) from None
    _replace_atomically(path, lambda tmp: _write_synced(tmp, buffer))
    for other in map(Path, also):
        _replace_atomically(other, lambda tmp: _link_or_write(path, tmp, buffer))


def _replace_atomically(path: Path, make):
    """make(tmp) creates a hidden temp file beside `path`, which then replaces `path` by a rename."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        make(tmp)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as e:
        _remove_quietly(tmp)
        raise _write_failed(path, e) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _write_failed(path: Path, e: OSError) -> UserError:
    return UserError(f"could not write checkpoint {path}: {e.strerror or e}; free disk space or choose another "
                     f"--out, then resume from the last checkpoint")


def _write_synced(tmp: Path, buffer: io.BytesIO):
    with open(tmp, "xb") as f:  # not tempfile.mkstemp: its files are 0600 whatever the umask says
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())


def _link_or_write(source: Path, tmp: Path, buffer: io.BytesIO):
    try:
        os.link(source, tmp)
    except OSError:  # another file system, or one without hard links
        _write_synced(tmp, buffer)


def _remove_quietly(path: Path):
    try:
        path.unlink(missing_ok=True)
    except OSError:  # e.g. its folder is not a folder: then there is nothing to remove
        pass


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


def load_checkpoint(path, kind: str = "vqvae") -> dict:
    """Load a checkpoint with weights_only=True, so a file someone hands you cannot run code."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; pass the path of a .pt file in it (last.pt, best.pt)")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .pt file written by train.py "
                        f"(or, for a prior, train_prior.py)")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on an unusual pickle protocol: the error below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code in it, not a torch file at all
        text = str(e)
        reason = text.strip().splitlines()[0][:160] if text.strip() else type(e).__name__
        if "weights_only" in text or "Unsupported global" in text:
            reason = "it contains objects other than tensors and plain data, which could run code when loaded"
        elif isinstance(e, EOFError) or path.stat().st_size == 0:
            reason = "the file is empty or cut short"
        elif "central directory" in text or "PytorchStreamReader" in text:
            reason = "the file is truncated or corrupt (an incomplete torch archive)"
        elif "invalid load key" in text:
            reason = "it is not a file written by torch.save"
        raise UserError(f"cannot load checkpoint {path}: {reason}; use a checkpoint written by this "
                        f"project's train.py") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint of this project (format {CHECKPOINT_FORMAT}); "
                        f"use one written by train.py")
    if state.get("kind", "vqvae") != kind:
        raise UserError(f"{path} holds a {state.get('kind')} checkpoint, but a {kind} checkpoint is needed here")
    return state


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and/or torch.compile wrappers, whose state_dict has no prefixes."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------------------------------------------------
# Interruptions and command lines
# ---------------------------------------------------------------------------------------------------------

def stop_on_sigterm():
    """Treat SIGTERM (`kill`, a cluster scheduler's time limit or pre-emption) like Ctrl-C: KeyboardInterrupt."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


@contextmanager
def interrupts_deferred():
    """Hold back Ctrl-C (and SIGTERM after stop_on_sigterm) inside the block and raise KeyboardInterrupt at its
    end, so that what the block writes (an epoch's checkpoints and CSV rows) is written in full or not at all."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        yield
        return
    received = []
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is signal.default_int_handler]
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise KeyboardInterrupt


class SavedEpochs:
    """The newest epoch whose checkpoints (and CSV rows) are complete on disk, and what a training run that stops
    early says about it. train.py and train_prior.py set `.epoch` when an epoch's writes are done."""

    def __init__(self, script: str, run_dir: Path, start_epoch: int, resume: str | None, resume_note: str = ""):
        self.script, self.run_dir, self.start_epoch, self.resume = script, Path(run_dir), start_epoch, resume
        self.resume_note = resume_note  # appended to the resume command, e.g. "(under the same torchrun command)"
        self.epoch = start_epoch - 1    # a resumed run starts with the epoch of its --resume file

    def path(self):
        """The file that holds self.epoch: last.pt, or the --resume file if nothing was saved since."""
        return self.run_dir / "last.pt" if self.epoch >= self.start_epoch else self.resume

    def kept(self) -> str:
        if self.epoch < 1:
            return "no epoch had finished, so nothing was saved"
        return f"{self.path()} holds epoch {self.epoch}"

    def diverged(self, epoch: int, what: str, value: float, cfg) -> UserError:
        """The error for a NaN/inf loss in `epoch`; cfg: the run's config (its lr, grad_clip and warmup_steps)."""
        fixes = [f"a lower --lr (this one had {cfg.lr:g})"]
        if not cfg.grad_clip:
            fixes.append("--grad-clip 1")
        if not cfg.warmup_steps:
            fixes.append("--warmup-steps 500")
        return UserError(f"training diverged in epoch {epoch} ({what} {value}); {self.kept()}"
                         f"{' (the last good one)' if self.epoch >= 1 else ''}; start a new run with "
                         f"{' or '.join([', '.join(fixes[:-1]), fixes[-1]]) if len(fixes) > 1 else fixes[0]}")

    def interrupted(self, epoch: int) -> str:
        """The message for Ctrl-C or SIGTERM in `epoch`: what is kept and the command that resumes it."""
        when = f"after epoch {epoch} was saved" if self.epoch == epoch else f"during epoch {epoch}"
        resume = ""
        if self.epoch >= 1:
            resume = (f". Resume with: python {self.script} --resume {self.path()}"
                      + (f" {self.resume_note}" if self.resume_note else ""))
        return f"\ninterrupted {when}; {self.kept()}{resume}"


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag gets one line (not the usage of every flag) and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message}; see python {self.prog} --help\n")


# ---------------------------------------------------------------------------------------------------------
# Metrics: SSIM and PSNR on images in [0, 1]
# ---------------------------------------------------------------------------------------------------------

def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 7,
         compiled: bool = False) -> torch.Tensor:
    """Per-image mean SSIM of (B, 1, H, W) batches, equal to skimage.metrics.structural_similarity
    with its defaults (7x7 uniform window, sample covariance, K1=0.01, K2=0.03) -> (B,).

    skimage averages over the image minus a (win_size-1)/2 border, which is exactly the 'valid' region
    of a stride-1 window, so no cropping is needed. On the CPU four images at a time, so that their maps stay in
    cache (~1 MB per 256x256 image): ~3x faster than whole batches of 32. compiled=True runs the same code through
    torch.compile on the CPU (CUDA is fast as it is): a few fused loops instead of ~20 passes over memory, ~5x
    faster after a one-off compile of a few seconds per image size, so it pays off from about ten thousand images.
    Where compiling fails (no C++ compiler), it warns once and runs eagerly."""
    x, y = x.float(), y.float()
    if x.is_cuda:
        return _ssim(x, y, data_range, win_size)
    chunk = 4
    full = len(x) - len(x) % chunk
    parts = [(_compiled_ssim if compiled else _ssim)(x[i:i + chunk], y[i:i + chunk], data_range, win_size)
             for i in range(0, full, chunk)]
    if full < len(x):  # a last, smaller chunk runs eagerly rather than compiling for its size too
        parts.append(_ssim(x[full:], y[full:], data_range, win_size))
    return torch.cat(parts)


def _ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, win_size: int) -> torch.Tensor:
    """ssim on one chunk. Four maps instead of the usual five (only var(x) + var(y) enters the formula), and the
    formula multiplied through by n^2 so that it takes the window sums as they are: with Sx = n * mean(x) over a
    window of n pixels, 2 ux uy + C1 = (2 Sx Sy + n^2 C1) / n^2 and var(x) = (n Sxx - Sx^2) / (n (n - 1))."""
    n = win_size * win_size
    cov_norm = n / (n - 1)
    c1, c2 = (0.01 * data_range * n) ** 2, (0.03 * data_range * n) ** 2
    sx, sy, sq, sxy = (window_sums(window_sums(m, -1, win_size), -2, win_size)  # (B, 1, H-6, W-6) each
                       for m in (x, y, x * x + y * y, x * y))
    p = sx * sy
    m = (sx * sx).addcmul_(sy, sy)
    numerator = (p * 2 + c1).mul_(sxy.mul_(n).sub_(p).mul_(2 * cov_norm).add_(c2))
    denominator = (m + c1).mul_(sq.mul_(n).sub_(m).mul_(cov_norm).add_(c2))
    return numerator.div_(denominator).flatten(1).mean(1)


def window_sums(m: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """Sums of every `width` consecutive entries along `dim` (the 'valid' positions, size - width + 1 of them), by
    doubling: sums of 1, 2, 4, ... entries, each from the previous, added up by the binary digits of `width`
    (7 = 4 + 2 + 1: four additions where a direct sum takes six). Only out-of-place additions of slices, which
    torch.compile fuses into one loop."""
    powers = [m]  # powers[k][i] = m[i] + ... + m[i + 2**k - 1]
    while 2 ** len(powers) <= width:
        span = 2 ** (len(powers) - 1)
        size = powers[-1].shape[dim] - span
        powers.append(powers[-1].narrow(dim, 0, size) + powers[-1].narrow(dim, span, size))
    length, total, offset = m.shape[dim] - width + 1, None, 0
    for k in reversed(range(len(powers))):
        if width >> k & 1:
            part = powers[k].narrow(dim, offset, length)
            total = part if total is None else total + part
            offset += 2 ** k
    return total


_compile_failed = False


def _compiled_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, win_size: int) -> torch.Tensor:
    global _compile_failed
    if not _compile_failed:
        try:
            return _ssim_compiled_once()(x, y, data_range, win_size)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            _compile_failed = True
            warnings.warn(f"torch.compile failed for SSIM ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "running it eagerly")
    return _ssim(x, y, data_range, win_size)


@functools.cache
def _ssim_compiled_once():
    return torch.compile(_ssim, dynamic=False)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) batches -> (B,); capped at 100 dB for identical images."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-10))).clamp(max=100)


def nearest_ssim(queries: torch.Tensor, gallery: torch.Tensor, candidates: int = 64,
                 compiled: bool = False) -> torch.Tensor:
    """For each (1, H, W) image of `queries`, its highest SSIM to any image of `gallery` (all in [0, 1]) -> (Nq,).

    SSIM is computed against the `candidates` gallery images nearest in pixel L2 distance (exact when the
    gallery is no larger), which keeps a search over a whole training split of thousands of slices cheap."""
    distances = torch.cdist(queries.flatten(1).float(), gallery.flatten(1).float())  # (Nq, Ng)
    nearest = distances.topk(min(candidates, len(gallery)), dim=1, largest=False).indices  # (Nq, candidates)
    return torch.stack([ssim(q.expand(len(i), *q.shape), gallery[i], compiled=compiled).max()
                        for q, i in zip(queries, nearest)])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, F) and (M, F), as in FID:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2).

    tr((S_a S_b)^1/2) is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    S_a^1/2 S_b S_a^1/2 (same spectrum), which needs only symmetric eigendecompositions."""
    a, b = a.double().cpu(), b.double().cpu()
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    trace_root = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + s_a.trace() + s_b.trace() - 2 * trace_root)


# ---------------------------------------------------------------------------------------------------------
# CSV, JSON and plots
# ---------------------------------------------------------------------------------------------------------

def append_csv(path: Path, row: dict):
    path = Path(path)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def drop_rows_after(path: Path, epoch: int) -> list[int]:
    """Remove the rows whose "epoch" is above `epoch` from a CSV (metrics.csv, code_usage.csv); returns their epochs.
    The file is replaced atomically (a hidden temporary file beside it, fsynced, renamed over it), so a crash
    leaves either the old file or the new one; a missing file, or one with nothing to remove, is left alone."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "epoch" not in rows[0]:
        return []
    column = rows[0].index("epoch")
    is_later = lambda r: bool(r) and _is_number(r[column]) and float(r[column]) > epoch  # noqa: E731
    later = [int(float(r[column])) for r in rows[1:] if is_later(r)]
    if not later:
        return []
    text = io.StringIO()
    csv.writer(text).writerows([rows[0], *(r for r in rows[1:] if not is_later(r))])  # csv.DictWriter's dialect
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        with open(tmp, "x", newline="") as f:
            f.write(text.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return later


def drop_epochs_after(epoch: int, paths) -> list[int]:
    """For a run resumed from `epoch` of a run that had gone further (--resume checkpoints/epoch_NNN.pt): the rows
    of the later epochs out of each CSV in `paths`, so that they do not appear twice once those epochs are trained
    again; says so in one line. Called as the first resumed epoch is saved, so that an interruption before then
    leaves the CSVs agreeing with last.pt. Returns the epochs removed."""
    dropped = {Path(p).name: drop_rows_after(p, epoch) for p in paths}
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
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(rows: list[dict], x: str, series: dict[str, str], path: Path, title: str, ylabel: str,
                logy: bool = False):
    """One line per {column: label} in `series`, against column `x`."""
    plt = _pyplot()
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training_curves(metrics_csv: Path, out_dir: Path):
    """loss.png, ssim.png and codebook.png from a run's metrics.csv."""
    rows, out_dir = read_csv(metrics_csv), Path(out_dir)
    plot_curves(rows, "epoch", {"train_reconstruction": "train", "val_reconstruction": "validation"},
                out_dir / "loss.png", "Reconstruction loss", "loss", logy=True)
    plot_curves(rows, "epoch", {"val_ssim": "validation SSIM"}, out_dir / "ssim.png", "Validation SSIM", "SSIM")
    plot_curves(rows, "epoch", {"codes_used_pct": "codes used (%)", "dead_codes_pct": "dead codes (%)"},
                out_dir / "codebook.png", "Codebook health", "% of K")


def save_image_grid(images: torch.Tensor, path: Path, nrow: int = 8, title: str | None = None):
    """(B, 1, H, W) images in [-1, 1] -> one PNG grid."""
    from torchvision.utils import make_grid
    plt = _pyplot()
    grid = make_grid(to_unit(images.detach().cpu()), nrow=nrow, padding=2, pad_value=1.0)[0]
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 100, grid.shape[0] / 100 + (0.3 if title else 0)), dpi=100)
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_side_by_side(inputs: torch.Tensor, outputs: torch.Tensor, path: Path, titles=("input", "reconstruction"),
                      nrow: int = 8):
    """Two grids, inputs beside outputs, in one figure."""
    from torchvision.utils import make_grid
    plt = _pyplot()
    grids = [make_grid(to_unit(t.detach().cpu()), nrow=nrow, padding=2, pad_value=1.0)[0] for t in (inputs, outputs)]
    h, w = grids[0].shape
    fig, axes = plt.subplots(1, 2, figsize=(2 * w / 100 + 0.4, h / 100 + 0.5), dpi=100)
    for ax, grid, title in zip(axes, grids, titles):
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_triplets(inputs: torch.Tensor, indices: torch.Tensor, outputs: torch.Tensor, path: Path, scores=None):
    """Rows of input / code-index map / reconstruction."""
    plt = _pyplot()
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_histogram(values, path: Path, title: str, xlabel: str, threshold: float | None = None):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(np.asarray(values), bins=40, color="steelblue")
    if threshold is not None:
        ax.axvline(threshold, color="red", ls="--", label=f"{threshold}")
        ax.legend()
    ax.set(title=title, xlabel=xlabel, ylabel="images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(values, path: Path, title: str, xlabel: str, ylabel: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(np.arange(len(values)), np.asarray(values), width=1.0, color="steelblue")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
