"""
NIfTI volumes (.nii, .nii.gz) as 2-D slices for the VQ-VAE, and its reconstructions written back as volumes.

A folder of volumes (searched recursively) becomes the same uint8 SliceDataset as OASIS and ADNI, decoded once:

- orientation: each volume is reordered to the closest canonical orientation, RAS+, from its affine
  (nibabel.as_closest_canonical: axes flipped and swapped, never resampled), so `axial` cuts across the
  inferior-superior axis whatever the array's axis order. Slices are numbered along that canonical axis (sagittal
  from the left, coronal from the back, axial from the bottom) and shown with the top of the head (axial: the
  front) up and the subject's left on the left (sagittal: the front on the right);
- intensities: each volume is clipped to the [p, 100 - p] percentiles of its voxels above its minimum (the
  background of most scans, left out so that a mostly empty field of view does not set the window) and scaled to
  0..255;
- slices with fewer than a `min_brain_fraction` share of nonzero pixels are skipped;
- every slice is placed centred on one canvas, zeros around it: NxN with --image-size N (cropped where the slice is
  larger, never resized, so that a pixel stays a voxel), else the largest slice of the folder rounded up to a
  multiple of 16 on each side, which every model with up to 4 downsamplings takes.

Subjects: the BIDS `sub-<label>` of a path where it has one, else the file's path below the folder without its
extension. The splits are by subject, seeded, or as listed in `splits.csv` (columns subject,split) in the folder.
In a BIDS dataset (a dataset_description.json at its root) only the T1-weighted anatomy is read,
sub-*/[ses-*/]anat/*_T1w.nii[.gz]; derivatives/ and sourcedata/ are not.

Writing back: a reconstruction becomes a volume in the input's array layout, affine and header, in the input's
intensity units (the 8-bit window mapped back), so that it lies exactly on the input in a viewer. Slices the model
did not see (skipped as near-empty, or cropped away by --image-size) hold the input's own normalised voxels,
mapped back the same way: the input clipped to its window.

This is the only module that imports nibabel.
"""
import csv
import gzip
import random
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from imaging.slices import SLICE_AXES, SPLITS, SliceDataset, natural_key
from utils import DataError, write_atomically

EXTENSIONS = (".nii", ".nii.gz")
SPLITS_FILE = "splits.csv"
BIDS_MARKER = "dataset_description.json"
CANVAS_MULTIPLE = 16  # 2^4: the canvas suits models with up to 4 downsamplings
MAX_VOXELS = 512 ** 3  # one volume; checked from the header, before its data is read
MAX_PERCENTILE_SAMPLES = 1 << 21  # percentiles from a regular subsample of at most this many voxels (exact enough)
# slice axis -> the canonical (RAS+) axes that become (slice, row, column); rows are then flipped so that superior
# (axial: anterior) is up
LAYOUTS = {"sagittal": (0, 2, 1), "coronal": (1, 2, 0), "axial": (2, 1, 0)}
RECONSTRUCTION_MARK = b"VQ-VAE reconstruction (predict.py)"  # header descrip: a file predict.py may write over
BIDS_SUBJECT = re.compile(r"sub-[A-Za-z0-9]+")


@dataclass(frozen=True)
class SliceOptions:
    """How volumes become slices: TrainConfig's slice_axis, clip_percentile, min_brain_fraction and image_size."""
    axis: str = "axial"
    clip_percentile: float = 0.5
    min_brain_fraction: float = 0.05
    image_size: int | None = None

    def check(self):
        """DataError for a value no volume can be sliced with (TrainConfig checks its flags the same way)."""
        if self.axis not in SLICE_AXES:
            raise DataError(f"unknown slice axis {self.axis!r}; choose one of {', '.join(SLICE_AXES)}")
        if not 0 <= self.clip_percentile < 50:
            raise DataError(f"clip percentile must be in [0, 50), got {self.clip_percentile}")
        if not 0 <= self.min_brain_fraction < 1:
            raise DataError(f"minimum brain fraction must be in [0, 1), got {self.min_brain_fraction}")


