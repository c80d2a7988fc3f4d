"""The models: the VQ-VAE (van den Oord et al. 2017, arXiv:1711.00937) and the autoregressive prior over its codes.

- VQ-VAE: `Encoder -> VectorQuantizer -> Decoder` (VQVAE), its config (VQVAEConfig) and the presets (PRESETS: model
  and optimiser settings together); the quantiser's straight-through estimator, EMA codebook, k-means
  initialisation and dead-code restarts (kept identical on every DDP rank by training/distributed.py's collectives);
- prior: PriorConfig and build_prior; Prior (sampling and completion, by driving a prior in its coding order), a
  gated PixelCNN (PixelCNNPrior: causal convolutions, gated layers), a causal transformer (TransformerPrior:
  GPT blocks, a KV cache), both in raster order, and a multiscale prior that codes a map in a few parallel passes
  (MultiscalePrior);
- tissue segmenter, the judge of anatomy: SegmenterConfig and a small U-Net (UNet);
- config plumbing shared with checkpoints.py: ConfigError, config_from_dict, first_failure.

Every hyper-parameter lives in a config dataclass saved inside every checkpoint, so the exact model can be rebuilt
from the file alone.
"""
import copy
import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from imaging.quality import centre_crop_of_windows, ssim, ssim_map
from imaging.slices import to_unit
from training.distributed import all_reduce_sum, broadcast_from_rank0

IMAGE_CHANNELS = 1  # grayscale MRI: every loader yields one channel


class ConfigError(ValueError):
    """A config field holds a value it cannot take."""

    def __init__(self, what: str, field: str, value):
        super().__init__(f"invalid {what} value for {field}: {value!r}")
        self.field, self.value = field, value


def first_failure(config, checks: dict[str, bool], what: str):
    """The one validation idiom of every config's __post_init__: ConfigError naming the first field that fails."""
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ConfigError(what, bad[0], getattr(config, bad[0]))


def config_from_dict(cls, values: dict, legacy: dict | None = None):
    """Build the dataclass `cls` from a dict read from a checkpoint or JSON, refusing unknown fields and values of
    the wrong type (a config from a file someone hands you is checked as strictly as flags). `legacy` maps removed
    fields to the only value they could have had; a file that holds exactly that value still loads."""
    if not isinstance(values, dict):
        raise ValueError(f"{cls.__name__} is a {type(values).__name__}, not a mapping")
    values = {k: v for k, v in values.items() if not (legacy and k in legacy and v == legacy[k])}
    known = {f.name: f.type for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    for name, value in values.items():
        allowed = getattr(known[name], "__args__", (known[name],))  # int | None -> (int, NoneType)
        ok = any(value is None if t is type(None) else
                 isinstance(value, (int, float)) and not isinstance(value, bool) if t is float else
                 isinstance(value, t) and (t is bool or not isinstance(value, bool)) for t in allowed)
        if not ok:
            raise ValueError(f"{cls.__name__}.{name} is {value!r}, not of type {known[name]}")
    return cls(**values)


@dataclass(frozen=True)
class VQVAEConfig:
    hidden_channels: int = 128      # width of every conv layer outside the residual branches
    downsamplings: int = 3          # each halves H and W: latent_grid = (H / 2^n, W / 2^n)
    residual_blocks: int = 0        # residual blocks at the latent resolution, in encoder and in decoder
    residual_channels: int = 64     # width inside a residual branch
    norm: str = "batch"             # "batch", "group" or "none"
    codebook_size: int = 32         # K
    embedding_dim: int = 128        # D
    commitment_cost: float = 0.25   # beta
    ssim_weight: float = 0.0        # reconstruction loss = MSE + ssim_weight * (1 - SSIM as scored, on [0, 1])
    tissue_weight: float = 0.0      # the loss counts the head's pixels 1 + tissue_weight times a background pixel
    gradient_weight: float = 0.0    # + gradient_weight * mean |image gradient difference|: sharp tissue boundaries
    codebook_update: str = "loss"   # "loss": codebook term in the loss; "ema": exponential moving averages
    ema_decay: float = 0.99         # EMA codebook: decay of the running counts and sums
    kmeans_init: bool = False       # initialise the codebook by k-means on the first training batch
    dead_code_threshold: float = 0.0  # restart codes whose EMA usage per step drops below this (0: never)
    output: str = "tanh"            # the decoder's last activation: tanh, or linear (clamped to [-1, 1] in eval)

    CHOICES = {"norm": ("batch", "group", "none"), "codebook_update": ("loss", "ema"), "output": ("tanh", "linear")}
    # Upper bounds keep a mistyped value (--codebook-size 1e10) from allocating before anything else is checked.
    LIMITS = {"hidden_channels": 4096, "residual_blocks": 64, "residual_channels": 4096, "codebook_size": 65536,
              "embedding_dim": 4096}

    def __post_init__(self):
        first_failure(self, {
            "hidden_channels": 1 <= self.hidden_channels <= self.LIMITS["hidden_channels"],
            "downsamplings": 1 <= self.downsamplings <= 6,
            "residual_blocks": 0 <= self.residual_blocks <= self.LIMITS["residual_blocks"],
            "residual_channels": 1 <= self.residual_channels <= self.LIMITS["residual_channels"],
            "norm": self.norm in self.CHOICES["norm"],
            "codebook_size": 2 <= self.codebook_size <= self.LIMITS["codebook_size"],
            "embedding_dim": 1 <= self.embedding_dim <= self.LIMITS["embedding_dim"],
            "commitment_cost": 0 <= self.commitment_cost < float("inf"),
            "ssim_weight": 0 <= self.ssim_weight < float("inf"),
            "tissue_weight": 0 <= self.tissue_weight < float("inf"),
            "gradient_weight": 0 <= self.gradient_weight < float("inf"),
            "codebook_update": self.codebook_update in self.CHOICES["codebook_update"],
            "output": self.output in self.CHOICES["output"],
            "ema_decay": 0 <= self.ema_decay < 1, "dead_code_threshold": 0 <= self.dead_code_threshold < float("inf"),
        }, "model config")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** self.downsamplings

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        f = self.downsampling_factor
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not divisible by 2^downsamplings = {f}; "
                             f"pass --image-size with a multiple of {f}")
        return height // f, width // f

    def bits_per_image(self, height: int, width: int) -> float:
        h, w = self.latent_grid(height, width)
        return h * w * math.log2(self.codebook_size)

    @classmethod
    def from_dict(cls, values: dict) -> "VQVAEConfig":
        return config_from_dict(cls, values, legacy={"in_channels": 1, "reconstruction_loss": "mse"})


@dataclass(frozen=True)
class Preset:
    """A named recipe: the model and the optimiser and batch settings that go with it."""
    model: VQVAEConfig
    lr: float
    lr_schedule: str   # "constant" or "cosine" (after warmup)
    warmup_steps: int
    grad_clip: float   # largest gradient norm (0: no clipping)
    batch_size: int    # images per step and process
    train_crop: int = 0  # train on random crops of this side where the images are larger (0: whole images)


