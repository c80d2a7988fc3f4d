"""The tissue segmenter and its judge: masks paired with slices, Dice, segment.py train/score."""
import json
import shutil

import numpy as np
import pytest
import torch

import compress
import predict
import sample
import segment
import train
import train_prior
from anatomy.tissues import dice_per_class, wasserstein_1d
from dataset import MASK_LEVELS, SEG_DIRS, build_dataset, mask_path
from helpers import assert_one_line_error, make_adni, run_main, tiny_args, write_image
from utils import DataError, read_csv

TINY_UNET = ["--base-channels", "4", "--levels", "3", "--batch-size", "4", "--epoch-slices", "8"]


@pytest.fixture(scope="module")
def judged(demo_root, tmp_path_factory):
    """A tiny VQ-VAE and a tiny segmenter, one epoch each on the demo slices, and the segmenter's test scores."""
    root = tmp_path_factory.mktemp("judged")
    train.main(tiny_args(demo_root, root / "vq", "--epochs", "1", "--codebook-size", "16", "--downsamplings", "2"))
    segment.main(train_args(demo_root, root / "seg", "--epochs", "1"))
    segment.main(["score", "--checkpoint", str(root / "seg"), "--split", "test"])
    return root / "vq" / "best.pt", root / "seg" / "best.pt", read_csv(root / "seg" / "score_test" / "per_slice.csv")


def copy_of(demo_root, tmp_path):
    return shutil.copytree(demo_root, tmp_path / "demo")


def train_args(root, out, *extra):
    return [str(a) for a in ["train", "--dataset", "demo", "--data-root", root, *TINY_UNET, "--out", out, *extra]]


# -----------------------------------------------------------------------------
# masks

def test_demo_writes_a_mask_beside_every_slice_and_lists_it(demo_root):
    listed = set((demo_root / "DEMO_FILES").read_text().split())
    images = [p for p in demo_root.rglob("demo_*.png")]
    assert images and all(mask_path(p.relative_to(demo_root).as_posix()) in listed for p in images)
    data = build_dataset("demo", demo_root, "train", masks=True, verbose=False)
    assert data.masks.shape == data.images.shape and set(data.masks.unique().tolist()) == {0, 1, 2, 3}
    assert (data.images[data.masks == 0].float().mean() < data.images[data.masks == 3].float().mean())


def test_masks_read_in_place_from_the_zip_equal_those_of_the_folder(demo_root, tmp_path):
    archive = shutil.make_archive(str(tmp_path / "demo"), "zip", demo_root)
    from_zip = build_dataset("OASIS", archive, "validate", masks=True, verbose=False)
    from_folder = build_dataset("OASIS", demo_root, "validate", masks=True, verbose=False)
    assert torch.equal(from_zip.masks, from_folder.masks) and torch.equal(from_zip.images, from_folder.images)


@pytest.mark.parametrize("damage, fragment", [
    ("missing", "is missing"),
    ("size", "is 16x16 pixels but its slice is 32x32"),
    ("values", "grey levels 7"),
])
def test_a_bad_mask_is_one_line_naming_it_and_skip_bad_skips_its_slice(demo_root, tmp_path, damage, fragment):
    root = copy_of(demo_root, tmp_path)
    mask = root / SEG_DIRS["test"] / "seg_010_slice_1.png"
    if damage == "missing":
        mask.unlink()
    else:
        pixels = np.zeros((16, 16) if damage == "size" else (32, 32), np.uint8)
        pixels[0, 0] = 7 if damage == "values" else MASK_LEVELS[1]
        write_image(mask, pixels)
    with pytest.raises(DataError) as e:
        build_dataset("OASIS", root, "test", masks=True, verbose=False)
    assert_one_line_error(e, mask.name, fragment, "--skip-bad")
    kept = build_dataset("OASIS", root, "test", masks=True, skip_bad=True, verbose=False)
    assert len(kept) == 3 and not any("slice_1" in f for f in kept.files)
    assert len(kept.masks) == len(kept.images) == 3


