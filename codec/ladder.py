"""The codec's rate ladder: the operating points ladder.py trains (POINTS), the file that lists a trained ladder's
points (LADDER_FILE, read by read_ladder), and Ladder, the encoder that picks per slice the point whose file is best
within a byte budget (compress.py encode --max-bytes / --ladder).
"""
import math
from pathlib import Path

import torch

from codec.vqz import PRIOR_CODERS, Codec, Header
from imaging.quality import ssim
from imaging.slices import uint8_to_unit
from utils import UserError, read_json

# name -> (preset, model overrides, prior overrides), smallest files first. The grid sets how many codes a slice
# has (H/16: 256 on 256x256, H/8: 1024, H/4: 4096), K how many bits each costs before the prior; points of one grid
# differ in K. The priors train on small batches, as the VQ-VAEs do, so that a time budget buys more updates; on
# the 64x64 maps of H/4 a narrower, shallower PixelCNN, since train_prior.py's default took 45 s per batch of 32 maps
# on one CPU core.
POINTS = {
    "h16-k256": ("default", {"downsamplings": 4, "codebook_size": 256}, {"batch_size": 8}),
    "h8-k32": ("default", {}, {"batch_size": 8}),
    "h8-k256": ("default", {"codebook_size": 256}, {"batch_size": 8}),
    "h4-k8": ("hq", {"codebook_size": 8}, {"batch_size": 4, "channels": 48, "layers": 8}),
    "h4-k32": ("hq", {"codebook_size": 32}, {"batch_size": 4, "channels": 48, "layers": 8}),
    "h4-k256": ("hq", {}, {"batch_size": 4, "channels": 48, "layers": 8}),
}

LADDER_FILE = "ladder.json"  # in a ladder.py folder: its points, smallest files first


def read_ladder(folder: Path) -> list[tuple[Path, Path | None]]:
    """The (VQ-VAE checkpoint, prior or None) of each point of a ladder folder (ladder.py's: <folder>/<point>/best.pt
    and <folder>/<point>/prior/best.pt), smallest first; a point whose prior was not trained yet has none."""
    path = Path(folder) / LADDER_FILE
    try:
        names = [p["name"] for p in read_json(path)["points"]]
        if not names or not all(isinstance(n, str) and n and Path(n).name == n and n not in (".", "..")
                                for n in names):
            raise ValueError("the points must be folder names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a ladder's list of points ({type(e).__name__}: {e}); pass a folder that "
                        f"ladder.py trained") from None
    runs = [Path(folder) / name for name in names]
    return [(run / "best.pt", run / "prior" / "best.pt" if (run / "prior" / "best.pt").is_file() else None)
            for run in runs]


class Ladder:
    """Several codecs (VQ-VAEs at different rates, each with its prior or none) as the operating points of one
    encoder: per slice, the file of the point whose reconstruction has the highest SSIM among those whose file fits
    a byte budget. A decoder finds each file's codec by the weights hashes in its header, so any mix of points
    decodes."""

    def __init__(self, codecs: list[Codec]):
        self.codecs = codecs

    def encode_within(self, images: torch.Tensor, max_bytes: int, labels=None,
                      progress=None) -> tuple[list[bytes], list[int]]:
        """uint8 (N, H, W) slices of one size -> (N .vqz file contents, the index of each one's codec)."""
        shape = tuple(images.shape[1:])
        target = uint8_to_unit(images.unsqueeze(1))
        best, picked, quality = [None] * len(images), [None] * len(images), torch.full((len(images),), -math.inf)
        smallest = torch.full((len(images),), math.inf)
        for index, codec in enumerate(self.codecs):
            codec.code_grid(shape)
            codes = codec.codes(images)
            conditional = codec.prior is not None and codec.prior.config.num_classes
            files = codec.encode_codes(codes, shape, labels if conditional else None, progress=progress)
            scores = ssim(uint8_to_unit(codec.reconstruct(codes).unsqueeze(1)), target)
            for i, data in enumerate(files):
                smallest[i] = min(smallest[i], len(data))
                if len(data) <= max_bytes and scores[i] > quality[i]:
                    best[i], picked[i], quality[i] = data, index, scores[i]
        if None in best:
            i = best.index(None)
            raise UserError(f"slice {i} fits no operating point in {max_bytes} bytes (its smallest file: "
                            f"{int(smallest[i])} bytes); allow more bytes or add a smaller model")
        return best, picked

    def codec_for(self, header: Header, name: str) -> Codec:
        """The codec with the VQ-VAE (and prior) that wrote a file with this header, or UserError; the only codec
        of a ladder of one, whose Codec.check then says what does not match."""
        for codec in self.codecs:
            if codec.vqvae_hash == header.vqvae_hash and (header.coder not in PRIOR_CODERS or codec.prior is None
                                                          or codec.prior_hash == header.prior_hash):
                return codec
        if len(self.codecs) == 1:
            return self.codecs[0]
        raise UserError(f"{name} was encoded with VQ-VAE weights (hash {header.vqvae_hash.hex()}) that none of the "
                        f"{len(self.codecs)} given VQ-VAEs has; decode it with the VQ-VAE it was encoded with")