PRESETS = {
    # The first report's recipe, layer for layer (bench.py's yardstick, yardstick/seed_vqvae.py, is its plain first
    # version): Adam at 2e-3, constant.
    "seed": Preset(VQVAEConfig(), lr=2e-3, lr_schedule="constant", warmup_steps=0, grad_clip=0.0, batch_size=16),
    # Same latent grid (H/8 x W/8) and codebook size (K=32) as seed, so the same bits per slice. Each choice was
    # measured on real OASIS validation under one 10-minute CPU budget (RESULTS.md, ablation): 64 channels, not
    # 128 (3.4x the steps per second on a CPU); MSE + 0.5 (1 - SSIM), sharper edges and texture than MSE alone; a
    # 100-step warmup and gradient clipping, without which the first steps of this normalisation-free net can kill
    # its ReLUs (the decoder then draws one grey blob for every slice). No normalisation layers: BatchNorm ties the
    # model to batch statistics, GroupNorm was slower and no better. Residual blocks at the latent resolution are
    # cheap there and add capacity where the bits are decided. A linear output, not tanh: most of a slice is black
    # (-1), where tanh's gradient vanishes. Batches of 4, not 16: on a CPU the images per second barely change, so
    # a time budget buys 4x the updates (validation SSIM after 10 minutes: OASIS 0.878 -> 0.909, ADNI 0.856 -> 0.882).
    "default": Preset(VQVAEConfig(hidden_channels=64, residual_blocks=4, residual_channels=64, norm="none",
                                  embedding_dim=64, codebook_update="ema", ema_decay=0.8, kmeans_init=True,
                                  dead_code_threshold=2.0, ssim_weight=0.5, output="linear"),
                      lr=2e-3, lr_schedule="cosine", warmup_steps=100, grad_clip=1.0, batch_size=4),
    # Higher fidelity: a 4x finer grid (H/4 x W/4) and K=256; otherwise default's recipe, trained on random
    # 128x128 crops: a quarter of the pixels per step, so up to 4x the steps in the same time, each on more anatomy and
    # less background (OASIS validation SSIM after 30 minutes: 0.9793 on whole slices, 0.9816 on crops on a slower
    # CPU); the model still codes whole slices.
    "hq": Preset(VQVAEConfig(hidden_channels=64, downsamplings=2, residual_blocks=2, residual_channels=64,
                             norm="none", codebook_size=256, embedding_dim=64, codebook_update="ema", ema_decay=0.8,
                             kmeans_init=True, dead_code_threshold=2.0, ssim_weight=0.5, output="linear"),
                 lr=2e-3, lr_schedule="cosine", warmup_steps=100, grad_clip=1.0, batch_size=4, train_crop=128),
}


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    return nn.Identity()


