"""
Brain MRI slice datasets (OASIS, ADNI, and a synthetic demo set).

Every split is decoded once into a uint8 (N, H, W) tensor, so training epochs do no image decoding.
Datasets can be read from a folder or in place from the official zip archive.
"""

import io
import random
import re
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

DATASETS = ("OASIS", "ADNI", "demo")
SPLITS = ("train", "validate", "test")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
OASIS_DIRS = {split: f"keras_png_slices_{split}" for split in SPLITS}
OASIS_PREFIXES = ("", "keras_png_slices_data/")  # split folders at the root, or one level down
ADNI_PREFIXES = ("", "AD_NC/")
ADNI_CLASSES = ["NC", "AD"]  # label = index
DEMO_VERSION = "demo-v1"
DEMO_MARKER = "DEMO_OK"


class DataError(Exception):
    """A problem with the user's data; str(e) is one line naming the path and the fix."""


class SliceDataset(torch.utils.data.Dataset):
    """Decoded 2D slices of one split; items are (float32 (1, H, W) image in [-1, 1], int label)."""

    def __init__(self, images, labels, class_names, patients, files, name, split):
        self.images = images  # uint8 (N, H, W)
        self.labels = labels  # int64 (N,)
        self.class_names = class_names
        self.patients = patients
        self.files = files
        self.name = name
        self.split = split

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return to_float(self.images[i]).unsqueeze(0), int(self.labels[i])

    @property
    def image_shape(self):
        return tuple(self.images.shape[1:])


def to_float(images_uint8):
    """uint8 (..., H, W) -> float32 in [-1, 1]."""
    return images_uint8.float() / 127.5 - 1


# -----------------------------------------------------------------------------
# decoding

def read_slice(data: bytes, name: str, image_size: int | None = None) -> np.ndarray:
    """
    Decode one image file into a uint8 (H, W) grayscale array.
    With image_size=N the image is centre-cropped to a square of its shorter side, then resized to NxN if needed.
    `name` is only used in the error message.
    """
    try:
        if not data:
            raise ValueError("the file is empty")
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes everything now, so truncated files fail here rather than later
            gray = _to_gray(img)
    except UnidentifiedImageError:
        raise DataError(_unreadable(name, "not an image format Pillow recognises")) from None
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, zlib.error, ...
        raise DataError(_unreadable(name, str(e) or type(e).__name__)) from None
    if image_size is not None:
        gray = _square(gray, image_size)
    return np.array(gray)


def _to_gray(img):
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        scaled = np.rint(np.asarray(img, dtype=np.float64) / 257)  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, img.convert("RGBA"))
    return img.convert("L")


def _square(img, size):
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img if side == size else img.resize((size, size), Image.BILINEAR)


def _unreadable(name, reason):
    reason = " ".join(reason.split())
    return f"cannot read image {name}: {reason}; delete or replace it, or pass --skip-bad to skip unreadable files"


def _decode_all(tree, rels, image_size, skip_bad, desc):
    """Decode `rels` into one uint8 tensor; returns (images, indices of the kept files).

    All images must have one size. Without skip_bad the first file of another size than the split's first file
    stops the load; with skip_bad the files of the most common size are kept and the others skipped."""
    images, kept, skipped, aside = None, [], [], {}  # aside: index -> decoded image of another size than the first
    progress = tqdm(rels, desc=desc, unit="img", disable=len(rels) <= 200 or desc is None)
    try:
        for i, rel in enumerate(progress):
            name = tree.display(rel)
            try:
                img = read_slice(tree.read(rel), name, image_size)
            except DataError:
                if not skip_bad:
                    raise
                skipped.append(i)
                continue
            if images is None:
                images = torch.empty((len(rels), *img.shape), dtype=torch.uint8)
            elif img.shape != images.shape[1:]:
                if not skip_bad:
                    (h, w), (eh, ew) = img.shape, images.shape[1:]
                    raise DataError(f"image {name} is {w}x{h} pixels but {tree.display(rels[kept[0]])}, the first "
                                    f"image of this split, is {ew}x{eh}; pass --image-size N to resize every image, "
                                    f"remove the odd file, or pass --skip-bad to skip the files whose size differs "
                                    f"from most")
                aside[i] = img
                continue
            images[len(kept)] = torch.from_numpy(img)
            kept.append(i)
    finally:
        progress.close()  # ends the bar's line, so that an error message starts on a line of its own
    if aside:
        images, kept, odd = _keep_most_common_size(images, kept, aside)
        skipped = sorted(skipped + odd)
    if skipped and desc is not None:  # desc is None when not verbose (e.g. ranks > 0 of a DDP run)
        print(f"skipped {len(skipped)} unreadable or odd-sized files (first: {tree.display(rels[skipped[0]])})")
    if not kept:
        raise DataError(f"none of the {len(rels)} images in {tree.display(_parent(rels[0]))} could be read; "
                        f"check the files or re-download the dataset")
    if len(kept) < len(images):
        images = images[:len(kept)].clone()
    return images, kept


