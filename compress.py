"""An image codec built from a trained VQ-VAE and its PixelCNN prior: one small file per slice holding the code
map, entropy-coded with the prior's probabilities.

    python compress.py encode --checkpoint runs/X/best.pt --prior runs/X/prior/best.pt slices/ --out coded/
    python compress.py encode --checkpoint runs/X/best.pt --split test --out coded/      # a split, no prior
    python compress.py decode --checkpoint runs/X/best.pt --prior runs/X/prior/best.pt coded/ --out decoded/
    python compress.py rd --checkpoint runs/A/best.pt --checkpoint runs/B/best.pt --split test

encode: PNG/JPEG files, folders of them, or (--split) a split of the dataset the checkpoint records -> one
<name>.vqz per slice. decode: .vqz files or folders of them -> 8-bit grey <name>.png, the VQ-VAE's reconstruction
of the slice that was encoded. rd: bytes per slice against SSIM and PSNR for each VQ-VAE (fixed-length, static
and prior coding) and for JPEG, WebP, JPEG 2000 and AVIF searched per image to fit byte budgets; writes rd.csv,
rd.json, rd.png (the curves) and rd_slice.png (one slice at equal bytes under every codec).

File format (.vqz, version 1; little-endian; a 38-byte header, then the payload):

    offset size  field
     0     3     magic b"VQZ"
     3     1     format version (1)
     4     1     coder: 0 fixed-length (ceil(log2 K) bits per code), 1 static (range coding with the VQ-VAE's
                 code-usage histogram), 2 prior (range coding with the PixelCNN prior's conditionals)
     5     1     class label for a class-conditional prior, 255 for none
     6     2+2   image height, width (pixels, at most 8192 each: images.MAX_IMAGE_SIDE)
    10     2+2   code grid height, width (must be what the VQ-VAE makes of that image size)
    14     8     VQ-VAE weights hash (the first 8 bytes of SHA-256 over its state dict)
    22     8     prior weights hash (zeros unless coder 2)
    30     4     CRC-32 of the code map (uint16 little-endian codes in raster order)
    34     4     payload length in bytes (must be exactly the rest of the file)
    38     ...   payload: packed bits (coder 0) or constriction range-coder words, uint32 little-endian (1, 2)

Exactness: the prior's logits are computed in float64 by one incremental procedure (Prior.incremental, the one
sampling uses too, run by encoder and decoder alike), rounded to 1/64 nat, and turned into integer frequencies by
integer arithmetic only (`frequencies`), so encoder and decoder code with identical integers. The float64 logits
are bit-identical with 1 and 2 threads and differ by ~1e-15 between batch compositions or from the one-pass
forward; a difference moves a frequency only if a logit lies within that distance of a rounding boundary (~1e-13
per logit). Should it happen, the CRC of the code map turns it into an error instead of a wrong image.

Entropy coding: constriction's range coder (stream.queue.RangeEncoder/RangeDecoder with stream.model.Categorical
(perfect=False)), a maintained library, rather than a hand-written arithmetic coder, whose carry and renormalisation
corner cases are a classic source of encoder/decoder mismatch. Its cost over the ideal code length of the integer
frequencies is about one 32-bit word per slice (0.03 to 4.1 bytes, mean 2.1, over 3000 random streams).
"""
import argparse
import hashlib
import io
import math
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from anatomy import DICE_COLUMNS, dice_table, segment_images
from checkpoints import check_prior_fits, default_prior, load_prior, load_segmenter, load_split, load_vqvae, run_dir_of
from dataset import read_slice
from images import IMAGE_SUFFIXES, MAX_IMAGE_SIDE, natural_key, psnr, ssim, to_float, to_uint8
from modules import drive
from utils import (ArgumentParser, UserError, add_runtime_flags, apply_runtime_flags, autocast, exits_with_one_line,
                   pyplot, write_csv, write_json)

MAGIC = b"VQZ"
FORMAT_VERSION = 1
HEADER = struct.Struct("<3sBBBHHHH8s8sII")
FIXED, STATIC, PRIOR = 0, 1, 2
CODER_NAMES = {FIXED: "fixed", STATIC: "static", PRIOR: "prior"}
NO_LABEL = 255
MAX_CODES = 1 << 22            # code positions per slice: a 2048x2048 grid
MAX_PAYLOAD_BITS_PER_CODE = 24  # the range coder's precision: no code costs more than 24 bits
MAX_FILE_BYTES = HEADER.size + MAX_CODES * MAX_PAYLOAD_BITS_PER_CODE // 8 + 64
SUFFIX = ".vqz"

# ---------------------------------------------------------------------------------------------------------
# Probabilities as integers
# ---------------------------------------------------------------------------------------------------------
# Logits are rounded to 1/LOGIT_STEPS nat; weights exp(-d / LOGIT_STEPS) come from a table built by integer
# arithmetic from one constant, round(2^62 exp(-1/64)) (computed once to 60 digits), so no floating-point
# function of the platform enters the frequencies after the rounding.
LOGIT_STEPS = 64
_EXP_STEP_Q62 = 4540188453729421605


def _exp_table() -> np.ndarray:
    table, value = [], 1 << 30
    while value:  # rounding down, so each entry is smaller than the one before and the table ends
        table.append(value)
        value = (value * _EXP_STEP_Q62) >> 62
    return np.array(table + [0], dtype=np.int64)


EXP_TABLE = _exp_table()  # EXP_TABLE[d] ~ 2^30 exp(-d / 64) (rounded down step by step), ending in 0


def probability_bits(k: int) -> int:
    """Frequencies of a K-symbol alphabet sum to 2^bits: 16 bits up to K = 256, more for larger codebooks (every
    symbol keeps at least 1, so K / 2^bits is the probability mass spent on that floor); 24 at most."""
    return max(16, min(24, math.ceil(math.log2(k)) + 8))


def frequencies(logits, bits: int) -> np.ndarray:
    """(m, K) logits (float64 numbers) -> (m, K) int64 frequencies, each >= 1, each row summing to 2^bits.

    Deterministic in the integers: only the rounding of logits * 64 to an integer involves floats."""
    logits = np.asarray(logits, dtype=np.float64)
    if not np.isfinite(logits).all():
        raise UserError("the prior produced non-finite logits (its weights are broken); use another prior checkpoint")
    z = np.rint(logits * LOGIT_STEPS)
    d = np.minimum(z.max(1, keepdims=True) - z, len(EXP_TABLE) - 1).astype(np.int64)
    e = EXP_TABLE[d]
    total, k = 1 << bits, logits.shape[1]
    f = e * (total - k) // e.sum(1, keepdims=True) + 1
    f[np.arange(len(f)), e.argmax(1)] += total - f.sum(1)
    return f


# ---------------------------------------------------------------------------------------------------------
# Payloads
# ---------------------------------------------------------------------------------------------------------

def _constriction():
    try:
        import constriction
    except ImportError:
        raise UserError("the constriction package is missing; install it with "
                        "pip install -r requirements.txt") from None
    return constriction


