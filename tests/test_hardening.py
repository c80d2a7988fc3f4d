"""Bad input, interruptions and untrusted files never crash with a traceback or lose work.

Everything goes through the scripts (train.py and predict.py as subprocesses) unless a fault can only be
injected in-process; loader-level behaviour is in test_dataset.py, checkpoint-level in test_utils.py.
Tiny 32x32 demo slices read as OASIS and a tiny model keep it fast; runs that only have to fail go two at a
time (one per core), since each spends most of its time importing torch.
"""
import csv
import itertools
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hyperprior
import predict
import sample
import segment
import train
import train_prior
from helpers import (
    ONE_THREAD,
    REPO,
    assert_one_line_error,
    held_at_second_epoch,
    interrupted_in_second_call,
    nan_weights_on_second_call,
    run_main,
    run_script,
    tiny_args,
)
from training import protocol, steps
from training.checkpoints import load_checkpoint, save_checkpoint
from training.runs import reserve_run_folder

SPLIT_DIRS = ("keras_png_slices_train", "keras_png_slices_validate", "keras_png_slices_test")
EPOCHS = 3  # of the shared run


# ---------------------------------------------------------------------------------------------------------
# helpers and the shared run
# ---------------------------------------------------------------------------------------------------------

def scripts(*calls):
    """Several script runs, two at a time; their results in order."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda args: run_script(*args), calls))


def assert_ends_with_error_line(result, *fragments):
    """For failures after progress bars were drawn: no traceback, and the last line is the one error line."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    assert errors[0].startswith("error: "), errors[0]
    for fragment in fragments:
        assert str(fragment) in errors[0], errors[0]


def oasis_tree(source, where):
    """A copy of demo slices, read as OASIS (so nothing is regenerated behind the test's back)."""
    shutil.copytree(source, where, ignore=shutil.ignore_patterns("DEMO_OK"))
    return where


def train_args(data_root, out, *extra):
    return ["train.py", *tiny_args(data_root, out, *extra, dataset="OASIS")]


def train_files(tree):
    return sorted((tree / SPLIT_DIRS[0]).iterdir())


