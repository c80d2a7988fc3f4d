"""
Brain MRI slice datasets (OASIS, ADNI, a synthetic demo set, and folders of NIfTI volumes: see volumes/nifti.py).

Every split is decoded once into a uint8 (N, H, W) tensor, so training epochs do no image decoding.
Datasets can be read from a folder or in place from the official zip archive.

Grey levels: 8-bit, colour and palette images are converted to 8-bit grey. A 16-bit grey image is scaled by the
bit depth its maximum implies, so that 12-bit scanner data is not left nearly black: a slice whose maximum is at
most 4095 holds 12-bit data and is scaled by 255/4095, any other by 255/65535 (1/257). Every slice of a 12-bit
volume is at most 4095, so all its slices get the same scale.

Tissue masks (OASIS and the demo): build_dataset(..., masks=True) pairs each slice <prefix>_<id>_slice_<n>.<ext> of
keras_png_slices_<split>/ with keras_png_slices_seg_<split>/seg_<id>_slice_<n>.<ext>, an 8-bit mask of MASK_LEVELS
(0 background, 85 CSF, 170 grey matter, 255 white matter), and keeps it as classes 0..3 in SliceDataset.masks.

Limits: a file is at most MAX_FILE_BYTES and an image at most MAX_IMAGE_SIDE pixels per side, both checked before
anything is decoded; unless --image-size resizes them, images are at least MIN_IMAGE_SIDE pixels per side (the side
limits, like the split names and SliceDataset, are in imaging/slices.py).
"""

import io
import lzma
import random
import re
import warnings
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from anatomy.vocabulary import MASKED_DATASETS
from imaging.slices import IMAGE_SUFFIXES, MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, SPLITS, SliceDataset, natural_key
from utils import DataError, UserError

DATASETS = ("OASIS", "ADNI", "demo", "nifti")
OASIS_DIRS = {split: f"keras_png_slices_{split}" for split in SPLITS}
SEG_DIRS = {split: f"keras_png_slices_seg_{split}" for split in SPLITS}  # the tissue masks of each split
WHERE_SHIPPED = "where-shipped"  # build_dataset(masks=...): the tissue masks if the dataset ships them, else none
MASK_LEVELS = (0, 85, 170, 255)  # grey level of class 0 (background), 1 (CSF), 2 (grey matter), 3 (white matter)
OASIS_PREFIXES = ("", "keras_png_slices_data/")  # split folders at the root, or one level down
ADNI_PREFIXES = ("", "AD_NC/")
ADNI_CLASSES = ["NC", "AD"]  # label = index
DEMO_VERSION = "demo-v3"  # v3: with tissue masks
DEMO_MARKER = "DEMO_OK"  # written last: the demo tree is complete
DEMO_MANIFEST = "DEMO_FILES"  # written before the first image: every file generate_demo is writing
DEMO_NAME = re.compile(r"demo_\d+_slice_\d+\.png")  # never an OASIS name (case_<id>_slice_<n>.nii.png)
DEMO_MASK_NAME = re.compile(r"seg_\d+_slice_\d+\.png")  # nor an OASIS mask's (seg_<id>_slice_<n>.nii.png)
# file name up to its first "." -> patient id, which keeps each patient's slices in one split
NAME_PATTERNS = {"OASIS": re.compile(r"(?:case|demo)_(?P<patient>.+)_slice_\d+"),
                 "ADNI": re.compile(r"(?P<patient>.+)_\d+")}
EXPECTED_NAMES = {"OASIS": "case_<id>_slice_<n>.nii.png (or the demo's demo_<id>_slice_<n>.png)",
                  "ADNI": "<patient>_<slice>.jpeg (e.g. 1003730_84.jpeg)"}
MAX_FILE_BYTES = 64 << 20  # one slice image; a bigger file is refused before it is read


# -----------------------------------------------------------------------------
# decoding