def fixed_bits(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


def pack_fixed(codes: np.ndarray, k: int) -> bytes:
    """(n,) codes -> ceil(log2 K) bits each, most significant first, zero-padded to whole bytes."""
    b = fixed_bits(k)
    bits = (codes.astype(np.int64)[:, None] >> np.arange(b - 1, -1, -1)) & 1
    return np.packbits(bits.astype(np.uint8).ravel()).tobytes()


def unpack_fixed(payload: bytes, n: int, k: int) -> np.ndarray:
    b = fixed_bits(k)
    bits = np.unpackbits(np.frombuffer(payload, np.uint8))[:n * b].reshape(n, b).astype(np.int64)
    return bits @ (1 << np.arange(b - 1, -1, -1))


def fixed_payload_bytes(n: int, k: int) -> int:
    return (n * fixed_bits(k) + 7) // 8


def words_to_bytes(words: np.ndarray) -> bytes:
    return words.astype("<u4").tobytes()


def bytes_to_words(payload: bytes) -> np.ndarray:
    return np.frombuffer(payload, "<u4").astype(np.uint32)


def code_crc(codes: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(codes, dtype="<u2").tobytes())


def weights_hash(model: torch.nn.Module) -> bytes:
    """First 8 bytes of SHA-256 over every tensor of the state dict (name, dtype, shape, bytes) in name order."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()[:8]


# ---------------------------------------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    coder: int
    label: int           # NO_LABEL when none
    image_shape: tuple   # (H, W)
    grid: tuple          # (h, w)
    vqvae_hash: bytes
    prior_hash: bytes
    crc: int
    payload_length: int

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, FORMAT_VERSION, self.coder, self.label, *self.image_shape, *self.grid,
                           self.vqvae_hash, self.prior_hash, self.crc, self.payload_length)


def parse_header(data: bytes, name: str) -> Header:
    """The header of a .vqz file's bytes, with every field bounded; UserError (one line) for anything else."""
    if not data:
        raise UserError(f"{name} is empty, not a .vqz file")
    if data[:len(MAGIC)] != MAGIC[:len(data)] or len(data) < len(MAGIC):
        raise UserError(f"{name} is not a .vqz file (it does not start with {MAGIC.decode()}); "
                        f"decode only files written by compress.py encode")
    if len(data) < HEADER.size:
        raise UserError(f"{name} is truncated: {len(data)} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, coder, label, height, width, gh, gw, vq_hash, prior_hash, crc, length = HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise UserError(f"{name} is .vqz format version {version}; this compress.py reads version {FORMAT_VERSION}")
    if coder not in CODER_NAMES:
        raise UserError(f"{name} names an unknown coder {coder} (a corrupt file, or a newer compress.py wrote it)")
    if not (1 <= height <= MAX_IMAGE_SIDE and 1 <= width <= MAX_IMAGE_SIDE):
        raise UserError(f"{name} declares a {height}x{width} image, outside 1..{MAX_IMAGE_SIDE} pixels per side "
                        f"(a corrupt file)")
    if not (1 <= gh and 1 <= gw and gh * gw <= MAX_CODES):
        raise UserError(f"{name} declares a {gh}x{gw} code grid, outside 1..{MAX_CODES} codes (a corrupt file)")
    limit = gh * gw * MAX_PAYLOAD_BITS_PER_CODE // 8 + 64
    if length > limit:
        raise UserError(f"{name} declares a {length}-byte payload, more than any {gh}x{gw} code map needs "
                        f"({limit}; a corrupt file)")
    actual = len(data) - HEADER.size
    if actual < length:
        raise UserError(f"{name} is truncated: its payload has {actual} of {length} bytes")
    if actual > length:
        raise UserError(f"{name} has {actual - length} bytes after its payload (a corrupt file)")
    return Header(coder, label, (height, width), (gh, gw), vq_hash, prior_hash, crc, length)


def read_vqz(path: Path) -> bytes:
    """A .vqz file's bytes; a file larger than any valid one could be is refused before it is read."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise UserError(f"{path} is {size} bytes, larger than any .vqz file can be ({MAX_FILE_BYTES}); "
                            f"not a file written by compress.py encode")
        with open(path, "rb") as f:
            return f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------------------
# The codec
# ---------------------------------------------------------------------------------------------------------

class Codec:
    """A VQ-VAE (and optionally its prior) as an image codec. Everything is batched: images or code maps of one
    size in, a list of file contents (or decoded maps and images) out."""

    def __init__(self, vqvae, prior=None, class_names=(), device=torch.device("cpu"), batch_size: int = 64,
                 precision: str = "auto"):
        self.vqvae, self.prior, self.device, self.batch_size = vqvae, prior, device, batch_size
        self.k = vqvae.config.codebook_size
        if self.k > (1 << 16):
            raise UserError(f"codebooks of more than 65536 codes are not supported by the .vqz format (K={self.k})")
        self.class_names = list(class_names)
        self.amp = autocast(precision, device)  # the VQ-VAE runs as predict.py runs it
        self.vqvae_hash = weights_hash(vqvae)
        self.prior_hash = weights_hash(prior) if prior is not None else bytes(8)
        self.bits = probability_bits(self.k)
        usage = vqvae.quantizer.usage.detach().double().cpu().numpy()
        self.static_freqs = frequencies(np.log(np.maximum(usage, 1e-6))[None], self.bits)[0]
        
    # -- the VQ-VAE ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W) -> (N, h, w) int64 code maps, as VQVAE.forward picks them in predict.py (channels_last
        input, the encoder under autocast, fp32 distances)."""
        out = []
        for batch in images.split(self.batch_size):
            x = to_float(batch.unsqueeze(1).to(self.device)).contiguous(memory_format=torch.channels_last)
            with self.amp:
                z = self.vqvae.encoder(x)
            with torch.autocast(self.device.type, enabled=False):
                out.append(self.vqvae.quantizer.quantize_indices(z.float()).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, h, w) code maps -> uint8 (N, H, W): the decoded images."""
        out = []
        for batch in codes.split(self.batch_size):
            with self.amp:
                out.append(to_uint8(self.vqvae.decode_indices(batch.to(self.device)))[:, 0].cpu())  # (B, H, W)
        return torch.cat(out)

    def grid_of(self, image_shape) -> tuple:
        try:
            grid = tuple(self.vqvae.config.latent_grid(*image_shape))
        except ValueError as e:
            raise UserError(str(e)) from None
        if self.prior is not None and not self.prior.fits(*grid):
            raise UserError(f"a {image_shape[0]}x{image_shape[1]} image makes a {grid[0]}x{grid[1]} code grid, larger "
                            f"than this prior's positions cover ({self.prior.config.max_grid} a side)")
        return grid

    # -- encoding -----------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, labels=None, coder: str = "auto", progress=None) -> list[bytes]:
        """uint8 (N, H, W) slices of one size -> N .vqz file contents."""
        self.grid_of(images.shape[1:])
        return self.encode_codes(self.codes(images), tuple(images.shape[1:]), labels, coder, progress)

    def encode_codes(self, codes: torch.Tensor, image_shape, labels=None, coder: str = "auto",
                     progress=None, ideal: list | None = None) -> list[bytes]:
        """(N, h, w) code maps of images of `image_shape` -> N .vqz file contents. coder: "fixed", "static",
        "prior", or "auto" (per slice the smallest of prior-coded (when there is a prior) and fixed-length, or of
        static and fixed-length without one). `ideal`: see prior_payloads."""
        n, h, w = codes.shape
        if self.grid_of(image_shape) != (h, w):
            raise UserError(f"{h}x{w} code maps are not what this VQ-VAE makes of {image_shape[0]}x{image_shape[1]} "
                            f"images")
        flat = codes.reshape(n, -1).numpy()
        if coder == "prior" or (coder == "auto" and self.prior is not None):
            if self.prior is None:
                raise UserError("--coder prior needs --prior")
            payloads = self.prior_payloads(codes, labels, progress, ideal)
            candidates = [(PRIOR, p) for p in payloads]
        elif coder in ("static", "auto"):
            candidates = [(STATIC, self.static_payload(c)) for c in flat]
        elif coder == "fixed":
            candidates = [(FIXED, pack_fixed(c, self.k)) for c in flat]
        else:
            raise UserError(f"unknown coder {coder!r}; choose auto, fixed, static or prior")
        files = []
        for index, (kind, payload) in enumerate(candidates):
            if coder == "auto" and len(payload) > fixed_payload_bytes(h * w, self.k):
                kind, payload = FIXED, pack_fixed(flat[index], self.k)
            label = int(labels[index]) if labels is not None else NO_LABEL
            header = Header(kind, label, tuple(image_shape), (h, w), self.vqvae_hash,
                            self.prior_hash if kind == PRIOR else bytes(8), code_crc(flat[index]), len(payload))
            files.append(header.pack() + payload)
        return files

    def static_payload(self, codes: np.ndarray) -> bytes:
        c = _constriction()
        encoder = c.stream.queue.RangeEncoder()
        encoder.encode(codes.astype(np.int32), c.stream.model.Categorical(self.static_freqs.astype(np.float64),
                                                                          perfect=False))
        return words_to_bytes(encoder.get_compressed())

    def _labels_for(self, labels, n):
        if not self.prior.config.num_classes:
            return None
        if labels is None:
            raise UserError("this prior is class-conditional: pass --class (or encode a split, whose labels are known)")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if (labels < 0).any() or (labels >= self.prior.config.num_classes).any() or len(labels) != n:
            raise UserError(f"class labels must be in 0..{self.prior.config.num_classes - 1}, one per slice")
        return labels

    @torch.no_grad()
    def prior_payloads(self, codes: torch.Tensor, labels=None, progress=None, ideal: list | None = None) -> list[bytes]:
        """(N, h, w) code maps -> N range-coded payloads; `ideal` (a list) receives each map's ideal code length in
        bits under the same integer frequencies."""
        c = _constriction()
        family = c.stream.model.Categorical(perfect=False)
        labels = self._labels_for(labels, len(codes))
        payloads = []
        for start in range(0, len(codes), self.batch_size):
            batch = codes[start:start + self.batch_size]
            n, h, w = batch.shape
            y = labels[start:start + n] if labels is not None else None
            encoders = [c.stream.queue.RangeEncoder() for _ in range(n)]
            symbols = batch.reshape(n, -1).numpy().astype(np.int32)
            ideal_bits = np.zeros(n)

            def choose(pos, logits):
                f = frequencies(logits.cpu().numpy(), self.bits)
                probabilities = f.astype(np.float64)
                for s in range(n):
                    encoders[s].encode(symbols[s, pos:pos + 1], family, probabilities[s:s + 1])
                ideal_bits[:] += self.bits - np.log2(f[np.arange(n), symbols[:, pos]].astype(np.float64))
                if progress is not None and pos % w == w - 1:
                    progress.set_postfix_str(f"row {pos // w + 1}/{h} of slices {start + 1}-{start + n}")
                return batch[:, pos // w, pos % w]

            drive(self.prior.incremental(n, h, w, y, torch.float64), h * w, choose)
            payloads += [words_to_bytes(e.get_compressed()) for e in encoders]
            if progress is not None:
                progress.update(n)
            if ideal is not None:
                ideal.extend(ideal_bits.tolist())
        return payloads

    # -- decoding -----------------------------------------------------------------------------------------
    def check(self, header: Header, name: str):
        """UserError unless this codec can decode a file with this header."""
        if header.vqvae_hash != self.vqvae_hash:
            raise UserError(f"{name} was encoded with other VQ-VAE weights (hash {header.vqvae_hash.hex()}, this "
                            f"checkpoint's is {self.vqvae_hash.hex()}); decode it with the --checkpoint it was "
                            f"encoded with")
        grid = self.grid_of(header.image_shape)
        if tuple(header.grid) != tuple(grid):
            raise UserError(f"{name} declares a {header.grid[0]}x{header.grid[1]} code grid, but this VQ-VAE makes "
                            f"{grid[0]}x{grid[1]} of a {header.image_shape[0]}x{header.image_shape[1]} image "
                            f"(a corrupt file)")
        n = grid[0] * grid[1]
        if header.coder == FIXED and header.payload_length != fixed_payload_bytes(n, self.k):
            raise UserError(f"{name} has a {header.payload_length}-byte fixed-length payload; {n} codes of K={self.k} "
                            f"take {fixed_payload_bytes(n, self.k)} (a corrupt file)")
        if header.coder in (STATIC, PRIOR) and header.payload_length % 4:
            raise UserError(f"{name} has a {header.payload_length}-byte range-coded payload, not a whole number of "
                            f"32-bit words (a corrupt file)")
        if header.coder == PRIOR:
            if self.prior is None:
                raise UserError(f"{name} was coded with a prior (hash {header.prior_hash.hex()}); pass the --prior it "
                                f"was encoded with")
            if header.prior_hash != self.prior_hash:
                raise UserError(f"{name} was encoded with other prior weights (hash {header.prior_hash.hex()}, this "
                                f"prior's is {self.prior_hash.hex()}); pass the --prior it was encoded with")
            classes = self.prior.config.num_classes
            if classes and header.label >= classes:
                raise UserError(f"{name} has class label {header.label}, but this prior knows {classes} classes "
                                f"(a corrupt file)")

    def decode(self, blobs: list[bytes], names: list[str], progress=None) -> tuple[list, torch.Tensor]:
        """.vqz file contents of slices of one size (checked with `check`) -> (code maps, uint8 images)."""
        headers = [parse_header(b, name) for b, name in zip(blobs, names)]
        for header, name in zip(headers, names):
            self.check(header, name)
        if len({(h.image_shape, h.grid) for h in headers}) > 1:
            raise UserError("Codec.decode takes slices of one size at a time")
        maps = [None] * len(blobs)
        prior_indices = []
        for index, (header, blob, name) in enumerate(zip(headers, blobs, names)):
            payload = blob[HEADER.size:]
            n = header.grid[0] * header.grid[1]
            if header.coder == FIXED:
                codes = unpack_fixed(payload, n, self.k)
                if codes.max() >= self.k:
                    raise UserError(f"{name} holds code {codes.max()}, outside the codebook of {self.k} "
                                    f"(a corrupt file)")
                maps[index] = codes
            elif header.coder == STATIC:
                c = _constriction()
                try:
                    decoder = c.stream.queue.RangeDecoder(bytes_to_words(payload))
                    maps[index] = decoder.decode(c.stream.model.Categorical(self.static_freqs.astype(np.float64),
                                                                            perfect=False), n).astype(np.int64)
                except Exception as e:  # constriction refuses data it cannot decode
                    raise UserError(f"{name}: its payload does not decode ({e}; a corrupt file)") from None
            else:
                prior_indices.append(index)
            if progress is not None and header.coder != PRIOR:
                progress.update(1)
        for start in range(0, len(prior_indices), self.batch_size):
            chunk = prior_indices[start:start + self.batch_size]
            decoded = self._decode_prior([blobs[i][HEADER.size:] for i in chunk], headers[chunk[0]].grid,
                                         [headers[i].label for i in chunk], [names[i] for i in chunk], progress)
            for i, codes in zip(chunk, decoded):
                maps[i] = codes
        for header, codes, name in zip(headers, maps, names):
            if code_crc(codes) != header.crc:
                raise UserError(f"{name}: the decoded codes fail the file's checksum (a corrupt payload, or "
                                f"probabilities that differ from the encoder's on this hardware)")
        h, w = headers[0].grid
        codes = torch.from_numpy(np.stack(maps)).view(len(maps), h, w)
        return codes, self.reconstruct(codes)

    @torch.no_grad()
    def _decode_prior(self, payloads, grid, labels, names, progress=None) -> list[np.ndarray]:
        c = _constriction()
        family = c.stream.model.Categorical(perfect=False)
        h, w = grid
        n = len(payloads)
        y = self._labels_for(labels, n) if self.prior.config.num_classes else None
        decoders = [c.stream.queue.RangeDecoder(bytes_to_words(p)) for p in payloads]
        out = np.zeros((n, h * w), dtype=np.int64)

        def choose(pos, logits):
            probabilities = frequencies(logits.cpu().numpy(), self.bits).astype(np.float64)
            for s in range(n):
                try:
                    out[s, pos] = decoders[s].decode(family, probabilities[s:s + 1])[0]
                except Exception as e:  # constriction refuses data it cannot decode
                    raise UserError(f"{names[s]}: its payload does not decode ({e}; a corrupt file)") from None
            if progress is not None and pos % w == w - 1:
                progress.set_postfix_str(f"row {pos // w + 1}/{h} of {n} slices")
            return torch.from_numpy(out[:, pos])

        drive(self.prior.incremental(n, h, w, y, torch.float64), h * w, choose)
        if progress is not None:
            progress.update(n)
        return list(out)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------

def load_codec(checkpoint: Path, prior_path: Path | None, device, batch_size: int, precision: str):
    """(Codec, the VQ-VAE's TrainConfig, its checkpoint)."""
    vqvae, cfg, state = load_vqvae(checkpoint, device)
    prior, prior_state, class_names = None, None, ()
    if prior_path is not None:
        prior, _, prior_state = load_prior(prior_path, device)
        check_prior_fits(prior_state, vqvae, prior_path, checkpoint)
        if prior.config.num_classes > NO_LABEL:
            raise UserError(f"the .vqz format stores class labels below {NO_LABEL}; this prior has "
                            f"{prior.config.num_classes} classes")
        class_names = prior_state.get("class_names", ())
    return Codec(vqvae, prior, class_names, device, batch_size, precision), cfg, state


def expand_inputs(paths: list[Path], suffixes: tuple, what: str) -> list[Path]:
    """Files as given, and the files with one of `suffixes` directly inside each folder given, in natural order."""
    files = []
    for path in paths:
        if path.is_dir():
            inside = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes),
                            key=lambda p: natural_key(p.name))
            if not inside:
                raise UserError(f"folder {path} holds no {what} ({', '.join(suffixes)} files)")
            files += inside
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path} does not exist; pass {what} or folders of them")
    return files