def metrics_epochs(run):
    with open(run / "metrics.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def per_image_scores(folder):
    with open(folder / "per_image.csv", newline="") as f:
        return [(row["ssim"], row["psnr"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def shared(demo_root, tmp_path_factory):
    """One finished run of EPOCHS epochs, its data and its run folder under paths with spaces and non-ASCII
    letters, and predict.py's output on its test split. Tests read it or copy it; none changes it."""
    base = tmp_path_factory.mktemp("shared")
    tree = oasis_tree(demo_root, base / "données IRM" / "keras png ✓")
    run, predicted = base / "runs ü" / "run 1", base / "sortie é"
    train.main(train_args(tree, run, "--epochs", EPOCHS)[1:])
    predict.main(["--checkpoint", str(run / "best.pt"), "--out", str(predicted)])
    return tree, run, predicted


# ---------------------------------------------------------------------------------------------------------
# bad data and bad flags, through the scripts
# ---------------------------------------------------------------------------------------------------------

def test_paths_with_spaces_and_non_ascii_letters_work_end_to_end(shared):
    tree, run, predicted = shared
    assert load_checkpoint(run / "last.pt")["train_config"]["data_root"] == str(tree)
    assert len(per_image_scores(predicted)) == 4
    assert "keras png ✓" in (predicted / "per_image.csv").read_text(encoding="utf-8")


def empty_png(tree):
    bad = train_files(tree)[3]
    bad.write_bytes(b"")
    return f"cannot read image {bad}: the file is empty", "--skip-bad"


def truncated_png(tree):
    bad = train_files(tree)[3]
    bad.write_bytes(bad.read_bytes()[:200])
    return f"cannot read image {bad}", "truncated", "--skip-bad"


def truncated_jpeg(tree):
    png = train_files(tree)[3]
    bad = png.with_suffix(".jpeg")
    Image.open(png).save(bad, "JPEG")
    png.unlink()
    bad.write_bytes(bad.read_bytes()[:300])
    return f"cannot read image {bad}", "--skip-bad"


def web_page_named_jpeg(tree):
    bad = train_files(tree)[3].with_suffix(".jpeg")
    bad.write_text("<html><body>404 Not Found</body></html>")
    return f"cannot read image {bad}: not an image format", "--skip-bad"


def odd_sized_png(tree):
    odd = train_files(tree)[5]
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(odd)
    return (f"image {odd} is 32x30 pixels but {train_files(tree)[0]}, the first", "is 32x32", "--image-size",
            "--skip-bad")


def empty_split_folder(tree):
    for f in (tree / SPLIT_DIRS[1]).iterdir():
        f.unlink()
    return f"no images (.png/.jpg/.jpeg) in {tree / SPLIT_DIRS[1]}",


def zip_of_another_layout(tree):
    shutil.rmtree(tree)
    with zipfile.ZipFile(tree, "w") as zf:
        zf.writestr("scans/case_1.png", b"")
        zf.writestr("README.txt", "hello")
    return f"{tree} does not have the expected layout", "found README.txt, scans/", "--data-root"


BAD_DATA = [empty_png, truncated_png, truncated_jpeg, web_page_named_jpeg, odd_sized_png, empty_split_folder,
            zip_of_another_layout]


def test_bad_data_stops_training_with_one_line_naming_the_file_and_the_fix(demo_root, tmp_path, capsys):
    trees = [oasis_tree(demo_root, tmp_path / spoil.__name__) for spoil in BAD_DATA]
    expected = [spoil(tree) for spoil, tree in zip(BAD_DATA, trees)]
    results = [run_main(train.main, train_args(tree, tmp_path / f"run {i}", "--epochs", 1)[1:], capsys)
               for i, tree in enumerate(trees)]
    for spoil, result, fragments in zip(BAD_DATA, results, expected):
        assert_one_line_error(result, *fragments)
    assert not list(tmp_path.glob("run *"))


def test_skip_bad_trains_on_the_readable_images_of_the_most_common_size(demo_root, tmp_path, capsys):
    tree = oasis_tree(demo_root, tmp_path / "data")
    files = train_files(tree)
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(files[0])  # the odd size comes first
    files[1].write_bytes(b"")
    files[2].write_bytes(files[2].read_bytes()[:200])
    files[3].write_text("<html></html>")
    r = run_main(train.main, train_args(tree, tmp_path / "run", "--epochs", 1, "--skip-bad")[1:], capsys)
    assert r.returncode == 0, r.stderr
    assert f"skipped 4 unreadable or odd-sized files (first: {files[0]})" in r.stdout
    assert "OASIS train: 28 slices" in r.stdout


def test_predict_skips_a_bad_test_image_with_skip_bad_as_its_error_says(shared, tmp_path, capsys):
    tree, run, _ = shared
    copy = oasis_tree(tree, tmp_path / "data")
    bad = sorted((copy / SPLIT_DIRS[2]).iterdir())[1]
    bad.write_bytes(b"")
    refused, skipped = (run_main(predict.main, ["--checkpoint", run / "best.pt", "--data-root", copy,
                                                "--out", tmp_path / "out", *flags], capsys)
                        for flags in ([], ["--skip-bad"]))
    assert_one_line_error(refused, f"cannot read image {bad}", "--skip-bad")
    assert skipped.returncode == 0, skipped.stderr
    assert f"skipped 1 unreadable or odd-sized files (first: {bad})" in skipped.stdout
    assert len(per_image_scores(tmp_path / "out")) == 3


def test_error_while_a_long_split_loads_is_not_glued_to_its_progress_bar(tmp_path, capsys):
    """Splits of more than 200 images draw a progress bar while they load."""
    for split in SPLIT_DIRS:
        (tmp_path / "data" / split).mkdir(parents=True)
    for i in range(201):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(tmp_path / "data" / SPLIT_DIRS[0] / f"case_{i}_slice_0.png")
    bad = tmp_path / "data" / SPLIT_DIRS[0] / "case_150_slice_0.png"
    bad.write_bytes(b"")
    r = run_main(train.main, train_args(tmp_path / "data", tmp_path / "run", "--epochs", 1)[1:], capsys)
    assert "OASIS train:" in r.stderr  # the bar was drawn
    assert_ends_with_error_line(r, f"cannot read image {bad}")


def test_colour_16_bit_and_palette_images_are_read_as_the_same_grey_levels(shared, tmp_path, capsys):
    tree, run, predicted = shared
    recoded = oasis_tree(tree, tmp_path / "recoded")
    perm = np.random.default_rng(0).permutation(256).astype(np.uint8)  # palette index -> grey level, shuffled

    def palette(g):
        image = Image.fromarray(np.argsort(perm).astype(np.uint8)[g], "P")
        image.putpalette(np.stack([perm] * 3, -1).ravel().tolist())
        return image

    encoders = [lambda g: Image.fromarray(np.stack([g] * 3, -1)),                        # RGB
                lambda g: Image.fromarray(np.stack([g] * 3 + [np.full_like(g, 255)], -1)),  # RGBA, opaque
                lambda g: Image.fromarray(g.astype(np.uint16) * 257),                   # 16-bit grey
                palette]
    test_files = sorted((recoded / SPLIT_DIRS[2]).iterdir())
    for path, encode in zip(test_files, encoders):
        encode(np.asarray(Image.open(path))).save(path)
    assert sorted(Image.open(p).mode for p in test_files) == ["I;16", "P", "RGB", "RGBA"]
    r = run_main(predict.main, ["--checkpoint", run / "best.pt", "--data-root", recoded, "--out", tmp_path / "out"],
                 capsys)
    assert r.returncode == 0, r.stderr
    assert per_image_scores(tmp_path / "out") == per_image_scores(predicted)  # same pixels in, same scores out


def test_bad_flags_exit_with_one_line(demo_root, shared, tmp_path, capsys):
    (tmp_path / "a file").write_text("")
    checkpoint = shared[1] / "best.pt"
    cases = [
        (train, train_args(demo_root, tmp_path / "run", "--dataset", "BraTS"),
         "argument --dataset: invalid choice: 'BraTS' (choose from 'OASIS', 'ADNI', 'demo', 'nifti')"),
        (train, train_args(demo_root, tmp_path / "run", "--device", "tpu"), "argument --device: invalid choice: 'tpu'"),
        (train, train_args(demo_root, tmp_path / "run", "--epochs", "ten"),
         "argument --epochs: invalid int value: 'ten'; see python"),
        (train, train_args(demo_root, tmp_path / "a file" / "run", "--epochs", 1), f"{tmp_path / 'a file'}"),
        (predict, ["predict.py", "--checkpoint", checkpoint, "--device", "tpu"], "argument --device: invalid choice"),
        (predict, ["predict.py", "--checkpoint", checkpoint, "--batch-size", "0"], "--batch-size must be between 1"),
        (predict, ["predict.py", "--checkpoint", checkpoint, "--seed", 2**64], "--seed must be between 0"),
        (sample, ["sample.py", "--checkpoint", checkpoint, "--num-samples", 1], "--num-samples must be between 2"),
        (sample, ["sample.py", "--checkpoint", checkpoint, "--num-samples", 4, "--temperature", "nan"],
         "--temperature must be a positive number, got nan"),
    ]
    for script_module, args, message in cases:
        assert_one_line_error(run_main(script_module.main, args[1:], capsys), message)
    assert not (tmp_path / "run").exists()


def test_a_new_run_never_overwrites_the_run_in_its_out_folder(shared, capsys):
    tree, run, _ = shared
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    r = run_main(train.main, train_args(tree, run, "--epochs", 1)[1:], capsys)
    assert_one_line_error(r, f"--out {run} already holds a run; continue it with --resume {run}")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


# ---------------------------------------------------------------------------------------------------------
# untrusted and unsuitable checkpoints, through predict.py and train.py --resume
# ---------------------------------------------------------------------------------------------------------

MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"vqvae-test-{os.getpid()}-code-ran"


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch '{MARKER}'",))


def truncated(good, path):
    path.write_bytes(good.read_bytes()[:good.stat().st_size // 2])


def plain_state_dict(good, path):
    torch.save(load_checkpoint(good)["model"], path)  # what another project's torch.save(model.state_dict()) is


def code_in_a_checkpoint(good, path):
    torch.save({**load_checkpoint(good), "payload": RunsCode()}, path)


def code_in_a_pickle(good, path):
    with open(path, "wb") as f:
        pickle.dump(RunsCode(), f)


def weights_of_another_config(good, path):
    state = load_checkpoint(good)
    state["model_config"] = {**state["model_config"], "codebook_size": 16}  # its weights hold 32 codes
    save_checkpoint(state, path)


UNSUITABLE = {truncated: "the file is truncated or corrupt", plain_state_dict: "is not a checkpoint of this project",
              code_in_a_checkpoint: "could run code", code_in_a_pickle: "could run code",
              weights_of_another_config: "size mismatch for quantizer.codebook"}


def test_unsuitable_checkpoints_are_refused_with_one_line_and_run_no_code(shared, tmp_path, capsys):
    MARKER.unlink(missing_ok=True)
    for make, message in UNSUITABLE.items():
        path = tmp_path / make.__name__ / "given.pt"
        path.parent.mkdir()
        make(shared[1] / "last.pt", path)
        for main, argv in ((predict.main, ["--checkpoint", path, "--out", tmp_path / "out"]),
                           (train.main, ["--resume", path, "--epochs", EPOCHS + 1])):
            assert_one_line_error(run_main(main, argv, capsys), path, message)
    assert not MARKER.exists()
    assert len(list(tmp_path.rglob("*"))) == 2 * len(UNSUITABLE)  # nothing written beside the given files


def test_resume_refuses_to_change_the_model(shared, tmp_path, capsys):
    run = shutil.copytree(shared[1], tmp_path / "run")
    r = run_main(train.main, ["--resume", run / "last.pt", "--epochs", EPOCHS + 1, "--codebook-size", 64, "--preset",
                              "hq"], capsys)
    assert_one_line_error(r, "these flags cannot change: --preset, --codebook-size (start a new run instead)")


def test_predict_says_where_the_missing_dataset_was_and_how_to_point_at_it(shared, tmp_path, capsys):
    results = []
    for dataset in ("OASIS", "ADNI"):
        state = load_checkpoint(shared[1] / "best.pt")
        state["train_config"] = {**state["train_config"], "dataset": dataset, "data_root": str(tmp_path / "gone")}
        save_checkpoint(state, tmp_path / dataset / "best.pt")
        results.append(run_main(predict.main, ["--checkpoint", tmp_path / dataset / "best.pt", "--out",
                                               tmp_path / "out"], capsys))
    oasis, adni = results
    assert_one_line_error(oasis, f"trained on OASIS at {tmp_path / 'gone'}, which is not there now",
                          "pass --data-root pointing at the folder holding keras_png_slices_train")
    assert_one_line_error(adni, f"trained on ADNI at {tmp_path / 'gone'}, which is not there now",
                          "pass --data-root pointing at the AD_NC folder")


# ---------------------------------------------------------------------------------------------------------
# interruptions and failures while training
# ---------------------------------------------------------------------------------------------------------

def test_ctrl_c_keeps_a_consistent_last_pt_and_the_resumed_run_equals_an_uninterrupted_one(shared, tmp_path, capsys):
    tree, uninterrupted, _ = shared
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, *held_at_second_epoch("train"),
                                *train_args(tree, run, "--epochs", EPOCHS)[1:]], cwd=REPO, env=ONE_THREAD,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (run / "last.pt").exists():  # epoch 1 is saved
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err
    saved = load_checkpoint(run / "last.pt")["epoch"]
    assert saved == 1
    assert f"{run / 'last.pt'} holds epoch {saved}. Resume with: python train.py --resume {run / 'last.pt'}" in err
    assert metrics_epochs(run) == list(range(1, saved + 1))

    r = run_main(train.main, ["--resume", run / "last.pt"], capsys)
    assert r.returncode == 0, r.stderr
    a, b = load_checkpoint(uninterrupted / "last.pt"), load_checkpoint(run / "last.pt")
    assert a["epoch"] == b["epoch"] == EPOCHS
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert metrics_epochs(run) == list(range(1, EPOCHS + 1))


def test_resuming_from_an_earlier_epoch_replaces_the_later_csv_rows(shared, tmp_path, capsys):
    run = shutil.copytree(shared[1], tmp_path / "run")
    r = run_main(train.main, ["--resume", run / "checkpoints" / "epoch_001.pt"], capsys)
    assert r.returncode == 0, r.stderr
    assert ("resumed from epoch 1: removed the rows of epochs 2-3, which this run trains again, from metrics.csv, "
            "code_usage.csv") in r.stdout
    assert metrics_epochs(run) == list(range(1, EPOCHS + 1))
    with open(run / "code_usage.csv", newline="") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, EPOCHS + 1))
    a, b = load_checkpoint(shared[1] / "last.pt"), load_checkpoint(run / "last.pt")
    assert a["epoch"] == b["epoch"] == EPOCHS and a["metrics"]["val_loss"] == b["metrics"]["val_loss"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_while_an_epoch_is_saved_lands_after_its_checkpoints_and_csv_rows(
        demo_root, tmp_path, monkeypatch, capsys, signum):
    real_save = protocol.save_checkpoint

    def save_after_an_interrupt(state, path, *also):
        os.kill(os.getpid(), signum)  # arrives as the epoch's checkpoints begin to be written
        real_save(state, path, *also)

    monkeypatch.setattr(protocol, "save_checkpoint", save_after_an_interrupt)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(demo_root, run, "--epochs", EPOCHS)[1:])
    assert stop.value.code == 130
    assert load_checkpoint(run / "last.pt")["epoch"] == load_checkpoint(run / "best.pt")["epoch"] == 1
    assert metrics_epochs(run) == [1]
    assert f"holds epoch 1. Resume with: python train.py --resume {run / 'last.pt'}" in capsys.readouterr().err


def trainer_commands(vqvae, demo_root, run) -> dict:
    """Each trainer: (its script module, the arguments of a tiny run of 3 epochs writing to `run`, checkpoint kind,
    the command that resumes it)."""
    return {
        "vqvae": (train, train_args(demo_root, run, "--epochs", EPOCHS)[1:], "vqvae", "train.py"),
        "prior": (train_prior, ["--vqvae", vqvae, "--epochs", EPOCHS, "--batch-size", 8, "--channels", 8, "--layers",
                                2, "--kernel-size", 3, "--epoch-samples", 0, "--out", run], "prior", "train_prior.py"),
        "segmenter": (segment, ["train", "--dataset", "demo", "--data-root", demo_root, "--base-channels", 4,
                                "--levels", 3, "--batch-size", 4, "--epoch-slices", 8, "--epochs", EPOCHS,
                                "--out", run], "segmenter", "segment.py train"),
        "hyperprior": (hyperprior, ["train", "--dataset", "demo", "--data-root", demo_root, "--n", 8, "--m", 8,
                                    "--batch-size", 4, "--save-minutes", 0.002, "--epochs", EPOCHS, "--out", run],
                       "hyperprior", "hyperprior.py train"),
    }


@pytest.mark.parametrize("trainer", ["vqvae", "prior", "segmenter", "hyperprior"])
def test_ctrl_c_in_every_trainer_keeps_the_last_epoch_resumable_and_releases_the_folder(
        trainer, shared, demo_root, tmp_path, monkeypatch, capsys):
    """The epoch protocol (training/protocol.py) as each trainer runs it: Ctrl-C in epoch 2 exits with 130 and one
    line saying what is kept and how to resume, epoch 1's checkpoint loads for a resume, the run folder is free
    for that resume in this same process, and the resume finishes the run."""
    if trainer == "hyperprior":
        pytest.importorskip("compressai")
    run = tmp_path / "run"
    module, argv, kind, script = trainer_commands(shared[1] / "best.pt", demo_root, run)[trainer]
    real_epoch = module.train_epoch
    monkeypatch.setattr(module, "train_epoch", interrupted_in_second_call(real_epoch))
    r = run_main(module.main, argv, capsys)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    said = [line for line in r.stderr.splitlines() if "interrupted" in line]
    assert said == [f"interrupted during epoch 2; {run / 'last.pt'} holds epoch 1. Resume with: python {script} "
                    f"--resume {run / 'last.pt'}"], r.stderr
    assert load_checkpoint(run, kind, resume=True)["epoch"] == 1
    reserve_run_folder(str(run), None, None, script, resuming=True)[1].release()  # the lock was released

    monkeypatch.setattr(module, "train_epoch", real_epoch)
    command = script.split()[1:]  # the subcommand, if any
    r = run_main(module.main, [*command, "--resume", run, "--epochs", 2], capsys)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(run, kind, resume=True)["epoch"] == 2
    assert_no_signal_can_raise_after_the_command()


def assert_no_signal_can_raise_after_the_command():
    """A trainer's Ctrl-C / SIGTERM handlers are disarmed once its main returned or exited: a signal landing during
    teardown or the interpreter's shutdown (torchrun's SIGTERM once another rank died) raises nothing."""
    for s in (signal.SIGINT, signal.SIGTERM):
        assert signal.getsignal(s) is signal.SIG_IGN, s
        os.kill(os.getpid(), s)


def test_segment_score_never_writes_over_a_file_it_did_not_write(demo_root, tmp_path, capsys):
    run = tmp_path / "run"
    module, argv, _, _ = trainer_commands(None, demo_root, run)["segmenter"]
    assert run_main(module.main, [*argv, "--epochs", 1], capsys).returncode == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "summary.json").write_text("my notes")
    r = run_main(segment.main, ["score", "--checkpoint", run, "--out", tmp_path / "mine"], capsys)
    assert_one_line_error(r, f"{tmp_path / 'mine' / 'summary.json'} is there and was not written by segment.py score")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["summary.json"]


@pytest.mark.parametrize("trainer, flags, message", [
    ("vqvae", ["--batch-size", 33], "the train split's images (32) are fewer than one batch (33)"),
    ("segmenter", ["--epoch-slices", 0, "--batch-size", 33],
     "the train split's slices (32) are fewer than one batch (33)"),
    ("segmenter", ["--epoch-slices", 3], "--epoch-slices (3) are fewer than one batch (4)"),
    ("hyperprior", ["--batch-size", 33], "the train split's slices (32) are fewer than one batch (33)"),
])
def test_a_config_under_which_an_epoch_trains_no_step_is_refused_before_anything_is_written(
        trainer, flags, message, demo_root, tmp_path, capsys):
    """Else the run would save its untrained model as best.pt and exit 0. (train_prior.py's last batch of an epoch
    may be partial: it always steps.)"""
    if trainer == "hyperprior":
        pytest.importorskip("compressai")
    run = tmp_path / "run"
    module, argv, _, _ = trainer_commands(tmp_path / "unused.pt", demo_root, run)[trainer]
    r = run_main(module.main, [*argv, *flags], capsys)
    assert r.returncode == 2
    assert_one_line_error(r, message, "so an epoch would train no step")
    assert not run.exists()
    assert_no_signal_can_raise_after_the_command()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the writer it kills")
def test_kill_9_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    target = tmp_path / "last.pt"
    payload = torch.zeros(4_000_000)  # 16 MB: a save takes long enough to be killed in the middle of it
    save_checkpoint({"kind": "vqvae", "version": 0, "stamp": torch.zeros(10), "w": payload}, target)
    rng, mid_write_kills = random.Random(0), 0
    for _ in range(10):
        pid = os.fork()
        if pid == 0:  # the writer: saves new versions until it is killed
            try:
                torch.set_num_threads(1)
                for version in itertools.count(1):
                    save_checkpoint({"kind": "vqvae", "version": version, "stamp": torch.full((10,), version),
                                     "w": payload}, target)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        state = torch.load(target, weights_only=True)
        assert torch.all(state["stamp"] == state["version"]) and state["w"].shape == payload.shape
        leftovers = [p.name for p in tmp_path.iterdir() if p != target]
        assert all(name.startswith(".last.pt.") and name.endswith(".tmp") for name in leftovers), leftovers
        mid_write_kills += bool(leftovers)
    assert mid_write_kills >= 2  # the kills did land in the middle of writes
    reserve_run_folder(str(tmp_path), None, None, "train.py", resuming=True)[1].release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "last.pt"]  # the next writer clears what they left


def test_diverging_loss_stops_the_run_before_anything_is_saved(demo_root, tmp_path, capsys):
    run = tmp_path / "run"
    r = run_main(train.main, train_args(demo_root, run, "--epochs", EPOCHS, "--lr", "1e8")[1:], capsys)
    assert_ends_with_error_line(r, "training diverged in epoch 1", "nothing was saved", "lower --lr")
    assert not list(run.rglob("*.pt"))


def test_loss_turning_nan_keeps_the_last_good_epoch(demo_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "train_epoch", nan_weights_on_second_call(train.train_epoch))
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(demo_root, run, "--epochs", EPOCHS)[1:])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "training diverged in epoch 2" in err and f"{run / 'last.pt'} holds epoch 1 (the last good one)" in err
    assert load_checkpoint(run / "last.pt")["epoch"] == load_checkpoint(run / "best.pt")["epoch"] == 1
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch_001.pt"]
    assert metrics_epochs(run) == [1]