def read_slice(data: bytes, name: str, image_size: int | None = None) -> np.ndarray:
    """
    Decode one image file into a uint8 (H, W) grayscale array.
    With image_size=N the image is centre-cropped to a square of its shorter side, then resized to NxN if needed.
    Without image_size, an image smaller than MIN_IMAGE_SIDE on a side is a DataError. `name` is only used in
    error messages.
    """
    try:
        if not data:
            raise ValueError("the file is empty")
        with warnings.catch_warnings():
            # Pillow warns from 89M pixels; _check_not_huge's limit is lower, and says which file
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                _check_not_huge(img.size, name)  # from the header: nothing is decoded yet
                img.load()  # decodes everything now, so truncated files fail here rather than later
                gray = _to_gray(img)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(_unreadable(name, "not an image format Pillow recognises")) from None
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, zlib.error, DecompressionBomb...
        raise DataError(_unreadable(name, str(e) or type(e).__name__)) from None
    if image_size is not None:
        gray = _square(gray, image_size)
    else:
        _check_not_tiny(gray.size, name)
    return np.array(gray)


def _check_not_huge(size, name):
    w, h = size
    if max(w, h) > MAX_IMAGE_SIDE:
        raise DataError(f"image {name} is {w}x{h} pixels, over the limit of {MAX_IMAGE_SIDE} pixels per side for a "
                        f"slice; downscale or remove it, or pass --skip-bad to skip such files")


def _check_not_tiny(size, name):
    w, h = size
    if min(w, h) < MIN_IMAGE_SIDE:
        raise DataError(f"image {name} is {w}x{h} pixels; SSIM needs at least 7x7 and the model's downsampling at "
                        f"least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}: pass --image-size N (N >= {MIN_IMAGE_SIDE}) to "
                        f"resize every image, or --skip-bad to skip such files")


def _to_gray(img):
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(img, dtype=np.float64)
        full_scale = 4095 if pixels.max() <= 4095 else 65535  # 12-bit data, else 16-bit (module docstring)
        scaled = np.rint(pixels * (255 / full_scale))
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

class FolderOrZip:
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
            self.member_set = set(self.members)

    def close(self):
        if self.zip is not None:
            self.zip.close()

    def display(self, rel):
        return f"{self.root}::{rel}" if self.zip else str(self.root / rel)

    def is_dir(self, rel):
        if self.zip:
            return any(n.startswith(rel + "/") for n in self.members)
        return (self.root / rel).is_dir()

    def is_file(self, rel):
        return rel in self.member_set if self.zip else (self.root / rel).is_file()

    def need_folder(self, rel, what, fix):
        """DataError unless `rel` is a folder: "<what> <path> is missing" or "... is a file, not a folder; <fix>"."""
        if not self.is_dir(rel):
            problem = "is a file, not a folder" if self.is_file(rel) else "is missing"
            raise DataError(f"{what} {self.display(rel)} {problem}; {fix}")

    def images_in(self, rel):
        """Image files directly inside folder `rel`, in natural sort order (case_2 before case_10)."""
        if self.zip:
            names = [n[len(rel) + 1:] for n in self.members if n.startswith(rel + "/")]
            names = [n for n in names if "/" not in n]
        else:
            names = [p.name for p in (self.root / rel).iterdir() if p.is_file()]
        # skip hidden files such as macOS "._case_1_slice_0.nii.png" resource forks
        names = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")]
        return [f"{rel}/{n}" for n in sorted(names, key=natural_key)]

    def entries(self, rel=""):
        """Names directly inside folder `rel` (for error messages)."""
        if self.zip:
            prefix = rel + "/" if rel else ""
            names = {"".join(n[len(prefix):].partition("/")[:2]) for n in self.zip.namelist() if n.startswith(prefix)}
            return sorted(names - {""})  # "dir/" or "file", like the folder listing below
        return sorted(p.name + "/" * p.is_dir() for p in (self.root / rel).iterdir())

    def read(self, rel):
        """The bytes of file `rel`. Any problem is the DataError of an unreadable file, so --skip-bad skips it."""
        try:
            return self._read_member(rel) if self.zip else self._read_file(rel)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error, lzma.LZMAError) as e:
            raise DataError(_unreadable(self.display(rel), str(e) or type(e).__name__)) from None

    def _read_file(self, rel):
        path = self.root / rel
        self._check_file_size(rel, path.stat().st_size)
        with open(path, "rb") as f:
            return self._capped_read(rel, f)  # the file may have grown since stat()

    def _read_member(self, rel):
        info = self.zip.getinfo(rel)
        if info.flag_bits & 0x1:
            raise DataError(_unreadable(self.display(rel), "it is an encrypted zip member; extract the archive with "
                                                           "its password and pass the folder as --data-root"))
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
            method = zipfile.compressor_names.get(info.compress_type, "unknown")
            raise DataError(_unreadable(self.display(rel), f"it is compressed with zip method {info.compress_type} "
                                        f"({method}), which Python cannot read; extract the archive with a tool that "
                                        f"can (e.g. 7-Zip) and pass the folder as --data-root"))
        self._check_file_size(rel, info.file_size)  # as the archive declares it, before anything is inflated
        with self.zip.open(info) as f:
            return self._capped_read(rel, f)

    def _capped_read(self, rel, f):
        """At most MAX_FILE_BYTES of open file `f`: one byte more is read to tell that there is more."""
        data = f.read(MAX_FILE_BYTES + 1)
        self._check_file_size(rel, len(data))
        return data

    def _check_file_size(self, rel, n_bytes):
        if n_bytes > MAX_FILE_BYTES:
            raise DataError(_unreadable(self.display(rel), f"it is over the {MAX_FILE_BYTES >> 20} MiB limit for one "
                                        f"slice image (at least {n_bytes / 2 ** 20:.1f} MiB)"))

    def find_prefix(self, prefixes, folders, expected):
        """The first prefix under which one of `folders` exists (as a folder, or wrongly as a file: need_folder then
        says so), else DataError saying what was expected."""
        for prefix in prefixes:
            if any(self.is_dir(prefix + f) or self.is_file(prefix + f) for f in folders):
                return prefix
        found = self.entries()
        shown = ", ".join(found[:8]) + (f", ... ({len(found)} entries)" if len(found) > 8 else "")
        raise DataError(f"{self.root} does not have the expected layout: expected {expected}; "
                        f"found {shown or 'nothing'}; pass --data-root pointing at the right folder or zip")


