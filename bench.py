"""Speed of training and evaluation against the yardstick, measured in one run on one machine.

    python bench.py                          # seed preset, 256x256, batch 16: a table, and bench.json
    python bench.py --steps 20 --threads 2   # longer, less noisy
    python bench.py --device cuda --steps 100
    python bench.py --quality                # validation SSIM after bf16 and after fp32 training (demo data)
    python bench.py --sampling               # seconds for 64 samples from each prior, incremental vs recomputed
    python bench.py --codec runs/ladder/*    # .vqz encode and decode slices/s of each VQ-VAE with each of its priors

The yardstick is yardstick/seed_vqvae.py in this repository (the first report's recipe as a first version is
written: fp32, NCHW, eager, PIL decoding per item; --reference times another file with the same four names). It runs
first, in the process as Python starts it; then come train.py's process-wide settings (train.speed_settings) and the
project's side:

- training: img/s of the step train.py runs (training/steps.py's vqvae_and_optimiser and train_step, uint8 batches
  from images decoded once) against the yardstick's step on a batch already in memory;
- FLOP/s of that step (FlopCounterMode: convolutions and matmuls) as a fraction of this machine's bf16 and fp32
  matmul peaks (best of a few large square matmuls; on CUDA the fp32 one runs in TF32, as train.py allows; the bf16
  one only where the hardware computes bf16, as utils.use_bf16 decides);
- SSIM evaluation: utils.ssim on batches, eager and compiled (as with --compile in train.py and predict.py; the
  compile time is reported apart), against skimage's structural_similarity one image at a time, and the largest
  difference between their values;
- data-loader wait as a share of step time: the project's in-memory batches, and the yardstick's DataLoader
  decoding each PNG with PIL, on PNG slices written to a temporary folder;
- peak memory during the timed steps: RSS on the CPU, torch.cuda.max_memory_allocated on CUDA.

--quality trains a preset (default seed) twice, through train.train, in bf16 and in fp32, with the same seed and
steps, on the demo slices (128x128) or on --data-root's OASIS-layout folder, and compares their validation SSIM
after the last epoch.

--sampling draws --samples code maps of --grid x --grid (K=32, OASIS' default) from each prior architecture at its
default size, with random weights (the arithmetic is that of a trained one): by Prior.sample, as sample.py,
completion and the codec run them (a raster prior incrementally, one position at a time; the multiscale prior in its
passes), each against the PixelCNN's time; and a raster prior also by recomputing the whole network for every
position, as a first version samples (that way is timed for NAIVE_POSITIONS positions and scaled to the map). It
also times train_prior.py's training step on batches of PRIOR_TRAIN_BATCH maps in codes per second, eagerly and,
with --compile, compiled (as train_prior.py --compile; give --warmup 3 so the compile is not timed).

--codec RUN ... times the .vqz codec of each VQ-VAE run (a run folder or its .pt) with each of its priors (every
prior*/best.pt in the run folder: the raster prior train_prior.py writes to prior/, and others, e.g. a multiscale
one trained with --out RUN/prior-multiscale) on the first --images slices of --split, in compress.py's batches of
CODEC_BATCH: slices per second of the VQ-VAE alone (encoder to code maps, decoder from them) and of whole .vqz
encoding (images to files) and decoding (files to images) with each prior, the files checked to decode to the same
codes; model loading is timed apart. Beside them each classical codec at its middle quality setting encodes and
decodes the same slices, one at a time.
"""
import argparse
import importlib.util
import math
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from skimage.metrics import structural_similarity
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from codec.classical import CLASSICAL_CODECS, available_codecs
from codec.vqz import Codec, load_codec
from dataset import build_dataset, generate_demo
from imaging.quality import ssim
from imaging.slices import SPLITS, to_float, to_unit, unit_to_float
from modules import PRESETS, PRIOR_ARCHS, build_prior, prior_config
from training.checkpoints import TrainConfig, check_prior_fits, checkpoint_file, load_prior, load_split, run_dir_of
from training.families import run_script
from training.flags import flag
from training.steps import (
    batches,
    compile_model,
    prior_train_step,
    require_compiler,
    speed_settings,
    stage_images,
    train_step,
    vqvae_and_optimiser,
)
from utils import (
    ArgumentParser,
    UserError,
    add_runtime_flags,
    apply_runtime_flags,
    autocast,
    claim_outputs,
    exits_with_one_line,
    read_csv,
    seed_everything,
    unwrap,
    use_bf16,
    write_json,
)

REFERENCE = Path(__file__).resolve().parent / "yardstick" / "seed_vqvae.py"
# The speed and accuracy targets this project set itself; bench.py reports them, it does not enforce them.
TARGETS = {"train_speedup": 5.0, "fraction_of_bf16_peak": 0.6, "ssim_speedup": 20.0, "ssim_max_abs_diff": 1e-4,
           "loader_wait_fraction": 0.05, "quality_ssim_gap": 0.005, "sampling_64_s": 60.0,
           "sampling_speedup_over_pixelcnn": 10.0, "codec_fraction_of_vqvae_speed": 0.5}
NAIVE_POSITIONS = 8  # --sampling: positions the recomputing sampler is timed for
CODEC_BATCH = 64  # --codec: slices per pass of the models, compress.py's default
PRIOR_TRAIN_BATCH = 8  # --sampling: code maps per timed prior training step (the README's batch on a CPU)


