"""Behaviour of dataset.py on tiny image trees generated here (never real data)."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from dataset import build_dataset, generate_demo, read_slice
from helpers import assert_one_line_error, make_adni, write_image
from imaging import slices as images
from imaging.slices import to_float
from utils import DataError

# -----------------------------------------------------------------------------
# helpers: tiny OASIS / ADNI trees (make_adni is in helpers.py, shared with test_prior.py)

def noise(seed, shape=(32, 32)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def make_oasis(holder, patients=("2", "10"), n_slices=3, size=32):
    """keras_png_slices_{train,validate,test} of noise slices, plus a keras_png_seg_train that must be ignored."""
    for k, split in enumerate(images.SPLITS):
        for p in patients:
            for s in range(n_slices):
                pixels = noise(1000 * k + 100 * int(p) + s, (size, size))
                write_image(holder / f"keras_png_slices_{split}" / f"case_{p}_slice_{s}.nii.png", pixels)
    (holder / "keras_png_seg_train").mkdir()
    (holder / "keras_png_seg_train" / "case_2_slice_0.nii.png").write_bytes(b"not an image")
    return holder


def zip_tree(folder, zip_path, arc_prefix):
    with zipfile.ZipFile(zip_path, "w") as zf:
        for f in sorted(folder.rglob("*")):
            zf.write(f, arc_prefix + f.relative_to(folder).as_posix())
    return zip_path


def load(name, root, split="train", **kwargs):
    return build_dataset(name, root, split, verbose=False, **kwargs)


# -----------------------------------------------------------------------------
# OASIS

def test_random_crops_are_windows_of_each_image_fixed_by_seed_and_key_not_by_batch():
    x = torch.arange(2 * 10 * 12, dtype=torch.int32).reshape(2, 1, 10, 12)
    crops = dataset.random_crops(x, 4, seed=(0, 1), keys=[7, 9])
    assert crops.shape == (2, 1, 4, 4)
    for image, crop in zip(x, crops):
        top, left = divmod(int(crop[0, 0, 0]) % 120, 12)
        assert torch.equal(crop, image[:, top:top + 4, left:left + 4])
    assert torch.equal(dataset.random_crops(x[1:], 4, seed=(0, 1), keys=[9]), crops[1:])  # alone: same crop
    corners = {int(dataset.random_crops(x[:1], 4, seed=(0, e), keys=[7])[0, 0, 0, 0]) for e in range(20)}
    assert len(corners) > 5  # a new corner every epoch


def test_oasis_holder_parent_and_zip_give_same_pixels(tmp_path):
    holder = make_oasis(tmp_path / "keras_png_slices_data")
    archive = zip_tree(holder, tmp_path / "keras_png_slices_data.zip", "keras_png_slices_data/")
    from_holder, from_parent, from_zip = (load("OASIS", r) for r in (holder, tmp_path, archive))
    assert from_holder.images.dtype == torch.uint8 and from_holder.images.shape == (6, 32, 32)
    assert torch.equal(from_holder.images, from_parent.images)
    assert torch.equal(from_holder.images, from_zip.images)
    expected = np.asarray(Image.open(holder / "keras_png_slices_train" / "case_2_slice_0.nii.png"))
    assert np.array_equal(from_holder.images[0].numpy(), expected)


def test_oasis_zip_with_split_folders_at_top_level(tmp_path):
    holder = make_oasis(tmp_path / "data")
    archive = zip_tree(holder, tmp_path / "flat.zip", "")
    assert torch.equal(load("OASIS", archive, "test").images, load("OASIS", holder, "test").images)


def test_zip_slices_are_named_zip_then_member(tmp_path):
    archive = zip_tree(make_oasis(tmp_path / "data"), tmp_path / "o.zip", "keras_png_slices_data/")
    ds = load("OASIS", archive)
    assert ds.files[0] == f"{archive}::keras_png_slices_data/keras_png_slices_train/case_2_slice_0.nii.png"


def test_oasis_ignores_seg_folders(tmp_path):
    ds = load("OASIS", make_oasis(tmp_path))  # keras_png_seg_train holds an unreadable file
    assert all("keras_png_slices_train" in f for f in ds.files)


def test_oasis_patient_ids_parsed_and_sorted_numerically(tmp_path):
    ds = load("OASIS", make_oasis(tmp_path, patients=("10", "2"), n_slices=11))
    assert ds.patients == ["2"] * 11 + ["10"] * 11
    assert [Path(f).name for f in ds.files[:3]] == [f"case_2_slice_{s}.nii.png" for s in (0, 1, 2)]
    assert Path(ds.files[10]).name == "case_2_slice_10.nii.png"


def test_oasis_labels_and_metadata(tmp_path):
    ds = load("OASIS", make_oasis(tmp_path), "validate")
    assert (ds.name, ds.split, ds.class_names, ds.image_shape) == ("OASIS", "validate", ["none"], (32, 32))
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0] * 6
    assert all("keras_png_slices_validate" in f for f in ds.files)


def test_getitem_returns_float_image_in_minus_one_to_one(tmp_path):
    ds = load("OASIS", make_oasis(tmp_path))
    image, label = ds[0]
    assert image.dtype == torch.float32 and image.shape == (1, 32, 32) and label == 0
    assert torch.allclose(image[0], ds.images[0].float() / 127.5 - 1)
    assert to_float(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


# -----------------------------------------------------------------------------
# ADNI

def test_adni_labels_and_non_square_shape(tmp_path):
    ds = load("ADNI", make_adni(tmp_path / "AD_NC"), "test")
    assert ds.class_names == ["NC", "AD"]
    assert ds.images.shape == (8, 240, 256) and ds.image_shape == (240, 256)
    for image, label, path in zip(ds.images, ds.labels.tolist(), ds.files):
        assert label == (1 if "/AD/" in Path(path).as_posix() else 0)
        assert abs(image.float().mean().item() - (60 if label else 180)) < 2  # JPEG is lossy
    assert ds.patients[:2] == ["2000", "2000"]


@pytest.mark.parametrize("arc_prefix", ["AD_NC/", ""])
def test_adni_zip_matches_folder(tmp_path, arc_prefix):
    ad_nc = make_adni(tmp_path / "AD_NC")
    archive = zip_tree(ad_nc, tmp_path / "ADNI.zip", arc_prefix)
    from_folder, from_zip = load("ADNI", ad_nc), load("ADNI", archive)
    assert torch.equal(from_folder.images, from_zip.images)
    assert torch.equal(from_folder.labels, from_zip.labels)
    assert from_folder.patients == from_zip.patients


def test_adni_reads_from_parent_of_ad_nc(tmp_path):
    make_adni(tmp_path / "AD_NC")
    assert len(load("ADNI", tmp_path, "test")) == 8


def test_adni_validate_is_patient_disjoint_part_of_train(tmp_path):
    root = make_adni(tmp_path / "AD_NC")
    train, val = load("ADNI", root, "train"), load("ADNI", root, "validate")
    assert set(train.patients).isdisjoint(val.patients)
    assert sorted(train.files + val.files) == sorted(str(p) for p in (root / "train").rglob("*.jpeg"))
    assert len(set(val.patients)) == 2  # 10% of 20 patients


def test_adni_validate_always_has_a_patient(tmp_path):
    val = load("ADNI", make_adni(tmp_path / "AD_NC", train_patients=2), "validate", val_fraction=0.01)
    assert len(set(val.patients)) == 1


def test_adni_validate_needs_patients_left_for_train(tmp_path):
    root = make_adni(tmp_path / "AD_NC", train_patients=1, test_patients=1)
    assert len(set(load("ADNI", root, "validate", val_fraction=0.9).patients)) == 2  # every patient
    with pytest.raises(DataError) as e:
        load("ADNI", root, "train", val_fraction=0.9)
    assert_one_line_error(e, root / "train", "validation fraction")


def test_adni_validate_split_is_seeded(tmp_path):
    root = make_adni(tmp_path / "AD_NC")
    val_patients = {seed: load("ADNI", root, "validate", seed=seed).patients for seed in (0, 0, 1, 2, 3)}
    assert load("ADNI", root, "validate", seed=0).patients == val_patients[0]
    assert len({tuple(p) for p in val_patients.values()}) > 1


def test_adni_prints_counts(tmp_path, capsys):
    build_dataset("ADNI", make_adni(tmp_path / "AD_NC"), "test", verbose=True)
    assert capsys.readouterr().out.strip() == "ADNI test: 8 slices (AD 4, NC 4) from 4 patients"


# -----------------------------------------------------------------------------
# demo

def test_demo_is_deterministic(tmp_path):
    a, b, c = (generate_demo(tmp_path / d, size=32, n_patients=10, slices_per_patient=2, seed=s)
               for d, s in (("a", 0), ("b", 0), ("c", 1)))
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 2 * 20  # slices and their masks
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_demo_builds_on_first_use_in_default_root(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "default_demo_root", lambda: tmp_path / "demo")
    sizes = {split: len(load("demo", None, split)) for split in images.SPLITS}
    assert sizes == {"train": 240, "validate": 30, "test": 30}
    ds = load("demo", None, "validate")
    assert set(ds.patients).isdisjoint(load("demo", None, "train").patients)
    image, label = ds[0]
    assert image.shape == (1, 128, 128) and label == 0 and ds.class_names == ["none"]
    assert -1 <= image.min() < image.max() <= 1
    assert (tmp_path / "demo" / dataset.DEMO_MARKER).is_file()


def test_demo_regenerates_half_written_tree(tmp_path):
    root = generate_demo(tmp_path, size=32, n_patients=10, slices_per_patient=2)
    some_slice = next((root / "keras_png_slices_train").iterdir())
    original = some_slice.read_bytes()
    some_slice.write_bytes(b"")
    generate_demo(root, size=32, n_patients=10, slices_per_patient=2)
    assert some_slice.read_bytes() == b""  # complete tree: left alone
    (root / dataset.DEMO_MARKER).unlink()
    generate_demo(root, size=32, n_patients=10, slices_per_patient=2)
    assert some_slice.read_bytes() == original


def test_demo_with_other_settings_replaces_old_tree(tmp_path):
    generate_demo(tmp_path, size=32, n_patients=20, slices_per_patient=2)
    generate_demo(tmp_path, size=16, n_patients=10, slices_per_patient=2)
    ds = load("demo", tmp_path, "train")
    assert len(ds) == 16 and ds.image_shape == (16, 16)


# -----------------------------------------------------------------------------
# decoding

GRAY = np.kron(np.array([[0, 64], [128, 255]], np.uint8), np.ones((4, 4), np.uint8))  # 8x8: the smallest allowed


def encode(pixels, mode=None, fmt="PNG", convert=None):
    image = Image.fromarray(pixels, mode)
    image = image.convert(convert) if convert else image
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("data, expected", [
    (encode(GRAY), GRAY),
    (encode(np.stack([GRAY] * 3, -1)), GRAY),
    (encode(GRAY, convert="P"), GRAY),
    (encode(np.stack([GRAY, np.full_like(GRAY, 255)], -1), "LA"), GRAY),
    (encode(np.stack([GRAY] * 3 + [np.full_like(GRAY, 128)], -1)), np.rint(GRAY * 128.0 / 255)),  # over black
    (encode(GRAY.astype(np.uint16) * 257), GRAY),  # 16-bit
    (encode(GRAY > 100, convert="1"), np.where(GRAY > 100, 255, 0)),
], ids=["L", "RGB", "P", "LA", "RGBA", "I;16", "1"])
def test_read_slice_gives_8bit_gray(data, expected):
    pixels = read_slice(data, "x.png")
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 8)
    assert np.abs(pixels.astype(int) - expected).max() <= 1


def test_image_size_resizes_square_images(tmp_path):
    ds = load("OASIS", make_oasis(tmp_path), image_size=16)
    assert ds.images.shape == (6, 16, 16)


def test_image_size_centre_crops_non_square_then_resizes(tmp_path):
    pixels = np.zeros((20, 40), np.uint8)  # 40 wide: centre 20 columns bright, 10 dark columns each side
    pixels[:, 10:30] = 200
    write_image(tmp_path / "keras_png_slices_train" / "case_1_slice_0.nii.png", pixels)
    assert load("OASIS", tmp_path, image_size=20).images[0].unique().tolist() == [200]
    assert load("OASIS", tmp_path, image_size=10).images.shape == (1, 10, 10)


# -----------------------------------------------------------------------------
# errors: one line, naming the path

def test_missing_root(tmp_path):
    with pytest.raises(DataError) as e:
        load("OASIS", tmp_path / "nowhere")
    assert_one_line_error(e, tmp_path / "nowhere", "--data-root")


def test_no_root_for_real_dataset():
    with pytest.raises(DataError) as e:
        load("ADNI", None)
    assert_one_line_error(e, "--data-root")


@pytest.mark.parametrize("name", ["OASIS", "ADNI"])
def test_wrong_layout_lists_what_was_found(tmp_path, name):
    (tmp_path / "photos").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError) as e:
        load(name, tmp_path)
    assert_one_line_error(e, tmp_path, "expected", "photos/", "notes.txt")


def test_empty_split_folder(tmp_path):
    make_oasis(tmp_path)
    for f in (tmp_path / "keras_png_slices_test").iterdir():
        f.unlink()
    with pytest.raises(DataError) as e:
        load("OASIS", tmp_path, "test")
    assert_one_line_error(e, tmp_path / "keras_png_slices_test", "no images")


def test_missing_split_folder(tmp_path):
    write_image(tmp_path / "keras_png_slices_train" / "case_1_slice_0.nii.png", noise(0))
    with pytest.raises(DataError) as e:
        load("OASIS", tmp_path, "validate")
    assert_one_line_error(e, tmp_path / "keras_png_slices_validate", "missing")


def truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize("spoil", [
    lambda p: p.write_bytes(b""),
    lambda p: p.write_text("<html>404 not found</html>"),
    truncate,
], ids=["empty", "not-an-image", "truncated"])
def test_unreadable_file(tmp_path, spoil):
    make_oasis(tmp_path)
    bad = tmp_path / "keras_png_slices_train" / "case_10_slice_1.nii.png"
    spoil(bad)
    with pytest.raises(DataError) as e:
        load("OASIS", tmp_path)
    assert_one_line_error(e, f"cannot read image {bad}", "--skip-bad")


def test_truncated_jpeg(tmp_path):
    root = make_adni(tmp_path / "AD_NC", test_patients=1)
    bad = root / "test" / "AD" / "1000_1.jpeg"
    truncate(bad)
    with pytest.raises(DataError) as e:
        load("ADNI", root, "test")
    assert_one_line_error(e, f"cannot read image {bad}")


def test_odd_sized_image(tmp_path):
    make_oasis(tmp_path)
    odd = write_image(tmp_path / "keras_png_slices_train" / "case_2_slice_1.nii.png", noise(0, (30, 32)))
    with pytest.raises(DataError) as e:
        load("OASIS", tmp_path)
    assert_one_line_error(e, odd, "32x30", "32x32", "--image-size", "--skip-bad")


def test_bad_zip(tmp_path):
    archive = tmp_path / "keras_png_slices_data.zip"
    archive.write_bytes(b"PK\x03\x04 but cut short")
    with pytest.raises(DataError) as e:
        load("OASIS", archive)
    assert_one_line_error(e, archive, "zip")


@pytest.mark.parametrize("name, split, choices", [
    ("OASIS", "val", "train, validate, test"),
    ("BraTS", "train", "OASIS, ADNI, demo"),
])
def test_unknown_names_list_choices(tmp_path, name, split, choices):
    with pytest.raises(DataError) as e:
        load(name, make_oasis(tmp_path), split)
    assert_one_line_error(e, choices)


def test_skip_bad_skips_and_reports(tmp_path, capsys):
    make_oasis(tmp_path)
    train = tmp_path / "keras_png_slices_train"
    (train / "case_2_slice_1.nii.png").write_bytes(b"")
    truncate(train / "case_10_slice_0.nii.png")
    write_image(train / "case_10_slice_2.nii.png", noise(0, (30, 32)))
    ds = build_dataset("OASIS", tmp_path, "train", skip_bad=True, verbose=True)
    assert len(ds) == len(ds.labels) == len(ds.patients) == len(ds.files) == 3
    assert ds.patients == ["2", "2", "10"]
    assert (f"skipped 3 unreadable or odd-sized files (first: {train / 'case_2_slice_1.nii.png'})"
            in capsys.readouterr().out.splitlines())


def test_paths_with_spaces_and_non_ascii(tmp_path):
    root = make_oasis(tmp_path / "données IRM" / "keras png ✓")
    archive = zip_tree(root, tmp_path / "données IRM" / "archive ü.zip", "")
    assert torch.equal(load("OASIS", root).images, load("OASIS", archive).images)