def _parent(rel):
    return rel.rpartition("/")[0]


def patient_id(filename, layout="OASIS"):
    """The patient of a slice file named the way `layout` names them, else None: 'case_402_slice_12.nii.png' -> '402'
    and the demo's 'demo_007_slice_3.png' -> '007' (OASIS layout); '1003730_84.jpeg' -> '1003730' (ADNI)."""
    m = NAME_PATTERNS[layout].fullmatch(filename.split(".")[0])
    return m["patient"] if m else None


# -----------------------------------------------------------------------------
# dataset layouts

def _oasis_files(tree, split):
    """(path, label, patient) of the split's files; the demo tree is read through this layout too."""
    expected = "folders keras_png_slices_train/, _validate/, _test/ (inside it or inside keras_png_slices_data/)"
    folder = tree.find_prefix(OASIS_PREFIXES, OASIS_DIRS.values(), expected) + OASIS_DIRS[split]
    return _with_patients(tree, [(rel, 0) for rel in _images_of(tree, folder)], "OASIS")


def _adni_files(tree, split, val_fraction, seed):
    expected = "folders train/ and test/, each holding AD/ and NC/ (inside it or inside AD_NC/)"
    prefix = tree.find_prefix(ADNI_PREFIXES, ("train", "test"), expected)
    folder = prefix + ("test" if split == "test" else "train")
    if not tree.is_dir(folder) and not tree.is_file(folder):
        raise DataError(_adni_split_missing(tree, prefix, split))
    tree.need_folder(folder, "split folder", "it should hold AD/ and NC/ image folders")
    class_dirs = [f"{folder}/{c}" for c in ADNI_CLASSES]
    for d in class_dirs:
        if tree.is_file(d):
            tree.need_folder(d, "class folder", "it should hold that class's slice images; check the extraction")
    if not any(tree.is_dir(d) for d in class_dirs):
        found = ", ".join(tree.entries(folder)) or "nothing"
        raise DataError(f"{tree.display(folder)} has no AD/ or NC/ folder (found {found}); check the extraction")
    files = [(rel, label) for label, d in enumerate(class_dirs) if tree.is_dir(d) for rel in tree.images_in(d)]
    if not files:
        raise DataError(f"no images (.png/.jpg/.jpeg) in {tree.display(folder)}/AD or /NC; check the extraction")
    files = _with_patients(tree, files, "ADNI")
    if split == "test":
        return files
    patients = [patient for _, _, patient in files]
    held_out = _validation_patients(patients, val_fraction, seed)
    files = [f for f, p in zip(files, patients) if (p in held_out) == (split == "validate")]
    if not files:
        raise DataError(f"{tree.display(folder)} has too few patients ({len(set(patients))}) to carve a "
                        f"{val_fraction:.0%} validation split and keep some for training; lower the validation "
                        f"fraction")
    return files