def test_masks_of_a_dataset_without_them_are_refused(tmp_path):
    with pytest.raises(DataError) as e:
        build_dataset("ADNI", tmp_path, "train", masks=True)
    assert_one_line_error(e, "OASIS and the demo")


# -----------------------------------------------------------------------------
# Dice

def test_dice_perfect_empty_swapped_and_partial():
    truth = torch.tensor([[[0, 1], [2, 3]]])
    assert dice_per_class(truth, truth).tolist() == [[1.0, 1.0, 1.0]]
    background = torch.zeros_like(truth)
    assert dice_per_class(background, background).tolist() == [[1.0, 1.0, 1.0]]  # no tissue, none found
    swapped = torch.tensor([[[0, 1], [3, 2]]])  # grey and white matter exchanged
    assert dice_per_class(swapped, truth).tolist() == [[1.0, 0.0, 0.0]]
    half = torch.tensor([[[0, 1], [1, 3]]])  # CSF 1 of 2 predicted right: 2 * 1 / (2 + 1)
    assert dice_per_class(half, truth)[0].tolist() == pytest.approx([2 / 3, 0.0, 1.0])


# -----------------------------------------------------------------------------
# segment.py

def test_training_resumed_after_an_epoch_ends_as_the_uninterrupted_run(demo_root, tmp_path, capsys):
    assert run_main(segment.main, train_args(demo_root, tmp_path / "whole", "--epochs", "2"), capsys).returncode == 0
    assert run_main(segment.main, train_args(demo_root, tmp_path / "cut", "--epochs", "1"), capsys).returncode == 0
    resumed = run_main(segment.main, ["train", "--resume", tmp_path / "cut", "--epochs", "2"], capsys)
    assert resumed.returncode == 0, resumed.err
    whole, cut = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("whole", "cut"))
    assert cut["epoch"] == 2 and all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])
    rows = [read_csv(tmp_path / run / "metrics.csv") for run in ("whole", "cut")]
    assert [(r["train_loss"], r["val_dice_mean"]) for r in rows[0]] == [(r["train_loss"], r["val_dice_mean"])
                                                                       for r in rows[1]]


