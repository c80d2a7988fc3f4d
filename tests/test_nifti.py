"""NIfTI volumes: orientation from the affine, normalisation, subject splits, bad volumes, writing reconstructions
back, and train + predict end to end. Every volume is a phantom made here with nibabel."""
import csv
import json

import nibabel as nib
import numpy as np
import pytest

import predict
import train
from dataset import build_dataset
from helpers import assert_one_line_error, run_main, tiny_args
from training.checkpoints import TrainConfig, load_split
from utils import DataError
from volumes import nifti

RAS = np.diag([1.0, 1.0, 1.0, 1.0])
LPS = np.diag([-1.0, -1.2, 0.9, 1.0])  # and anisotropic voxels
# array axes run superior->inferior, right->left, anterior->posterior, rotated 10 degrees about the S axis
c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
OBLIQUE = np.array([[0, -c, s, 20], [0, -s, -c, 15], [-1, 0, 0, -10], [0, 0, 0, 1]])
MARKER = np.array([-6.0, 6.0, 6.0])  # world (RAS, mm) centre of a bright cube: left, anterior, superior


def phantom(affine, shape=(30, 34, 32), seed=0):
    """int16 voxels of a head centred in the field of view: a ball of brain with a bright cube at MARKER, laid out
    in the array as `affine` says, so that the cube is at the same place in space whatever the affine."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    world = ijk @ affine[:3, :3].T + affine[:3, 3] - centre
    r = np.linalg.norm(world, axis=1)
    values = np.where(r < 13, 500.0, 0) + np.where(np.abs(world - MARKER).max(1) <= 2.5, 700, 0)
    values += np.random.default_rng(seed).normal(0, 10, len(values)) * (r < 13)
    return np.clip(values, 0, None).reshape(shape).astype(np.int16)


def save(path, affine=RAS, data=None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(phantom(affine, **kwargs) if data is None else data, affine), path)
    return path


def options(**kwargs):
    return nifti.SliceOptions(**kwargs)


@pytest.mark.parametrize("affine", [RAS, LPS, OBLIQUE], ids=["RAS", "LPS", "oblique-permuted"])
def test_marker_lands_where_its_anatomy_says_for_every_axis(tmp_path, affine):
    path = save(tmp_path / "head.nii.gz", affine)
    # (slice index in the upper half?, row in the upper half?, column in the right half?) for each slice axis
    expected = {"axial": (True, True, False),      # superior; anterior up; the subject's left on the left
                "coronal": (True, True, False),    # anterior; superior up; left on the left
                "sagittal": (False, True, True)}   # left; superior up; anterior on the right
    for axis, (high_slice, top, right) in expected.items():
        ds = nifti.load_files([path], options(axis=axis, min_brain_fraction=0), verbose=False)
        volume = ds.volumes[0]
        n = volume.canonical_shape[nifti.LAYOUTS[axis][0]]
        index, row, col = np.argwhere(ds.images.numpy() == 255).mean(0)
        assert len(ds) == n and ds.image_shape[0] % 16 == ds.image_shape[1] % 16 == 0
        assert (volume.kept[round(index)] > n / 2, row < ds.image_shape[0] / 2, col > ds.image_shape[1] / 2) == \
            (high_slice, top, right), axis
        assert ds.files[0] == f"{path}::{axis}[0]"
    assert np.allclose(nib.as_closest_canonical(nib.load(path)).affine, volume.canonical_affine)


@pytest.mark.parametrize("image_size", [None, 16])
def test_written_volume_lies_on_the_input(tmp_path, image_size):
    """The model's input written back as a 'reconstruction' is the input clipped to its window, in the input's
    shape, affine and data type: including the skipped slices and, with --image-size 16, the cropped margins."""
    path = save(tmp_path / "head.nii", OBLIQUE)
    ds = nifti.load_files([path], options(axis="coronal", image_size=image_size), verbose=False)
    volume = ds.volumes[0]
    assert len(volume.kept) < volume.canonical_shape[1] and ds.image_shape == ((16, 16) if image_size else (32, 48))
    out = tmp_path / "out" / "head_recon.nii.gz"
    nifti.write_reconstruction(volume, ds.images[volume.rows].numpy(), out)
    source, written = nib.load(path), nib.load(out)
    assert written.shape == source.shape and np.array_equal(written.affine, source.affine)
    assert written.get_data_dtype() == source.get_data_dtype()
    lo, hi = volume.window
    assert np.abs(np.clip(source.get_fdata(), lo, hi) - written.get_fdata()).max() <= (hi - lo) / 255 / 2 + 1e-3
    nifti.write_reconstruction(volume, ds.images[volume.rows].numpy(), out)  # its own file: may be replaced
    foreign = save(tmp_path / "out" / "other_recon.nii.gz")
    with pytest.raises(DataError) as e:
        nifti.write_reconstruction(volume, ds.images[volume.rows].numpy(), foreign)
    assert_one_line_error(e, "not a reconstruction written by predict.py")


def test_splits_by_subject_seeded_or_from_splits_csv(tmp_path, capsys):
    root = tmp_path / "bids"
    (root / "dataset_description.json").parent.mkdir()
    (root / "dataset_description.json").write_text("{}")
    for i in range(1, 11):
        for session in ("ses-1", "ses-2") if i <= 2 else ("",):
            save(root / f"sub-{i:02d}" / session / "anat" / f"sub-{i:02d}_{session + '_' * bool(session)}T1w.nii.gz",
                 seed=i, shape=(24, 24, 20))
    save(root / "sub-01" / "func" / "sub-01_task-rest_bold.nii.gz", data=np.ones((4, 4, 4, 3), np.int16))  # ignored
    save(root / "derivatives" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", data=np.zeros((4, 4, 4), np.int16))
    splits = {split: build_dataset("nifti", root, split, seed=3) for split in ("train", "validate", "test")}
    subjects = {split: set(ds.patients) for split, ds in splits.items()}
    assert sum(len(v) for v in subjects.values()) == 10 and len(set.union(*subjects.values())) == 10
    assert len(subjects["validate"]) == len(subjects["test"]) == 1
    assert sum(len(ds.volumes) for ds in splits.values()) == 12  # the two sessions of sub-01 and sub-02
    assert "nifti train: " in capsys.readouterr().out
    assert build_dataset("nifti", root, "test", seed=3, verbose=False).patients == splits["test"].patients

    (root / "splits.csv").write_text("subject,split\n" + "".join(
        f"sub-{i:02d},{'test' if i == 1 else 'validate' if i == 2 else 'train'}\n" for i in range(1, 11)))
    test = build_dataset("nifti", root, "test", verbose=False)
    assert set(test.patients) == {"sub-01"} and len(test.volumes) == 2
    (root / "splits.csv").write_text("subject,split\nsub-01,test\nsub-02,validate\n")
    with pytest.raises(DataError) as e:
        build_dataset("nifti", root, "train", verbose=False)
    assert_one_line_error(e, "subject sub-03 has volumes in the folder but is not in", "splits.csv")


def bad_volumes(folder):
    """name -> (path, fragment of its one-line error) of every kind of bad volume."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "text.nii.gz").write_text("not a volume")
    truncated = save(folder / "truncated.nii.gz", seed=1)
    truncated.write_bytes(truncated.read_bytes()[:len(truncated.read_bytes()) // 2])
    flat = np.ones((20, 20, 20), np.float32)
    flat[3, 3, 3] = np.nan
    singular = save(folder / "singular.nii", seed=2)
    header = bytearray(singular.read_bytes())
    header[312:328] = bytes(16)  # srow_z: the sform's third row (the sform is what nibabel reads, sform_code 2)
    singular.write_bytes(bytes(header))
    return {"text": (folder / "text.nii.gz", "not a readable NIfTI file"),
            "truncated": (truncated, "its data cannot be read"),
            "2-D": (save(folder / "flat.nii", data=np.ones((20, 20), np.int16)), "2-D image"),
            "4-D": (save(folder / "series.nii.gz", data=np.ones((20, 20, 20, 2), np.int16)), "4-D series of 2"),
            "NaN": (save(folder / "nan.nii.gz", data=flat), "NaN"),
            "all-zero": (save(folder / "zero.nii.gz", data=np.zeros((20, 20, 20), np.int16)), "every voxel is 0"),
            "singular": (singular, "affine is singular")}


def test_bad_volumes_one_line_each_or_skipped(tmp_path, capsys):
    bad = bad_volumes(tmp_path / "bad")
    good = save(tmp_path / "good" / "head.nii.gz")
    for name, (path, fragment) in bad.items():
        with pytest.raises(DataError) as e:
            nifti.load_files([good, path], options(), verbose=False)
        assert_one_line_error(e, str(path), fragment, "--skip-bad")
    ds = nifti.load_files([good, *(p for p, _ in bad.values())], options(), skip_bad=True)
    assert [v.path for v in ds.volumes] == [str(good)]
    assert f"skipped {len(bad)} bad volumes (first: {bad['text'][0]}: not a readable NIfTI file" in \
        capsys.readouterr().out
    save(tmp_path / "good" / "single.nii.gz", data=phantom(RAS)[..., None])  # (x, y, z, 1): a volume
    assert len(nifti.load_files([tmp_path / "good" / "single.nii.gz"], options(), verbose=False).volumes) == 1


def test_config_flags_reach_every_split(tmp_path):
    root = tmp_path / "vols"
    for i in range(4):
        save(root / f"scan{i}.nii.gz", LPS, seed=i)
    cfg = TrainConfig(dataset="nifti", data_root=str(root), slice_axis="sagittal", clip_percentile=1.0,
                      min_brain_fraction=0.2, test_fraction=0.25, val_fraction=0.25)
    test = load_split(cfg, "test", verbose=False)
    assert test.volumes[0].axis == "sagittal" and test.files[0].startswith(str(root / "scan"))
    assert len(test) == len(test.volumes[0].kept) < 25 and test.patients[0].startswith("scan")
    with pytest.raises(DataError) as e:
        build_dataset("nifti", root, "train", val_fraction=0.5, test_fraction=0.5)
    assert_one_line_error(e, "test fraction")


def test_train_then_predict_writes_volumes_on_their_inputs(tmp_path, capsys):
    root = tmp_path / "vols"
    inputs = [save(root / f"sub-{i}" / f"sub-{i}_T1w.nii.gz", affine, seed=i)
              for i, affine in enumerate([RAS, LPS, OBLIQUE, RAS])]
    run = tmp_path / "run"
    args = tiny_args(root, run, "--epochs", "1")
    args[args.index("demo")] = "nifti"
    assert run_main(train.main, args, capsys).returncode == 0
    r = run_main(predict.main, ["--checkpoint", run, "--out", tmp_path / "pred"], capsys)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((tmp_path / "pred" / "per_volume.csv").open()))
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert len(rows) == 1 and summary["volumes"][0]["subject"] == rows[0]["subject"]
    assert summary["images"] == int(rows[0]["slices"]) and 0 < float(rows[0]["ssim"]) <= 1
    source, written = nib.load(rows[0]["volume"]), nib.load(rows[0]["reconstruction"])
    assert written.shape == source.shape and np.array_equal(written.affine, source.affine)

    r = run_main(predict.main, ["--checkpoint", run, "--volumes", inputs[2], inputs[1], "--out", tmp_path / "v"],
                 capsys)
    assert r.returncode == 0, r.stderr
    for name, source in (("sub-2_T1w", inputs[2]), ("sub-1_T1w", inputs[1])):
        written = nib.load(tmp_path / "v" / "volumes" / f"{name}_recon.nii.gz")
        assert written.shape == nib.load(source).shape and np.array_equal(written.affine, nib.load(source).affine)
    foreign = save(tmp_path / "w" / "volumes" / "sub-1_T1w_recon.nii.gz")  # not predict.py's: never replaced
    r = run_main(predict.main, ["--checkpoint", run, "--volumes", inputs[2], inputs[1], "--out", tmp_path / "w"],
                 capsys)
    assert_one_line_error(r, str(foreign), "is not a reconstruction written by predict.py")
    assert sorted(p.name for p in (tmp_path / "w" / "volumes").iterdir()) == [foreign.name]
    r = run_main(predict.main, ["--checkpoint", run, "--volumes", root / "missing.nii.gz"], capsys)
    assert_one_line_error(r, "missing.nii.gz does not exist")
    r = run_main(predict.main, ["--checkpoint", run, "--volumes", inputs[0], "--data-root", root], capsys)
    assert_one_line_error(r, "--volumes", "does not go with")
    r = run_main(predict.main, ["--checkpoint", run, "--volumes", inputs[0], "--split", "validate"], capsys)
    assert_one_line_error(r, "--volumes reconstructs the files given; it does not go with --split")
