"""The .vqz format and its entropy coders: a slice's code map under a trained VQ-VAE, written to a small file and
read back, entropy-coded with the prior's conditionals or without a prior. compress.py is its command line;
codec/classical.py holds the classical codecs it is compared with, codec/ladder.py several VQ-VAEs as one encoder.

File format (.vqz, version 1; little-endian; a 38-byte header, then the payload):

    offset size  field
     0     3     magic b"VQZ"
     3     1     format version (1)
     4     1     coder: 0 fixed-length (ceil(log2 K) bits per code), 1 static (range coding with the VQ-VAE's
                 code-usage histogram), 2 prior (range coding with a raster-order prior's conditionals, code by
                 code: PixelCNN or transformer), 3 passes (range coding with a multiscale prior's conditionals,
                 pass by pass; added after 0-2, whose files read as they always did)
     5     1     class label for a class-conditional prior, 255 for none
     6     2+2   image height, width (pixels, at most 8192 each: images.MAX_IMAGE_SIDE)
    10     2+2   code grid height, width (must be what the VQ-VAE makes of that image size)
    14     8     VQ-VAE weights hash (the first 8 bytes of SHA-256 over its state dict)
    22     8     prior weights hash (zeros unless coder 2 or 3)
    30     4     CRC-32 of the code map (uint16 little-endian codes in raster order)
    34     4     payload length in bytes (must be exactly the rest of the file)
    38     ...   payload: packed bits (coder 0) or constriction range-coder words, uint32 little-endian (1, 2, 3)

Coding order: coder 2 codes the positions in raster order, one symbol at a time; coder 3 codes them in the prior's
passes (MultiscalePrior.schedule), each pass's positions in the order of MultiscalePrior.pass_positions. A range
coder's symbols are a sequence either way: encoder and decoder run the same passes over the same positions.

Exactness: the prior's logits are computed in float64 by the one procedure that fills maps in the prior's coding
order (Prior.fill, the one sampling uses too, run by encoder and decoder alike), rounded to 1/64 nat, and turned
into integer frequencies by integer arithmetic only (`frequencies`), so encoder and decoder code with identical
integers. The float64 logits differ by ~1e-15 at most between thread counts (the multiscale prior's convolutions),
batch compositions or from the one-pass forward; a difference moves a frequency only if a logit lies within that
distance of a rounding boundary (~1e-13 per logit). Should it happen, the CRC of the code map turns it into an
error instead of a wrong image.

Entropy coding: constriction's range coder (stream.queue.RangeEncoder/RangeDecoder with stream.model.Categorical
(perfect=False)), a maintained library, rather than a hand-written arithmetic coder, whose carry and renormalisation
corner cases are a classic source of encoder/decoder mismatch. Its cost over the ideal code length of the integer
frequencies is about one 32-bit word per slice (0.03 to 4.1 bytes, mean 2.1, over 3000 random streams).
"""
import hashlib
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imaging.slices import MAX_IMAGE_SIDE, to_float, to_uint8
from training.checkpoints import check_prior_fits, load_prior, load_vqvae
from utils import UserError, autocast

MAGIC = b"VQZ"
FORMAT_VERSION = 1
HEADER = struct.Struct("<3sBBBHHHH8s8sII")
FIXED, STATIC, PRIOR, PASSES = 0, 1, 2, 3
CODER_NAMES = {FIXED: "fixed", STATIC: "static", PRIOR: "prior", PASSES: "passes"}
PRIOR_CODERS = (PRIOR, PASSES)  # coded with a prior's conditionals: in raster order, or in a multiscale prior's passes
CODING_ORDERS = {PRIOR: "in raster order (a pixelcnn or transformer prior)", PASSES: "in a multiscale prior's passes"}
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
_EXP_TABLE_TORCH = torch.from_numpy(EXP_TABLE)


def probability_bits(k: int) -> int:
    """Frequencies of a K-symbol alphabet sum to 2^bits: 16 bits up to K = 256, more for larger codebooks (every
    symbol keeps at least 1, so K / 2^bits is the probability mass spent on that floor); 24 at most."""
    return max(16, min(24, math.ceil(math.log2(k)) + 8))