@pytest.mark.skipif(sys.platform == "win32", reason="simulates a full disk with RLIMIT_FSIZE")
def test_full_disk_while_saving_is_reported_and_keeps_the_previous_checkpoint(shared, tmp_path):
    import resource
    run = shutil.copytree(shared[1], tmp_path / "run")
    limit = (run / "last.pt").stat().st_size // 2  # no checkpoint fits; config.json and the CSV rows do

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = run_script("train.py", "--resume", run / "last.pt", "--epochs", EPOCHS + 1, preexec_fn=small_disk)
    assert_ends_with_error_line(r, f"could not write checkpoint {run / 'checkpoints' / f'epoch_{EPOCHS + 1:03d}.pt'}",
                                "File too large", "resume from the last checkpoint")
    assert load_checkpoint(run / "last.pt")["epoch"] == EPOCHS
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"epoch_{e:03d}.pt" for e in
                                                                       range(1, EPOCHS + 1)]
    assert metrics_epochs(run) == list(range(1, EPOCHS + 1))


# ---------------------------------------------------------------------------------------------------------
# one writer per run folder, checks before the run starts, failures that come from outside the code
# ---------------------------------------------------------------------------------------------------------

def test_two_runs_started_together_in_one_out_folder_leave_one_run_and_one_error_line(demo_root, tmp_path):
    run = tmp_path / "run"
    results = scripts(train_args(demo_root, run, "--epochs", 1), train_args(demo_root, run, "--epochs", 1))
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr for r in results]
    loser = next(r for r in results if r.returncode)
    assert_one_line_error(loser.stderr.strip().splitlines()[-1], str(run))
    # the winner named in the lock file, or "another process" if it holds the lock and has not named itself yet
    assert "is being written by " in loser.stderr or "already holds a run" in loser.stderr
    assert metrics_epochs(run) == [1]