class DownBlock(nn.Sequential):
    """Conv 4x4 stride 2 -> norm -> ReLU: halves H and W."""

    def __init__(self, in_channels: int, out_channels: int, norm: str):
        super().__init__(nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1),
                         make_norm(norm, out_channels), nn.ReLU(inplace=True))


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d with the bias added after the convolution rather than inside it: the same parameters and
    result, but oneDNN (CPU) computes a transposed convolution's bias gradient very slowly. bf16, channels_last,
    batch 16, 128 -> 128 channels, 64x64 -> 128x128, one core: backward 400 ms with the bias inside, 175 ms
    without; the separate add and its gradient cost ~25 ms."""

    def forward(self, x):
        y = F.conv_transpose2d(x, self.weight, None, self.stride, self.padding, self.output_padding, self.groups,
                               self.dilation)
        return y + self.bias.view(-1, 1, 1).to(y.dtype)


class UpBlock(nn.Sequential):
    """Transposed conv 4x4 stride 2 -> norm -> ReLU: doubles H and W."""

    def __init__(self, in_channels: int, out_channels: int, norm: str):
        super().__init__(ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1),
                         make_norm(norm, out_channels), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """x + Conv1x1(ReLU(norm(Conv3x3(ReLU(x))))), as in the VQ-VAE paper."""

    def __init__(self, channels: int, residual_channels: int, norm: str):
        super().__init__()
        # The first ReLU must not be in place: x also feeds the skip connection.
        self.branch = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, residual_channels, 3, padding=1),
            make_norm(norm, residual_channels), nn.ReLU(inplace=True),
            nn.Conv2d(residual_channels, channels, 1),
        )

    def forward(self, x):
        return x + self.branch(x)


def residual_stack(c: VQVAEConfig) -> nn.Sequential:
    blocks = [ResidualBlock(c.hidden_channels, c.residual_channels, c.norm) for _ in range(c.residual_blocks)]
    if blocks:
        blocks.append(nn.ReLU())
    return nn.Sequential(*blocks)


def needs_projection(c: VQVAEConfig) -> bool:
    """The seed recipe maps straight to D channels; anything else gets a 1x1 projection to/from D."""
    return c.residual_blocks > 0 or c.hidden_channels != c.embedding_dim


class Encoder(nn.Module):
    """(B, C, H, W) image -> (B, D, H/2^n, W/2^n) continuous latents z_e."""

    def __init__(self, c: VQVAEConfig):
        super().__init__()
        project = needs_projection(c)
        widths = [IMAGE_CHANNELS] + [c.hidden_channels] * c.downsamplings
        if not project:
            widths[-1] = c.embedding_dim
        self.down = nn.Sequential(*[DownBlock(i, o, c.norm) for i, o in zip(widths, widths[1:])])
        self.residual = residual_stack(c)
        self.project = nn.Conv2d(c.hidden_channels, c.embedding_dim, 1) if project else nn.Identity()

    def forward(self, x):
        return self.project(self.residual(self.down(x)))


class Decoder(nn.Module):
    """(B, D, h, w) quantised latents -> (B, C, h * 2^n, w * 2^n) image in [-1, 1] (linear output: in training,
    unclamped)."""

    def __init__(self, c: VQVAEConfig):
        super().__init__()
        project = needs_projection(c)
        width = c.hidden_channels if project else c.embedding_dim
        self.project = nn.Conv2d(c.embedding_dim, c.hidden_channels, 1) if project else nn.Identity()
        self.residual = residual_stack(c)
        self.up = nn.Sequential(*[UpBlock(width if i == 0 else c.hidden_channels, c.hidden_channels, c.norm)
                                  for i in range(c.downsamplings - 1)])
        self.to_image = ConvTranspose2d(c.hidden_channels, IMAGE_CHANNELS, 4, stride=2, padding=1)
        self.tanh = c.output == "tanh"

    def forward(self, z):
        x = self.to_image(self.up(self.residual(self.project(z))))
        if self.tanh:
            return torch.tanh(x)
        return x if self.training else x.clamp(-1, 1)  # no clamp in training: it would stop gradients as tanh does


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor        # (B, D, h, w), straight-through: forward = codes, backward = identity to z_e
    indices: torch.Tensor          # (B, h, w) int64
    codebook_loss: torch.Tensor    # ||sg(z_e) - z_q||^2 (zero when the codebook is EMA-updated)
    commitment_loss: torch.Tensor  # beta * ||z_e - sg(z_q)||^2
    code_counts: torch.Tensor      # (K,) how often each code was chosen in this batch (this rank)


def kmeans(x: torch.Tensor, k: int, iters: int = 10) -> torch.Tensor:
    """Lloyd's k-means on (N, D) rows; returns (k, D) centroids. Empty clusters keep their old centroid."""
    centroids = x[torch.randperm(x.shape[0], device=x.device)[:k]]
    if centroids.shape[0] < k:  # fewer vectors than codes: repeat them
        centroids = x[torch.randint(0, x.shape[0], (k,), device=x.device)]
    for _ in range(iters):
        assign = squared_distances(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = count_codes(assign, k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


def count_codes(indices: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) code indices -> (k,) int64 counts. Not torch.bincount: on CUDA it reads the largest index back to
    the host to size its output, a synchronisation in every training step."""
    return torch.zeros(k, dtype=torch.long, device=indices.device).index_add_(0, indices, torch.ones_like(indices))


def squared_distances(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N, K) squared L2 distances as one matmul: ||x||^2 - 2 x.e + ||e||^2."""
    return torch.addmm((codebook * codebook).sum(1), x, codebook.t(), alpha=-2).add_((x * x).sum(1, keepdim=True))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook with a straight-through estimator.

    The codebook is learned either by its loss term (`update="loss"`, the paper's eq. 3) or by exponential
    moving averages of the assigned encoder outputs (`update="ema"`, paper appendix A.1), with optional
    k-means initialisation and dead-code restarts. Distances and EMA statistics are always fp32, even
    under autocast, and EMA statistics are summed over all ranks so every rank keeps the same codebook.
    """

    def __init__(self, codebook_size: int, embedding_dim: int, commitment_cost: float = 0.25,
                 update: str = "loss", ema_decay: float = 0.99, kmeans_init: bool = False,
                 dead_code_threshold: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.codebook_size, self.embedding_dim = codebook_size, embedding_dim
        self.commitment_cost, self.update, self.ema_decay, self.eps = commitment_cost, update, ema_decay, eps
        self.kmeans_init, self.dead_code_threshold = kmeans_init, dead_code_threshold
        codebook = torch.empty(codebook_size, embedding_dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        if update == "loss":
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
            self.register_buffer("ema_sum", codebook.clone())
        self.register_buffer("usage", torch.ones(codebook_size))  # EMA of assignments per step, per code
        self.register_buffer("initialised", torch.tensor(not kmeans_init))
        self._initialised_checked = False  # read the buffer (a host sync) once, not every step

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) nearest codes, in fp32 whatever autocast says: bf16 distances pick other codes."""
        with torch.no_grad(), torch.autocast(flat.device.type, enabled=False):
            return squared_distances(flat.float(), self.codebook.float()).argmin(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) indices -> (B, D, h, w) codes."""
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2)

    def quantize_indices(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) latents -> (B, h, w) nearest-code indices; no statistics are updated."""
        b, d, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        return self.nearest(flat).view(b, h, w)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            b, d, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (N, D), N = B*h*w
            if self.training and not self._initialised_checked:
                if not self.initialised:
                    self._initialise(flat.detach())
                self._initialised_checked = True
            indices = self.nearest(flat)  # (N,)
            counts = count_codes(indices, self.codebook_size)
            codes = self.lookup(indices.view(b, h, w))  # (B, D, h, w)
            commitment = self.commitment_cost * F.mse_loss(z, codes.detach())
            if self.update == "loss":
                codebook_loss = F.mse_loss(codes, z.detach())
            else:
                codebook_loss = z.new_zeros(())
            # Straight-through estimator in training; in eval the codes themselves, so that a reconstruction equals
            # decode_indices of its code map bit for bit (what compress.py decodes).
            quantized = z + (codes - z).detach() if self.training else codes
            # Only now, after this batch was quantised with the codes it was assigned to: moving the codebook (EMA,
            # restarts) first would hand a vector the new value of a code restarted in this very step.
            if self.training:
                self._update_statistics(flat.detach(), indices, counts)
        return QuantizerOutput(quantized, indices.view(b, h, w), codebook_loss, commitment, counts)

    @torch.no_grad()
    def _initialise(self, flat: torch.Tensor):
        self.codebook.data.copy_(broadcast_from_rank0(kmeans(flat, self.codebook_size)))
        if self.update == "ema":
            self.ema_sum.copy_(self.codebook)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _update_statistics(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor):
        """EMA usage (and, for EMA codebooks, the codebook itself), then dead-code restarts."""
        counts = all_reduce_sum(counts.float())
        decay = self.ema_decay
        self.usage.mul_(decay).add_(counts, alpha=1 - decay)
        if self.update == "ema":
            sums = all_reduce_sum(torch.zeros_like(self.codebook).index_add_(0, indices, flat))
            self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
            n = self.usage.sum()
            smoothed = (self.usage + self.eps) / (n + self.codebook_size * self.eps) * n  # Laplace smoothing
            smoothed = smoothed.unsqueeze(1)
            # A code that has never been assigned (zero statistics) keeps its value instead of becoming 0/0.
            self.codebook.copy_(torch.where(smoothed > 0, self.ema_sum / smoothed.clamp(min=1e-12), self.codebook))
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(flat)

    def _restart_dead_codes(self, flat: torch.Tensor):
        """Move codes used less than the threshold onto random encoder outputs of this batch (rank 0's).

        Written without data-dependent branches so it costs no host sync."""
        dead = (self.usage < self.dead_code_threshold).unsqueeze(1)  # (K, 1)
        samples = broadcast_from_rank0(flat[torch.randint(0, flat.shape[0], (self.codebook_size,),
                                                          device=flat.device)].contiguous())
        self.codebook.data.copy_(torch.where(dead, samples, self.codebook))
        self.usage.copy_(torch.where(dead.squeeze(1), torch.full_like(self.usage, self.dead_code_threshold),
                                     self.usage))
        if self.update == "ema":
            self.ema_sum.copy_(torch.where(dead, samples * self.dead_code_threshold, self.ema_sum))


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean of `values`, each counted `weights` times (a plain mean for None)."""
    return values.mean() if weights is None else (values * weights).sum() / weights.sum()


@torch.no_grad()
def head_weights(x: torch.Tensor, tissue_weight: float) -> torch.Tensor:
    """(B, 1, H, W) images in [-1, 1] -> per-pixel loss weights: 1 + tissue_weight on the head (pixels above 10 %
    grey, closed over 7x7 windows so that the dark sulci and ventricles inside count too), 1 on the background. A
    rule on the image alone, so it works for every dataset and costs two poolings per step; the skull and scalp
    that OASIS slices keep count as head."""
    bright = (x > -0.8).float()
    closed = -F.max_pool2d(-F.max_pool2d(bright, 7, 1, 3), 7, 1, 3)  # dilate, then erode
    return 1 + tissue_weight * closed


def gradient_difference(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean |d x_hat - d x| over the horizontal and vertical finite differences of (B, C, H, W) images."""
    def gradients(im):
        return im[..., :, 1:] - im[..., :, :-1], im[..., 1:, :] - im[..., :-1, :]
    (hx, vx), (h, v) = gradients(x_hat), gradients(x)
    return ((hx - h).abs().mean() + (vx - v).abs().mean()) / 2


class VQVAEOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, C, H, W) in [-1, 1]
    losses: dict                  # reconstruction, codebook, commitment; the training loss is their sum
    indices: torch.Tensor         # (B, h, w)
    code_counts: torch.Tensor     # (K,)


class VQVAE(nn.Module):
    """Encoder -> VectorQuantizer -> Decoder."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(config.codebook_size, config.embedding_dim, config.commitment_cost,
                                         config.codebook_update, config.ema_decay, config.kmeans_init,
                                         config.dead_code_threshold)
        self.decoder = Decoder(config)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, h, w) code indices."""
        return self.quantizer.quantize_indices(self.encoder(x))

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code indices -> (B, C, H, W) images in [-1, 1]."""
        return self.decoder(self.quantizer.lookup(indices))

    def reconstruction_loss(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """MSE, plus the SSIM the model is scored with when ssim_weight > 0: MSE alone spends the bits on the bright
        tissue's intensity and blurs the edges and texture that SSIM (a product of local contrast and structure
        terms) rewards. SSIM is not shift-invariant, so it is taken on [0, 1] (clamped) exactly as scored.

        Two options spend the bits on tissue, which a plain mean over a slice spends half on black background:
        tissue_weight weighs both terms' pixels by head_weights; gradient_weight adds the mean absolute difference of
        the images' horizontal and vertical gradients, which a blurred sulcus or cortical ribbon pays for in full
        where MSE charges it only the square of a small intensity error."""
        c = self.config
        x_hat, x = x_hat.float(), x.float()
        weights = head_weights(x, c.tissue_weight) if c.tissue_weight else None  # (B, 1, H, W)
        loss = weighted_mean((x_hat - x).square(), weights)
        if c.ssim_weight:
            if weights is None:
                similarity = ssim(to_unit(x_hat), to_unit(x)).mean()
            else:
                similarity = weighted_mean(ssim_map(to_unit(x_hat), to_unit(x)), centre_crop_of_windows(weights))
            loss = loss + c.ssim_weight * (1 - similarity)
        if c.gradient_weight:
            loss = loss + c.gradient_weight * gradient_difference(x_hat, x)
        return loss

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> VQVAEOutput:
        """The reconstruction loss is taken against `target` where given (denoising: the clean image of a noisy
        x), else against x itself."""
        q = self.quantizer(self.encoder(x))
        x_hat = self.decoder(q.quantized)
        losses = {"reconstruction": self.reconstruction_loss(x_hat, x if target is None else target),
                  "codebook": q.codebook_loss,
                  "commitment": q.commitment_loss}
        return VQVAEOutput(x_hat, losses, q.indices, q.code_counts)


# ---------------------------------------------------------------------------------------------------------
# Prior: an autoregressive model over code maps, a gated PixelCNN, a causal transformer or a multiscale prior
# ---------------------------------------------------------------------------------------------------------
# p(z) = prod_t p(z_t | z_<t [, class]) over the (B, h, w) code-index maps of a trained VQ-VAE, in the prior's
# coding order: raster order t = i*w + j (pixelcnn, transformer), or groups of positions coded together, coarse
# lattices first (multiscale). New slices are decoded from sampled maps; the codec entropy-codes a map with the
# same conditionals. Every prior trains on whole maps at once (forward) and fills maps in its coding order
# (Prior.fill: one position at a time through `incremental` for the raster priors, one network pass per group for
# the multiscale prior), which sampling, completion and the codec all run.

PRIOR_ARCHS = ("pixelcnn", "transformer", "multiscale")
# The multiscale prior's passes per level: the offsets (row, column) in the level's 2x2 cells that each codes, given
# the offsets coded before (a cell's (0, 0) code belongs to the coarser lattice, coded by the levels above).
MULTISCALE_PHASES = {1: (((1, 1), (0, 1), (1, 0)),),
                     2: (((1, 1),), ((0, 1), (1, 0))),  # centres, then the rest: a checkerboard (He et al. 2021)
                     3: (((1, 1),), ((0, 1),), ((1, 0),))}


@dataclass(frozen=True)
class PriorConfig:
    arch: str = "pixelcnn"    # pixelcnn (gated PixelCNN), transformer (GPT): raster order; multiscale: a few passes
    codebook_size: int = 32   # K, the VQ-VAE's; the prior reads and predicts code indices in [0, K)
    channels: int = 64        # width: of both PixelCNN stacks, the transformer's embedding, the multiscale convolutions
    layers: int = 12          # gated layers (the first also hides the current position), or blocks (the others)
    kernel_size: int = 5      # odd k: PixelCNN rows above seen k//2, columns k//2 a side; multiscale: k x k convs
    heads: int = 4            # transformer: attention heads (they split the channels)
    max_grid: int = 64        # largest grid side the learned row and column embeddings cover (all but plain pixelcnn)
    num_classes: int = 0      # 0: unconditional; otherwise the prior is conditioned on a label in [0, num_classes)
    dropout: float = 0.0      # pixelcnn: horizontal stack's gates; transformer: attention, MLP; multiscale: its blocks
    positions: bool = False   # pixelcnn: add learned row and column embeddings to the codes' (the others have them)
    levels: int = 4           # multiscale: codes every 2^levels a side come first, each level then halves the spacing
    phases: int = 2           # multiscale: passes per level (2: a checkerboard); a map takes 1 + levels * phases passes

    CHOICES = {"arch": PRIOR_ARCHS, "phases": tuple(MULTISCALE_PHASES)}

    def __post_init__(self):
        first_failure(self, {"arch": self.arch in PRIOR_ARCHS,
                             "codebook_size": 2 <= self.codebook_size <= VQVAEConfig.LIMITS["codebook_size"],
                             "channels": 1 <= self.channels <= 4096, "layers": 1 <= self.layers <= 256,
                             "kernel_size": 3 <= self.kernel_size <= 63 and self.kernel_size % 2 == 1,
                             "heads": 1 <= self.heads <= 256 and self.channels % self.heads == 0,
                             "max_grid": 1 <= self.max_grid <= 2048,
                             "num_classes": 0 <= self.num_classes <= 10000, "dropout": 0 <= self.dropout < 1,
                             "positions": not self.positions or self.arch == "pixelcnn",
                             "levels": 1 <= self.levels <= 11, "phases": self.phases in MULTISCALE_PHASES},
                      "prior config")


# What --arch alone gives besides PriorConfig's defaults: the size each architecture was measured at (RESULTS.md).
PRIOR_ARCH_DEFAULTS = {"pixelcnn": {}, "transformer": {"channels": 128, "layers": 4, "heads": 4},
                       "multiscale": {"layers": 3, "kernel_size": 3}}


def prior_config(**values) -> PriorConfig:
    """PriorConfig(**values), the fields not given taken from its architecture's defaults."""
    return PriorConfig(**{**PRIOR_ARCH_DEFAULTS.get(values.get("arch", "pixelcnn"), {}), **values})


class Prior(nn.Module):
    """What every prior shares: forward maps (B, h, w) indices [+ (B,) labels] to (B, K, h, w) logits, those at
    (i, j) depending only on the codes before (i, j) in the prior's coding order; `fill` computes the same logits in
    that order (a raster prior one position at a time through `incremental`, each map's whole cost once); `sample`,
    completion and the codec drive it."""
    config: PriorConfig
    raster_order = True  # codes one position at a time in raster order (False: a few groups of positions at once)

    def labels_for(self, n: int, class_index: int | None = None) -> torch.Tensor | None:
        """(n,) labels to sample with: `class_index` for all, or every class in turn; None if unconditional."""
        if not self.config.num_classes:
            return None
        return torch.full((n,), class_index) if class_index is not None else torch.arange(n) % self.config.num_classes

    def check_labels(self, labels):
        if self.config.num_classes and labels is None:
            raise ValueError("this prior is class-conditional: pass labels")

    def fits(self, h: int, w: int) -> bool:
        """Whether the prior can model h x w code maps."""
        return True

    def incremental(self, n: int, h: int, w: int, labels=None, dtype=torch.float32):
        """A generator over the h*w positions of n maps in raster order: it yields the (n, K) logits (in `dtype`) of
        a position and must then be sent the (n,) codes at that position (fill_in_raster_order runs one)."""
        raise NotImplementedError

    def passes(self, h: int, w: int) -> int:
        """How many sequential steps `fill` takes for an h x w map: network runs one after the other."""
        return h * w

    def fill(self, n: int, h: int, w: int, labels, choose, dtype=torch.float32):
        """Fill n (h, w) code maps in the prior's coding order. choose(positions, logits) gets the flat raster
        indices (m,) (int64, on the CPU) of the positions coded together next and their (n, m, K) logits in
        `dtype`, and returns their (n, m) codes (drawn, given or decoded), on which later positions are
        conditioned. A raster prior calls it for one position at a time."""
        order = torch.arange(h * w)
        fill_in_raster_order(self.incremental(n, h, w, labels, dtype), h * w,
                             lambda pos, logits: choose(order[pos:pos + 1], logits[:, None])[:, 0])

    @torch.no_grad()
    def sample(self, n: int, shape: tuple[int, int], labels=None, temperature: float = 1.0, generator=None,
               given: torch.Tensor | None = None, given_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Draw n code maps of `shape` (h, w) in the prior's coding order -> (n, h, w) int64. Positions where
        `given_mask` ((n, h, w) or (h, w), bool) is True keep the codes of `given` (n, h, w): completion of partial
        maps (a multiscale prior sees a given code only from its pass on, so its completion is conditioned on the
        given codes coded before each position, not on all of them)."""
        h, w = shape
        device = next(self.parameters()).device
        keep = (given_mask if given_mask is not None else torch.zeros(h, w, dtype=torch.bool)).to(device)
        keep = keep.expand(n, h, w).reshape(n, -1)
        given = given.to(device).reshape(n, -1) if given is not None else torch.zeros(n, h * w, dtype=torch.long,
                                                                                       device=device)
        codes = torch.zeros(n, h * w, dtype=torch.long, device=device)

        def draw(positions, logits):
            positions = positions.to(device)
            probs = F.softmax(logits.float() / temperature, dim=2)  # (n, m, K)
            drawn = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(n, -1)
            codes[:, positions] = torch.where(keep[:, positions], given[:, positions], drawn)
            return codes[:, positions]
        labels = labels.to(device) if labels is not None else None
        self.fill(n, h, w, labels, draw)
        return codes.view(n, h, w)


def fill_in_raster_order(steps, positions: int, choose):
    """Fill code maps position by position in raster order through a Prior.incremental generator `steps`:
    choose(position, logits) returns the (n,) codes of each position (drawn, given, or decoded), sent back to it."""
    logits = next(steps)
    for pos in range(positions):
        codes = choose(pos, logits)
        try:
            logits = steps.send(codes)
        except StopIteration:
            assert pos == positions - 1


def build_prior(config: PriorConfig) -> Prior:
    return {"pixelcnn": PixelCNNPrior, "transformer": TransformerPrior,
            "multiscale": MultiscalePrior}[config.arch](config)


# -- gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders") ------------

class CausalConv2d(nn.Conv2d):
    """A convolution whose output at (i, j) sees only a causal window of its input.

    "vertical": rows i - k//2 .. i, columns j - k//2 .. j + k//2 (a (k//2 + 1) x k kernel, padded above);
    "horizontal": row i, columns j - k//2 .. j (a 1 x (k//2 + 1) kernel, padded on the left).
    With include_center=False (mask 'A', first layer) the kernel's last row (vertical) or column (horizontal)
    is masked out, so row i (vertical) or position (i, j) (horizontal) is hidden too. Kernels are only the
    causal half, so no multiply is spent on masked-out taps except those of the first layer."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, direction: str, include_center: bool):
        r = kernel_size // 2
        kernel, self.padding_lrtb = {"vertical": ((r + 1, kernel_size), (r, r, r, 0)),
                                     "horizontal": ((1, r + 1), (r, 0, 0, 0))}[direction]
        super().__init__(in_channels, out_channels, kernel)
        mask = torch.ones(kernel)
        if not include_center:
            if direction == "vertical":
                mask[-1] = 0
            else:
                mask[:, -1] = 0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        return F.conv2d(F.pad(x, self.padding_lrtb), self.weight * self.mask, self.bias)  # same (h, w) as x


def gate(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """(B, 2C, ...) -> (B, C, ...): tanh(a) * sigmoid(b), the paper's gated activation, a and b the two halves of
    `dim` (the channels: 1, or -1 for channels-last buffers such as the incremental procedure's)."""
    a, b = x.chunk(2, dim=dim)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedMaskedConv(nn.Module):
    """One gated layer of both stacks (paper fig. 2).

    The vertical stack sees the rows above the current one, the horizontal stack the current row left of the
    current position; vertical features flow into the horizontal stack (1x1 conv), never back, which is what
    removes the original PixelCNN's blind spot without leaking the future. The horizontal stack is residual
    except in the first layer, where the identity would pass the current position through."""

    def __init__(self, channels: int, kernel_size: int, first: bool, num_classes: int, dropout: float):
        super().__init__()
        self.vertical = CausalConv2d(channels, 2 * channels, kernel_size, "vertical", include_center=not first)
        self.horizontal = CausalConv2d(channels, 2 * channels, kernel_size, "horizontal", include_center=not first)
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.dropout = nn.Dropout(dropout)
        self.condition = nn.Embedding(num_classes, 2 * channels) if num_classes else None
        self.residual = not first

    def class_bias(self, labels: torch.Tensor | None):
        """(B,) labels -> (B, 2C, 1, 1) per-class bias added before both gates (the paper's V^T h), or 0."""
        if self.condition is None:
            return 0
        return self.condition(labels)[:, :, None, None]

    def vertical_step(self, v: torch.Tensor, labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) -> next vertical features (B, C, h, w) and their input to the horizontal stack (B, 2C, h, w)."""
        features = self.vertical(v)
        return gate(features + self.class_bias(labels)), self.vertical_to_horizontal(features)

    def horizontal_step(self, h: torch.Tensor, from_vertical: torch.Tensor, labels=None) -> torch.Tensor:
        """(B, C, h, w), (B, 2C, h, w) -> (B, C, h, w)."""
        out = self.horizontal_out(self.dropout(gate(self.horizontal(h) + from_vertical + self.class_bias(labels))))
        return h + out if self.residual else out


def grid_positions(prior: Prior, h: int, w: int) -> torch.Tensor:
    """(h, w, C): the sum of the prior's learned row and column embeddings at each position of an h x w grid."""
    if not prior.fits(h, w):
        raise ValueError(f"a {h}x{w} code grid is larger than this prior's max_grid {prior.config.max_grid}")
    device = prior.rows.weight.device
    return prior.rows(torch.arange(h, device=device))[:, None] + prior.columns(torch.arange(w, device=device))[None]


class PixelCNNPrior(Prior):
    """Gated PixelCNN over code maps: (B, h, w) indices [+ (B,) labels] -> (B, K, h, w) logits."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.codebook_size, c.channels)
        if c.positions:  # registered slices: where a code sits says much about which it is
            self.rows, self.columns = nn.Embedding(c.max_grid, c.channels), nn.Embedding(c.max_grid, c.channels)
            for table in (self.rows, self.columns):  # zero: training starts from the prior without positions (at
                nn.init.zeros_(table.weight)         # the codes' scale they slowed its first epoch by 0.02 bits)
        self.layers = nn.ModuleList([GatedMaskedConv(c.channels, c.kernel_size, i == 0, c.num_classes, c.dropout)
                                     for i in range(c.layers)])
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c.channels, c.channels, 1), nn.ReLU(),
                                  nn.Conv2d(c.channels, c.codebook_size, 1))

    def fits(self, h: int, w: int) -> bool:
        return not self.config.positions or max(h, w) <= self.config.max_grid

    def forward(self, indices: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.check_labels(labels)
        x = self.embed(indices)  # (B, h, w) -> (B, h, w, C)
        if self.config.positions:
            x = x + grid_positions(self, *indices.shape[1:])
        v = h = x.permute(0, 3, 1, 2)  # (B, C, h, w)
        for layer in self.layers:
            v, from_vertical = layer.vertical_step(v, labels)
            h = layer.horizontal_step(h, from_vertical, labels)
        return self.head(h)

    def incremental(self, n: int, h: int, w: int, labels=None, dtype=torch.float32):
        """Channels-last buffers: each layer's vertical stack runs once per row (from the last k//2 + 1 rows of its
        input) and its horizontal stack once per position (from the last k//2 + 1 columns), so a map costs one
        forward pass of arithmetic, not one per position. Agrees with forward to rounding (tests/test_prior.py)."""
        self.check_labels(labels)
        return pixelcnn_steps(pixelcnn_matrices(self, dtype), self.config, n, h, w, labels)


def pixelcnn_matrices(prior: PixelCNNPrior, dtype) -> dict:
    """The prior's weights in `dtype` as the matrices pixelcnn_steps multiplies by."""
    as_dtype = lambda t: t.detach().to(dtype)  # noqa: E731
    matrix = lambda conv: as_dtype(conv.weight)[:, :, 0, 0].t()  # noqa: E731  a 1x1 conv as (in, out)
    two_c = 2 * prior.config.channels
    layers = [{
        # (2C, C, r+1, k) -> rows ordered (kernel row, kernel column, input channel), the patch order of the steps
        "wv": as_dtype(layer.vertical.weight * layer.vertical.mask).permute(2, 3, 1, 0).reshape(-1, two_c),
        "bv": as_dtype(layer.vertical.bias),
        "wh": as_dtype(layer.horizontal.weight * layer.horizontal.mask)[:, :, 0].permute(2, 1, 0).reshape(-1, two_c),
        "bh": as_dtype(layer.horizontal.bias),
        "wvh": matrix(layer.vertical_to_horizontal), "bvh": as_dtype(layer.vertical_to_horizontal.bias),
        "wo": matrix(layer.horizontal_out), "bo": as_dtype(layer.horizontal_out.bias),
        "cond": as_dtype(layer.condition.weight) if layer.condition is not None else None,
        "residual": layer.residual} for layer in prior.layers]
    first, second = prior.head[1], prior.head[3]
    positions = prior.config.positions
    return {"embed": as_dtype(prior.embed.weight), "layers": layers,
            "rows": as_dtype(prior.rows.weight) if positions else None,
            "columns": as_dtype(prior.columns.weight) if positions else None,
            "head": (matrix(first), as_dtype(first.bias), matrix(second), as_dtype(second.bias))}


def pixelcnn_steps(m: dict, c: PriorConfig, n: int, h: int, w: int, labels):
    """The generator of PixelCNNPrior.incremental, over the matrices `m`."""
    r, k, layers = c.kernel_size // 2, c.kernel_size, m["layers"]
    new = lambda *shape: m["embed"].new_zeros(*shape)  # noqa: E731
    vertical = [new(n, r + 1, w + 2 * r, c.channels) for _ in layers]  # input rows i-r..i of each layer, padded
    horizontal = [new(n, w + r, c.channels) for _ in layers]           # input of each layer along row i, padded left
    class_bias = [layer["cond"][labels] if labels is not None and layer["cond"] is not None else None
                  for layer in layers]  # (n, 2C) each
    w1, b1, w2, b2 = m["head"]
    for i in range(h):
        for buf in vertical:  # the window moves down one row
            buf[:, :r] = buf[:, 1:].clone()
            buf[:, r] = 0
        to_horizontal = []
        for index, (layer, bias) in enumerate(zip(layers, class_bias)):
            patches = vertical[index].unfold(2, k, 1).permute(0, 2, 1, 4, 3).reshape(n * w, -1)
            features = torch.addmm(layer["bv"], patches, layer["wv"])  # (n*w, 2C)
            to_horizontal.append(torch.addmm(layer["bvh"], features, layer["wvh"]).view(n, w, 2 * c.channels))
            if index + 1 < len(layers):
                features = features.view(n, w, 2 * c.channels)
                pre = features if bias is None else features + bias[:, None]
                vertical[index + 1][:, r, r:r + w] = gate(pre, dim=-1)
        for buf in horizontal:
            buf.zero_()
        for j in range(w):
            out = None
            for index, (layer, bias) in enumerate(zip(layers, class_bias)):
                window = horizontal[index][:, j:j + r + 1].reshape(n, -1)
                pre = torch.addmm(layer["bh"], window, layer["wh"]) + to_horizontal[index][:, j]
                if bias is not None:
                    pre = pre + bias
                out = torch.addmm(layer["bo"], gate(pre, dim=-1), layer["wo"])
                if layer["residual"]:
                    out = horizontal[index][:, r + j] + out
                if index + 1 < len(layers):
                    horizontal[index + 1][:, r + j] = out
            logits = torch.addmm(b2, torch.addmm(b1, out.relu(), w1).relu(), w2)
            codes = yield logits
            embedded = m["embed"][codes.to(m["embed"].device)]
            if m["rows"] is not None:
                embedded = embedded + m["rows"][i] + m["columns"][j]
            horizontal[0][:, r + j] = embedded
            vertical[0][:, r, r + j] = embedded


# -- causal transformer over the raster sequence (GPT-2 blocks, as nanoGPT writes them) -------------------------

class KVCache:
    """One attention layer's keys and values of the positions so far, for incremental decoding: buffers for
    `length` positions, allocated at the first call and filled in place (no copy of the past per position)."""

    def __init__(self, length: int):
        self.length, self.size, self.keys, self.values = length, 0, None, None

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, heads, t, d) keys and values; returns all of them so far."""
        if self.keys is None:
            self.keys = keys.new_empty(*keys.shape[:2], self.length, keys.shape[3])
            self.values = torch.empty_like(self.keys)
        end = self.size + keys.shape[2]
        self.keys[:, :, self.size:end], self.values[:, :, self.size:end] = keys, values
        self.size = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, channels: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C). With a cache, x holds the newest position(s), attending to all cached ones."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, C/H)
        if cache is not None:
            k, v = cache.extend(k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, channels: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attention = CausalSelfAttention(channels, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class TransformerPrior(Prior):
    """A GPT over the raster sequence of a code map: token t is a start token (the class's, or the one
    unconditional start) for t = 0 and code t-1 otherwise, plus learned row and column embeddings of the position
    t it predicts; causal self-attention lets position t see every code before it, not only a local window."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        c = self.config = config
        self.start = nn.Embedding(max(1, c.num_classes), c.channels)
        self.embed = nn.Embedding(c.codebook_size, c.channels)
        self.rows, self.columns = nn.Embedding(c.max_grid, c.channels), nn.Embedding(c.max_grid, c.channels)
        self.blocks = nn.ModuleList([TransformerBlock(c.channels, c.heads, c.dropout) for _ in range(c.layers)])
        self.norm = nn.LayerNorm(c.channels)
        self.head = nn.Linear(c.channels, c.codebook_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def fits(self, h: int, w: int) -> bool:
        return max(h, w) <= self.config.max_grid

    def positions(self, h: int, w: int) -> torch.Tensor:
        """(h*w, C): the embedding of each raster position's row and column."""
        return grid_positions(self, h, w).reshape(h * w, -1)

    def start_tokens(self, n: int, labels) -> torch.Tensor:
        """(n, 1, C)."""
        return self.start(labels if labels is not None else torch.zeros(n, dtype=torch.long,
                                                                         device=self.start.weight.device))[:, None]

    def forward(self, indices: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.check_labels(labels)
        b, h, w = indices.shape
        codes = indices.reshape(b, h * w)
        x = torch.cat([self.start_tokens(b, labels), self.embed(codes[:, :-1])], 1) + self.positions(h, w)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).transpose(1, 2).reshape(b, -1, h, w)  # (B, T, K) -> (B, K, h, w)

    def incremental(self, n: int, h: int, w: int, labels=None, dtype=torch.float32):
        """Keys and values cached per block: position t runs one token through the blocks."""
        self.check_labels(labels)
        model = self if dtype == self.head.weight.dtype else copy.deepcopy(self).to(dtype)
        return transformer_steps(model, n, h, w, labels)


def transformer_steps(model: TransformerPrior, n: int, h: int, w: int, labels):
    """The generator of TransformerPrior.incremental."""
    positions, caches = model.positions(h, w), [KVCache(h * w) for _ in model.blocks]
    x = model.start_tokens(n, labels)  # (n, 1, C)
    for t in range(h * w):
        x = x + positions[t]
        for block, cache in zip(model.blocks, caches):
            x = block(x, cache)
        codes = yield model.head(model.norm(x))[:, 0]  # (n, K)
        x = model.embed(codes.to(positions.device))[:, None]


# -- multiscale prior: a map in a few parallel passes, coarse lattices first ------------------------------------
# (Reed et al. 2017, "Parallel Multiscale Autoregressive Density Estimation"; each level a checkerboard as in He et
# al. 2021, "Checkerboard Context Model for Efficient Learned Image Compression".) Level l (levels .. 1) sees the
# map as 2x2 cells of the lattice of spacing t = 2^(l-1): offset (di, dj) of cell (a, b) is the code at
# ((2a + di) t, (2b + dj) t), and its (0, 0) offsets are the coarser lattice, coded before. The first pass codes the
# anchors, the (0, 0) offsets of the coarsest level (every 2^levels codes a side) from their positions alone; each
# level's phases then code its other offsets, conditioned on every code before. Each pass has a small convolutional
# network of its own (PassNetwork) that runs on its level's cell grid: an h x w map costs about phases * h * w / 3
# cell evaluations over all passes, and 1 + levels * phases network runs one after the other.

class MultiscalePass(NamedTuple):
    level: int      # the level whose 2x2 cells the pass runs on: lattice spacing 2^(level - 1)
    targets: tuple  # the cell offsets o = 2 * di + dj it codes
    known: tuple    # the offsets coded before it (visible to the network)


def multiscale_passes(levels: int, phases: int) -> list[MultiscalePass]:
    """The coding order: the anchors, then each level from the coarsest, its phases in MULTISCALE_PHASES order."""
    passes = [MultiscalePass(levels, (0,), ())]
    for level in range(levels, 0, -1):
        known = (0,)
        for offsets in MULTISCALE_PHASES[phases]:
            targets = tuple(2 * di + dj for di, dj in offsets)
            passes.append(MultiscalePass(level, targets, known))
            known += targets
    return passes


def offset_rows(offset: int, level: int, h: int, w: int) -> tuple[range, range]:
    """The map rows and columns of one cell offset at a level (the cells cropped to the map)."""
    t = 1 << (level - 1)
    return range((offset >> 1) * t, h, 2 * t), range((offset & 1) * t, w, 2 * t)


def to_cells(codes: torch.Tensor, level: int) -> torch.Tensor:
    """(B, h, w) codes (-1: none yet) -> (B, 4, hc, wc) the level's 2x2 cells, offset o = 2 * di + dj along dim 1;
    offsets that fall outside the map are -1."""
    t = 1 << (level - 1)
    lattice = codes[:, ::t, ::t]  # (B, ht, wt)
    b, ht, wt = lattice.shape
    hc, wc = -(-ht // 2), -(-wt // 2)
    padded = lattice.new_full((b, 2 * hc, 2 * wc), -1)
    padded[:, :ht, :wt] = lattice
    return padded.view(b, hc, 2, wc, 2).permute(0, 2, 4, 1, 3).reshape(b, 4, hc, wc)


class ContextBlock(nn.Module):
    """x + conv(relu(conv(relu(x)))), k x k convolutions over the cell grid; the second starts at zero, so a new
    block passes its input through and a deep stack starts as a shallow one."""

    def __init__(self, channels: int, kernel_size: int, dropout: float):
        super().__init__()
        self.first = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.second = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.second.weight)
        nn.init.zeros_(self.second.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.second(self.dropout(F.relu(self.first(F.relu(x)))))  # (B, C, hc, wc)


class PassNetwork(nn.Module):
    """The network of one pass: (B, 4, hc, wc) cells of its level (-1: no code) -> (B, targets, K, hc, wc) logits of
    the offsets it codes, from the offsets coded before it and each cell's position. Each pass has its own weights:
    the passes differ in what they see and predict, and a pass's network runs only for its own positions, so
    weights of their own add capacity at no cost in time."""

    def __init__(self, c: PriorConfig, step: MultiscalePass):
        super().__init__()
        k, self.k, self.level, self.targets = c.codebook_size, c.codebook_size, step.level, step.targets
        # per cell offset its code, or K where it is not visible (coded later, or outside the map): o * (K + 1) + z
        self.embed = nn.Embedding(4 * (k + 1), c.channels)
        self.rows, self.columns = nn.Embedding(c.max_grid, c.channels), nn.Embedding(c.max_grid, c.channels)
        for table in (self.rows, self.columns):  # zero, as the PixelCNN's: training starts without positions
            nn.init.zeros_(table.weight)
        self.condition = nn.Embedding(c.num_classes, c.channels) if c.num_classes else None
        self.blocks = nn.Sequential(*[ContextBlock(c.channels, c.kernel_size, c.dropout) for _ in range(c.layers)])
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c.channels, c.channels, 1), nn.ReLU(),
                                  nn.Conv2d(c.channels, len(step.targets) * k, 1))
        visible = torch.zeros(4, dtype=torch.bool)
        visible[list(step.known)] = True
        self.register_buffer("visible", visible, persistent=False)
        self.register_buffer("offsets", torch.arange(4) * (k + 1), persistent=False)

    def forward(self, cells: torch.Tensor, labels=None) -> torch.Tensor:
        seen = self.visible[:, None, None] & (cells >= 0)
        x = self.embed(torch.where(seen, cells, self.k) + self.offsets[:, None, None]).sum(1)  # (B, hc, wc, C)
        hc, wc, device = *cells.shape[2:], cells.device
        x = x + (self.rows(torch.arange(hc, device=device) << self.level)[:, None]  # at each cell's (0, 0) code
                 + self.columns(torch.arange(wc, device=device) << self.level)[None])
        if self.condition is not None:
            x = x + self.condition(labels)[:, None, None]
        logits = self.head(self.blocks(x.permute(0, 3, 1, 2)))  # (B, targets * K, hc, wc)
        return logits.unflatten(1, (len(self.targets), self.k))


class MultiscalePrior(Prior):
    """(B, h, w) indices [+ (B,) labels] -> (B, K, h, w) logits, each position's from the codes of the passes
    before its own (multiscale_passes), by its pass's network; `fill` runs the passes one after the other, each over
    all its positions."""
    raster_order = False

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        self.schedule = multiscale_passes(config.levels, config.phases)
        self.networks = nn.ModuleList([PassNetwork(config, step) for step in self.schedule])

    def fits(self, h: int, w: int) -> bool:
        return max(h, w) <= self.config.max_grid

    def check_fits(self, h: int, w: int):
        if not self.fits(h, w):
            raise ValueError(f"a {h}x{w} code grid is larger than this prior's max_grid {self.config.max_grid}")

    def passes(self, h: int, w: int) -> int:
        return sum(1 for step in self.schedule if self.pass_positions(step, h, w).numel())

    def pass_positions(self, step: MultiscalePass, h: int, w: int) -> torch.Tensor:
        """(m,) the flat raster indices a pass codes, its target offsets in turn, each in raster order."""
        flat = []
        for offset in step.targets:
            rows, columns = (torch.tensor(r, dtype=torch.long) for r in offset_rows(offset, step.level, h, w))
            flat.append((rows[:, None] * w + columns[None]).reshape(-1))
        return torch.cat(flat)

    @staticmethod
    def gather(logits: torch.Tensor, step: MultiscalePass, h: int, w: int) -> torch.Tensor:
        """(B, targets, K, hc, wc) -> (B, m, K) in pass_positions' order."""
        out = []
        for index, offset in enumerate(step.targets):
            rows, columns = offset_rows(offset, step.level, h, w)
            out.append(logits[:, index, :, :len(rows), :len(columns)].flatten(2).transpose(1, 2))
        return torch.cat(out, 1)

    def forward(self, indices: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Every pass from the true codes (teacher forcing), each level's cells made once."""
        self.check_labels(labels)
        b, h, w = indices.shape
        self.check_fits(h, w)
        cells = {level: to_cells(indices, level) for level in range(1, self.config.levels + 1)}
        out = None
        for step, network in zip(self.schedule, self.networks):
            logits = network(cells[step.level], labels)  # (B, targets, K, hc, wc)
            if out is None:
                out = logits.new_zeros(b, logits.shape[2], h, w)
            for index, offset in enumerate(step.targets):
                rows, columns = offset_rows(offset, step.level, h, w)
                out[:, :, rows.start::rows.step, columns.start::columns.step] = \
                    logits[:, index, :, :len(rows), :len(columns)]
        return out

    def fill(self, n: int, h: int, w: int, labels, choose, dtype=torch.float32):
        """One network run per pass, over all the pass's positions of the n maps at once, in `dtype` (the prior's
        weights converted once a call); each map's arithmetic is its own, whichever maps share its batch."""
        self.check_labels(labels)
        self.check_fits(h, w)
        model = self if dtype == next(self.parameters()).dtype else copy.deepcopy(self).to(dtype)
        device = next(self.parameters()).device
        codes = torch.full((n, h * w), -1, dtype=torch.long, device=device)
        for step, network in zip(self.schedule, model.networks):
            positions = self.pass_positions(step, h, w)
            if not positions.numel():  # a level coarser than a small map
                continue
            logits = network(to_cells(codes.view(n, h, w), step.level), labels)
            chosen = choose(positions, self.gather(logits, step, h, w))
            codes[:, positions.to(device)] = chosen.to(device)


# ---------------------------------------------------------------------------------------------------------
# Tissue segmenter: a small U-Net (Ronneberger et al. 2015, arXiv:1505.04597)
# ---------------------------------------------------------------------------------------------------------
# An independent judge of reconstructions, codec output and samples: it maps a slice to per-pixel logits over
# background, CSF, grey matter and white matter, and shares nothing with the VQ-VAE under test.

TISSUE_CLASSES = 4  # background, CSF, grey matter, white matter: the classes of a tissue mask

@dataclass(frozen=True)
class SegmenterConfig:
    base_channels: int = 16   # channels at full resolution; each level down doubles them
    levels: int = 4           # resolution levels: levels - 1 downsamplings by 2

    LIMITS = {"base_channels": 1024, "levels": 7}

    def __post_init__(self):
        first_failure(self, {
            "base_channels": 1 <= self.base_channels <= self.LIMITS["base_channels"],
            "levels": 1 <= self.levels <= self.LIMITS["levels"],
        }, "segmenter config")

    def check_fits(self, height: int, width: int):
        """ValueError unless H and W halve cleanly at every level, so skips and upsampled maps line up."""
        f = 2 ** (self.levels - 1)
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not divisible by 2^(levels - 1) = {f}; use slices "
                             f"whose sides are multiples of {f}, or fewer --levels")


class ConvBlock(nn.Sequential):
    """(Conv 3x3 -> BatchNorm -> ReLU) twice, at one resolution."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True))


class Down(nn.Sequential):
    """Max-pool by 2, then a ConvBlock: (B, C, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.MaxPool2d(2), ConvBlock(c_in, c_out))


class Up(nn.Module):
    """Transposed conv 2x2 stride 2, concatenated with the encoder's skip at that resolution, then a ConvBlock."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.block = ConvBlock(2 * c_out, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], 1))  # (B, 2 C_out, 2h, 2w) -> (B, C_out, 2h, 2w)


class UNet(nn.Module):
    """(B, 1, H, W) slices in [-1, 1] -> (B, TISSUE_CLASSES, H, W) tissue logits."""

    def __init__(self, config: SegmenterConfig):
        super().__init__()
        self.config = config
        widths = [config.base_channels * 2 ** i for i in range(config.levels)]
        self.stem = ConvBlock(IMAGE_CHANNELS, widths[0])
        self.downs = nn.ModuleList(Down(a, b) for a, b in zip(widths, widths[1:]))
        self.ups = nn.ModuleList(Up(b, a) for a, b in reversed(list(zip(widths, widths[1:]))))
        self.head = nn.Conv2d(widths[0], TISSUE_CLASSES, 1)

    def skips(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's map at every level, full resolution first; the last is the bottleneck
        (B, base_channels * 2^(levels-1), H / 2^(levels-1), W / 2^(levels-1))."""
        maps = [self.stem(x)]
        for down in self.downs:
            maps.append(down(maps[-1]))
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *skips, x = self.skips(x)
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
        return self.head(x)