def frequencies(logits, bits: int) -> np.ndarray:
    """(m, K) logits (float64 numbers: an array, or a tensor on the CPU) -> (m, K) int64 frequencies, each >= 1,
    each row summing to 2^bits."""
    return frequency_tensor(torch.as_tensor(logits, dtype=torch.float64), bits).numpy()


def frequency_tensor(logits: torch.Tensor, bits: int) -> torch.Tensor:
    """frequencies on a float64 (m, K) tensor on the CPU, as an int64 tensor.

    Deterministic in the integers: only the rounding of logits * 64 to an integer (half to even) involves floats.
    Computed by torch (threaded: a multiscale prior's pass brings the frequencies of a whole map at once); the
    integers are those numpy's np.rint, // and argmax (the first of equal maxima) give (tests/test_codec.py)."""
    if not torch.isfinite(logits).all():
        raise UserError("the prior produced non-finite logits (its weights are broken); use another prior checkpoint")
    z = torch.round(logits * LOGIT_STEPS)
    d = (z.amax(1, keepdim=True) - z).clamp_(max=len(EXP_TABLE) - 1).long()
    e = _EXP_TABLE_TORCH[d]
    total, k = 1 << bits, logits.shape[1]
    f = torch.div(e * (total - k), e.sum(1, keepdim=True), rounding_mode="floor") + 1
    f[torch.arange(len(f)), e.argmax(1)] += total - f.sum(1)
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
        self.prior_coder = None if prior is None else PRIOR if prior.raster_order else PASSES
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

    def code_grid(self, image_shape) -> tuple:
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
        self.code_grid(images.shape[1:])
        return self.encode_codes(self.codes(images), tuple(images.shape[1:]), labels, coder, progress)

    def encode_codes(self, codes: torch.Tensor, image_shape, labels=None, coder: str = "auto",
                     progress=None, ideal: list | None = None) -> list[bytes]:
        """(N, h, w) code maps of images of `image_shape` -> N .vqz file contents. coder: "fixed", "static",
        "prior", or "auto" (per slice the smallest of prior-coded (when there is a prior) and fixed-length, or of
        static and fixed-length without one). `ideal`: see prior_payloads."""
        n, h, w = codes.shape
        if self.code_grid(image_shape) != (h, w):
            raise UserError(f"{h}x{w} code maps are not what this VQ-VAE makes of {image_shape[0]}x{image_shape[1]} "
                            f"images")
        flat = codes.reshape(n, -1).numpy()
        if coder == "prior" or (coder == "auto" and self.prior is not None):
            if self.prior is None:
                raise UserError("prior coding needs a prior, and this codec has none")
            payloads = self.prior_payloads(codes, labels, progress, ideal)
            candidates = [(self.prior_coder, p) for p in payloads]
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
                            self.prior_hash if kind in PRIOR_CODERS else bytes(8), code_crc(flat[index]),
                            len(payload))
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
            raise UserError("this prior is class-conditional: every slice needs its class label")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if (labels < 0).any() or (labels >= self.prior.config.num_classes).any() or len(labels) != n:
            raise UserError(f"class labels must be in 0..{self.prior.config.num_classes - 1}, one per slice")
        return labels

    def pass_frequencies(self, logits: torch.Tensor) -> np.ndarray:
        """(n, m, K) float64 logits of the m positions coded together -> (n, m, K) frequencies as float64 (exact
        integers), the probabilities constriction's models take."""
        n, m, k = logits.shape
        return frequency_tensor(logits.reshape(n * m, k).cpu(), self.bits).double().reshape(n, m, k).numpy()

    @torch.no_grad()
    def prior_payloads(self, codes: torch.Tensor, labels=None, progress=None, ideal: list | None = None) -> list[bytes]:
        """(N, h, w) code maps -> N range-coded payloads, the positions in the prior's coding order (Prior.fill);
        `ideal` (a list) receives each map's ideal code length in bits under the same integer frequencies."""
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
            report = coding_progress(progress, h, w, f"slices {start + 1}-{start + n}")

            def choose(positions, logits):
                f = self.pass_frequencies(logits)  # (n, m, K)
                coded = symbols[:, positions.numpy()]  # (n, m)
                for s in range(n):
                    encoders[s].encode(coded[s], family, f[s])
                chosen = np.take_along_axis(f, coded[:, :, None].astype(np.int64), 2)[:, :, 0]
                ideal_bits[:] += (self.bits - np.log2(chosen)).sum(1)
                report(len(positions))
                return torch.from_numpy(coded.astype(np.int64))

            self.prior.fill(n, h, w, y, choose, torch.float64)
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
                            f"checkpoint's is {self.vqvae_hash.hex()}); decode it with the VQ-VAE it was "
                            f"encoded with")
        grid = self.code_grid(header.image_shape)
        if tuple(header.grid) != tuple(grid):
            raise UserError(f"{name} declares a {header.grid[0]}x{header.grid[1]} code grid, but this VQ-VAE makes "
                            f"{grid[0]}x{grid[1]} of a {header.image_shape[0]}x{header.image_shape[1]} image "
                            f"(a corrupt file)")
        n = grid[0] * grid[1]
        if header.coder == FIXED and header.payload_length != fixed_payload_bytes(n, self.k):
            raise UserError(f"{name} has a {header.payload_length}-byte fixed-length payload; {n} codes of K={self.k} "
                            f"take {fixed_payload_bytes(n, self.k)} (a corrupt file)")
        if header.coder in (STATIC, *PRIOR_CODERS) and header.payload_length % 4:
            raise UserError(f"{name} has a {header.payload_length}-byte range-coded payload, not a whole number of "
                            f"32-bit words (a corrupt file)")
        if header.coder in PRIOR_CODERS:
            if self.prior is None:
                raise UserError(f"{name} was coded with a prior (hash {header.prior_hash.hex()}); decode it with the "
                                f"prior it was encoded with")
            if header.coder != self.prior_coder:
                raise UserError(f"{name} was coded {CODING_ORDERS[header.coder]}, but this prior codes "
                                f"{CODING_ORDERS[self.prior_coder]}; decode it with the prior it was encoded with "
                                f"(hash {header.prior_hash.hex()})")
            if header.prior_hash != self.prior_hash:
                raise UserError(f"{name} was encoded with other prior weights (hash {header.prior_hash.hex()}, this "
                                f"prior's is {self.prior_hash.hex()}); decode it with the prior it was encoded with")
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
            if progress is not None and header.coder not in PRIOR_CODERS:
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
        """Range-decode payloads of one grid size together, in the prior's coding order as prior_payloads coded
        them."""
        c = _constriction()
        family = c.stream.model.Categorical(perfect=False)
        h, w = grid
        n = len(payloads)
        y = self._labels_for(labels, n) if self.prior.config.num_classes else None
        decoders = [c.stream.queue.RangeDecoder(bytes_to_words(p)) for p in payloads]
        out = np.zeros((n, h * w), dtype=np.int64)
        report = coding_progress(progress, h, w, f"{n} slices")

        def choose(positions, logits):
            probabilities = self.pass_frequencies(logits)  # (n, m, K)
            at = positions.numpy()
            for s in range(n):
                try:
                    out[s, at] = decoders[s].decode(family, probabilities[s])
                except Exception as e:  # constriction refuses data it cannot decode
                    raise UserError(f"{names[s]}: its payload does not decode ({e}; a corrupt file)") from None
            report(len(at))
            return torch.from_numpy(out[:, at])

        self.prior.fill(n, h, w, y, choose, torch.float64)
        if progress is not None:
            progress.update(n)
        return list(out)


def coding_progress(progress, h: int, w: int, what: str):
    """A callback for each group of positions coded (its count): a progress bar's postfix says how many rows' worth
    of an h x w map's codes are done, once per row's worth."""
    done = 0

    def report(m: int):
        nonlocal done
        before, done = done, done + m
        if progress is not None and done // w > before // w:
            progress.set_postfix_str(f"row {done // w}/{h} of {what}")
    return report


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