def _keep_most_common_size(images, kept, aside):
    """`images` holds the files `kept` (the first file's size), `aside` the others: keep the most common size.
    Returns (images, kept indices, skipped indices)."""
    shape, n = Counter(img.shape for img in aside.values()).most_common(1)[0]
    if n <= len(kept):
        return images, kept, sorted(aside)
    chosen = sorted(i for i, img in aside.items() if img.shape == shape)
    odd = sorted(set(kept) | (set(aside) - set(chosen)))
    return torch.from_numpy(np.stack([aside[i] for i in chosen])), chosen, odd


# -----------------------------------------------------------------------------
# folder or zip archive

class _Tree:
    """Read-only view of a dataset folder or zip archive; paths inside it are '/'-separated and relative."""

    def __init__(self, root: Path):
        self.root = root
        self.zip = None
        if root.is_file():
            try:
                self.zip = zipfile.ZipFile(root)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{root} is not a readable zip archive ({e}); re-download it, "
                                f"or extract it and pass the extracted folder as --data-root") from None
            self.members = [n for n in self.zip.namelist() if not n.endswith("/")]

    def close(self):
        if self.zip is not None:
            self.zip.close()

    def display(self, rel):
        return f"{self.root}::{rel}" if self.zip else str(self.root / rel)

    def is_dir(self, rel):
        if self.zip:
            return any(n.startswith(rel + "/") for n in self.members)
        return (self.root / rel).is_dir()

    def images_in(self, rel):
        """Image files directly inside folder `rel`, in natural sort order (case_2 before case_10)."""
        if self.zip:
            names = [n[len(rel) + 1:] for n in self.members if n.startswith(rel + "/")]
            names = [n for n in names if "/" not in n]
        else:
            names = [p.name for p in (self.root / rel).iterdir() if p.is_file()]
        # skip hidden files such as macOS "._case_1_slice_0.nii.png" resource forks
        names = [n for n in names if n.lower().endswith(IMAGE_EXTS) and not n.startswith(".")]
        return [f"{rel}/{n}" for n in sorted(names, key=_natural_key)]

    def entries(self, rel=""):
        """Names directly inside folder `rel` (for error messages)."""
        if self.zip:
            prefix = rel + "/" if rel else ""
            names = {"".join(n[len(prefix):].partition("/")[:2]) for n in self.zip.namelist() if n.startswith(prefix)}
            return sorted(names - {""})  # "dir/" or "file", like the folder listing below
        return sorted(p.name + "/" * p.is_dir() for p in (self.root / rel).iterdir())

    def read(self, rel):
        try:
            return self.zip.read(rel) if self.zip else (self.root / rel).read_bytes()
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(_unreadable(self.display(rel), str(e))) from None

    def find_prefix(self, prefixes, folders, expected):
        """The first prefix under which one of `folders` exists, else DataError saying what was expected."""
        for prefix in prefixes:
            if any(self.is_dir(prefix + f) for f in folders):
                return prefix
        found = self.entries()
        shown = ", ".join(found[:8]) + (f", ... ({len(found)} entries)" if len(found) > 8 else "")
        raise DataError(f"{self.root} does not have the expected layout: expected {expected}; "
                        f"found {shown or 'nothing'}; pass --data-root pointing at the right folder or zip")


def _natural_key(s):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _parent(rel):
    return rel.rpartition("/")[0]


def patient_id(filename):
    """'case_402_slice_12.nii.png' -> '402' (OASIS); '1003730_84.jpeg' -> '1003730' (ADNI)."""
    m = re.match(r"case_(.+)_slice_\d+", filename)
    if m:
        return m.group(1)
    stem = filename.split(".")[0]
    return stem.rpartition("_")[0] or stem


# -----------------------------------------------------------------------------
# dataset layouts

def _oasis_files(tree, split):
    expected = "folders keras_png_slices_train/, _validate/, _test/ (inside it or inside keras_png_slices_data/)"
    folder = tree.find_prefix(OASIS_PREFIXES, OASIS_DIRS.values(), expected) + OASIS_DIRS[split]
    return [(rel, 0) for rel in _images_of(tree, folder)]