@dataclass
class Volume:
    """One volume of a NIfTI SliceDataset: where its slices are, and what writing its reconstruction back needs.
    Its kept slices are the dataset's rows first .. first + len(kept) - 1, in order."""
    path: str
    subject: str
    shape: tuple                 # the input's 3-D array shape
    affine: np.ndarray           # the input's (4, 4) affine
    header: nib.Nifti1Header     # the input's header (or Nifti2Header)
    canonical_shape: tuple       # the array reordered to RAS+
    canonical_affine: np.ndarray
    axis: str                    # the slice axis
    kept: np.ndarray             # indices of the slices in the dataset, along the canonical slice axis
    first: int                   # the dataset row of kept[0]
    window: tuple                # (lo, hi): the intensities mapped to 0 and 255

    @property
    def rows(self) -> slice:
        return slice(self.first, self.first + len(self.kept))


# -----------------------------------------------------------------------------
# finding volumes and subjects

def find_volumes(root: Path) -> list[Path]:
    """The volume files under `root` in natural order; in a BIDS dataset only sub-*/[ses-*/]anat/*_T1w.nii[.gz].
    Hidden files and folders (macOS ._ files, .git) are left out."""
    bids = (root / BIDS_MARKER).is_file()
    found = []
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        if not path.name.lower().endswith(EXTENSIONS) or any(p.startswith(".") for p in parts):
            continue
        if bids and not (parts[0].startswith("sub-") and len(parts) >= 3 and parts[-2] == "anat"
                         and re.search(r"_T1w\.nii(\.gz)?$", path.name)):
            continue
        if path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def subject_of(path: Path, root: Path | None = None) -> str:
    """The BIDS label (sub-01) of the first folder or file name in the path that has one, else the path below
    `root` (or the file name) without its extension: one subject per file."""
    rel = path.relative_to(root) if root is not None else Path(path.name)
    for part in rel.parts:
        m = BIDS_SUBJECT.match(part)
        if m and (part == m[0] or part[m.end():].startswith("_")):
            return m[0]
    return volume_stem(rel.as_posix())


def volume_stem(name) -> str:
    """A volume's path or file name without its .nii or .nii.gz."""
    return re.sub(r"\.nii(\.gz)?$", "", str(name), flags=re.IGNORECASE)


def split_subjects(subjects: list[str], root: Path, val_fraction: float, test_fraction: float,
                   seed: int) -> dict[str, str]:
    """subject -> split: as root/splits.csv lists them, else a seeded shuffle of the subjects cut into test
    (`test_fraction`, at least one unless 0), validate (`val_fraction`, at least one) and train (the rest)."""
    if (root / SPLITS_FILE).is_file():
        return _read_splits(root / SPLITS_FILE, set(subjects))
    unique = sorted(set(subjects), key=natural_key)
    random.Random(seed).shuffle(unique)
    n_test = max(1, round(test_fraction * len(unique))) if test_fraction > 0 else 0
    n_val = max(1, round(val_fraction * len(unique)))
    if len(unique) - n_test - n_val < 1:
        raise DataError(f"{root} has {len(unique)} subjects, too few for a {val_fraction:.0%} validation and a "
                        f"{test_fraction:.0%} test share with one subject left to train on; add volumes, lower "
                        f"--val-fraction / --test-fraction, or list each subject's split in {root / SPLITS_FILE}")
    return {s: "test" if i < n_test else "validate" if i < n_test + n_val else "train" for i, s in enumerate(unique)}