def test_a_second_ctrl_c_landing_before_the_first_is_handled_still_reports_what_was_saved(
        demo_root, tmp_path, monkeypatch, capsys):
    real_epoch, real_ignore, calls = train.train_epoch, protocol.ignore_further_interrupts, []

    def ctrl_c_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_epoch(*a, **k)

    def second_ctrl_c_first(*a):
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, before the first one's handling has begun
        real_ignore(*a)

    monkeypatch.setattr(train, "train_epoch", ctrl_c_in_epoch_2)
    monkeypatch.setattr(protocol, "ignore_further_interrupts", second_ctrl_c_first)
    run = tmp_path / "run"
    r = run_main(train.main, train_args(demo_root, run, "--epochs", EPOCHS)[1:], capsys)
    assert r.returncode == 130 and "Traceback" not in r.stderr
    assert (f"interrupted during epoch 2; {run / 'last.pt'} holds epoch 1. Resume with: python train.py --resume "
            f"{run / 'last.pt'}") in r.stderr
    assert "before training started" not in r.stderr and metrics_epochs(run) == [1]


def test_a_second_ctrl_c_while_the_first_is_handled_changes_nothing(demo_root, tmp_path, monkeypatch, capsys):
    real_epoch, real_message, calls = train.train_epoch, protocol.SavedEpochs.interrupted, []

    def interrupted_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*a, **k)

    def impatient(self, epoch):
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, while the first is being handled
        return real_message(self, epoch)

    monkeypatch.setattr(train, "train_epoch", interrupted_in_epoch_2)
    monkeypatch.setattr(protocol.SavedEpochs, "interrupted", impatient)
    run = tmp_path / "run"
    r = run_main(train.main, train_args(demo_root, run, "--epochs", EPOCHS)[1:], capsys)
    assert r.returncode == 130 and "Traceback" not in r.stderr
    assert f"interrupted during epoch 2; {run / 'last.pt'} holds epoch 1" in r.stderr
    assert "before training started" not in r.stderr and metrics_epochs(run) == [1]


