"""Bad input to dataset.py gives a one-line DataError, and the demo generator never touches files it did not write.

Every tree, zip and image here is tiny and made by the test; the lying headers are patched bytes, not big files."""

import struct
import zipfile
import zlib

import numpy as np
import pytest

import dataset
from dataset import DEMO_MANIFEST, DEMO_MARKER, check_compatible, demo_settings, generate_demo, patient_id, read_slice
from helpers import assert_one_line_error, make_adni, write_image
from imaging import slices as images
from test_dataset import encode, load, make_oasis, noise, zip_tree
from utils import DataError

SMALL_DEMO = dict(size=16, n_patients=10, slices_per_patient=2)


def snapshot(root):
    """Every path under `root` with its bytes (None for a folder)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


# -----------------------------------------------------------------------------
# 1. the demo generator writes only where it may, and deletes only what it wrote

def test_demo_refuses_a_folder_holding_real_data_and_leaves_it_as_it_was(tmp_path):
    root = make_oasis(tmp_path / "oasis", patients=("001",), n_slices=1)  # case_001_slice_0: demo-v1's very names
    before = snapshot(root)
    with pytest.raises(DataError) as e:
        generate_demo(root, **SMALL_DEMO)
    assert_one_line_error(e, root, "did not write", "empty or new --data-root")
    with pytest.raises(DataError):
        load("demo", root)  # --dataset demo --data-root <a real tree>
    assert snapshot(root) == before


@pytest.mark.parametrize("foreign", ["keras_png_slices_train/case_1_slice_0.nii.png", "notes.txt",
                                     "keras_png_slices_test/sub/x.png"])
def test_demo_with_other_settings_deletes_nothing_it_did_not_write(tmp_path, foreign):
    generate_demo(tmp_path, **SMALL_DEMO)
    (tmp_path / foreign).parent.mkdir(exist_ok=True)
    (tmp_path / foreign).write_bytes(b"real data")
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as e:
        generate_demo(tmp_path, size=32, n_patients=10, slices_per_patient=3)
    assert_one_line_error(e, tmp_path, foreign.partition("/sub")[0], "--data-root")
    assert snapshot(tmp_path) == before


def test_demo_manifest_cannot_make_a_real_file_its_own(tmp_path):
    generate_demo(tmp_path, **SMALL_DEMO)
    real = tmp_path / "keras_png_slices_train" / "case_1_slice_0.nii.png"
    real.write_bytes(b"real data")
    with (tmp_path / DEMO_MANIFEST).open("a") as manifest:
        manifest.write("keras_png_slices_train/case_1_slice_0.nii.png\n")  # only demo names can ever be its own
    with pytest.raises(DataError):
        generate_demo(tmp_path, size=32, n_patients=10, slices_per_patient=3)
    assert real.read_bytes() == b"real data"


def test_demo_with_other_settings_replaces_exactly_its_own_files(tmp_path):
    generate_demo(tmp_path, size=32, n_patients=20, slices_per_patient=3)
    generate_demo(tmp_path, **SMALL_DEMO)
    images = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")}
    assert len(images) == 2 * 20 and images == set((tmp_path / DEMO_MANIFEST).read_text().split())  # slices, masks
    assert demo_settings(tmp_path) == dict(SMALL_DEMO, seed=0)
    expected = [DEMO_MANIFEST, DEMO_MARKER, *dataset.OASIS_DIRS.values(), *dataset.SEG_DIRS.values()]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)


def test_demo_files_have_names_of_their_own_and_read_as_oasis(tmp_path):
    root = generate_demo(tmp_path / "new", **SMALL_DEMO)
    names = [p.name for folder in dataset.OASIS_DIRS.values() for p in (root / folder).iterdir()]
    masks = [p.name for folder in dataset.SEG_DIRS.values() for p in (root / folder).iterdir()]
    assert len(names) == 20 and all(dataset.DEMO_NAME.fullmatch(n) for n in names)
    assert len(masks) == 20 and all(dataset.DEMO_MASK_NAME.fullmatch(n) for n in masks)
    assert not any(n.startswith("case_") for n in names)
    train = load("OASIS", root)  # bench.py and copied demo trees read it so
    assert train.patients[:3] == ["001", "001", "002"] and len(set(train.patients)) == 8
    assert (root / DEMO_MARKER).read_text().startswith(dataset.DEMO_VERSION + " ") and dataset.DEMO_VERSION != "demo-v1"


def test_demo_interrupted_run_is_resumed_into_the_same_tree(tmp_path, monkeypatch):
    fresh = generate_demo(tmp_path / "fresh", **SMALL_DEMO)
    real_phantom, calls = dataset._phantom, []

    def phantom_interrupted_at_fourth_patient(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real_phantom(*args)
    monkeypatch.setattr(dataset, "_phantom", phantom_interrupted_at_fourth_patient)
    with pytest.raises(KeyboardInterrupt):
        generate_demo(tmp_path / "cut", **SMALL_DEMO)
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert not (cut / DEMO_MARKER).exists() and len(list(cut.rglob("demo_*.png"))) == 6
    generate_demo(cut, **SMALL_DEMO)
    assert snapshot(cut) == snapshot(fresh)


def test_demo_root_that_is_a_file(tmp_path):
    (tmp_path / "demo").write_text("not a folder")
    with pytest.raises(DataError) as e:
        generate_demo(tmp_path / "demo", **SMALL_DEMO)
    assert_one_line_error(e, tmp_path / "demo", "is a file, not a folder")
    assert (tmp_path / "demo").read_text() == "not a folder"


def test_demo_settings_that_make_no_dataset(tmp_path):
    with pytest.raises(DataError) as e:
        generate_demo(tmp_path / "demo", size=4, n_patients=10, slices_per_patient=2)
    assert_one_line_error(e, "size must be at least 8")
    assert not (tmp_path / "demo").exists()


# -----------------------------------------------------------------------------
# 2. every file name must say its patient, so the patient-disjoint split holds

@pytest.mark.parametrize("name, layout, patient", [
    ("case_402_slice_12.nii.png", "OASIS", "402"),
    ("case_2_slice_0.png", "OASIS", "2"),
    ("demo_007_slice_3.png", "OASIS", "007"),
    ("1003730_84.jpeg", "ADNI", "1003730"),
    ("scan.jpeg", "ADNI", None),
    ("1003730.jpeg", "ADNI", None),
    ("case_1.png", "OASIS", None),
    ("brain_slice_3.png", "OASIS", None),
    ("1003730_84.jpeg", "OASIS", None),
])
def test_patient_id(name, layout, patient):
    assert patient_id(name, layout) == patient


@pytest.mark.parametrize("split", ["train", "validate", "test"])
def test_adni_file_name_without_patient_is_an_error(tmp_path, split):
    root = make_adni(tmp_path / "AD_NC", train_patients=2, test_patients=1, n_slices=1)
    bad = write_image(root / ("test" if split == "test" else "train") / "NC" / "scan.jpeg", noise(0, (240, 256)))
    with pytest.raises(DataError) as e:
        load("ADNI", root, split)
    assert_one_line_error(e, bad, "<patient>_<slice>", "rename or remove")


def test_oasis_file_name_without_patient_is_an_error(tmp_path):
    make_oasis(tmp_path)
    bad = write_image(tmp_path / "keras_png_slices_test" / "slice_7.png", noise(0))
    with pytest.raises(DataError) as e:
        load("OASIS", tmp_path, "test")
    assert_one_line_error(e, bad, "case_<id>_slice_<n>")


# -----------------------------------------------------------------------------
# 3. an ADNI tree with train/ but no test/

@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_adni_without_test_folder_loads_train_and_validate(tmp_path, as_zip):
    root = make_adni(tmp_path / "AD_NC", train_patients=5, test_patients=0, n_slices=1)
    root = zip_tree(root, tmp_path / "AD_NC.zip", "AD_NC/") if as_zip else root
    train, val = load("ADNI", root, "train"), load("ADNI", root, "validate")
    assert len(train) + len(val) == 10 and set(train.patients).isdisjoint(val.patients)
    with pytest.raises(DataError) as e:
        load("ADNI", root, "test")
    assert_one_line_error(e, f"{root}::AD_NC" if as_zip else root, "has no test/ folder", "--split validate")


# -----------------------------------------------------------------------------
# 4. zip members that cannot be read are unreadable files (so --skip-bad skips them)

BAD_MEMBER = "keras_png_slices_train/case_10_slice_1.nii.png"


def deflated_oasis_zip(tmp_path):
    holder = make_oasis(tmp_path / "data")
    archive = tmp_path / "oasis.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(holder.rglob("*")):
            zf.write(f, f.relative_to(holder).as_posix())
    return archive


def patch_member(archive, member, flag_bits=None, method=None, size=None, corrupt=False):
    """Rewrite fields of `member`'s local header and central directory entry, at their offsets in the zip spec."""
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        local = zf.getinfo(member).header_offset
    central = raw.rfind(member.encode()) - 46  # the central directory comes last
    assert raw[local:local + 4] == b"PK\x03\x04" and raw[central:central + 4] == b"PK\x01\x02"
    for start, flags_at, method_at, size_at in ((local, 6, 8, 22), (central, 8, 10, 24)):
        for value, at, fmt in ((flag_bits, flags_at, "<H"), (method, method_at, "<H"), (size, size_at, "<I")):
            if value is not None:
                struct.pack_into(fmt, raw, start + at, value)
    if corrupt:
        name_len, extra_len = struct.unpack_from("<HH", raw, local + 26)
        data = local + 30 + name_len + extra_len
        raw[data:data + 4] = b"\xff" * 4  # a deflate block of the reserved type 3
    archive.write_bytes(bytes(raw))
    return archive