def load_reference(path: Path):
    """The yardstick's module from its file: SeedVQVAE, LR, step and Folder are what bench.py uses of it."""
    if not path.is_file():
        raise UserError(f"the yardstick {path} does not exist: pass --reference PATH to a file with SeedVQVAE, LR, "
                        f"step and Folder (as {REFERENCE.relative_to(REFERENCE.parent.parent)}), or --skip-reference "
                        f"to time the project alone")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: the process's peak RSS starts again from its current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # elsewhere the peak covers the whole process so far


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def best_of(fn, device: torch.device, desc: str, repeats: int = 3):
    """fn() -> (its result, the fastest of `repeats` runs in seconds)."""
    seconds = []
    for _ in tqdm(range(repeats), desc=desc, leave=False, dynamic_ncols=True):
        sync(device)
        t = time.perf_counter()
        result = fn()
        sync(device)
        seconds.append(time.perf_counter() - t)
    return result, min(seconds)


def timed(step, warmup: int, steps: int, device: torch.device, desc: str) -> tuple[float, float]:
    """Run `step` warmup + steps times; returns (seconds of the last `steps`, peak memory over them in MiB)."""
    for _ in tqdm(range(warmup), desc=f"{desc} (warm-up)", leave=False, dynamic_ncols=True):
        step()
    sync(device)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True):
        step()
    sync(device)
    return time.perf_counter() - t0, peak_memory_mib(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, sizes: list[int]) -> float:
    """Best FLOP/s of an n x n @ n x n matmul over `sizes`, each timed over ~0.2 s, best of 3."""
    best = 0.0
    for n in tqdm(sizes, desc=f"{str(dtype)[6:]} matmul peak", leave=False, dynamic_ncols=True):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        reps = max(1, min(100, round(0.2 / (time.perf_counter() - t))))
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync(device)
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


# ---------------------------------------------------------------------------------------------------------
# The yardstick's side
# ---------------------------------------------------------------------------------------------------------

def reference_training(ref, args, device) -> dict:
    torch.manual_seed(0)
    model = ref.SeedVQVAE().to(device)
    opt = torch.optim.Adam(model.parameters(), ref.LR)
    x = unit_to_float(torch.rand(args.batch_size, 1, args.size, args.size)).to(device)
    seconds, peak = timed(lambda: ref.step(model, opt, x), args.warmup, args.steps, device, "yardstick training")
    return {"img_per_s": args.batch_size * args.steps / seconds, "step_s": seconds / args.steps, "peak_mib": peak}


def reference_loader(ref, folder: Path, args) -> float:
    """Seconds per batch from a DataLoader over the yardstick's Folder (PIL decoding in the loop)."""
    loader = torch.utils.data.DataLoader(ref.Folder(folder, args.size), args.batch_size, shuffle=True, drop_last=True)
    it, n = iter(loader), min(args.steps, len(loader))
    t = time.perf_counter()
    for _ in tqdm(range(n), desc="yardstick loader", leave=False, dynamic_ncols=True):
        next(it)
    return (time.perf_counter() - t) / n