def test_flags_that_cannot_work_here_stop_before_the_run_folder_is_made(demo_root, tmp_path, monkeypatch, capsys):
    odd = oasis_tree(demo_root, tmp_path / "odd")
    for path in (odd / SPLIT_DIRS[1]).iterdir():  # validation images of another size than train's
        Image.new("L", (40, 24)).save(path)
    monkeypatch.setattr(steps.shutil, "which", lambda name: None)  # no C++ compiler on this machine
    cases = [
        (train_args(demo_root, tmp_path / "run", "--compile"), "--compile needs a C++ compiler"),
        (train_args(demo_root, tmp_path / "run", "--preset", "seed", "--image-size", 8, "--batch-size", 1,
                    "--hidden-channels", 8, "--embedding-dim", 8), "BatchNorm needs more than one value per channel"),
        (train_args(odd, tmp_path / "run"), "validate images are 40x24 pixels"),
    ]
    for args, message in cases:
        assert_one_line_error(run_main(train.main, args[1:], capsys), message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("failure, message", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB"), "out of memory on cpu"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), "out of memory"),
])
def test_running_out_of_memory_is_one_line_saying_what_to_lower(demo_root, tmp_path, monkeypatch, capsys, failure,
                                                                message):
    def epoch(*args, **kwargs):
        raise failure
    monkeypatch.setattr(train, "train_epoch", epoch)
    r = run_main(train.main, train_args(demo_root, tmp_path / "run", "--epochs", 1)[1:], capsys)
    assert_one_line_error(r.stderr.strip().splitlines()[-1], message, "lower --batch-size")
    assert r.returncode == 2


def test_a_full_disk_while_drawing_figures_names_the_file_and_the_epoch_kept(demo_root, tmp_path, monkeypatch, capsys):
    def no_space(values, path, *args):
        raise OSError(27, "File too large", str(path))
    monkeypatch.setattr(train, "plot_bars", no_space)
    run = tmp_path / "run"
    r = run_main(train.main, train_args(demo_root, run, "--epochs", EPOCHS)[1:], capsys)
    assert_one_line_error(r.stderr.strip().splitlines()[-1], f"could not write a figure of epoch 1 "
                          f"({run / 'code_usage.png'}: File too large)", f"{run / 'last.pt'} holds epoch 1")