@pytest.mark.parametrize("patch, reason", [
    (dict(corrupt=True), "invalid block type"),                # zlib.error
    (dict(flag_bits=0x1), "encrypted"),                        # RuntimeError: password required
    (dict(method=9), "deflate64"),                             # NotImplementedError
    (dict(size=100 << 20), "over the 64 MiB limit"),           # refused before anything is inflated
], ids=["corrupt-deflate", "encrypted", "deflate64", "declared-100MiB"])
def test_unreadable_zip_member(tmp_path, patch, reason):
    archive = patch_member(deflated_oasis_zip(tmp_path), BAD_MEMBER, **patch)
    with pytest.raises(DataError) as e:
        load("OASIS", archive)
    assert_one_line_error(e, f"cannot read image {archive}::{BAD_MEMBER}", reason, "--skip-bad")
    kept = load("OASIS", archive, skip_bad=True)
    assert len(kept) == 5 and f"{archive}::{BAD_MEMBER}" not in kept.files


def test_file_over_the_size_limit(tmp_path, monkeypatch):
    make_oasis(tmp_path)
    monkeypatch.setattr(dataset, "MAX_FILE_BYTES", 1000)  # each 32x32 noise PNG is over 1000 bytes
    with pytest.raises(DataError) as e:
        load("OASIS", tmp_path)
    assert_one_line_error(e, tmp_path / "keras_png_slices_train" / "case_2_slice_0.nii.png", "limit")