def test_score_writes_dice_per_slice_and_summary(judged):
    _, segmenter, rows = judged
    out = segmenter.parent / "score_test"
    assert len(rows) == 4 and list(rows[0]) == ["file", "dice_csf", "dice_gm", "dice_wm", "dice_mean"]
    assert all(0 <= r["dice_mean"] <= 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dice"]["dice_mean"]["mean"] == pytest.approx(np.mean([r["dice_mean"] for r in rows]))
    assert (out / "segmentations.png").is_file() and (out / "dice_hist.png").is_file()


def test_segment_without_a_command_is_one_line(capsys):
    assert_one_line_error(run_main(segment.main, ["--dataset", "demo"], capsys), "train or score")


# -----------------------------------------------------------------------------
# the judge in predict.py and compress.py

def test_predict_judges_originals_and_reconstructions_with_the_segmenter(judged, tmp_path, capsys):
    vqvae, segmenter, scored = judged
    result = run_main(predict.main, ["--checkpoint", vqvae, "--segmenter", segmenter, "--out", tmp_path], capsys)
    assert result.returncode == 0, result.stderr
    rows = read_csv(tmp_path / "per_image.csv")
    assert len(rows) == 4
    assert {"ssim", "original_dice_mean", "reconstruction_dice_csf", "between_dice_wm"} <= set(rows[0])
    assert [r["original_dice_mean"] for r in rows] == [r["dice_mean"] for r in scored]  # as segment.py score
    anatomy = json.loads((tmp_path / "summary.json").read_text())["anatomy"]
    assert anatomy["reconstruction_minus_original"] == pytest.approx(
        anatomy["reconstruction"]["dice_mean"]["mean"] - anatomy["original"]["dice_mean"]["mean"])
    assert (tmp_path / "worst_anatomy.png").is_file()


def test_rd_gives_the_tissue_dice_of_every_codec_at_every_budget(judged, tmp_path, capsys):
    vqvae, segmenter, scored = judged
    result = run_main(compress.main, ["rd", "--checkpoint", vqvae, "--prior", "none", "--segmenter", segmenter,
                                      "--budgets", "400,3000", "--codecs", "jpeg", "--out", tmp_path], capsys)
    assert result.returncode == 0, result.stderr
    rows = read_csv(tmp_path / "rd_anatomy.csv")
    assert [(r["codec"], r["budget_bytes"]) for r in rows] == [
        ("original", ""), *[(r["codec"], "") for r in rows if r["codec"].startswith("VQ-VAE")],
        ("ladder", 400.0), ("ladder", 3000.0), ("jpeg", 400.0), ("jpeg", 3000.0)]
    assert rows[0]["dice_mean"] == pytest.approx(np.mean([r["dice_mean"] for r in scored]))
    # one reconstruction, whichever of its files the budget picks
    assert len({r["dice_mean"] for r in rows if r["codec"].startswith("VQ-VAE") or r["codec"] == "ladder"}) == 1
    jpeg = rows[-1]
    assert jpeg["images_fit"] == 4 and jpeg["mean_bytes"] <= 3000
    assert "dice_minus_jpeg2000_at_320_bytes" in json.loads((tmp_path / "rd_anatomy.json").read_text())


def test_predict_noise_with_the_segmenter_gives_the_dice_of_the_denoised_slices_beside_the_clean(judged, tmp_path,
                                                                                                 capsys):
    vqvae, segmenter, scored = judged
    r = run_main(predict.main, ["--checkpoint", vqvae, "--noise", "rician:0.1", "--baselines", "--segmenter",
                                segmenter, "--out", tmp_path], capsys)
    assert r.returncode == 0, r.stderr
    rows = read_csv(tmp_path / "per_image.csv")
    assert {"ours_ssim", "original_dice_mean", "reconstruction_dice_mean", "between_dice_mean"} <= set(rows[0])
    assert [r["original_dice_mean"] for r in rows] == [r["dice_mean"] for r in scored]  # the clean slices'
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["noise"] == "rician:0.1" and summary["anatomy"]["segmenter"] == str(segmenter)
    assert summary["anatomy"]["reconstruction"]["dice_mean"]["mean"] == pytest.approx(
        np.mean([r["reconstruction_dice_mean"] for r in rows]))
    assert "tissue Dice" in r.stdout and "denoised by ours (from rician:0.1)" in r.stdout
    assert (tmp_path / "worst_anatomy.png").is_file()


def segmenter_of_levels(levels: int, path):
    """An untrained segmenter checkpoint whose U-Net has `levels` levels: it takes sides that are multiples of
    2^(levels - 1) only."""
    from dataclasses import asdict

    from modules import SegmenterConfig, UNet
    from training.checkpoints import SegmenterTrainConfig, save_checkpoint
    cfg = SegmenterConfig(base_channels=2, levels=levels)
    save_checkpoint({"kind": "segmenter", "model": UNet(cfg).state_dict(), "model_config": asdict(cfg),
                     "train_config": asdict(SegmenterTrainConfig(dataset="demo")), "epoch": 1, "best_val_dice": 0.0,
                     "metrics": {}, "demo_settings": None}, path)
    return path


@pytest.mark.parametrize("command", ["predict", "predict --noise", "compress rd", "sample"])
def test_a_segmenter_that_cannot_take_the_slices_is_refused_before_anything_is_written(command, trained_models,
                                                                                       tmp_path, capsys):
    vqvae, prior = trained_models
    main, argv = {"predict": (predict.main, ["--checkpoint", vqvae]),
                  "predict --noise": (predict.main, ["--checkpoint", vqvae, "--noise", "rician:0.1", "--baselines"]),
                  "compress rd": (compress.main, ["rd", "--checkpoint", vqvae, "--prior", "none", "--codecs", "jpeg",
                                                  "--budgets", "400"]),
                  "sample": (sample.main, ["--prior", prior, "--num-samples", "2"])}[command]
    r = run_main(main, [*argv, "--segmenter", segmenter_of_levels(7, tmp_path / "seg.pt"), "--out", tmp_path / "o"],
                 capsys)
    assert r.returncode == 2
    assert_one_line_error(r, "image size 32x32 is not divisible by 2^(levels - 1) = 64")
    assert not (tmp_path / "o").exists()


def test_rd_with_the_segmenter_on_a_split_without_masks_is_refused_before_anything_is_written(judged, tmp_path,
                                                                                             capsys):
    _, segmenter, _ = judged
    train.main(tiny_args(make_adni(tmp_path / "AD_NC"), tmp_path / "vq", "--dataset", "ADNI", "--image-size", "32",
                         "--epochs", "1", "--val-fraction", "0.5"))
    r = run_main(compress.main, ["rd", "--checkpoint", tmp_path / "vq", "--prior", "none", "--codecs", "jpeg",
                                 "--budgets", "400", "--segmenter", segmenter, "--out", tmp_path / "o"], capsys)
    assert r.returncode == 2 and not (tmp_path / "o").exists()
    assert_one_line_error(r, "tissue masks come with OASIS and the demo data only")


def test_samples_are_judged_by_the_segmenter_beside_real_references(judged, tmp_path, capsys):
    vqvae, segmenter, _ = judged
    train_prior.main(["--vqvae", str(vqvae), "--epochs", "1", "--batch-size", "8", "--channels", "8", "--layers", "2",
                      "--kernel-size", "3", "--epoch-samples", "0", "--out", str(tmp_path / "prior")])
    result = run_main(sample.main, ["--num-samples", "4", "--prior", tmp_path / "prior" / "best.pt", "--segmenter",
                                     segmenter, "--out", tmp_path / "s"], capsys)
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "s" / "sample_scores.json").read_text())
    frechet = scores["segmenter_frechet_distance"]
    assert {"samples_vs_train", "validate_real_vs_train", "validate_reconstructions_vs_train"} <= set(frechet)
    assert "not an independent judge" in scores["frechet_distance"]["about"]
    for tissue in ("CSF", "GM", "WM"):
        shares = scores["tissue_fractions"][tissue]
        assert {"samples", "validate_real", "validate_true_masks"} <= set(shares)
        assert 0 <= shares["samples"]["mean"] <= 1 and shares["wasserstein_samples_vs_validate"] >= 0