def output_paths(out: Path, names: list[str], suffix: str) -> list[Path]:
    """One output file per input name (its name without the last suffix, + `suffix`) in `out`; refuses names that
    collide and files that already exist, before anything is written."""
    targets = [out / (Path(n).stem + suffix) for n in names]
    seen = {}
    for name, target in zip(names, targets):
        if target in seen:
            raise UserError(f"{seen[target]} and {name} would both be written to {target}; encode them into "
                            f"different --out folders")
        seen[target] = name
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    existing = [t for t in targets if t.exists()]
    if existing:
        raise UserError(f"{existing[0]} already exists ({len(existing)} of the outputs do); compress.py never "
                        f"overwrites files: choose a new --out folder or remove them")
    return targets


def write_new(path: Path, data: bytes):
    with open(path, "xb") as f:  # never over a file that appeared since the check
        f.write(data)


def resolve_class(codec: Codec, class_name: str | None, n: int):
    if class_name is None:
        return None
    if codec.prior is None or not codec.prior.config.num_classes:
        raise UserError("--class needs a class-conditional --prior")
    lowered = [c.lower() for c in codec.class_names]
    if class_name.lower() not in lowered:
        raise UserError(f"unknown --class {class_name!r}; this prior knows {', '.join(codec.class_names)}")
    return torch.full((n,), lowered.index(class_name.lower()), dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------

def cmd_encode(args, device):
    if not args.inputs and args.split is None:
        raise UserError("nothing to encode: pass image files or folders, or --split")
    if args.inputs and args.split is not None:
        raise UserError("pass either image files/folders or --split, not both")
    codec, cfg, state = load_codec(args.checkpoint, args.prior, device, args.batch_size, args.precision)
    if args.split is not None:
        data = load_split(cfg, args.split, args.data_root, demo=state["demo_settings"])
        images, names = data.images, [Path(f).name for f in data.files]
        labels = data.labels if codec.prior is not None and codec.prior.config.num_classes else None
        if args.class_name is not None:
            labels = resolve_class(codec, args.class_name, len(images))
    else:
        files = expand_inputs(args.inputs, IMAGE_SUFFIXES, "images")
        size = cfg.image_size
        decoded = []
        for f in tqdm(files, desc="reading", leave=False, disable=len(files) < 50):
            try:
                decoded.append(read_slice(f.read_bytes(), str(f), size))
            except OSError as e:
                raise UserError(f"cannot read {f}: {e.strerror or e}") from None
        shapes = {a.shape for a in decoded}
        if len(shapes) > 1:
            sizes = ", ".join(f"{h}x{w}" for h, w in sorted(shapes))
            raise UserError(f"the images have {len(shapes)} different sizes ({sizes}); encode each size separately")
        images, names = torch.from_numpy(np.stack(decoded)), [f.name for f in files]
        labels = resolve_class(codec, args.class_name, len(images))
    if codec.prior is not None and codec.prior.config.num_classes and labels is None:
        raise UserError("this prior is class-conditional: pass --class with one of "
                        f"{', '.join(codec.class_names)}")
    codec.grid_of(images.shape[1:])
    targets = output_paths(args.out, names, SUFFIX)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tqdm(total=len(images), desc="encoding", unit="slice", leave=False) as bar:
        codes = codec.codes(images)
        if codec.prior is None or args.coder in ("fixed", "static"):
            bar.update(len(images))
        files = codec.encode_codes(codes, tuple(images.shape[1:]), labels, args.coder,
                                   progress=bar if codec.prior is not None else None)
    seconds = time.perf_counter() - t0
    for target, data in zip(targets, files):
        write_new(target, data)
    sizes = np.array([len(f) for f in files])
    coders = sorted({CODER_NAMES[f[4]] for f in files})
    h, w = codes.shape[1:]
    print(f"encoded {len(files)} slices of {images.shape[1]}x{images.shape[2]} ({h}x{w} codes, K={codec.k}) with "
          f"the {'/'.join(coders)} coder: {sizes.mean():.1f} bytes per slice on average "
          f"({(sizes.mean() - HEADER.size) * 8 / (h * w):.3f} bits per code in the payload), "
          f"{len(files) / seconds:.2f} slices/s | written to {args.out}")


def cmd_decode(args, device):
    files = expand_inputs(args.files, (SUFFIX,), ".vqz files")
    codec, _, _ = load_codec(args.checkpoint, args.prior, device, args.batch_size, args.precision)
    blobs = [read_vqz(f) for f in files]
    headers = [parse_header(b, str(f)) for b, f in zip(blobs, files)]
    for header, f in zip(headers, files):
        codec.check(header, str(f))
    targets = output_paths(args.out, [f.name for f in files], ".png")
    args.out.mkdir(parents=True, exist_ok=True)
    from PIL import Image
    groups = {}
    for index, header in enumerate(headers):
        groups.setdefault((header.image_shape, header.grid), []).append(index)
    t0 = time.perf_counter()
    with tqdm(total=len(files), desc="decoding", unit="slice", leave=False) as bar:
        for indices in groups.values():
            _, images = codec.decode([blobs[i] for i in indices], [str(files[i]) for i in indices], bar)
            for i, image in zip(indices, images):
                buffer = io.BytesIO()
                Image.fromarray(image.numpy(), "L").save(buffer, "PNG")
                write_new(targets[i], buffer.getvalue())
    seconds = time.perf_counter() - t0
    print(f"decoded {len(files)} slices, {len(files) / seconds:.2f} slices/s | written to {args.out}")


# ---------------------------------------------------------------------------------------------------------
# Rate-distortion study
# ---------------------------------------------------------------------------------------------------------

CLASSICAL = ("jpeg", "webp", "jpeg2000", "avif")
DEFAULT_BUDGETS = (256, 320, 400, 512, 640, 800, 1024, 1280, 1536, 2048, 3072, 4096)
J2K_RATES = tuple(float(r) for r in np.geomspace(4000, 2, 120))  # compression ratios, worst quality first


def classical_settings(codec: str, pixels: int) -> list:
    """Each codec's quality settings, from the worst (smallest file) to the best."""
    if codec == "jpeg":
        return list(range(1, 96))
    if codec in ("webp", "avif"):
        return list(range(0, 101))
    if codec == "jpeg2000":
        return [r for r in J2K_RATES if pixels / r >= 40]  # below ~40 bytes OpenJPEG writes only markers
    raise UserError(f"unknown codec {codec!r}; choose from {', '.join(CLASSICAL)}")


def classical_encode(image: np.ndarray, codec: str, setting) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    im = Image.fromarray(image, "L")
    if codec == "jpeg":
        im.save(buffer, "JPEG", quality=setting, optimize=True)
    elif codec == "webp":
        im.save(buffer, "WEBP", quality=setting, method=6)
    elif codec == "avif":
        im.save(buffer, "AVIF", quality=setting, speed=6)
    else:
        im.save(buffer, "JPEG2000", quality_mode="rates", quality_layers=[setting], irreversible=True, no_jp2=True)
    return buffer.getvalue()


def classical_decode(data: bytes) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"))


class BudgetSearch:
    """The best quality setting of one codec whose file fits a byte budget, for one image; every setting is encoded
    at most once, whatever the budgets asked."""

    def __init__(self, image: np.ndarray, codec: str):
        self.image, self.codec = image, codec
        self.settings = classical_settings(codec, image.size)
        self.cache = {}

    def encoded(self, index: int) -> bytes:
        if index not in self.cache:
            self.cache[index] = classical_encode(self.image, self.codec, self.settings[index])
        return self.cache[index]

    def fit(self, budget: int) -> bytes | None:
        """The file of the best setting at most `budget` bytes (by bisection: sizes grow with quality), or None."""
        lo, hi = 0, len(self.settings) - 1
        if len(self.encoded(lo)) > budget:
            return None
        if len(self.encoded(hi)) <= budget:
            return self.encoded(hi)
        while hi - lo > 1:  # encoded(lo) fits, encoded(hi) does not
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if len(self.encoded(mid)) <= budget else (lo, mid)
        return self.encoded(lo)

    def smallest(self) -> int:
        return len(self.encoded(0))


def _scores(decoded: np.ndarray, original: np.ndarray) -> tuple[float, float]:
    x = torch.from_numpy(np.array(decoded)).float()[None, None] / 255
    y = torch.from_numpy(np.array(original)).float()[None, None] / 255
    return float(ssim(x, y)[0]), float(psnr(x, y)[0])


def classical_one_image(job):
    """One image through every codec at every budget: (image, codecs, budgets, matched) -> {codec: {budget or
    ("matched", name): (bytes, ssim, psnr) or None, "smallest": bytes}}. `matched` maps a name to this image's own
    budget (the size of its .vqz file under one VQ-VAE and coder). A worker's unit of work."""
    image, codecs, budgets, matched = job
    result = {}
    for codec in codecs:
        search = BudgetSearch(image, codec)
        result[codec] = {"smallest": search.smallest()}
        wanted = [(b, b) for b in budgets] + [(("matched", name), b) for name, b in matched.items()]
        for key, budget in wanted:
            data = search.fit(budget)
            result[codec][key] = None if data is None else (len(data), *_scores(classical_decode(data), image))
    return result


def _worker_init():
    torch.set_num_threads(1)


def classical_study(images: np.ndarray, codecs, budgets, matched: dict, workers: int) -> list:
    """classical_one_image over all images; matched: name -> (N,) per-image budgets."""
    jobs = [(image, codecs, budgets, {name: int(b[i]) for name, b in matched.items()})
            for i, image in enumerate(images)]
    desc = f"{', '.join(codecs)}: quality searched per slice"
    if workers <= 1:
        return [classical_one_image(j) for j in tqdm(jobs, desc=desc, unit="slice", leave=False)]
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
        return list(tqdm(pool.imap(classical_one_image, jobs, chunksize=4), total=len(jobs), desc=desc,
                         unit="slice", leave=False))


def classical_row(results: list, codec: str, key, setting: str, budget) -> dict:
    """One row of rd.csv from classical_one_image results: means over the images that fit, the others counted."""
    fit = [r[codec][key] for r in results if r[codec][key] is not None]
    over = [r[codec]["smallest"] for r in results if r[codec][key] is None]
    mean = lambda i: float(np.mean([f[i] for f in fit])) if fit else float("nan")  # noqa: E731
    return {"codec": codec, "setting": setting, "budget_bytes": budget, "images": len(results),
            "images_fit": len(fit), "images_over_budget": len(over),
            "smallest_file_of_an_image_over_budget": min(over) if over else "",
            "mean_bytes": mean(0), "mean_payload_bytes": "", "bits_per_slice": mean(0) * 8,
            "payload_bits_per_code": "", "mean_ssim": mean(1),
            "std_ssim": float(np.std([f[1] for f in fit])) if fit else float("nan"), "mean_psnr": mean(2),
            "latent_grid": "", "K": ""}


def mean_scores(decoded: torch.Tensor, originals: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    s, p = [], []
    for a, b in zip(decoded.split(64), originals.split(64)):
        x, y = a.float()[:, None] / 255, b.float()[:, None] / 255
        s.append(ssim(x, y))
        p.append(psnr(x, y))
    return torch.cat(s).numpy(), torch.cat(p).numpy()


def cmd_rd(args, device):
    budgets, codecs, priors = rd_settings(args)
    out = args.out or run_dir_of(args.checkpoints[0]) / f"rd_{args.split}"
    outputs = {name: out / name for name in ("rd.csv", "rd.json", "rd.png", "rd_slice.png")
               + (ANATOMY_OUTPUTS if args.segmenter else ())}
    segmenter = load_segmenter(args.segmenter, device) if args.segmenter else None
    existing = [p for p in outputs.values() if p.exists()]
    if existing:
        raise UserError(f"{existing[0]} already exists; compress.py never overwrites files: choose a new --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")

    # Each VQ-VAE, on the same slices
    measured, originals, names = {}, None, None
    for ckpt, prior_path in zip(args.checkpoints, priors):
        codec, cfg, state = load_codec(ckpt, prior_path, device, args.batch_size, args.precision)
        images, labels, files = rd_slices(load_split(cfg, args.split, args.data_root, demo=state["demo_settings"]),
                                          args.max_images)
        if originals is None:
            originals, names = images, files
        elif originals.shape != images.shape or not torch.equal(originals, images):
            raise UserError(f"{ckpt} records other {args.split} images than {args.checkpoints[0]}; compare "
                            f"checkpoints trained on the same dataset")
        label = f"{cfg.preset} ({run_dir_of(ckpt).name})"
        if label in measured:  # the same run twice (e.g. with and without its prior)
            label = f"{label} #{len(measured) + 1}"
        measured[label] = measure_vqvae(codec, images, labels, files, label, args.verify)
        measured[label]["model"].update(checkpoint=str(ckpt), prior=str(prior_path) if prior_path else None,
                                        epoch=state.get("epoch"))
    rows = [row for m in measured.values() for row in m["rows"]]

    # Classical codecs: at each fixed budget, and at each slice's own .vqz size under each VQ-VAE row
    matched = {f"{r['codec']} {r['setting']}": r.pop("_sizes") for r in rows}
    results = classical_study(originals.numpy(), codecs, budgets, matched, args.workers)
    for codec_name in codecs:
        rows += [classical_row(results, codec_name, b, "quality searched per slice", b) for b in budgets]
        rows += [classical_row(results, codec_name, ("matched", name), f"at the size of each {name} file",
                               "per slice") for name in matched]

    # Outputs
    out.mkdir(parents=True, exist_ok=True)
    write_csv(outputs["rd.csv"], rows)
    speeds = {label: m["speed"] for label, m in measured.items()}
    summary = {"split": args.split, "images": len(originals), "image_size": list(originals.shape[1:]),
               "header_bytes": HEADER.size, "budgets": budgets, "codecs": codecs,
               "models": {label: m["model"] for label, m in measured.items()},
               "rows": rows, "speed": speeds, "targets": targets(rows),
               "about": "bytes are whole .vqz files (38-byte header included) and whole classical files "
                        "(JPEG 2000 as a raw codestream, without the JP2 container); classical means are over the "
                        "images that fit the budget, images_over_budget counts the others"}
    write_json(outputs["rd.json"], summary)
    plot_rd(rows, outputs["rd.png"],
            f"{args.split}: {len(originals)} slices of {originals.shape[1]}x{originals.shape[2]}")
    figures = {label: m["figure"] for label, m in measured.items()}
    slice_figure(originals.numpy(), figures, codecs, outputs["rd_slice.png"], args.figure_slice, names)
    if segmenter:
        summary["anatomy"] = anatomy_rd(segmenter, args, device, (cfg, state), originals, names, rows, figures,
                                        codecs, budgets, outputs)
    print_rd(rows, speeds, out, tuple(outputs))
    return summary


def rd_settings(args) -> tuple[list[int], list[str], list[Path | None]]:
    """rd's budgets, classical codecs and the prior of each --checkpoint (default_prior where none is given and one
    is there), checked before anything is loaded."""
    budgets = sorted(set(args.budgets))
    if not budgets or min(budgets) < 1:
        raise UserError("--budgets must be positive byte counts, e.g. 320,640,1280")
    codecs = list(dict.fromkeys(args.codecs))
    for c in codecs:
        classical_settings(c, 1 << 16)
    if args.max_images is not None and args.max_images < 1:
        raise UserError(f"--max-images must be at least 1, got {args.max_images}")
    if args.priors and len(args.priors) != len(args.checkpoints):
        raise UserError(f"give one --prior per --checkpoint ({len(args.checkpoints)}), 'none' for no prior, or no "
                        f"--prior to use each run's prior/best.pt where there is one")
    if args.priors:
        priors = [None if str(p).lower() == "none" else Path(p) for p in args.priors]
    else:
        priors = [default_prior(c) if default_prior(c).is_file() else None for c in args.checkpoints]
    return budgets, codecs, priors


def rd_slices(data, max_images: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(uint8 images, labels, file names) of a split, or `max_images` of them spread evenly over it."""
    if not max_images or len(data.images) <= max_images:
        return data.images, data.labels, list(data.files)
    pick = torch.linspace(0, len(data.images) - 1, max_images).round().long()
    return data.images[pick], data.labels[pick], [data.files[i] for i in pick.tolist()]


def measure_vqvae(codec: Codec, images: torch.Tensor, labels: torch.Tensor, names: list[str], label: str,
                  verify: bool) -> dict:
    """One VQ-VAE as a codec: its reconstructions' scores, its files under every coder it has (the prior-coded ones
    decoded again with `verify`), their speed; -> {"rows": rows of rd.csv, "speed", "figure", "model"}."""
    n, (height, width) = len(images), images.shape[1:]
    t0 = time.perf_counter()
    codes = codec.codes(images)
    t_codes = time.perf_counter() - t0
    t0 = time.perf_counter()
    recon = codec.reconstruct(codes)
    speed = {"vqvae_encode_slices_per_s": n / t_codes, "vqvae_decode_slices_per_s": n / (time.perf_counter() - t0),
             "threads": torch.get_num_threads(), "device": str(codec.device)}
    coded = {coder: codec.encode_codes(codes, (height, width), coder=coder) for coder in ("fixed", "static")}
    ideal = None
    if codec.prior is not None:
        y = labels if codec.prior.config.num_classes else None
        ideal = []
        t0 = time.perf_counter()
        with tqdm(total=n, desc=f"{label}: prior encoding", unit="slice", leave=False) as bar:
            coded["prior"] = codec.encode_codes(codes, (height, width), y, "prior", bar, ideal)
        speed["prior_encode_slices_per_s"] = n / (t_codes + time.perf_counter() - t0)
        if verify:
            speed["prior_decode_slices_per_s"] = verify_decoding(codec, coded["prior"], codes, recon, names, label)
    s, p = mean_scores(recon, images)
    h, w = codes.shape[1:]
    rows = [vqvae_row(label, coder, blobs, s, p, (h, w), codec.k, ideal if coder == "prior" else None)
            for coder, blobs in coded.items()]
    best = min(coded, key=lambda c: np.mean([len(b) for b in coded[c]]))
    model = {"latent_grid": [h, w], "K": codec.k, "vqvae_hash": codec.vqvae_hash.hex(),
             "prior_hash": codec.prior_hash.hex()}
    return {"rows": rows, "speed": speed, "figure": {"coder": best, "files": coded[best], "recon": recon},
            "model": model}


def verify_decoding(codec: Codec, files: list[bytes], codes: torch.Tensor, recon: torch.Tensor, names: list[str],
                    label: str) -> float:
    """Decode prior-coded files again: UserError unless they give back the same codes and images; -> slices/s."""
    t0 = time.perf_counter()
    with tqdm(total=len(files), desc=f"{label}: prior decoding", unit="slice", leave=False) as bar:
        decoded_codes, decoded = codec.decode(files, [f"{f} ({label})" for f in names], bar)
    if not torch.equal(decoded_codes, codes) or not torch.equal(decoded, recon):
        raise UserError(f"{label}: decoding the prior-coded files did not give back the same codes and images; "
                        f"please report this")
    return len(files) / (time.perf_counter() - t0)


def vqvae_row(label: str, coder: str, blobs: list[bytes], s: np.ndarray, p: np.ndarray, grid: tuple[int, int],
              k: int, ideal: list | None) -> dict:
    """One row of rd.csv for a VQ-VAE's files under one coder (SSIM and PSNR are its reconstructions', whatever
    the coder); "_sizes" holds each slice's file size, the classical codecs' budgets at equal bytes."""
    sizes = np.array([len(b) for b in blobs], dtype=np.float64)
    h, w = grid
    row = {"codec": f"VQ-VAE {label}", "setting": coder, "budget_bytes": "", "images": len(blobs),
           "images_fit": len(blobs), "images_over_budget": 0, "mean_bytes": sizes.mean(),
           "mean_payload_bytes": sizes.mean() - HEADER.size, "bits_per_slice": sizes.mean() * 8,
           "payload_bits_per_code": (sizes.mean() - HEADER.size) * 8 / (h * w),
           "mean_ssim": float(s.mean()), "std_ssim": float(s.std()), "mean_psnr": float(p.mean()),
           "latent_grid": f"{h}x{w}", "K": k}
    if ideal is not None:
        row["ideal_payload_bytes"] = float(np.mean(ideal)) / 8
    row["_sizes"] = sizes
    return row


def print_rd(rows: list[dict], speeds: dict, out: Path, written: tuple):
    for r in rows:
        if r["codec"].startswith("VQ-VAE"):
            print(f"{r['codec']} {r['setting']}: {r['mean_bytes']:.1f} bytes/slice ({r['mean_payload_bytes']:.1f} "
                  f"payload) | SSIM {r['mean_ssim']:.4f} | PSNR {r['mean_psnr']:.2f} dB")
        else:
            budget = f"<= {r['budget_bytes']} B" if isinstance(r["budget_bytes"], int) else r["setting"]
            print(f"{r['codec']} {budget}: {r['images_fit']} fit, {r['images_over_budget']} over | "
                  f"{r['mean_bytes']:.1f} bytes | SSIM {r['mean_ssim']:.4f} | PSNR {r['mean_psnr']:.2f} dB")
    print(f"speed: {speeds}")
    print(f"written to {out} ({', '.join(written)})")


ANATOMY_OUTPUTS = ("rd_anatomy.csv", "rd_anatomy.json")


def anatomy_rd(segmenter, args, device, trained, originals, files, rows, figure, codecs, budgets, outputs) -> dict:
    """rd --segmenter: the segmenter's tissue Dice against the true masks (dice_mean: the mean of CSF, GM and WM)
    for the originals, each VQ-VAE (its one reconstruction, at the mean file size of each of its coders) and each
    classical codec at each budget (each slice at the best quality that fits; slices that fit in no file are left
    out and counted, as in rd.csv) -> rd_anatomy.csv and rd_anatomy.json, returned too."""
    model, _, seg_state = segmenter
    cfg, state = trained
    amp = autocast(args.precision, device)
    data = load_split(cfg, args.split, args.data_root, demo=state["demo_settings"], masks=True, verbose=False)
    where = {f: i for i, f in enumerate(data.files)}
    masks = data.masks[[where[f] for f in files]]  # the masks of the slices measured, in their order

    def dice_row(codec, setting, budget, images, picked, mean_bytes):
        dice = dice_table(segment_images(model, images, device, amp, args.batch_size), masks[picked]).mean(0)
        return {"codec": codec, "setting": setting, "budget_bytes": budget, "images": len(masks),
                "images_fit": len(picked), "mean_bytes": mean_bytes, **dict(zip(DICE_COLUMNS, dice.tolist()))}

    everything = list(range(len(masks)))
    table = [dice_row("original", "8-bit PNG", "", originals, everything, "")]
    for r in rows:
        if r["codec"].startswith("VQ-VAE"):
            recon = figure[r["codec"].removeprefix("VQ-VAE ")]["recon"]
            table.append(dice_row(r["codec"], r["setting"], "", recon, everything, r["mean_bytes"]))
    for codec in codecs:
        fits = {b: [] for b in budgets}  # budget -> (slice index, file) of the slices that fit
        for i, image in enumerate(tqdm(originals.numpy(), desc=f"{codec}: Dice per budget", leave=False)):
            search = BudgetSearch(image, codec)
            for b in budgets:
                if (data_bytes := search.fit(b)) is not None:
                    fits[b].append((i, data_bytes))
        for b, fit in fits.items():
            if fit:
                decoded = torch.from_numpy(np.stack([classical_decode(f) for _, f in fit]))
                table.append(dice_row(codec, "quality searched per slice", b, decoded, [i for i, _ in fit],
                                      float(np.mean([len(f) for _, f in fit]))))
    result = {"segmenter": str(args.segmenter), "segmenter_epoch": seg_state["epoch"], "rows": table,
              "dice_minus_jpeg2000_at_320_bytes": dice_against(table, "jpeg2000", 320)}
    write_csv(outputs["rd_anatomy.csv"], table)
    write_json(outputs["rd_anatomy.json"], result)
    for r in table:
        print(f"tissue Dice | {r['codec']} {r['setting']}" + (f" <= {r['budget_bytes']} B" if r["budget_bytes"] else "")
              + f": {r['images_fit']}/{r['images']} slices, mean Dice {r['dice_mean']:.4f} (CSF {r['dice_csf']:.4f}"
              f" GM {r['dice_gm']:.4f} WM {r['dice_wm']:.4f})")
    return result


def dice_against(table: list[dict], codec: str, budget: int) -> dict:
    """Each VQ-VAE row whose mean file fits `budget`: its mean Dice minus that of `codec` at `budget` bytes."""
    reference = [r for r in table if r["codec"] == codec and r["budget_bytes"] == budget]
    if not reference:
        return {}
    return {f"{r['codec']} {r['setting']} ({r['mean_bytes']:.0f} B)": r["dice_mean"] - reference[0]["dice_mean"]
            for r in table if r["codec"].startswith("VQ-VAE") and r["mean_bytes"] <= budget}


def targets(rows: list[dict]) -> dict:
    """The codec's targets as measured: SSIM against JPEG 2000 at 640 bytes and at equal bytes per slice, the
    prior-coded size, and whether the VQ-VAE points lie above every classical codec's points below 1.5 KB."""
    vq = [r for r in rows if r["codec"].startswith("VQ-VAE")]
    classical = [r for r in rows if not r["codec"].startswith("VQ-VAE")]
    out = {}
    j2k640 = [r for r in classical if r["codec"] == "jpeg2000" and r["budget_bytes"] == 640]
    if j2k640:
        j = j2k640[0]
        out["jpeg2000_at_640_bytes"] = {k: j[k] for k in ("mean_ssim", "mean_bytes", "images_over_budget")}
        out["ssim_minus_jpeg2000_at_640_bytes"] = {
            f"{r['codec']} {r['setting']} ({r['mean_bytes']:.0f} B file, {r['mean_payload_bytes']:.0f} B payload)":
                r["mean_ssim"] - j["mean_ssim"] for r in vq if r["mean_payload_bytes"] <= 640}
    out["ssim_minus_classical_at_equal_bytes_per_slice"] = {
        f"{r['codec']} {r['setting']}": {
            c["codec"]: {"ssim_gain": r["mean_ssim"] - c["mean_ssim"], "images_over_budget": c["images_over_budget"]}
            for c in classical if c["setting"] == f"at the size of each {r['codec']} {r['setting']} file"}
        for r in vq}
    out["prior_coded_mean_bytes"] = {r["codec"]: {"file": r["mean_bytes"], "payload": r["mean_payload_bytes"]}
                                     for r in vq if r["setting"] == "prior"}
    above = {}
    for r in classical:
        if not isinstance(r["budget_bytes"], int) or r["budget_bytes"] > 1536 or not math.isfinite(r["mean_ssim"]):
            continue
        within = [v["mean_ssim"] for v in vq if v["mean_bytes"] <= r["budget_bytes"]]
        above[f"{r['codec']} <= {r['budget_bytes']} B"] = (max(within) > r["mean_ssim"]) if within else None
    out["vqvae_above_classical_below_1536_bytes"] = {
        "about": "per classical point: does a VQ-VAE point with at most its budget in mean file bytes have a higher "
                 "mean SSIM (null: no VQ-VAE point that small)", **above}
    out["vqvae_above_every_classical_point_below_1536_bytes"] = bool(above) and all(v is True for v in above.values())
    return out


def plot_rd(rows: list[dict], path: Path, title: str):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, metric, name in zip(axes, ("mean_ssim", "mean_psnr"), ("mean SSIM", "mean PSNR (dB)")):
        for codec in dict.fromkeys(r["codec"] for r in rows if not r["codec"].startswith("VQ-VAE")):
            pts = [r for r in rows if r["codec"] == codec and math.isfinite(r[metric])
                   and isinstance(r["budget_bytes"], int)]
            if not pts:
                continue
            line, = ax.plot([r["mean_bytes"] for r in pts], [r[metric] for r in pts], marker="o", ms=3, label=codec)
            matched = [r for r in rows if r["codec"] == codec and math.isfinite(r[metric])
                       and not isinstance(r["budget_bytes"], int)]
            ax.plot([r["mean_bytes"] for r in matched], [r[metric] for r in matched], ls="none", marker="x", ms=6,
                    color=line.get_color())
            for r in pts:
                if r["images_over_budget"]:
                    ax.plot(r["mean_bytes"], r[metric], marker="o", ms=8, mfc="none", color=line.get_color())
                    ax.annotate(f"{r['images_over_budget']} over", (r["mean_bytes"], r[metric]), fontsize=6,
                                textcoords="offset points", xytext=(3, -8), color=line.get_color())
        markers = {"fixed": "s", "static": "^", "prior": "*"}
        for codec in dict.fromkeys(r["codec"] for r in rows if r["codec"].startswith("VQ-VAE")):
            pts = sorted((r for r in rows if r["codec"] == codec), key=lambda r: r["mean_bytes"])
            line, = ax.plot([r["mean_bytes"] for r in pts], [r[metric] for r in pts], ls=":", lw=1.5, label=codec)
            for r in pts:
                ax.plot(r["mean_bytes"], r[metric], marker=markers.get(r["setting"], "o"),
                        ms=9 if r["setting"] == "prior" else 6, color=line.get_color())
        ax.axvline(1536, color="grey", lw=0.5, ls="--")
        ax.set(xscale="log", xlabel="bytes per slice (whole file)", ylabel=name, title=f"{name} vs size")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8,
               title="VQ-VAE: square fixed-length, triangle static, star prior coding (one reconstruction, so one "
                     "SSIM); classical: o at each budget (ringed: some slices did not fit), x at each VQ-VAE file's "
                     "size per slice", title_fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * math.ceil(len(labels) / 4), 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def slice_figure(originals: np.ndarray, figure: dict, codecs, path: Path, index: int | None, files):
    """One slice: the original, then per VQ-VAE its decoded file beside every classical codec at the same bytes."""
    plt = pyplot()
    index = len(originals) // 2 if index is None else index
    if not 0 <= index < len(originals):
        raise UserError(f"--figure-slice {index} is outside 0..{len(originals) - 1}")
    original = originals[index]
    rows = list(figure.items())
    cols = 2 + len(codecs)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.5 * len(rows)), squeeze=False)
    for r, (label, entry) in enumerate(rows):
        budget = len(entry["files"][index])
        vq = entry["recon"][index].numpy()
        panels = [("original", original), (f"VQ-VAE {label}\n{entry['coder']}, {budget} B, SSIM "
                                           f"{_scores(vq, original)[0]:.3f}", vq)]
        for codec in codecs:
            search = BudgetSearch(original, codec)
            data = search.fit(budget)
            if data is None:
                panels.append((f"{codec}: does not fit in {budget} B\n(its smallest file: {search.smallest()} B)",
                               None))
            else:
                decoded = classical_decode(data)
                panels.append((f"{codec}, {len(data)} B\nSSIM {_scores(decoded, original)[0]:.3f}", decoded))
        for ax, (title, image) in zip(axes[r], panels):
            if image is not None:
                ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.suptitle(f"{Path(str(files[index])).name}: every codec at (at most) the VQ-VAE file's bytes", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = ArgumentParser(prog="compress.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    def common(q, prior_help):
        q.add_argument("--checkpoint", type=Path, required=True, help="the VQ-VAE .pt written by train.py, or its "
                       "run folder (its best.pt)")
        q.add_argument("--prior", type=Path, help=prior_help)
        add_runtime_flags(q, batch_size=64, batch_help="slices per pass of the models")

    e = sub.add_parser("encode", help="images -> .vqz files", description="Encode slices into .vqz files.")
    common(e, "a prior .pt written by train_prior.py: code with its probabilities (default: no prior, static or "
              "fixed-length coding)")
    e.add_argument("inputs", nargs="*", type=Path, help="PNG/JPEG files or folders of them")
    e.add_argument("--split", help="encode this split of the dataset the checkpoint records instead of files")
    e.add_argument("--data-root", help="with --split: where that dataset is now, if it moved")
    e.add_argument("--out", type=Path, required=True, help="folder for the .vqz files (existing files are never "
                   "overwritten)")
    e.add_argument("--coder", default="auto", choices=("auto", "prior", "static", "fixed"),
                   help="auto: per slice the smallest of prior (with --prior) or static, and fixed-length")
    e.add_argument("--class", dest="class_name", help="the class of every slice, for a class-conditional prior")

    d = sub.add_parser("decode", help=".vqz files -> PNGs", description="Decode .vqz files into 8-bit PNGs.")
    common(d, "the prior .pt the files were encoded with (needed for prior-coded files)")
    d.add_argument("files", nargs="+", type=Path, help=".vqz files or folders of them")
    d.add_argument("--out", type=Path, required=True, help="folder for the PNGs (existing files are never overwritten)")

    r = sub.add_parser("rd", help="rate-distortion study against JPEG, WebP, JPEG 2000 and AVIF",
                       description="Bytes per slice against SSIM and PSNR for VQ-VAEs and classical codecs.")
    r.add_argument("--checkpoint", dest="checkpoints", type=Path, action="append", required=True,
                   help="a VQ-VAE .pt or run folder (its best.pt); repeat for several (e.g. default and hq)")
    r.add_argument("--prior", dest="priors", action="append",
                   help="the prior of each --checkpoint in order, or none (default: <run>/prior/best.pt if present)")
    r.add_argument("--split", default="test", help="the split to measure (default: test)")
    r.add_argument("--data-root", help="where the dataset is now, if it moved")
    r.add_argument("--budgets", type=lambda s: [int(v) for v in s.split(",") if v], default=list(DEFAULT_BUDGETS),
                   help=f"byte budgets for the classical codecs (default: {','.join(map(str, DEFAULT_BUDGETS))})")
    r.add_argument("--codecs", type=lambda s: [v for v in s.split(",") if v], default=list(CLASSICAL),
                   help=f"classical codecs to compare (default: {','.join(CLASSICAL)})")
    r.add_argument("--max-images", type=int, help="use this many slices spread over the split (default: all)")
    r.add_argument("--workers", type=int, default=1, help="processes for the classical codecs' searches (default: 1)")
    r.add_argument("--figure-slice", type=int, help="index of the slice in rd_slice.png (default: the middle one)")
    r.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="decode every prior-coded file and check it gives the same codes and image (default: on)")
    r.add_argument("--segmenter", type=Path, help="a tissue segmenter .pt written by segment.py train, or its run "
                   "folder: also the tissue Dice at every budget (rd_anatomy.csv, rd_anatomy.json)")
    r.add_argument("--out", type=Path, help="output folder (default: rd_<split> in the first checkpoint's run)")
    add_runtime_flags(r, batch_size=64, batch_help="slices per pass of the models")
    return p.parse_args(argv)


def main(argv=None):
    with exits_with_one_line(interrupted="interrupted; the files written so far are complete, the rest were not "
                                         "written"):
        args = parse_args(argv)
        device = apply_runtime_flags(args)
        return {"encode": cmd_encode, "decode": cmd_decode, "rd": cmd_rd}[args.command](args, device)


if __name__ == "__main__":
    main()
