"""Training steps and what they run on: the optimiser step, the VQ-VAE's step and its batches (train.py runs them,
bench.py times them), the prior's step, the process-wide speed settings and torch.compile."""
import shutil

import torch
import torch.nn.functional as F

from imaging.slices import to_float
from modules import VQVAE, VQVAEConfig
from training.schedule import lr_scheduler
from utils import UserError, keep_freed_memory


def optimizer_step(loss, model, opt, scheduler, grad_clip: float):
    """Backward, optional gradient clipping, then one step of the optimiser and of the LR schedule (if any)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    if scheduler is not None:
        scheduler.step()


def prior_train_step(prior, stepped, opt, scheduler, codes, labels, amp, grad_clip: float) -> torch.Tensor:
    """One step of a prior on (B, h, w) code maps [+ (B,) labels], the forward through `stepped` (the prior, or its
    torch.compile); returns the loss, mean nats per code (train_prior.py runs it, bench.py times it)."""
    with amp:
        logits = stepped(codes, labels)  # (B, K, h, w)
    loss = F.cross_entropy(logits.float(), codes)
    optimizer_step(loss, prior, opt, scheduler, grad_clip)
    return loss


# ---------------------------------------------------------------------------------------------------------
# The VQ-VAE's training step (train.py runs it, bench.py times it)
# ---------------------------------------------------------------------------------------------------------

def speed_settings(device: torch.device):
    """The process-wide part of the fast path: TF32 on CUDA; on the CPU, glibc keeps freed memory for reuse
    (utils.keep_freed_memory). bench.py times the yardstick before applying these."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # the shapes repeat every step, so the fastest kernels are worth finding
    else:
        keep_freed_memory()


def stage_images(cfg, device: torch.device, *splits, verbose: bool):
    """On CUDA, move each split's decoded uint8 images to the GPU once (the OASIS train split is 0.6 GB), so that a
    batch is one gather there: at small batches the step is bound by what the host does, and a pinned copy per
    batch costs a large share of it. Splits that do not fit stay in host memory."""
    if device.type != "cuda" or not cfg.images_on_device:
        return
    for data in splits:
        try:
            data.images = data.images.to(device)
        except torch.OutOfMemoryError:
            if verbose:
                print(f"note: the {data.split} images ({data.images.nbytes / 2**30:.1f} GiB) do not fit on "
                      f"{device}; they stay in host memory")


def batches(data, sampler, batch_size: int, device: torch.device, drop_last: bool):
    """Yield (B, 1, H, W) uint8 batches on `device`. Images were decoded once into memory (host or, after
    stage_images, the GPU), so this is an index into a tensor: no decoding, no worker processes."""
    order = torch.tensor(list(sampler), dtype=torch.long, device=data.images.device)
    stop = len(order) - batch_size + 1 if drop_last else len(order)
    for start in range(0, max(stop, 0), batch_size):
        x = data.images[order[start:start + batch_size]].unsqueeze(1)  # (B, 1, H, W) uint8
        if x.device != device:
            x = (x.pin_memory() if device.type == "cuda" else x).to(device, non_blocking=True)
        yield x


def check_one_batch(what: str, items: int, batch: int, fix: str = "lower --batch-size"):
    """UserError unless the `items` an epoch draws from (`what`: which they are) fill one batch of `batch`: with
    fewer an epoch trains no step, and the run would save its untrained model as the best one. Every trainer checks
    its data with it before anything is written."""
    if items < batch:
        raise UserError(f"{what} ({items}) are fewer than one batch ({batch}), so an epoch would train no step; {fix}")


def on_device(model: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """The model on `device`, in the channels_last memory format if asked (faster convolutions on CPU and GPU)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def adam_and_schedule(model: torch.nn.Module, cfg, total_steps: int):
    """Adam over the model's trainable weights at cfg.lr, and its LR schedule (warmup, cfg.lr_schedule) of
    `total_steps`: every trainer's optimiser."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    return opt, lr_scheduler(opt, cfg, total_steps)


def vqvae_and_optimiser(cfg, model_cfg: VQVAEConfig, device: torch.device, total_steps: int):
    """A new VQ-VAE (on `device`, channels_last unless --no-channels-last), its Adam optimiser and LR schedule."""
    model = on_device(VQVAE(model_cfg), device, cfg.channels_last)
    return (model, *adam_and_schedule(model, cfg, total_steps))


def require_compiler():
    """--compile's precondition, checked before a run folder is made."""
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise UserError("--compile needs a C++ compiler (torch.compile generates and builds C++/Triton code) and "
                        "none was found; install g++ or drop --compile")


def compile_model(model: torch.nn.Module, device: torch.device, distributed: bool) -> torch.nn.Module:
    """torch.compile. On a single CUDA GPU also with CUDA graphs ("reduce-overhead"): at the seed's batch of 16 the
    step is bound by kernel launches, which graphs remove. Under DDP the gradient all-reduce runs between graph
    segments, so there the default mode. On the CPU, random ops (the priors' dropout) draw from ATen's generator
    instead of inductor's, which fills dropout masks element by element; so the compiled model is faster with
    dropout, and draws the eager model's random numbers and trains to its weights."""
    if device.type == "cpu":
        from torch._inductor import config as inductor_config  # loaded only by a compiled run
        inductor_config.fallback_random = True
    single_gpu = device.type == "cuda" and not distributed
    return torch.compile(model, mode="reduce-overhead" if single_gpu else None)


def train_step(model, opt, scheduler, x, cfg, autocast, corrupt=None):
    """One optimisation step on a (B, 1, H, W) uint8 batch; returns the model output and the loss. Nothing in it
    waits for the device. bench.py times exactly this. With `corrupt` (denoising), the model reads corrupt(x) and
    its reconstruction loss is taken against the clean x."""
    x = to_float(x)
    target = None if corrupt is None else x
    inputs = x if corrupt is None else corrupt(x)
    if cfg.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with autocast:
        out = model(inputs, target)
    loss = sum(out.losses.values())
    optimizer_step(loss, model, opt, scheduler, cfg.grad_clip)
    return out, loss