def _read_splits(path: Path, subjects: set[str]) -> dict[str, str]:
    """subject -> split from a splits.csv, which must name every subject of the folder once and only those."""
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}; it should be a CSV file with the columns subject,split") from None
    if not rows or [c.strip().lower() for c in rows[0]] != ["subject", "split"]:
        raise DataError(f"{path} must start with the header line subject,split")
    splits = {}
    for number, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        subject, split = (c.strip() for c in row) if len(row) == 2 else ("", "")
        if split not in SPLITS or not subject:
            raise DataError(f"{path} line {number}: expected subject,split with split one of {', '.join(SPLITS)}, "
                            f"got {','.join(row)!r}")
        if splits.setdefault(subject, split) != split:
            raise DataError(f"{path} line {number}: subject {subject} is listed in {splits[subject]} and in {split}")
    unknown, missing = sorted(set(splits) - subjects), sorted(subjects - set(splits))
    if unknown:
        raise DataError(f"{path} lists subject {unknown[0]}, which has no volume in the folder (subjects are named "
                        f"like {min(subjects)}); fix or remove the line")
    if missing:
        raise DataError(f"subject {missing[0]} has volumes in the folder but is not in {path}; add a line for it")
    return splits


# -----------------------------------------------------------------------------
# reading one volume

class BadVolume(DataError):
    """A volume that cannot be used; str(e) is one line naming it, the problem and the fixes."""

    def __init__(self, path, reason):
        super().__init__(f"cannot use volume {path}: {reason}; remove or replace it, or pass --skip-bad to skip bad "
                         f"volumes")
        self.path, self.reason = path, reason


def _why(e: Exception) -> str:
    return " ".join(str(e).split())[:160] or type(e).__name__