def _adni_files(tree, split, val_fraction, seed):
    expected = "folders train/ and test/, each holding AD/ and NC/ (inside it or inside AD_NC/)"
    prefix = tree.find_prefix(ADNI_PREFIXES, ("train", "test"), expected)
    folder = prefix + ("test" if split == "test" else "train")
    if not tree.is_dir(folder):
        raise DataError(f"split folder {tree.display(folder)} is missing; it should hold AD/ and NC/ image folders")
    class_dirs = [f"{folder}/{c}" for c in ADNI_CLASSES]
    if not any(tree.is_dir(d) for d in class_dirs):
        found = ", ".join(tree.entries(folder)) or "nothing"
        raise DataError(f"{tree.display(folder)} has no AD/ or NC/ folder (found {found}); check the extraction")
    files = [(rel, label) for label, d in enumerate(class_dirs) if tree.is_dir(d) for rel in tree.images_in(d)]
    if not files:
        raise DataError(f"no images (.png/.jpg/.jpeg) in {tree.display(folder)}/AD or /NC; check the extraction")
    if split == "test":
        return files
    patients = [patient_id(Path(rel).name) for rel, _ in files]
    held_out = _validation_patients(patients, val_fraction, seed)
    files = [f for f, p in zip(files, patients) if (p in held_out) == (split == "validate")]
    if not files:
        raise DataError(f"{tree.display(folder)} has too few patients ({len(set(patients))}) to carve a "
                        f"{val_fraction:.0%} validation split and keep some for training; lower the validation fraction")
    return files


def _validation_patients(patients, val_fraction, seed):
    """A seeded random `val_fraction` of the patients (at least one), so no patient is in both train and validate."""
    unique = sorted(set(patients), key=_natural_key)
    random.Random(seed).shuffle(unique)
    return set(unique[:max(1, round(val_fraction * len(unique)))])


def _images_of(tree, folder):
    if not tree.is_dir(folder):
        raise DataError(f"split folder {tree.display(folder)} is missing; check the download/extraction of the dataset")
    files = tree.images_in(folder)
    if not files:
        raise DataError(f"no images (.png/.jpg/.jpeg) in {tree.display(folder)}; check the download/extraction")
    return files


# -----------------------------------------------------------------------------
# public entry point

def build_dataset(name, root, split, image_size=None, val_fraction=0.1, seed=0, skip_bad=False, verbose=True):
    """
    Load one split of OASIS, ADNI or the synthetic demo set. `root` may be a folder or a zip archive.
    ADNI has no validation split of its own: `validate` is a seeded, patient-disjoint `val_fraction` of ADNI train.
    """
    name = _choice(name, DATASETS, "dataset")
    split = _choice(split, SPLITS, "split")
    if image_size is not None and image_size < 1:
        raise DataError(f"image size must be a positive integer, got {image_size!r}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"validation fraction must be in [0, 1), got {val_fraction}")
    if name == "demo":
        root = Path(root if root is not None else default_demo_root()).expanduser()
        if not (root / DEMO_MARKER).is_file():  # a complete tree made with other generate_demo settings is used as is
            generate_demo(root, verbose=verbose)
    if root is None:
        raise DataError(f"no dataset root given for {name}; pass --data-root pointing at the folder holding "
                        f"keras_png_slices_train (OASIS) or AD_NC (ADNI), or its zip, or use --dataset demo")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist; pass --data-root pointing at the folder holding "
                        f"keras_png_slices_train (OASIS) or AD_NC (ADNI), or its zip")

    tree = _Tree(root)
    try:
        files = _adni_files(tree, split, val_fraction, seed) if name == "ADNI" else _oasis_files(tree, split)
        rels = [rel for rel, _ in files]
        images, kept = _decode_all(tree, rels, image_size, skip_bad, desc=f"{name} {split}" if verbose else None)
        paths = [tree.display(rels[i]) for i in kept]
    finally:
        tree.close()

    labels = torch.tensor([files[i][1] for i in kept], dtype=torch.int64)
    class_names = ADNI_CLASSES if name == "ADNI" else ["none"]
    patients = [patient_id(Path(rels[i]).name) for i in kept]
    ds = SliceDataset(images, labels, list(class_names), patients, paths, name, split)
    if verbose:
        print(_summary(ds))
    return ds


def _choice(value, choices, what):
    for c in choices:
        if str(value).lower() == c.lower():
            return c
    raise DataError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _summary(ds):
    counts = ""
    if len(ds.class_names) > 1:
        per_class = sorted(zip(ds.class_names, torch.bincount(ds.labels, minlength=len(ds.class_names)).tolist()))
        counts = " (" + ", ".join(f"{c} {n}" for c, n in per_class) + ")"
    return f"{ds.name} {ds.split}: {len(ds)} slices{counts} from {len(set(ds.patients))} patients"


