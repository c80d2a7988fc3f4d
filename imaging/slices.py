"""What every module agrees on about a slice image, in torch only (nothing of this project is imported here):

- pixel conventions: uint8 (N, H, W) as decoded, float in [-1, 1] as the models see it, [0, 1] as it is scored,
  and the conversions between them (to_float, to_unit, to_uint8; uint8_to_unit, unit_to_uint8, unit_to_float);
- SliceDataset, one split's decoded slices in memory, and the names shared by every loader (SPLITS, SLICE_AXES,
  IMAGE_SUFFIXES, the image-size limits, natural_key).

SSIM and PSNR, the scores of every command, are in imaging/quality.py.
"""
import re

import torch

SPLITS = ("train", "validate", "test")
SLICE_AXES = ("axial", "coronal", "sagittal")  # nifti: the anatomical axis slices are cut across
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # slice image files, compared in lower case
MAX_IMAGE_SIDE = 8192  # pixels per side of any image read, resized to or declared by a .vqz file
MIN_IMAGE_SIDE = 8  # SSIM's 7x7 window, and the model's downsampling of the default preset (2^3)


def natural_key(name: str) -> list:
    """Sort key of natural order: case_2 before case_10. Case-sensitive (Z before a): the order of patients and
    subjects seeds the carved validation and test splits, which a checkpoint re-derives rather than stores."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------------------------------------
# Pixel conventions
# ---------------------------------------------------------------------------------------------------------

def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W) -> float32 in [-1, 1]."""
    return images_uint8.float() / 127.5 - 1


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] float32, clamped."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 in 0..255, rounded: the 8-bit image a reconstruction is when written to a file."""
    return unit_to_uint8(to_unit(x))


def uint8_to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W) -> float32 in [0, 1], as SSIM and PSNR score images."""
    return images_uint8.float() / 255


def unit_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> uint8 in 0..255, clamped and rounded."""
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8)


def unit_to_float(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the models' range."""
    return x * 2 - 1


class SliceDataset(torch.utils.data.Dataset):
    """Decoded 2D slices of one split; items are (float32 (1, H, W) image in [-1, 1], int label)."""

    def __init__(self, images, labels, class_names, patients, files, name, split, volumes=None, masks=None):
        self.images = images  # uint8 (N, H, W)
        self.masks = masks  # uint8 (N, H, W) tissue classes 0..3 (build_dataset(..., masks=True)), else None
        self.labels = labels  # int64 (N,)
        self.class_names = class_names
        self.patients = patients
        self.files = files
        self.name = name
        self.split = split
        self.volumes = volumes  # nifti: a nifti.Volume per volume, in row order (where its slices are, how to write
        # a reconstruction back); None for datasets of slice images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return to_float(self.images[i]).unsqueeze(0), int(self.labels[i])

    @property
    def image_shape(self):
        return tuple(self.images.shape[1:])

    def subset(self, rows: torch.Tensor) -> "SliceDataset":
        """The slices at `rows` (int64 (n,)), with their masks, labels, patients and files; without the volumes,
        whose slices a subset no longer holds whole."""
        picked = rows.tolist()
        return SliceDataset(self.images[rows], self.labels[rows], self.class_names,
                            [self.patients[i] for i in picked], [self.files[i] for i in picked], self.name,
                            self.split, masks=None if self.masks is None else self.masks[rows])