def open_volume(path: Path):
    """The image (its data not yet read) and its 3-D shape, or BadVolume: not NIfTI, 2-D, 4-D, too large, or an
    affine that does not map voxels to space (singular, or not finite)."""
    try:
        image = nib.load(path)
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, ValueError, struct.error... on bad files
        raise BadVolume(path, f"not a readable NIfTI file ({_why(e)})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BadVolume(path, f"it holds a {type(image).__name__}, not a NIfTI volume")
    shape = image.shape
    if len(shape) < 3:
        raise BadVolume(path, f"it is a {len(shape)}-D image of shape {shape}, not a volume")
    if len(shape) > 3 and np.prod(shape[3:]) > 1:
        raise BadVolume(path, f"it is a {len(shape)}-D series of {np.prod(shape[3:])} volumes of shape {shape[:3]}; "
                              f"extract the volume to use (e.g. nibabel: image.slicer[..., 0])")
    if np.prod(shape[:3]) > MAX_VOXELS:
        raise BadVolume(path, f"its shape {shape[:3]} is over the limit of {MAX_VOXELS} voxels")
    affine = image.affine
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise BadVolume(path, "its affine is singular or not finite, so its orientation is unknown (check the sform, "
                              "qform and pixdim of its header)")
    return image, tuple(shape[:3])


def canonical_data(image, path):
    """(the image reordered to RAS+, its voxels as a 3-D array), or BadVolume for data that cannot be read
    (truncated), is not real numbers, or holds NaN or infinities."""
    try:
        canonical = nib.as_closest_canonical(image)  # reads the data unless the image is RAS+ already
        data = np.asanyarray(canonical.dataobj)
    except Exception as e:  # truncated gzip: EOFError, zlib.error, OSError; short .nii: OSError, ValueError
        raise BadVolume(path, f"its data cannot be read ({_why(e)})") from None
    if data.dtype.kind not in "biuf":
        raise BadVolume(path, f"its voxels are {data.dtype} (e.g. complex or RGB), not real numbers")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise BadVolume(path, "it has NaN or infinite voxels")
    return canonical, data.reshape(data.shape[:3])


def intensity_window(data: np.ndarray, path, percentile: float) -> tuple[float, float]:
    """The [p, 100 - p] percentiles of the voxels above the volume's minimum (its background), from a regular
    subsample (percentiles of millions of voxels change in the 4th digit at most). A window of zero width (a mask:
    every foreground voxel alike) widens to [minimum, maximum]; a constant volume is a DataError."""
    lowest, highest = float(data.min()), float(data.max())
    if lowest == highest:
        raise BadVolume(path, f"every voxel is {lowest:g}: the volume holds no image")
    sample = data.reshape(-1)[::max(1, data.size // MAX_PERCENTILE_SAMPLES)]
    sample = sample[sample > lowest]
    lo, hi = (float(v) for v in np.percentile(sample, [percentile, 100 - percentile])) if sample.size else (0, 0)
    return (lo, hi) if hi > lo else (lowest, highest)


def normalise(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint8: `data` clipped to [lo, hi] and scaled to 0..255 (in float32, in place on one copy)."""
    x = data.astype(np.float32)
    x -= lo
    x *= 255 / (hi - lo)
    np.clip(x, 0, 255, out=x)
    return np.rint(x, out=x).astype(np.uint8)


def to_stack(canonical: np.ndarray, axis: str) -> np.ndarray:
    """The RAS+ volume as (slices, rows, columns) along `axis`, rows from superior (axial: anterior) down. A view."""
    return np.flip(np.transpose(canonical, LAYOUTS[axis]), axis=1)


def from_stack(stack: np.ndarray, axis: str) -> np.ndarray:
    """The inverse of to_stack: the RAS+ volume. A view."""
    return np.transpose(np.flip(stack, axis=1), np.argsort(LAYOUTS[axis]))


def slice_shape(shape: tuple, image, axis: str) -> tuple[int, int]:
    """(rows, columns) of the slices along `axis` of a volume of array shape `shape`, from its header alone."""
    canonical = np.empty(3, int)
    canonical[io_orientation(image.affine)[:, 0].astype(int)] = shape
    _, rows, columns = LAYOUTS[axis]
    return int(canonical[rows]), int(canonical[columns])


# -----------------------------------------------------------------------------
# canvas

def _placement(size: int, target: int) -> tuple[int, int, int]:
    """(start in the slice, start on the canvas, length) of a slice side of `size` centred on a canvas of `target`."""
    if target >= size:
        return 0, (target - size) // 2, size
    return (size - target) // 2, 0, target


def canvas_of(shapes: list[tuple[int, int]], image_size: int | None) -> tuple[int, int]:
    """The canvas for slices of `shapes`: NxN for image_size N, else the largest side rounded up to 16."""
    if image_size is not None:
        return image_size, image_size
    return tuple(-(-max(s[i] for s in shapes) // CANVAS_MULTIPLE) * CANVAS_MULTIPLE for i in (0, 1))


def place(stack: np.ndarray, canvas: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, H, W) tensor: each slice of `stack` centred on a zero canvas of `canvas`, cropped where larger."""
    (sy, dy, ny), (sx, dx, nx) = (_placement(n, t) for n, t in zip(stack.shape[1:], canvas))
    out = torch.zeros((len(stack), *canvas), dtype=torch.uint8)
    out[:, dy:dy + ny, dx:dx + nx] = torch.from_numpy(np.ascontiguousarray(stack[:, sy:sy + ny, sx:sx + nx]))
    return out


def unplace(images: np.ndarray, stack: np.ndarray) -> None:
    """The inverse of place: the canvas images written into the matching region of `stack` (N, h, w), in place."""
    (sy, dy, ny), (sx, dx, nx) = (_placement(n, t) for n, t in zip(stack.shape[1:], images.shape[1:]))
    stack[:, sy:sy + ny, sx:sx + nx] = images[:, dy:dy + ny, dx:dx + nx]


# -----------------------------------------------------------------------------
# datasets

def load_folder(root, split: str, options: SliceOptions, val_fraction: float = 0.1, test_fraction: float = 0.1,
                seed: int = 0, skip_bad: bool = False, verbose: bool = True) -> SliceDataset:
    """One split of the volumes under `root` (dataset.build_dataset's nifti branch)."""
    options.check()
    root = _folder(root)
    paths = find_volumes(root)
    if not paths:
        what = "sub-*/anat/*_T1w.nii[.gz] files (it is a BIDS dataset)" if (root / BIDS_MARKER).is_file() else \
            ".nii or .nii.gz files"
        raise DataError(f"no {what} under {root}; pass --data-root pointing at a folder of NIfTI volumes")
    subjects = {p: subject_of(p, root) for p in paths}
    splits = split_subjects(list(subjects.values()), root, val_fraction, test_fraction, seed)
    listed = (root / SPLITS_FILE).is_file()
    if split not in splits.values():  # seeded, only the test split can be empty: with a test fraction of 0
        fix = (f"add one to {root / SPLITS_FILE}" if listed else
               "train with a --test-fraction above 0, or use --split validate")
        raise DataError(f"no subject of {root} is in the {split} split; {fix}")
    how = f"as listed in {SPLITS_FILE}" if listed else f"seeded split, seed {seed}"
    return load_volumes(paths, split, options, subjects, skip_bad, verbose, how=how,
                        keep=lambda path: splits[subjects[path]] == split)


def load_files(files, options: SliceOptions, skip_bad: bool = False, verbose: bool = True) -> SliceDataset:
    """The given volume files as one dataset (split "volumes"), sliced as `options` say (predict.py --volumes)."""
    options.check()
    paths = []
    for f in files:
        path = Path(f).expanduser()
        if not path.is_file():
            raise DataError(f"volume {path} {'is a folder' if path.is_dir() else 'does not exist'}; pass .nii or "
                            f".nii.gz files")
        paths.append(path)
    return load_volumes(paths, "volumes", options, {p: subject_of(p) for p in paths}, skip_bad, verbose,
                        keep=lambda p: True, how="given files")


def load_volumes(paths, split, options, subjects, skip_bad, verbose, keep, how) -> SliceDataset:
    """The slices of the volumes in `paths` that `keep` selects, on a canvas fitting all of `paths` (so that every
    split of a folder has one image size). Bad volumes are a DataError, or with skip_bad skipped and reported."""
    opened, bad = {}, []
    for path in paths:
        try:
            opened[path] = open_volume(path)
        except BadVolume as e:
            if not skip_bad:
                raise
            bad.append(e)
    if not opened:
        raise DataError(f"none of the {len(paths)} volumes can be used (first: {bad[0].path}: {bad[0].reason})")
    canvas = canvas_of([slice_shape(shape, image, options.axis) for image, shape in opened.values()],
                       options.image_size)
    parts, volumes, skipped_slices = [], [], 0
    for path in (p for p in paths if p in opened and keep(p)):
        try:
            volume, stack = slice_volume(path, *opened[path], subjects[path], options)
        except BadVolume as e:
            if not skip_bad:
                raise
            bad.append(e)
            continue
        volume.first = sum(len(v.kept) for v in volumes)
        skipped_slices += len(stack) - len(volume.kept)
        volumes.append(volume)
        parts.append(place(stack[volume.kept], canvas))
    bad = [e for e in bad if keep(e.path)]  # those of other splits are reported when those are loaded
    if bad and verbose:
        print(f"skipped {len(bad)} bad volumes (first: {bad[0].path}: {bad[0].reason})")
    return _dataset(parts, volumes, split, options, canvas, skipped_slices, how, verbose)


def slice_volume(path, image, shape, subject, options) -> tuple[Volume, np.ndarray]:
    """(its Volume record (first row still 0), its uint8 stack of all slices) of one opened volume."""
    canonical, data = canonical_data(image, path)
    window = intensity_window(data, path, options.clip_percentile)
    stack = to_stack(normalise(data, *window), options.axis)
    brain = np.count_nonzero(stack, axis=(1, 2)) / (stack.shape[1] * stack.shape[2])
    kept = np.flatnonzero(brain >= options.min_brain_fraction)
    if not len(kept):
        raise BadVolume(path, f"none of its {options.axis} slices has a brain fraction (nonzero pixels) of "
                              f"{options.min_brain_fraction} (the most: {brain.max():.3f}); lower --min-brain-fraction")
    return Volume(str(path), subject, shape, image.affine.copy(), image.header.copy(), tuple(data.shape),
                  canonical.affine.copy(), options.axis, kept, 0, window), stack


def _dataset(parts, volumes, split, options, canvas, skipped_slices, how, verbose) -> SliceDataset:
    if not parts:
        raise DataError(f"every volume of the nifti {split} split is bad and was skipped; replace them")
    images = torch.cat(parts)
    files = [f"{v.path}::{v.axis}[{i}]" for v in volumes for i in v.kept]
    patients = [v.subject for v in volumes for _ in v.kept]
    ds = SliceDataset(images, torch.zeros(len(images), dtype=torch.int64), ["none"], patients, files, "nifti", split,
                      volumes=volumes)
    if verbose:
        print(f"nifti {split}: {len(images)} {options.axis} slices of {canvas[1]}x{canvas[0]} from {len(volumes)} "
              f"volumes of {len(set(patients))} subjects ({how}; {skipped_slices} near-empty slices skipped)")
    return ds


def _folder(root) -> Path:
    if root is None:
        raise DataError("no dataset root given for nifti; pass --data-root pointing at a folder of .nii/.nii.gz "
                        "volumes (searched recursively; a BIDS dataset works)")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist; pass --data-root pointing at a folder of NIfTI volumes")
    if not root.is_dir():
        raise DataError(f"dataset root {root} is a file, not a folder; pass the folder holding the volumes (predict.py "
                        f"--volumes reconstructs single files)")
    return root


# -----------------------------------------------------------------------------
# writing reconstructions back

def reconstruction_image(volume: Volume, images: np.ndarray):
    """The volume whose kept slices are `images` (uint8 (len(kept), H, W) canvas images, the model's output), in the
    input's array layout, affine and header and its intensity units; elsewhere the input's own normalised voxels."""
    image, shape = open_volume(Path(volume.path))
    if shape != tuple(volume.shape) or not np.allclose(image.affine, volume.affine):
        raise DataError(f"volume {volume.path} has changed since it was loaded (shape or affine); predict again")
    _, data = canonical_data(image, volume.path)
    stack = to_stack(normalise(data, *volume.window), volume.axis)  # a view of the new array: written in place
    kept = np.ascontiguousarray(stack[volume.kept])
    unplace(images, kept)
    stack[volume.kept] = kept
    back = ornt_transform(axcodes2ornt("RAS"), io_orientation(volume.affine))
    voxels = apply_orientation(from_stack(stack, volume.axis), back)
    lo, hi = volume.window
    data = voxels.astype(np.float32) * np.float32((hi - lo) / 255) + np.float32(lo)
    header = volume.header.copy()
    header["descrip"] = RECONSTRUCTION_MARK
    return type(image)(data.reshape(header.get_data_shape()), volume.affine, header)


def check_replaceable(path: Path):
    """DataError if `path` holds a file that is not a reconstruction written by predict.py (its header's descrip
    says so): such a file is never replaced."""
    if Path(path).exists():
        try:
            ours = nib.load(path).header["descrip"].tobytes().rstrip(b"\0") == RECONSTRUCTION_MARK
        except Exception:  # not a NIfTI file at all: not ours either
            ours = False
        if not ours:
            raise DataError(f"{path} exists and is not a reconstruction written by predict.py; choose another --out")


def write_reconstruction(volume: Volume, images: np.ndarray, path: Path):
    """Write reconstruction_image(...) to `path` (.nii.gz) atomically, unless check_replaceable refuses."""
    check_replaceable(path)
    image = reconstruction_image(volume, images)
    write_atomically(path, gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))
