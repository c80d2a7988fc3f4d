"""VQ-VAE building blocks (van den Oord et al. 2017, arXiv:1711.00937) and the presets built from them.

A model is `Encoder -> VectorQuantizer -> Decoder`; every hyper-parameter lives in `VQVAEConfig`, which is
saved inside every checkpoint so the exact model can be rebuilt from the file alone.
"""
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class VQVAEConfig:
    in_channels: int = 1
    hidden_channels: int = 128      # width of every conv layer outside the residual branches
    downsamplings: int = 3          # each halves H and W: latent_grid = (H / 2^n, W / 2^n)
    residual_blocks: int = 0        # residual blocks at the latent resolution, in encoder and in decoder
    residual_channels: int = 64     # width inside a residual branch
    norm: str = "batch"             # "batch", "group" or "none"
    codebook_size: int = 32         # K
    embedding_dim: int = 128        # D
    commitment_cost: float = 0.25   # beta
    codebook_update: str = "loss"   # "loss": codebook term in the loss; "ema": exponential moving averages
    ema_decay: float = 0.99
    kmeans_init: bool = False       # initialise the codebook by k-means on the first training batch
    dead_code_threshold: float = 0.0  # restart codes whose EMA usage per step drops below this (0: never)
    reconstruction_loss: str = "mse"  # "mse" or "l1"

    def __post_init__(self):
        checks = {
            "in_channels": self.in_channels >= 1, "hidden_channels": self.hidden_channels >= 1,
            "downsamplings": 1 <= self.downsamplings <= 6, "residual_blocks": self.residual_blocks >= 0,
            "residual_channels": self.residual_channels >= 1, "norm": self.norm in ("batch", "group", "none"),
            "codebook_size": self.codebook_size >= 2, "embedding_dim": self.embedding_dim >= 1,
            "commitment_cost": self.commitment_cost >= 0, "codebook_update": self.codebook_update in ("loss", "ema"),
            "ema_decay": 0 <= self.ema_decay < 1, "dead_code_threshold": self.dead_code_threshold >= 0,
            "reconstruction_loss": self.reconstruction_loss in ("mse", "l1"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid model config value for {bad[0]}: {getattr(self, bad[0])!r}")

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
        return h * w * torch.tensor(float(self.codebook_size)).log2().item()

    @classmethod
    def from_dict(cls, d: dict) -> "VQVAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}")
        return cls(**d)


PRESETS = {
    # The first report's recipe, layer for layer (see the reference in ../shared/bench/reference_vqvae.py).
    "seed": VQVAEConfig(),
    # Same latent grid (H/8 x W/8) and codebook size (K=32) as seed, so the same bits per slice.
    "default": VQVAEConfig(hidden_channels=128, residual_blocks=2, residual_channels=64, norm="group",
                           embedding_dim=64, codebook_update="ema", kmeans_init=True, dead_code_threshold=1.0),
    # Higher fidelity: a 4x finer grid (H/4 x W/4) and K=256.
    "hq": VQVAEConfig(hidden_channels=128, downsamplings=2, residual_blocks=2, residual_channels=64,
                      norm="group", codebook_size=256, embedding_dim=64, codebook_update="ema",
                      kmeans_init=True, dead_code_threshold=1.0),
}


def preset(name: str, **overrides) -> VQVAEConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


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


class UpBlock(nn.Sequential):
    """Transposed conv 4x4 stride 2 -> norm -> ReLU: doubles H and W."""

    def __init__(self, in_channels: int, out_channels: int, norm: str):
        super().__init__(nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1),
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
        widths = [c.in_channels] + [c.hidden_channels] * c.downsamplings
        if not project:
            widths[-1] = c.embedding_dim
        self.down = nn.Sequential(*[DownBlock(i, o, c.norm) for i, o in zip(widths, widths[1:])])
        self.residual = residual_stack(c)
        self.project = nn.Conv2d(c.hidden_channels, c.embedding_dim, 1) if project else nn.Identity()

    def forward(self, x):
        return self.project(self.residual(self.down(x)))


class Decoder(nn.Module):
    """(B, D, h, w) quantised latents -> (B, C, h * 2^n, w * 2^n) image in [-1, 1]."""

    def __init__(self, c: VQVAEConfig):
        super().__init__()
        project = needs_projection(c)
        width = c.hidden_channels if project else c.embedding_dim
        self.project = nn.Conv2d(c.embedding_dim, c.hidden_channels, 1) if project else nn.Identity()
        self.residual = residual_stack(c)
        self.up = nn.Sequential(*[UpBlock(width if i == 0 else c.hidden_channels, c.hidden_channels, c.norm)
                                  for i in range(c.downsamplings - 1)])
        self.to_image = nn.ConvTranspose2d(c.hidden_channels, c.in_channels, 4, stride=2, padding=1)

    def forward(self, z):
        return torch.tanh(self.to_image(self.up(self.residual(self.project(z)))))


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor        # (B, D, h, w), straight-through: forward = codes, backward = identity to z_e
    indices: torch.Tensor          # (B, h, w) int64
    codebook_loss: torch.Tensor    # ||sg(z_e) - z_q||^2 (zero when the codebook is EMA-updated)
    commitment_loss: torch.Tensor  # beta * ||z_e - sg(z_q)||^2
    code_counts: torch.Tensor      # (K,) how often each code was chosen in this batch (this rank)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t, src=0)
    return t


def kmeans(x: torch.Tensor, k: int, iters: int = 10) -> torch.Tensor:
    """Lloyd's k-means on (N, D) rows; returns (k, D) centroids. Empty clusters keep their old centroid."""
    centroids = x[torch.randperm(x.shape[0], device=x.device)[:k]]
    if centroids.shape[0] < k:  # fewer vectors than codes: repeat them
        centroids = x[torch.randint(0, x.shape[0], (k,), device=x.device)]
    for _ in range(iters):
        assign = squared_distances(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


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
        with torch.no_grad():
            return squared_distances(flat, self.codebook.float()).argmin(1)

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
            counts = torch.bincount(indices, minlength=self.codebook_size)
            if self.training:
                self._update_statistics(flat.detach(), indices, counts)
            indices = indices.view(b, h, w)
            codes = self.lookup(indices)  # (B, D, h, w)
            commitment = self.commitment_cost * F.mse_loss(z, codes.detach())
            if self.update == "loss":
                codebook_loss = F.mse_loss(codes, z.detach())
            else:
                codebook_loss = z.new_zeros(())
            quantized = z + (codes - z).detach()  # straight-through estimator
        return QuantizerOutput(quantized, indices, codebook_loss, commitment, counts)

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

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        q = self.quantizer(self.encoder(x))
        x_hat = self.decoder(q.quantized)
        if self.config.reconstruction_loss == "mse":
            reconstruction = F.mse_loss(x_hat.float(), x.float())
        else:
            reconstruction = F.l1_loss(x_hat.float(), x.float())
        losses = {"reconstruction": reconstruction, "codebook": q.codebook_loss, "commitment": q.commitment_loss}
        return VQVAEOutput(x_hat, losses, q.indices, q.code_counts)