def _adni_split_missing(tree, prefix, split):
    where = tree.display(prefix.rstrip("/")) if prefix else str(tree.root)
    if split == "test":
        return (f"{where} has no test/ folder; ADNI's test split is the release's own AD_NC/test/ (patients that are "
                f"not in train/): extract it there, or use --split validate for a patient-disjoint part of train/")
    return (f"{where} has no train/ folder; ADNI's train and validate splits both come from AD_NC/train/: "
            f"extract it there")


def _with_patients(tree, files, layout):
    """(path, label) -> (path, label, patient). A name without a patient id is a DataError rather than a patient of
    its own, which could put one patient's slices in both train and validate."""
    out = []
    for rel, label in files:
        patient = patient_id(rel.rpartition("/")[2], layout)
        if patient is None:
            raise DataError(f"cannot tell which patient {tree.display(rel)} belongs to: its name does not follow "
                            f"{EXPECTED_NAMES[layout]}, which keeps each patient's slices in one split; rename or "
                            f"remove the file")
        out.append((rel, label, patient))
    return out


def _validation_patients(patients, val_fraction, seed):
    """A seeded random `val_fraction` of the patients (at least one), so no patient is in both train and validate."""
    unique = sorted(set(patients), key=natural_key)
    random.Random(seed).shuffle(unique)
    return set(unique[:max(1, round(val_fraction * len(unique)))])


def _images_of(tree, folder):
    tree.need_folder(folder, "split folder", "check the download/extraction of the dataset")
    files = tree.images_in(folder)
    if not files:
        raise DataError(f"no images (.png/.jpg/.jpeg) in {tree.display(folder)}; check the download/extraction")
    return files


# -----------------------------------------------------------------------------
# public entry point