def test_class_conditional_samples_are_judged_per_class_beside_real_slices_of_each_class(judged, tmp_path, capsys):
    """ADNI has no tissue masks: the segmenter's shares per class (AD, NC) are the reference, in samples and real."""
    _, segmenter, _ = judged
    ad_nc = make_adni(tmp_path / "AD_NC")
    train.main(tiny_args(ad_nc, tmp_path / "vqvae", "--dataset", "ADNI", "--image-size", "32", "--epochs", "1",
                         "--val-fraction", "0.5"))
    train_prior.main(["--vqvae", str(tmp_path / "vqvae" / "best.pt"), "--conditional", "--epochs", "1",
                      "--batch-size", "8", "--channels", "8", "--layers", "2", "--kernel-size", "3",
                      "--epoch-samples", "0"])
    result = run_main(sample.main, ["--num-samples", "4", "--checkpoint", tmp_path / "vqvae" / "best.pt", "--segmenter",
                                     segmenter, "--reference-slices", "5", "--out", tmp_path / "s"], capsys)
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "s" / "sample_scores.json").read_text())
    assert scores["train_reference_slices"] == 5 and scores["nearest_train_ssim"]["samples"]["images"] == 4
    assert "validate_true_masks" not in scores["tissue_fractions"]["CSF"]
    by_class = scores["tissue_fractions_by_class"]
    for name in ("samples", "validate_real"):
        nc, ad = by_class["NC"][name]["CSF"], by_class["AD"][name]["CSF"]
        assert nc["slices"] > 0 and ad["slices"] > 0  # samples: every class in turn; validate: both classes
        assert by_class["AD - NC"][name]["CSF"] == pytest.approx(ad["mean"] - nc["mean"])
    assert "CSF share AD - NC: samples" in result.stdout


def test_wasserstein_of_shifted_samples_is_the_shift():
    a = np.array([0.1, 0.2, 0.4])
    assert wasserstein_1d(a, a + 0.25) == pytest.approx(0.25) and wasserstein_1d(a, a) == 0
