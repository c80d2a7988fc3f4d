"""The classical codecs the .vqz codec is compared with, behind one interface: JPEG, WebP, JPEG 2000 and AVIF
through Pillow; JPEG XL through imagecodecs (libjxl's maintained binding, an optional dependency) where it is
installed. Each codec lists its quality settings from the worst (smallest file) to the best and encodes and decodes
8-bit grey images; BudgetSearch finds, per image, the best setting whose file fits a byte budget.
"""
import io

import numpy as np

from utils import UserError


def imagecodecs():
    """The optional imagecodecs package (JPEG XL only), or a one-line error saying how to install it."""
    try:
        import imagecodecs as module
    except ImportError:
        raise UserError("JPEG XL needs the imagecodecs package, an optional dependency of the study: "
                        "pip install imagecodecs") from None
    return module


class ClassicalCodec:
    """One classical codec. `settings(pixels)`: its quality settings for an image of that many pixels, from the
    worst (smallest file) to the best; `encode(image, setting)`: a uint8 (H, W) image's file; `decode(data)`: the
    image again. This base writes and reads through Pillow: a codec names its Pillow format and the save options of
    a setting."""
    name = pillow_format = ""

    def settings(self, pixels: int) -> list:
        raise NotImplementedError

    def save_options(self, setting) -> dict:
        raise NotImplementedError

    def encode(self, image: np.ndarray, setting) -> bytes:
        from PIL import Image
        buffer = io.BytesIO()
        Image.fromarray(image, "L").save(buffer, self.pillow_format, **self.save_options(setting))
        return buffer.getvalue()

    def decode(self, data: bytes) -> np.ndarray:
        from PIL import Image
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("L"))


class Jpeg(ClassicalCodec):
    name, pillow_format = "jpeg", "JPEG"

    def settings(self, pixels: int) -> list:
        return list(range(1, 96))

    def save_options(self, quality) -> dict:
        return {"quality": quality, "optimize": True}


class WebP(ClassicalCodec):
    name, pillow_format = "webp", "WEBP"

    def settings(self, pixels: int) -> list:
        return list(range(0, 101))

    def save_options(self, quality) -> dict:
        return {"quality": quality, "method": 6}


class Jpeg2000(ClassicalCodec):
    """A raw codestream (no JP2 container), irreversible, one quality layer at a compression ratio."""
    name, pillow_format = "jpeg2000", "JPEG2000"
    RATES = tuple(float(r) for r in np.geomspace(4000, 2, 120))  # compression ratios, worst quality first

    def settings(self, pixels: int) -> list:
        return [r for r in self.RATES if pixels / r >= 40]  # below ~40 bytes OpenJPEG writes only markers

    def save_options(self, rate) -> dict:
        return {"quality_mode": "rates", "quality_layers": [rate], "irreversible": True, "no_jp2": True}


class Avif(ClassicalCodec):
    name, pillow_format = "avif", "AVIF"

    def settings(self, pixels: int) -> list:
        return list(range(0, 101))

    def save_options(self, quality) -> dict:
        return {"quality": quality, "speed": 6}


class JpegXL(ClassicalCodec):
    """libjxl through imagecodecs, on one thread: the same bytes on every machine, and workers share the cores."""
    name = "jpegxl"
    DISTANCES = tuple(float(d) for d in np.geomspace(25, 0.05, 90))  # butteraugli distances (25: libjxl's worst)

    def settings(self, pixels: int) -> list:
        imagecodecs()
        return list(self.DISTANCES)

    def encode(self, image: np.ndarray, distance) -> bytes:
        return bytes(imagecodecs().jpegxl_encode(image, distance=distance, effort=7, numthreads=1))

    def decode(self, data: bytes) -> np.ndarray:
        return np.asarray(imagecodecs().jpegxl_decode(data, numthreads=1))


CLASSICAL_CODECS = {c.name: c for c in (Jpeg(), WebP(), Jpeg2000(), Avif(), JpegXL())}


def classical_codec(name: str) -> ClassicalCodec:
    if name not in CLASSICAL_CODECS:
        raise UserError(f"unknown codec {name!r}; choose from {', '.join(CLASSICAL_CODECS)}")
    return CLASSICAL_CODECS[name]


def available_codecs() -> list[str]:
    """The names of the classical codecs this installation can run: all but JPEG XL without imagecodecs."""
    try:
        imagecodecs()
    except UserError:
        return [name for name in CLASSICAL_CODECS if name != JpegXL.name]
    return list(CLASSICAL_CODECS)


class BudgetSearch:
    """The best quality setting of one codec whose file fits a byte budget, for one image; every setting is encoded
    at most once, whatever the budgets asked."""

    def __init__(self, image: np.ndarray, codec: ClassicalCodec):
        self.image, self.codec = image, codec
        self.settings = codec.settings(image.size)
        self.cache = {}

    def encoded(self, index: int) -> bytes:
        if index not in self.cache:
            self.cache[index] = self.codec.encode(self.image, self.settings[index])
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
