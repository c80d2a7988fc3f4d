"""The first report's recipe as a student's first version: fp32, NCHW, eager, each PNG decoded with PIL whenever
it is read.

Recipe: images scaled to [-1, 1]; encoder 3 x [Conv 4x4 stride 2 -> BatchNorm -> ReLU], 128 channels, the last
one giving the D=128 latents; a codebook of K=32 vectors learned through its loss term; decoder 2 x [transposed
Conv 4x4 stride 2 -> BatchNorm -> ReLU] and a transposed conv to one channel -> tanh; loss
MSE(x, x_hat) + MSE(z_q, sg(z_e)) + 0.25 MSE(z_e, sg(z_q)); Adam at a constant 2e-3, batches of 16 (on OASIS
256x256 the first report reached a mean SSIM of 0.849 after 40 epochs).

It imports nothing from this repository: it is the independent baseline. bench.py reads four names from it, and
from any file given to `bench.py --reference`: SeedVQVAE (built without arguments), LR, step(model, optimizer,
batch) and Folder(folder, size).
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

LR = 2e-3
CHANNELS = 128
CODEBOOK_SIZE = 32  # K
CODE_DIM = 128  # D
BETA = 0.25  # weight of the commitment term


class Folder(torch.utils.data.Dataset):
    """The PNG slices in one folder, opened and decoded with PIL on every access -> (1, size, size) in [-1, 1]."""

    def __init__(self, folder, size: int):
        self.paths = sorted(Path(folder).glob("*.png"))
        self.size = size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = Image.open(self.paths[index]).convert("L")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).unsqueeze(0) * 2 - 1


class SeedVQVAE(nn.Module):
    """forward(x) -> (reconstruction, codebook loss + commitment loss)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, CHANNELS, 4, 2, 1), nn.BatchNorm2d(CHANNELS), nn.ReLU(),
            nn.Conv2d(CHANNELS, CHANNELS, 4, 2, 1), nn.BatchNorm2d(CHANNELS), nn.ReLU(),
            nn.Conv2d(CHANNELS, CODE_DIM, 4, 2, 1), nn.BatchNorm2d(CODE_DIM), nn.ReLU(),
        )
        self.codebook = nn.Embedding(CODEBOOK_SIZE, CODE_DIM)
        self.codebook.weight.data.uniform_(-1 / CODEBOOK_SIZE, 1 / CODEBOOK_SIZE)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(CODE_DIM, CHANNELS, 4, 2, 1), nn.BatchNorm2d(CHANNELS), nn.ReLU(),
            nn.ConvTranspose2d(CHANNELS, CHANNELS, 4, 2, 1), nn.BatchNorm2d(CHANNELS), nn.ReLU(),
            nn.ConvTranspose2d(CHANNELS, 1, 4, 2, 1), nn.Tanh(),
        )

    def quantize(self, z_e):
        """Each latent vector -> its nearest codebook vector, with the gradient passed straight through."""
        b, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        nearest = torch.cdist(flat, self.codebook.weight).argmin(dim=1)
        z_q = self.codebook(nearest).reshape(b, h, w, d).permute(0, 3, 1, 2)
        loss = F.mse_loss(z_q, z_e.detach()) + BETA * F.mse_loss(z_e, z_q.detach())
        return z_e + (z_q - z_e).detach(), loss

    def forward(self, x):
        z_q, vq_loss = self.quantize(self.encoder(x))
        return self.decoder(z_q), vq_loss


def step(model, optimizer, batch) -> float:
    """One training step on a batch in [-1, 1]; returns its loss."""
    optimizer.zero_grad()
    reconstruction, vq_loss = model(batch)
    loss = F.mse_loss(reconstruction, batch) + vq_loss
    loss.backward()
    optimizer.step()
    return loss.item()