# -----------------------------------------------------------------------------
# 5. huge images are refused from their header, before anything is decoded

def png_claiming(width, height):
    """A valid 8x8 PNG whose IHDR chunk (with a matching CRC) says it is width x height."""
    data = bytearray(encode(np.zeros((8, 8), np.uint8)))
    assert data[12:16] == b"IHDR"  # 8-byte signature, then IHDR: length, type, 13 bytes of data, CRC
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("width, height, reason", [
    (13000, 13000, "is 13000x13000 pixels, over the limit of 8192"),  # Pillow only warns at this size
    (9000, 8, "is 9000x8 pixels"),
    (20000, 20000, "decompression bomb"),  # Pillow refuses it in Image.open
])
def test_huge_image_is_refused_from_its_header(width, height, reason):
    with pytest.raises(DataError) as e:
        read_slice(png_claiming(width, height), "big.png")
    assert_one_line_error(e, "big.png", reason, "--skip-bad")


def test_huge_image_among_slices_is_skipped_with_skip_bad(tmp_path):
    make_oasis(tmp_path)
    big = tmp_path / "keras_png_slices_train" / "case_10_slice_1.nii.png"
    big.write_bytes(png_claiming(13000, 13000))
    with pytest.raises(DataError) as e:
        load("OASIS", tmp_path)
    assert_one_line_error(e, big, "13000x13000")
    assert len(load("OASIS", tmp_path, skip_bad=True)) == 5