def per_image_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """skimage, one image at a time, as the yardstick evaluates -> (N,) values."""
    return torch.tensor([structural_similarity(a[0], b[0], data_range=1.0) for a, b in zip(x.numpy(), y.numpy())],
                        dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------
# The project's side
# ---------------------------------------------------------------------------------------------------------

def project_training(args, device, data) -> dict:
    """The step train.py runs, on batches drawn from `data` as train_epoch draws them; also its FLOPs."""
    cfg = TrainConfig(preset=args.preset, batch_size=args.batch_size, precision=args.precision,
                      channels_last=args.channels_last, compile=args.compile).resolved()
    seed_everything(0)
    model, opt, scheduler = vqvae_and_optimiser(cfg, PRESETS[args.preset].model, device, args.warmup + args.steps + 1)
    if cfg.compile:
        model = compile_model(model, device, distributed=False)
    stage_images(cfg, device, data, verbose=False)
    bf16 = use_bf16(cfg.precision, device)
    amp = autocast(cfg.precision, device)
    model.train()
    it = batches(data, torch.randperm(len(data)).tolist(), args.batch_size, device, drop_last=True)
    waits = []

    def step():
        t = time.perf_counter()
        x = next(it)
        waits.append(time.perf_counter() - t)
        train_step(model, opt, scheduler, x, cfg, amp)

    seconds, peak = timed(step, args.warmup, args.steps, device, f"{args.preset} training")
    with FlopCounterMode(display=False) as counter:  # on the eager model: the same FLOPs, counted exactly
        train_step(unwrap(model), opt, scheduler, next(it), cfg, amp)
    return {"img_per_s": args.batch_size * args.steps / seconds, "step_s": seconds / args.steps, "peak_mib": peak,
            "wait_fraction": sum(waits[args.warmup:]) / seconds, "flops_per_step": counter.get_total_flops(),
            "precision": "bf16" if bf16 else "fp32"}


def batched_ssim(x: torch.Tensor, y: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """images.ssim on batches of 32, as metrics.score_split runs it -> (N,) values."""
    return torch.cat([ssim(x[i:i + 32], y[i:i + 32], compiled=compiled) for i in range(0, len(x), 32)])


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------

def machine(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                    platform.processor() or platform.machine())
    return {"device": str(device), "name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def png_slices(tmp: str, args) -> Path:
    """PNG slices in the OASIS layout under `tmp`, enough for every batch of the timed runs without repeating one;
    returns the training folder."""
    per_patient = math.ceil((args.warmup + args.steps + 1) * args.batch_size / 8)  # 8 of the 10 patients train
    print(f"writing {10 * per_patient} {args.size}x{args.size} PNG slices to {tmp}")
    generate_demo(tmp, size=args.size, n_patients=10, slices_per_patient=per_patient)
    return Path(tmp) / "keras_png_slices_train"


def timed_on_png_slices(ref, args, device) -> dict:
    """Both sides' training and loading, and skimage's SSIM, on PNG slices written to a temporary folder. The
    yardstick runs first, before speed_settings changes the process."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = png_slices(tmp, args)
        reference = reference_training(ref, args, device) if ref else None
        reference_batch_s = reference_loader(ref, folder, args) if ref else None
        t = time.perf_counter()
        data = build_dataset("OASIS", tmp, "train", verbose=False)
        decode_s = time.perf_counter() - t
        x = to_unit(to_float(data.images).unsqueeze(1))  # (N, 1, H, W) in [0, 1]
        y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
        per_image, per_image_s = best_of(lambda: per_image_ssim(x, y), torch.device("cpu"), "skimage SSIM")
        speed_settings(device)
        project = project_training(args, device, data)
    return {"reference": reference, "reference_batch_s": reference_batch_s, "project": project,
            "decode_s": decode_s, "images": len(data), "x": x, "y": y, "per_image": per_image,
            "per_image_s": per_image_s}


def ssim_speed(x, y, per_image, per_image_s: float, device) -> dict:
    """utils.ssim on batches, eager and compiled, against skimage's values `per_image` timed at `per_image_s`."""
    x, y = x.to(device), y.to(device)
    batched_ssim(x[:2], y[:2])  # warm-up
    batched, batched_s = best_of(lambda: batched_ssim(x, y), device, "batched SSIM")
    t = time.perf_counter()
    batched_ssim(x[:4], y[:4], compiled=True)  # compiles for this image size (on the CPU)
    compile_s = time.perf_counter() - t
    compiled, compiled_s = best_of(lambda: batched_ssim(x, y, compiled=True), device, "compiled SSIM")
    return {"images": len(x), "batched_img_per_s": len(x) / batched_s,
            "per_image_img_per_s": len(x) / per_image_s, "speedup": per_image_s / batched_s,
            "max_abs_diff": float((batched.double().cpu() - per_image).abs().max()),
            "compiled_img_per_s": len(x) / compiled_s, "compiled_speedup": per_image_s / compiled_s,
            "compiled_max_abs_diff": float((compiled.double().cpu() - per_image).abs().max()),
            "compile_s": compile_s}


def flop_rates(args, project: dict, reference: dict | None, device) -> dict:
    """The project's training step in FLOP/s against this machine's matmul peaks."""
    # bf16 emulated in software (a CPU without AVX512-BF16/AMX) runs minutes per large matmul, and no step trains in it
    peak_bf16 = matmul_peak(torch.bfloat16, device, args.peak_sizes) if use_bf16("auto", device) else None
    peak_fp32 = matmul_peak(torch.float32, device, args.peak_sizes)
    achieved = project["flops_per_step"] / project["step_s"]
    # what the training target asks of this machine: the step's FLOPs at TARGETS["train_speedup"] x the yardstick
    needed = reference and (TARGETS["train_speedup"] * reference["img_per_s"] / args.batch_size
                            * project["flops_per_step"])
    return {"per_step": project["flops_per_step"], "achieved_per_s": achieved,
            "peak_bf16_per_s": peak_bf16, "peak_fp32_per_s": peak_fp32,
            "fraction_of_bf16_peak": peak_bf16 and achieved / peak_bf16,
            "fraction_of_fp32_peak": achieved / peak_fp32,
            "fraction_of_bf16_peak_for_train_target": peak_bf16 and needed and needed / peak_bf16}


def speed_targets(r: dict) -> dict:
    """Which of TARGETS the speed results `r` meet (None: not measured)."""
    return {
        "train_speedup": r["train"]["speedup"] and r["train"]["speedup"] >= TARGETS["train_speedup"],
        "fraction_of_bf16_peak": r["flops"]["fraction_of_bf16_peak"]
        and r["flops"]["fraction_of_bf16_peak"] >= TARGETS["fraction_of_bf16_peak"],
        "ssim_speedup": max(r["ssim"]["speedup"], r["ssim"]["compiled_speedup"]) >= TARGETS["ssim_speedup"],
        "ssim_max_abs_diff": max(r["ssim"]["max_abs_diff"], r["ssim"]["compiled_max_abs_diff"])
        <= TARGETS["ssim_max_abs_diff"],
        "loader_wait_fraction": r["loader"]["project_wait_fraction"] < TARGETS["loader_wait_fraction"],
    }


def speed(args, device, ref) -> dict:
    """The speed benchmark against the yardstick module `ref` (None: the project alone)."""
    runs = timed_on_png_slices(ref, args, device)
    reference, project, reference_batch_s = runs["reference"], runs["project"], runs["reference_batch_s"]
    ssim_results = ssim_speed(runs["x"], runs["y"], runs["per_image"], runs["per_image_s"], device)
    flops = flop_rates(args, project, reference, device)
    r = {
        "machine": machine(device),
        "settings": {"preset": args.preset, "size": args.size, "batch": args.batch_size, "steps": args.steps,
                     "warmup": args.warmup, "precision": project["precision"], "channels_last": args.channels_last,
                     "compile": args.compile},
        "train": {"project_img_per_s": project["img_per_s"],
                  "reference_img_per_s": reference and reference["img_per_s"],
                  "speedup": reference and project["img_per_s"] / reference["img_per_s"],
                  "project_step_s": project["step_s"], "reference_step_s": reference and reference["step_s"]},
        "flops": flops,
        "ssim": ssim_results,
        "loader": {"project_wait_fraction": project["wait_fraction"],
                   "reference_wait_fraction": reference and reference_batch_s / (reference_batch_s
                                                                                 + reference["step_s"]),
                   "reference_batch_s": reference_batch_s, "project_decode_once_s": runs["decode_s"],
                   "images": runs["images"]},
        "memory": {"what": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process",
                   "project_mib": project["peak_mib"], "reference_mib": reference and reference["peak_mib"]},
    }
    r["targets"] = speed_targets(r)
    return r


def quality(args, device) -> dict:
    """train.py twice, bf16 and fp32, as a user would run it (a subprocess each), and their validation SSIM."""
    runs, data = {}, args.data_root or "the demo slices"
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("bf16", "fp32"):
            print(f"--- {args.preset} preset, {precision}, {args.epochs} epochs on {data}", flush=True)
            out = Path(tmp) / precision
            run_script("train.py", {"dataset": "OASIS" if args.data_root else "demo",
                                    "data_root": args.data_root or Path(tmp) / "demo", "preset": args.preset,
                                    "epochs": args.epochs, "batch_size": args.batch_size, "precision": precision,
                                    "channels_last": args.channels_last, "device": args.device, "seed": 0,
                                    "out": out, "compile": args.compile},
                       args.threads, f"the {precision} training run failed (its error is above)")
            rows = read_csv(out / "metrics.csv")
            runs[precision] = {"val_ssim": rows[-1]["val_ssim"], "best_val_ssim": max(r["val_ssim"] for r in rows),
                               "val_psnr": rows[-1]["val_psnr"], "train_img_per_s": rows[-1]["train_img_per_s"]}
    gap = runs["bf16"]["val_ssim"] - runs["fp32"]["val_ssim"]
    return {"machine": machine(device),
            "settings": {"preset": args.preset, "epochs": args.epochs, "batch": args.batch_size, "data": data},
            "bf16": runs["bf16"], "fp32": runs["fp32"], "val_ssim_bf16_minus_fp32": gap,
            "targets": {"quality_ssim_gap": abs(gap) <= TARGETS["quality_ssim_gap"]}}


@torch.no_grad()
def naive_sampling_seconds(prior, n: int, h: int, w: int, device: torch.device) -> float:
    """Seconds to sample n maps by running the whole prior on the map for each position, from NAIVE_POSITIONS
    positions (one more untimed) scaled to h*w: every position costs the same full forward pass."""
    codes = torch.zeros(n, h, w, dtype=torch.long, device=device)
    positions = min(NAIVE_POSITIONS, h * w - 1)

    def position(pos):
        logits = prior(codes)[:, :, pos // w, pos % w]
        codes[:, pos // w, pos % w] = torch.multinomial(logits.float().softmax(1), 1).squeeze(1)
    position(0)
    sync(device)
    t = time.perf_counter()
    for pos in range(1, positions + 1):
        position(pos)
    sync(device)
    return (time.perf_counter() - t) / positions * h * w


def prior_training_codes_per_s(arch: str, args, device: torch.device, compiled: bool) -> float:
    """Codes per second of train_prior.py's step (forward under --precision, cross-entropy, Adam) on random
    PRIOR_TRAIN_BATCH x --grid x --grid maps, for a new prior of `arch` at its default size."""
    torch.manual_seed(0)
    prior = build_prior(prior_config(arch=arch, max_grid=max(64, args.grid))).to(device).train()
    model = compile_model(prior, device, distributed=False) if compiled else prior
    opt = torch.optim.Adam(prior.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    amp = autocast(args.precision, device)
    codes = torch.randint(0, 32, (PRIOR_TRAIN_BATCH, args.grid, args.grid), device=device)

    def step():
        prior_train_step(prior, model, opt, scheduler, codes, None, amp, grad_clip=1.0)
    seconds, _ = timed(step, args.warmup, args.steps, device, f"{arch} training" + (", compiled" if compiled else ""))
    return codes.numel() * args.steps / seconds


def sampling(args, device) -> dict:
    """Prior.sample against the recomputing sampler (raster priors) and against the PixelCNN's Prior.sample, for each
    architecture."""
    n, h, w, rows = args.samples, args.grid, args.grid, {}
    for arch in PRIOR_ARCHS:
        torch.manual_seed(0)
        prior = build_prior(prior_config(arch=arch, max_grid=max(64, args.grid))).to(device).eval()
        sync(device)
        t = time.perf_counter()
        prior.sample(n, (h, w))
        sync(device)
        sampled = time.perf_counter() - t
        naive = naive_sampling_seconds(prior, n, h, w, device) if prior.raster_order else None
        eager = prior_training_codes_per_s(arch, args, device, compiled=False)
        compiled = prior_training_codes_per_s(arch, args, device, compiled=True) if args.compile else None
        rows[arch] = {"config": {f: getattr(prior.config, f) for f in ("channels", "layers", "kernel_size", "heads",
                                                                        "levels", "phases")},
                      "parameters": sum(p.numel() for p in prior.parameters()),
                      "coding_order": "raster" if prior.raster_order else "passes", "passes": prior.passes(h, w),
                      "incremental_s": sampled, "recomputing_s": naive, "speedup": naive and naive / sampled,
                      "speedup_over_pixelcnn": rows["pixelcnn"]["incremental_s"] / sampled if rows else 1.0,
                      "train_codes_per_s": eager, "compiled_train_codes_per_s": compiled,
                      "compiled_train_speedup": compiled / eager if compiled is not None else None}
    per_64 = {arch: r["incremental_s"] * 64 / n for arch, r in rows.items()}
    precision = "bf16" if use_bf16(args.precision, device) else "fp32"
    return {"machine": machine(device), "settings": {"samples": n, "grid": [h, w], "codebook_size": 32,
                                                     "train_batch": PRIOR_TRAIN_BATCH, "precision": precision},
            "priors": rows,
            "targets": {**{f"sampling_64_s_{arch}": s <= TARGETS["sampling_64_s"] for arch, s in per_64.items()},
                        **{f"sampling_speedup_over_pixelcnn_{arch}": r["speedup_over_pixelcnn"]
                           >= TARGETS["sampling_speedup_over_pixelcnn"]
                           for arch, r in rows.items() if r["coding_order"] == "passes"}}}


def print_sampling(r: dict):
    m, s = r["machine"], r["settings"]
    print(f"\n{m['name']} ({m['device']}, {m['threads']} threads), torch {m['torch']}; {s['samples']} samples of "
          f"{s['grid'][0]}x{s['grid'][1]} codes, K={s['codebook_size']}")
    print(f"{'prior':40s}{'passes':>8s}{'sampling':>10s}{'recomputing':>12s}{'ratio':>8s}{'vs pixelcnn':>12s}   "
          f"64 samples <= {TARGETS['sampling_64_s']:g} s")
    for arch, p in r["priors"].items():
        c = p["config"]
        what = f"{arch} ({c['channels']} ch, {c['layers']} layers, {p['parameters'] / 1e6:.2f}M)"
        print(f"{what:40s}{p['passes']:8d}{p['incremental_s']:9.1f}s{fmt(p['recomputing_s'], '11.0f')}"
              f"{'s' if p['recomputing_s'] else ' '}{fmt(p['speedup'], '7.0f')}{'x' if p['speedup'] else ' '}"
              f"{p['speedup_over_pixelcnn']:11.1f}x   {mark(r['targets'][f'sampling_64_s_{arch}'])}")
    print(f"\ntraining step, batch {s['train_batch']}, {s['precision']}: codes/s eager, compiled (--compile), ratio")
    for arch, p in r["priors"].items():
        print(f"{arch:40s}{p['train_codes_per_s']:12.0f}{fmt(p['compiled_train_codes_per_s'], '12.0f')}"
              f"{fmt(p['compiled_train_speedup'], '8.2f')}{'x' if p['compiled_train_speedup'] else ''}")


def fmt(value, spec: str) -> str:
    return format(value, spec) if value is not None else format("-", ">" + spec.split(".")[0])


def mark(ok) -> str:
    return {True: "yes", False: "NO", None: "-"}[ok]


def print_speed(r: dict):
    m, s, t, f, e, w, mem, ok = (r[k] for k in ("machine", "settings", "train", "flops", "ssim", "loader", "memory",
                                               "targets"))
    print(f"\n{m['name']} ({m['device']}, {m['threads']} threads), torch {m['torch']}; {s['preset']} preset, "
          f"{s['size']}x{s['size']}, batch {s['batch']}, {s['steps']} steps after {s['warmup']} warm-up, "
          f"{s['precision']}, channels_last {s['channels_last']}, compile {s['compile']}")
    print(f"{'':34s}{'project':>12s}{'yardstick':>12s}{'ratio':>9s}   target met")
    print(f"{'training (img/s)':34s}{t['project_img_per_s']:12.1f}{fmt(t['reference_img_per_s'], '12.1f')}"
          f"{fmt(t['speedup'], '8.1f')}x   >= {TARGETS['train_speedup']:g}x: {mark(ok['train_speedup'])}")
    print(f"{'SSIM evaluation (img/s)':34s}{e['batched_img_per_s']:12.1f}{e['per_image_img_per_s']:12.1f}"
          f"{e['speedup']:8.1f}x   max |diff| {e['max_abs_diff']:.1e}")
    print(f"{'  compiled (--compile) (img/s)':34s}{e['compiled_img_per_s']:12.1f}{e['per_image_img_per_s']:12.1f}"
          f"{e['compiled_speedup']:8.1f}x   >= {TARGETS['ssim_speedup']:g}x: {mark(ok['ssim_speedup'])}; "
          f"max |diff| {e['compiled_max_abs_diff']:.1e} <= {TARGETS['ssim_max_abs_diff']:g}: "
          f"{mark(ok['ssim_max_abs_diff'])}  (compiling: {e['compile_s']:.1f} s)")
    print(f"{'data-loader wait (% of step)':34s}{100 * w['project_wait_fraction']:12.2f}"
          f"{fmt(w['reference_wait_fraction'] and 100 * w['reference_wait_fraction'], '12.1f')}{'':9s}   "
          f"< {100 * TARGETS['loader_wait_fraction']:g} %: {mark(ok['loader_wait_fraction'])}  "
          f"(decoding once: {w['images']} images in {w['project_decode_once_s']:.2f} s)")
    print(f"{'peak memory (MiB)':34s}{mem['project_mib']:12.0f}{fmt(mem['reference_mib'], '12.0f')}{'':9s}   "
          f"({mem['what']})")
    bf16 = (f"{100 * f['fraction_of_bf16_peak']:.0f} % of the bf16 matmul peak ({f['peak_bf16_per_s'] / 1e9:.0f} "
            f"GFLOP/s; >= {100 * TARGETS['fraction_of_bf16_peak']:g} %: {mark(ok['fraction_of_bf16_peak'])})"
            if f["peak_bf16_per_s"] else "no native bf16 here (its peak not measured)")
    print(f"training step: {f['per_step'] / 1e9:.1f} GFLOP, {f['achieved_per_s'] / 1e9:.1f} GFLOP/s = {bf16}, "
          f"{100 * f['fraction_of_fp32_peak']:.0f} % of the fp32 peak ({f['peak_fp32_per_s'] / 1e9:.0f} GFLOP/s)")
    if f["fraction_of_bf16_peak_for_train_target"] is not None:
        print(f"{TARGETS['train_speedup']:g}x the yardstick's training speed needs "
              f"{100 * f['fraction_of_bf16_peak_for_train_target']:.0f} % of the bf16 matmul peak for this step")


# ---------------------------------------------------------------------------------------------------------
# --codec: .vqz encoding and decoding against the VQ-VAE alone and the classical codecs
# ---------------------------------------------------------------------------------------------------------

def codec_speed(args, device) -> dict:
    """Each --codec run's VQ-VAE alone and its .vqz files with each of its priors, then the classical codecs, on
    the first --images slices of --split (the first run's: a ladder's points share their dataset)."""
    runs, slices = {}, None
    for run in args.codec:
        checkpoint = checkpoint_file(run)
        runs[str(run)], images = vqz_speed(checkpoint, sorted(run_dir_of(checkpoint).glob("prior*/best.pt")), args,
                                           device)
        slices = images if slices is None else slices
    classical = {name: classical_speed(CLASSICAL_CODECS[name], slices.numpy()) for name in available_codecs()}
    return {"machine": machine(device),
            "settings": {"images": len(slices), "split": args.split, "batch": CODEC_BATCH,
                         "precision": "bf16" if use_bf16(args.precision, device) else "fp32"},
            "runs": runs, "classical": classical,
            "targets": {f"{run}: {row['prior']}": {
                "encode_at_least_half_the_vqvae_encoder": row["encode_fraction_of_vqvae"]
                >= TARGETS["codec_fraction_of_vqvae_speed"],
                "decode_at_least_half_the_vqvae_decoder": row["decode_fraction_of_vqvae"]
                >= TARGETS["codec_fraction_of_vqvae_speed"]}
                for run, r in runs.items() for row in r["priors"]}}


def seconds(work) -> tuple:
    """(work()'s result, the seconds it took)."""
    t = time.perf_counter()
    out = work()
    return out, time.perf_counter() - t


def vqz_speed(checkpoint: Path, priors: list[Path], args, device) -> tuple[dict, torch.Tensor]:
    """One VQ-VAE: its encoder and decoder alone, and whole .vqz encoding (images -> files) and decoding (files ->
    images) with each prior, after one untimed slice each (the first call's set-up is not the codec's speed)."""
    (codec, cfg, state), load_s = seconds(lambda: load_codec(checkpoint, None, device, CODEC_BATCH, args.precision))
    data = load_split(cfg, args.split, args.data_root, demo=state["demo_settings"], verbose=False)
    images, n = data.images[:args.images], min(args.images, len(data))
    codec.reconstruct(codec.codes(images[:1]))
    codes, encode_s = seconds(lambda: codec.codes(images))
    _, decode_s = seconds(lambda: codec.reconstruct(codes))
    vqvae = {"encode_slices_per_s": n / encode_s, "decode_slices_per_s": n / decode_s}
    rows = []
    for path in tqdm(priors, desc=f"{checkpoint}: priors", leave=False):
        (prior, _, prior_state), prior_load_s = seconds(lambda: load_prior(path, device))
        check_prior_fits(prior_state, codec.vqvae, path, checkpoint)
        with_prior = Codec(codec.vqvae, prior, prior_state["class_names"], device, CODEC_BATCH, args.precision)
        labels = data.labels[:n] if prior.config.num_classes else None
        with_prior.decode(with_prior.encode(images[:1], labels if labels is None else labels[:1], "prior"), ["-"])
        files, encode_s = seconds(lambda: with_prior.encode(images, labels, "prior"))
        (decoded, _), decode_s = seconds(lambda: with_prior.decode(files, [f"{path}: slice {i}" for i in range(n)]))
        if not torch.equal(decoded, codes):
            raise UserError(f"{path}: the .vqz files did not decode to the codes they were encoded from")
        rows.append({"prior": str(path), "arch": prior.config.arch, "passes": prior.passes(*codes.shape[1:]),
                     "load_s": prior_load_s, "mean_bytes": sum(map(len, files)) / n,
                     "encode_slices_per_s": n / encode_s, "decode_slices_per_s": n / decode_s,
                     "coding_order": "raster" if prior.raster_order else "passes",
                     "encode_fraction_of_vqvae": (n / encode_s) / vqvae["encode_slices_per_s"],
                     "decode_fraction_of_vqvae": (n / decode_s) / vqvae["decode_slices_per_s"]})
    raster = next((r["mean_bytes"] for r in rows if r["coding_order"] == "raster"), None)
    for row in rows:
        row["bytes_over_raster_prior"] = raster and row["mean_bytes"] / raster
    return {"checkpoint": str(checkpoint), "latent_grid": list(codes.shape[1:]), "K": codec.k, "load_s": load_s,
            "vqvae": vqvae, "priors": rows}, images


def classical_speed(codec, images) -> dict:
    """A classical codec at its middle quality setting on uint8 (N, H, W) slices, one at a time."""
    settings = codec.settings(images[0].size)
    setting = settings[len(settings) // 2]
    files, encode_s = seconds(lambda: [codec.encode(image, setting) for image in images])
    _, decode_s = seconds(lambda: [codec.decode(f) for f in files])
    return {"setting": setting, "mean_bytes": sum(map(len, files)) / len(files),
            "encode_slices_per_s": len(images) / encode_s, "decode_slices_per_s": len(images) / decode_s}


def print_codec(r: dict):
    m, s = r["machine"], r["settings"]
    print(f"\n{m['name']} ({m['device']}, {m['threads']} threads), torch {m['torch']}; {s['images']} {s['split']} "
          f"slices, batches of {s['batch']}, {s['precision']}; slices per second, model loading apart")
    for run in r["runs"].values():
        (h, w), v = run["latent_grid"], run["vqvae"]
        print(f"\n{run['checkpoint']} ({h}x{w} codes, K={run['K']}; loaded in {run['load_s']:.1f} s)")
        print(f"{'':44s}{'encode':>9s}{'decode':>9s}{'bytes':>8s}{'passes':>8s}{'load':>7s}   of the VQ-VAE's speed")
        print(f"{'VQ-VAE alone':44s}{v['encode_slices_per_s']:9.1f}{v['decode_slices_per_s']:9.1f}")
        for p in run["priors"]:
            print(f"{p['prior'][-36:] + ' ' + p['arch']:44s}{p['encode_slices_per_s']:9.1f}"
                  f"{p['decode_slices_per_s']:9.1f}{p['mean_bytes']:8.0f}{p['passes']:8d}{p['load_s']:6.1f}s   "
                  f"encode {p['encode_fraction_of_vqvae']:.2f}, decode {p['decode_fraction_of_vqvae']:.2f}"
                  + (f"; bytes {p['bytes_over_raster_prior']:.3f}x the raster prior's"
                     if p["bytes_over_raster_prior"] and p["coding_order"] == "passes" else ""))
    print(f"\n{'classical codec (middle setting), one slice at a time':44s}{'encode':>9s}{'decode':>9s}{'bytes':>8s}")
    for name, c in r["classical"].items():
        print(f"{name + ' ' + format(c['setting'], 'g'):44s}{c['encode_slices_per_s']:9.1f}"
              f"{c['decode_slices_per_s']:9.1f}{c['mean_bytes']:8.0f}")


def int_list(text: str) -> list[int]:
    """--peak-sizes: positive integers, comma-separated (argparse's one line for anything else)."""
    values = [int(n) for n in text.split(",")]
    if min(values) < 1:
        raise ValueError(f"sizes must be positive: {text}")
    return values


def main(argv=None):
    p = ArgumentParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image side for the speed runs (default: 256)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps, each side (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them; with --compile give 3, as "
                   "the first two compile (default: 2)")
    add_runtime_flags(p, batch_size=16, batch_help="images per training step, each side")
    p.add_argument("--preset", default="seed", choices=list(PRESETS), help="the project's model (default: seed, "
                   "the yardstick's recipe)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="the project's memory format, as train.py (default: on)")
    p.add_argument("--compile", action="store_true", help="torch.compile the project's model")
    p.add_argument("--skip-reference", action="store_true", help="time the project alone")
    p.add_argument("--reference", type=Path, default=REFERENCE, help="the yardstick: a Python file with SeedVQVAE, "
                   "LR, step and Folder (default: yardstick/seed_vqvae.py in this repository)")
    p.add_argument("--peak-sizes", type=int_list, default=None,
                   help="matmul sizes for the peak FLOP/s (default: 1024,2048,4096 on the CPU, 4096,8192,16384 on "
                        "CUDA)")
    p.add_argument("--quality", action="store_true", help="compare validation SSIM after bf16 and fp32 training")
    p.add_argument("--epochs", type=int, default=20, help="--quality: epochs of each run (default: 20; the demo "
                   "train split is 240 slices)")
    p.add_argument("--data-root", default=None, help="--quality: train on this OASIS-layout folder instead of the "
                   "demo slices; --codec: where the runs' dataset is now, if it moved")
    p.add_argument("--sampling", action="store_true", help="time sampling from each prior architecture (a raster "
                   "one also by recomputing the whole prior per position)")
    p.add_argument("--samples", type=int, default=64, help="--sampling: code maps drawn at once (default: 64)")
    p.add_argument("--grid", type=int, default=32, help="--sampling: code grid side (default: 32, the default "
                   "preset's of a 256x256 slice)")
    p.add_argument("--codec", nargs="+", type=Path, metavar="RUN", help="time the .vqz codec of these VQ-VAE runs "
                   "(run folders or .pt files) with every prior*/best.pt in their folders")
    p.add_argument("--images", type=int, default=64, help="--codec: slices timed, the first of --split (default: 64)")
    p.add_argument("--split", default="test", choices=SPLITS, help="--codec: the split the slices come from "
                   "(default: test)")
    p.add_argument("--json", default=None, help="where to write the results (default: bench.json, or "
                   "bench_quality.json / bench_sampling.json / bench_codec.json with --quality / --sampling / "
                   "--codec)")
    with exits_with_one_line():
        args = p.parse_args(argv)
        check_args(args, p)
        path = Path(args.json or DEFAULT_JSON[benchmark_of(args)])
        if not path.parent.is_dir():  # checked before the benchmark runs, not after
            raise UserError(f"--json {path}: the folder {path.parent} does not exist; create it or choose another path")
        device = apply_runtime_flags(args)
        ref = None if benchmark_of(args) != "bench.py" or args.skip_reference else load_reference(args.reference)
        claim_outputs(path.parent, [path.name], "bench.py")
        if args.codec:
            results = codec_speed(args, device)
            print_codec(results)
        elif args.sampling:
            results = sampling(args, device)
            print_sampling(results)
        elif args.quality:
            results = quality(args, device)
            print(f"\nvalidation SSIM after {args.epochs} epochs of the {args.preset} preset on "
                  f"{results['settings']['data']}: "
                  f"bf16 {results['bf16']['val_ssim']:.4f}, fp32 {results['fp32']['val_ssim']:.4f}, difference "
                  f"{results['val_ssim_bf16_minus_fp32']:+.4f} (|difference| <= {TARGETS['quality_ssim_gap']:g}: "
                  f"{mark(results['targets']['quality_ssim_gap'])})")
        else:
            args.peak_sizes = args.peak_sizes or ([4096, 8192, 16384] if device.type == "cuda" else [1024, 2048, 4096])
            results = speed(args, device, ref)
            print_speed(results)
        write_json(path, results)
        print(f"wrote {path}")


# The flags each benchmark reads besides --device, --threads and --json; one given to a benchmark that does not read
# it would do nothing, and is refused (check_args).
BENCHMARK_FLAGS = {
    "bench.py": ("size", "steps", "warmup", "batch_size", "precision", "preset", "channels_last", "compile",
                 "skip_reference", "reference", "peak_sizes"),
    "bench.py --quality": ("epochs", "data_root", "preset", "batch_size", "channels_last", "compile"),
    "bench.py --sampling": ("samples", "grid", "steps", "warmup", "precision", "compile"),
    "bench.py --codec": ("images", "split", "data_root", "precision"),
}


DEFAULT_JSON = {"bench.py": "bench.json", "bench.py --quality": "bench_quality.json",
                "bench.py --sampling": "bench_sampling.json", "bench.py --codec": "bench_codec.json"}


def benchmark_of(args) -> str:
    """The benchmark the flags ask for, as BENCHMARK_FLAGS names it."""
    return next((f"bench.py --{name}" for name in ("quality", "sampling", "codec") if getattr(args, name)), "bench.py")


def check_args(args, parser):
    if min(args.size, args.steps, args.epochs, args.samples, args.grid, args.images) < 1 or args.warmup < 0:
        raise UserError("--size, --steps, --epochs, --samples, --grid and --images must be at least 1, --warmup at "
                        "least 0")
    chosen = [name for name in ("quality", "sampling", "codec") if getattr(args, name)]
    if len(chosen) > 1:
        raise UserError(f"--{chosen[0]} and --{chosen[1]} are two benchmarks: run one at a time")
    benchmark = benchmark_of(args)
    unread = [k for k, v in vars(args).items() if k not in ("quality", "sampling", "codec", "device", "threads",
                                                            "json", *BENCHMARK_FLAGS[benchmark])
              and v != parser.get_default(k)]
    if unread:
        readers = " or ".join(b for b, flags in BENCHMARK_FLAGS.items() if unread[0] in flags)
        raise UserError(f"{benchmark} does not read {flag(unread[0])} (a flag of {readers}); drop it")
    if args.compile:
        require_compiler()
    factor = PRESETS[args.preset].model.downsampling_factor
    if args.size % factor:
        raise UserError(f"--size must be a multiple of {factor} for the {args.preset} preset")


if __name__ == "__main__":
    main()