def build_dataset(name, root, split, image_size=None, val_fraction=0.1, seed=0, skip_bad=False, verbose=True,
                  test_fraction=0.1, slice_axis="axial", clip_percentile=0.5, min_brain_fraction=0.05, masks=False):
    """
    Load one split of OASIS, ADNI, the synthetic demo set or a folder of NIfTI volumes. `root` may be a folder or
    (OASIS, ADNI) a zip archive. ADNI has no validation split of its own: `validate` is a seeded, patient-disjoint
    `val_fraction` of ADNI train. NIfTI volumes are split by subject (`val_fraction`, `test_fraction`, `seed`, or the
    folder's splits.csv) and sliced as the last four arguments say (volumes/nifti.py). With `masks` (OASIS and demo
    only) each slice's tissue mask is loaded too (module docstring); with `skip_bad` a slice whose mask is missing
    or bad is skipped with it. masks=WHERE_SHIPPED loads them where the dataset ships them and they are all there,
    else goes on without them (saying why): the in-brain scores' brain masks (anatomy/brain.py) then come from
    the slices alone.
    """
    name = _choice(name, DATASETS, "dataset")
    split = _choice(split, SPLITS, "split")
    if image_size is not None and not MIN_IMAGE_SIDE <= image_size <= MAX_IMAGE_SIDE:
        raise DataError(f"image size must be an integer from {MIN_IMAGE_SIDE} (SSIM's 7x7 window and the model's "
                        f"downsampling) to {MAX_IMAGE_SIDE}, got {image_size!r}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"validation fraction must be in [0, 1), got {val_fraction}")
    optional = masks == WHERE_SHIPPED
    if optional:
        masks = name in MASKED_DATASETS and image_size is None
    if masks and (name not in MASKED_DATASETS or image_size is not None):
        raise DataError(f"tissue masks come with OASIS and the demo data only, at the slices' own size; got "
                        f"{name}{f' with --image-size {image_size}' if image_size is not None else ''}")
    if name == "nifti":
        if not 0 <= test_fraction < 1 - val_fraction:
            raise DataError(f"test fraction must be in [0, 1 - validation fraction), got {test_fraction}")
        from volumes.nifti import SliceOptions, load_folder  # here: nibabel takes ~0.5 s to import
        options = SliceOptions(slice_axis, clip_percentile, min_brain_fraction, image_size)
        return load_folder(root, split, options, val_fraction, test_fraction, seed, skip_bad, verbose)
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

    tree = FolderOrZip(root)
    try:
        files = _adni_files(tree, split, val_fraction, seed) if name == "ADNI" else _oasis_files(tree, split)
        rels = [rel for rel, _, _ in files]
        images, kept = _decode_all(tree, rels, image_size, skip_bad, desc=f"{name} {split}" if verbose else None)
        tissue = None
        if masks:
            try:
                images, tissue, kept = _paired_masks(tree, rels, images, kept, skip_bad and not optional, verbose)
            except DataError as e:
                if not optional:
                    raise
                if verbose:
                    print(f"{name} {split}: no tissue masks ({e}); in-brain scores use brain masks computed from the "
                          f"slices")
        paths = [tree.display(rels[i]) for i in kept]
    finally:
        tree.close()

    labels = torch.tensor([files[i][1] for i in kept], dtype=torch.int64)
    class_names = ADNI_CLASSES if name == "ADNI" else ["none"]
    patients = [files[i][2] for i in kept]
    ds = SliceDataset(images, labels, list(class_names), patients, paths, name, split, masks=tissue)
    if verbose:
        print(_summary(ds))
    return ds


# -----------------------------------------------------------------------------
# tissue masks

def mask_path(rel: str) -> str:
    """Where the mask of slice `rel` is: .../keras_png_slices_<split>/<prefix>_<id>_slice_<n>.<ext> ->
    .../keras_png_slices_seg_<split>/seg_<id>_slice_<n>.<ext>."""
    folder, _, name = rel.rpartition("/")
    parent, _, split_dir = folder.rpartition("/")
    split = split_dir.removeprefix("keras_png_slices_")
    return "/".join(p for p in (parent, SEG_DIRS.get(split, split_dir), re.sub(r"^(case|demo)_", "seg_", name)) if p)


def _paired_masks(tree, rels, images, kept, skip_bad, verbose):
    """The tissue classes (uint8 (N, H, W), 0..3) of the decoded slices `images` (the files rels[kept]); with
    skip_bad, slices whose mask is missing or bad are dropped. Returns (images, masks, kept)."""
    folder = _parent(mask_path(rels[0]))
    tree.need_folder(folder, "tissue mask folder", f"OASIS ships it beside {_parent(rels[0]).rpartition('/')[2]} "
                     f"(../shared/data/get_real_data.sh extracts it); or train and score without masks")
    masks, good, bad = torch.empty_like(images), [], []
    for j, i in enumerate(tqdm(kept, desc="tissue masks", unit="img", disable=len(kept) <= 200 or not verbose)):
        try:
            masks[len(good)] = torch.from_numpy(_read_mask(tree, rels[i], tuple(images.shape[1:])))
        except DataError:
            if not skip_bad:
                raise
            bad.append(i)
            continue
        images[len(good)] = images[j]  # in place: j >= len(good)
        good.append(i)
    if bad and verbose:
        print(f"skipped {len(bad)} slices whose tissue mask is missing or bad (first: {tree.display(rels[bad[0]])})")
    if not good:
        raise DataError(f"none of the {len(kept)} slices in {tree.display(_parent(rels[0]))} has a readable tissue "
                        f"mask in {tree.display(folder)}; check the extraction")
    return images[:len(good)].clone(), masks[:len(good)].clone(), good


def _read_mask(tree, rel, shape):
    """The mask of slice `rel` as classes 0..3, or a DataError naming the file: missing, unreadable, not `shape`
    (H, W), or grey levels outside MASK_LEVELS."""
    mask_rel = mask_path(rel)
    name = tree.display(mask_rel)
    if not tree.is_file(mask_rel):
        raise DataError(f"slice {tree.display(rel)} has no tissue mask: {name} is missing; restore it, or pass "
                        f"--skip-bad to skip slices without a mask")
    levels = read_slice(tree.read(mask_rel), name)
    if levels.shape != shape:
        (h, w), (sh, sw) = levels.shape, shape
        raise DataError(f"tissue mask {name} is {w}x{h} pixels but its slice is {sw}x{sh}; replace the mask, or pass "
                        f"--skip-bad to skip such slices")
    odd = np.setdiff1d(np.unique(levels), MASK_LEVELS)
    if odd.size:
        raise DataError(f"tissue mask {name} holds grey levels {', '.join(map(str, odd[:5].tolist()))} outside "
                        f"{'/'.join(map(str, MASK_LEVELS))} (background/CSF/GM/WM); replace the mask, or pass "
                        f"--skip-bad to skip such slices")
    return levels // MASK_LEVELS[1]


def check_compatible(train_shape, other, against="train"):
    """DataError unless the images of `other` (a SliceDataset) are `train_shape` (H, W), the size of the images the
    model trains (or was trained) on. Check every split right after loading it, so that a mismatch stops the run
    before training starts rather than at the first validation. `against` names those images in the message."""
    if tuple(other.image_shape) != tuple(train_shape):
        (h, w), (th, tw) = other.image_shape, train_shape
        raise DataError(f"{other.name} {other.split} images are {w}x{h} pixels (e.g. {other.files[0]}) but {against} "
                        f"images are {tw}x{th}; pass --image-size N to resize every split to NxN")


def random_crops(x, side: int, seed, keys):
    """(B, C, H, W) images -> (B, C, side, side) crops, image b's corner drawn uniformly from a Generator seeded with
    (*seed, keys[b]): the same crop in any batch, order or number of processes, and again on resume. Training on
    crops spends each step on the pixels that carry anatomy more often, and takes more steps in the same time; the
    model is fully convolutional, so it still encodes whole slices."""
    h, w = x.shape[-2:]
    corners = [np.random.default_rng([*seed, int(k)]).integers(0, (h - side + 1, w - side + 1)) for k in keys]
    return torch.stack([x[b, :, top:top + side, left:left + side] for b, (top, left) in enumerate(corners)])


def class_index(class_name: str | None, class_names, conditional: bool) -> int | None:
    """The index of --class `class_name` among a prior's `class_names`, in any letter case; None when no class is
    asked for. UserError in one line when the prior is not class-conditional or does not know the class."""
    if class_name is None:
        return None
    if not conditional:
        raise UserError("--class needs a class-conditional prior (one trained with train_prior.py --conditional)")
    lowered = [c.lower() for c in class_names]
    if class_name.lower() not in lowered:
        raise UserError(f"unknown --class {class_name!r}; choose one of {', '.join(class_names)}")
    return lowered.index(class_name.lower())


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
    Write brain-like phantom slices as 8-bit PNGs named demo_<patient>_slice_<n>.png (never an OASIS name) in the
    OASIS folder layout, split 80/10/10 by patient, each with its tissue mask (the tissues the phantom draws) as
    keras_png_slices_seg_<split>/seg_<patient>_slice_<n>.png. Same seed -> identical files. Returns `root`.

    It writes only into a new or empty folder, or one that holds nothing but an earlier demo tree, and deletes only
    files it wrote: before the first image it writes the manifest DEMO_FILES, listing every file it is about to
    write, and the marker DEMO_OK last. So a complete tree with the same settings is left as it is; an interrupted
    run (manifest, no marker) or a tree with other settings is replaced, deleting just the files its manifest lists;
    and a folder holding anything else is refused with a DataError, since that may be real data.
    """
    root = Path(root).expanduser()
    settings = dict(size=size, n_patients=n_patients, slices_per_patient=slices_per_patient, seed=seed)
    if demo_settings(root) == settings:
        return root
    if size < MIN_IMAGE_SIDE or n_patients < 3 or slices_per_patient < 1:
        raise DataError(f"demo settings {settings} make no usable dataset: size must be at least {MIN_IMAGE_SIDE}, "
                        f"n_patients at least 3 (one for each split) and slices_per_patient at least 1")
    earlier = _earlier_demo_files(root)
    if verbose:
        print(f"generating {n_patients * slices_per_patient} synthetic demo slices in {root}")
    try:
        _write_demo(root, earlier, settings)
    except OSError as e:
        raise DataError(f"cannot write demo data to {root} ({e}); pass a writable --data-root") from None
    return root


def _write_demo(root, earlier, settings):
    """Replace the demo files `earlier` by a demo tree made with `settings` (generate_demo's)."""
    n_patients, per_patient = settings["n_patients"], settings["slices_per_patient"]
    (root / DEMO_MARKER).unlink(missing_ok=True)  # first: from here on the tree counts as interrupted
    for rel in earlier:
        (root / rel).unlink()
    for folder in [*OASIS_DIRS.values(), *SEG_DIRS.values()]:
        (root / folder).mkdir(parents=True, exist_ok=True)
    names = [[_demo_file(p, s, n_patients) for s in range(per_patient)] for p in range(n_patients)]
    (root / DEMO_MANIFEST).write_text("".join(f"{rel}\n{mask_path(rel)}\n" for patient in names for rel in patient))
    for p, patient in enumerate(names):
        slices, tissues = _phantom(np.random.default_rng([settings["seed"], p]), settings["size"], per_patient)
        for rel, img, tissue in zip(patient, slices, tissues):
            Image.fromarray(img).save(root / rel)
            Image.fromarray(np.asarray(MASK_LEVELS, np.uint8)[tissue]).save(root / mask_path(rel))
    (root / DEMO_MARKER).write_text(f"{DEMO_VERSION} " + " ".join(f"{k}={v}" for k, v in settings.items()) + "\n")


def _demo_file(patient, slice_index, n_patients):
    """Where generate_demo writes slice `slice_index` of patient `patient` (0-based): the first 80% of the patients
    train, the next 10% validate, the last 10% test (at least one patient each)."""
    n_held_out = max(1, n_patients // 10)
    n_train = n_patients - 2 * n_held_out
    split = "train" if patient < n_train else "validate" if patient < n_train + n_held_out else "test"
    return f"{OASIS_DIRS[split]}/demo_{patient + 1:03d}_slice_{slice_index}.png"


def _earlier_demo_files(root):
    """The files in `root` that an earlier generate_demo wrote (its manifest lists them); a DataError if `root`
    holds anything else, which may be real data: an OASIS tree has the same folders, and its files once had the
    demo's names."""
    if not root.exists():
        return []
    if not root.is_dir():
        raise DataError(f"demo data root {root} is a file, not a folder; pass an empty or new --data-root for demo "
                        f"data")
    try:
        listed = set((root / DEMO_MANIFEST).read_text().splitlines())
    except (OSError, ValueError):  # no manifest, or not one of ours: then nothing here counts as a demo file
        listed = set()
    earlier = []
    for entry in sorted(root.iterdir()):
        is_mask_dir = entry.name in SEG_DIRS.values()
        if entry.is_symlink() or not (entry.name in (DEMO_MARKER, DEMO_MANIFEST) and entry.is_file()
                                      or (entry.name in OASIS_DIRS.values() or is_mask_dir) and entry.is_dir()):
            raise _not_demo(root, entry)
        for file in sorted(entry.iterdir()) if entry.is_dir() else []:
            rel = f"{entry.name}/{file.name}"
            pattern = DEMO_MASK_NAME if is_mask_dir else DEMO_NAME
            if file.is_symlink() or not file.is_file() or rel not in listed or not pattern.fullmatch(file.name):
                raise _not_demo(root, file)
            earlier.append(rel)
    return earlier


def _not_demo(root, path):
    shown = path.relative_to(root).as_posix() + "/" * (path.is_dir() and not path.is_symlink())
    return DataError(f"{root} already holds {shown}, which generate_demo did not write (it may be real data); pass an "
                     f"empty or new --data-root for demo data")


def _phantom(rng, size, n_slices):
    """One patient's axial slices, uint8 (n_slices, size, size): skull ring, grey/white matter, two ventricles; and
    their tissue classes, uint8 (n_slices, size, size): 0 outside the brain (the skull ring too), 1 CSF (the
    ventricles), 2 grey matter, 3 white matter, each where its soft mask is over one half."""
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

    tissue = np.where(brain > 0.5, np.where(white > 0.5, 3, 2), 0).astype(np.uint8)

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
        tissue[ventricle > 0.5] = 1

    img = img + rng.normal(0, 3, img.shape) * head
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), tissue