# -----------------------------------------------------------------------------
# synthetic demo data

def default_demo_root():
    return Path(__file__).resolve().parent / "data" / "demo"


def demo_settings(root=None) -> dict | None:
    """The generate_demo settings (size, n_patients, slices_per_patient, seed) of the complete demo tree at `root`
    (None: the default root), read from its marker file; None if there is no complete tree of this version."""
    marker = Path(root if root is not None else default_demo_root()).expanduser() / DEMO_MARKER
    try:
        version, *fields = marker.read_text().split()
        settings = {key: int(value) for key, value in (f.split("=") for f in fields)}
    except (OSError, ValueError):
        return None
    return settings if version == DEMO_VERSION else None


def generate_demo(root, size=128, n_patients=30, slices_per_patient=10, seed=0, verbose=False):
    """
    Write brain-like phantom slices as 8-bit PNGs in the OASIS layout, split 80/10/10 by patient.
    Skips the work if `root` already holds a complete tree with the same settings. Same seed -> identical files.
    """
    root = Path(root).expanduser()
    marker = root / DEMO_MARKER
    stamp = f"{DEMO_VERSION} size={size} n_patients={n_patients} slices_per_patient={slices_per_patient} seed={seed}\n"
    if marker.is_file():
        if marker.read_text() == stamp:
            return root
        # a complete demo tree with other settings: only then is it safe to delete (it holds nothing but demo files)
        marker.unlink()
        for d in OASIS_DIRS.values():
            shutil.rmtree(root / d, ignore_errors=True)
    if verbose:
        print(f"generating {n_patients * slices_per_patient} synthetic demo slices in {root}")

    n_held_out = max(1, n_patients // 10)
    n_train = n_patients - 2 * n_held_out
    for p in range(n_patients):
        split = "train" if p < n_train else "validate" if p < n_train + n_held_out else "test"
        folder = root / OASIS_DIRS[split]
        folder.mkdir(parents=True, exist_ok=True)
        slices = _phantom(np.random.default_rng([seed, p]), size, slices_per_patient)
        for s, img in enumerate(slices):
            Image.fromarray(img).save(folder / f"case_{p + 1:03d}_slice_{s}.nii.png")
    marker.write_text(stamp)  # written last, so an interrupted run is redone next time
    return root


def _phantom(rng, size, n_slices):
    """One patient's axial slices, uint8 (n_slices, size, size): skull ring, grey/white matter, two ventricles."""
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    z = np.linspace(-0.8, 0.8, n_slices)[:, None, None]  # position of the slice through the head

    angle = rng.uniform(-0.25, 0.25)
    cx, cy = rng.uniform(-0.05, 0.05, 2)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    ax, ay = rng.uniform(0.68, 0.80), rng.uniform(0.80, 0.92)
    r = np.sqrt((u / ax) ** 2 + (v / ay) ** 2) / np.sqrt(1 - 0.6 * z ** 2)  # head narrows away from the middle

    # smooth texture: a few random low-frequency plane waves that also drift with z
    freqs = rng.uniform(-5, 5, (6, 3))
    phases = rng.uniform(0, 2 * np.pi, 6)
    texture = sum(np.cos(np.pi * (fu * u + fv * v + fz * z) + ph) for (fu, fv, fz), ph in zip(freqs, phases)) / 3

    def inside(d):  # soft 0..1 mask, about one pixel wide at the boundary d = 0
        return 0.5 * (1 + np.tanh(d * size / 3))

    head, brain = inside(1.08 - r), inside(1.0 - r)
    white = inside(0.72 + 0.08 * texture - r)
    img = rng.uniform(180, 220) * (head - brain) + brain * (rng.uniform(85, 100) + 70 * white + 8 * texture)

    # ventricles: two dark tilted ellipses that grow and then shrink through the slices
    grow = rng.uniform(0.8, 1.3) * np.exp(-((z - rng.uniform(-0.1, 0.2)) / 0.45) ** 2) + 1e-3
    offset = rng.uniform(0.10, 0.15)
    for side in (-1, 1):
        du, dv = u - side * offset, v + 0.05
        tilt = side * 0.3
        a = (du * np.cos(tilt) + dv * np.sin(tilt)) / 0.07
        b = (-du * np.sin(tilt) + dv * np.cos(tilt)) / 0.22
        ventricle = inside(grow - np.sqrt(a ** 2 + b ** 2)) * brain
        img = img * (1 - ventricle) + 25 * ventricle

    img = img + rng.normal(0, 3, img.shape) * head
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