# -----------------------------------------------------------------------------
# 6. image sizes: too small for SSIM, and splits that differ from train

def test_tiny_images_are_an_error_unless_resized(tmp_path):
    make_oasis(tmp_path, size=5)
    with pytest.raises(DataError) as e:
        load("OASIS", tmp_path)
    assert_one_line_error(e, "case_2_slice_0.nii.png is 5x5 pixels", "7x7", "--image-size")
    assert load("OASIS", tmp_path, image_size=16).images.shape == (6, 16, 16)


@pytest.mark.parametrize("image_size", [4, 9000])
def test_image_size_out_of_range(tmp_path, image_size):
    with pytest.raises(DataError) as e:
        load("OASIS", make_oasis(tmp_path), image_size=image_size)
    assert_one_line_error(e, "image size", "from 8", str(image_size))


def test_check_compatible(tmp_path):
    make_oasis(tmp_path)
    for p in ("2", "10"):
        write_image(tmp_path / "keras_png_slices_test" / f"case_{p}_slice_0.nii.png", noise(0, (24, 40)))
    for p in ("2", "10"):
        for s in (1, 2):
            (tmp_path / "keras_png_slices_test" / f"case_{p}_slice_{s}.nii.png").unlink()
    train, val, test = (load("OASIS", tmp_path, split) for split in images.SPLITS)
    assert check_compatible(train.image_shape, val) is None
    with pytest.raises(DataError) as e:
        check_compatible(train.image_shape, test)
    assert_one_line_error(e, "OASIS test images are 40x24", test.files[0], "train images are 32x32", "--image-size")


# -----------------------------------------------------------------------------
# 7. messages and grey levels

@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_split_folder_that_is_a_file(tmp_path, as_zip):
    root = tmp_path / "data"
    write_image(root / "keras_png_slices_train" / "case_1_slice_0.nii.png", noise(0))
    (root / "keras_png_slices_validate").write_bytes(b"oops")
    root = zip_tree(root, tmp_path / "o.zip", "") if as_zip else root
    with pytest.raises(DataError) as e:
        load("OASIS", root, "validate")
    where = f"{root}::keras_png_slices_validate" if as_zip else root / "keras_png_slices_validate"
    assert_one_line_error(e, where, "is a file, not a folder")


def test_adni_split_or_class_folder_that_is_a_file(tmp_path):
    root = make_adni(tmp_path / "AD_NC", train_patients=2, test_patients=0, n_slices=1)
    (root / "test").write_bytes(b"oops")
    with pytest.raises(DataError) as e:
        load("ADNI", root, "test")
    assert_one_line_error(e, root / "test", "is a file, not a folder")
    for f in (root / "train" / "AD").iterdir():
        f.unlink()
    (root / "train" / "AD").rmdir()
    (root / "train" / "AD").write_bytes(b"oops")
    with pytest.raises(DataError) as e:
        load("ADNI", root, "train")
    assert_one_line_error(e, root / "train" / "AD", "is a file, not a folder")


def ramp(top):
    return np.rint(np.linspace(0, top, 64)).reshape(8, 8).astype(np.uint16)  # encode() writes it as a 16-bit PNG


def test_16_bit_png_of_12_bit_data_is_scaled_by_4095():
    pixels = read_slice(encode(ramp(4095)), "x.png")
    assert np.abs(pixels.astype(int) - np.rint(ramp(4095) * (255 / 4095))).max() == 0
    assert pixels.max() == 255
    darker = read_slice(encode(ramp(1000)), "y.png")  # a slice of the same volume: same scale, not its own max
    assert darker.max() == round(1000 * 255 / 4095)


def test_16_bit_png_of_16_bit_data_is_scaled_by_257():
    pixels = read_slice(encode(ramp(65535)), "x.png")
    assert np.abs(pixels.astype(int) - np.rint(ramp(65535) * (255 / 65535))).max() == 0
    assert read_slice(encode(ramp(4096)), "y.png").max() == round(4096 / 257)
