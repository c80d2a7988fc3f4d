"""sample.py, the command that samples a prior: its flag checks, the one --class lookup it shares with compress.py,
the prior it finds beside a VQ-VAE checkpoint, and its seeding (end to end in test_prior.py and test_segment.py)."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import compress
import predict
import sample
from dataset import class_index
from helpers import assert_one_line_error, run_main
from utils import OUTPUT_RECORD, UserError


@pytest.mark.parametrize("flags, message", [
    (["--num-samples", "1"], "--num-samples must be between 2 and 100000 (the Frechet distance needs two), got 1"),
    (["--num-samples", "100001"], "--num-samples must be between 2 and 100000"),
    (["--temperature", "0"], "--temperature must be a positive number, got 0.0"),
    (["--reference-slices", "1"], "--reference-slices must be at least 2, got 1"),
    (["--seed", "-1"], "--seed must be between 0 and 2**63 - 1, got -1"),
    (["--split", "all"], "argument --split: invalid choice: 'all'"),
])
def test_bad_flags_stop_before_anything_is_loaded(flags, message, capsys):
    assert_one_line_error(run_main(sample.main, flags, capsys), message)


def test_predict_no_longer_samples(capsys):
    r = run_main(predict.main, ["--sample", "4"], capsys)
    assert r.returncode == 2
    assert_one_line_error(r, "unrecognized arguments: --sample 4")


def test_one_class_lookup_for_sample_and_compress():
    names = ["NC", "AD"]
    assert class_index(None, names, True) is None and class_index(None, [], False) is None
    assert class_index("ad", names, True) == 1 and class_index("NC", names, True) == 0
    with pytest.raises(UserError, match=r"^unknown --class 'MCI'; choose one of NC, AD$"):
        class_index("MCI", names, True)
    not_conditional = "--class needs a class-conditional prior (one trained with train_prior.py --conditional)"
    with pytest.raises(UserError) as e:
        class_index("AD", ["none"], False)
    assert str(e.value) == not_conditional
    with pytest.raises(UserError) as e:  # compress.py: a codec without a prior
        compress.resolve_class(SimpleNamespace(prior=None, class_names=[]), "AD", 3)
    assert str(e.value) == not_conditional
    conditional = SimpleNamespace(prior=SimpleNamespace(config=SimpleNamespace(num_classes=2)), class_names=names)
    assert compress.resolve_class(conditional, "ad", 3).tolist() == [1, 1, 1]


def test_a_checkpoint_without_a_prior_beside_it_says_how_to_train_one(trained_models, tmp_path, capsys):
    lone = tmp_path / "best.pt"
    shutil.copyfile(trained_models[0], lone)
    assert_one_line_error(run_main(sample.main, ["--checkpoint", lone], capsys),
                          f"no prior at {tmp_path / 'prior' / 'best.pt'}; train one with python train_prior.py "
                          f"--vqvae {lone}, or pass --prior")


def test_the_same_seed_samples_the_same_slices_and_scores(trained_models, tmp_path, capsys):
    """--checkpoint finds the prior in its run's prior/; --seed alone decides the samples."""
    vqvae, _ = trained_models
    outputs = []
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        r = run_main(sample.main, ["--checkpoint", vqvae, "--num-samples", "3", "--seed", seed, "--device", "cpu",
                                   "--out", tmp_path / name], capsys)
        assert r.returncode == 0, r.stderr
        assert f"written to {tmp_path / name}" in r.stdout
        outputs.append(((tmp_path / name / "samples.png").read_bytes(),
                        json.loads((tmp_path / name / "sample_scores.json").read_text())))
    (png_a, scores_a), (png_b, scores_b), (png_c, _) = outputs
    assert png_a == png_b and scores_a == scores_b and png_a != png_c
    assert scores_a["samples"] == 3 and scores_a["seed"] == 3 and scores_a["prior"].endswith("prior/best.pt")


@pytest.mark.parametrize("command", ["predict", "sample"])
def test_a_file_the_command_did_not_write_is_never_written_over_and_its_own_are(command, trained_models, tmp_path,
                                                                                capsys, monkeypatch):
    from matplotlib.figure import Figure
    monkeypatch.setattr(Figure, "savefig", lambda figure, path, **kwargs: Path(path).write_bytes(b""))  # not drawn
    vqvae, prior = trained_models
    main, argv, theirs = {"predict": (predict.main, ["--checkpoint", vqvae], "summary.json"),
                          "sample": (sample.main, ["--prior", prior, "--num-samples", "2"], "samples.png")}[command]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / theirs).write_text("a user's")
    refused = run_main(main, [*argv, "--out", tmp_path / "mine"], capsys)
    assert refused.returncode == 2
    assert_one_line_error(refused, f"{tmp_path / 'mine' / theirs} is there and was not written by {command}.py")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == [theirs]
    assert (tmp_path / "mine" / theirs).read_text() == "a user's"
    for _ in range(2):  # a new folder, then the rerun over the command's own files
        run = run_main(main, [*argv, "--out", tmp_path / "new"], capsys)
        assert run.returncode == 0, run.stderr
    written = {str(p.relative_to(tmp_path / "new")) for p in (tmp_path / "new").rglob("*") if p.is_file()}
    assert written - {OUTPUT_RECORD} == set(json.loads((tmp_path / "new" / OUTPUT_RECORD).read_text()))


def test_more_reference_slices_than_the_train_split_has_are_refused(trained_models, tmp_path, capsys):
    r = run_main(sample.main, ["--prior", trained_models[1], "--reference-slices", "33", "--out", tmp_path / "s"],
                 capsys)
    assert_one_line_error(r, "--reference-slices 33 is more than the 32 slices of the train split; pass at most 32")
    assert not (tmp_path / "s").exists()
