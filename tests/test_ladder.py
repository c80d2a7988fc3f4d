"""ladder.py trains each operating point's VQ-VAE and then its prior as train.py / train_prior.py runs, skips runs
that finished, resumes unfinished ones, and lists the points in ladder.json for compress.py --ladder."""
import json
from types import SimpleNamespace

import torch

import compress
import ladder
from codec.ladder import read_ladder
from helpers import assert_one_line_error, run_main
from training import families


def fake_runs(monkeypatch):
    """Record each trainer command instead of running it."""
    commands = []
    monkeypatch.setattr(families.subprocess, "run",
                        lambda cmd, **kwargs: commands.append(" ".join(map(str, cmd))) or SimpleNamespace(returncode=0))
    return commands


def test_each_point_trains_its_vqvae_with_its_grid_and_codebook_then_its_prior(tmp_path, monkeypatch, capsys):
    commands = fake_runs(monkeypatch)
    run_main(ladder.main, ["--dataset", "OASIS", "--data-root", "/data", "--max-minutes", "20", "--prior-minutes",
                           "8", "--points", "h8-k256,h16-k256", "--out", tmp_path], capsys)
    assert len(commands) == 4
    coarse_vq, coarse_prior, fine_vq, fine_prior = commands  # smallest files first, whatever the order given
    assert "train.py" in coarse_vq and "--downsamplings 4" in coarse_vq and "--codebook-size 256" in coarse_vq
    assert "--max-minutes 20.0" in coarse_vq and f"--out {tmp_path / 'h16-k256'}" in coarse_vq
    assert "train_prior.py" in coarse_prior and f"--vqvae {tmp_path / 'h16-k256' / 'best.pt'}" in coarse_prior
    assert "--max-minutes 8.0" in coarse_prior and "--batch-size 8" in coarse_prior
    assert "--preset default" in fine_vq and "--downsamplings" not in fine_vq
    assert [p["name"] for p in json.loads((tmp_path / "ladder.json").read_text())["points"]] == ["h16-k256",
                                                                                                 "h8-k256"]
    assert read_ladder(tmp_path) == [(tmp_path / "h16-k256" / "best.pt", None), (tmp_path / "h8-k256" / "best.pt",
                                                                                   None)]


def test_a_finished_run_is_kept_and_an_unfinished_one_resumed(tmp_path, monkeypatch, capsys):
    commands = fake_runs(monkeypatch)
    run = tmp_path / "h8-k32"
    (run / "prior").mkdir(parents=True)
    torch.save({"epoch": 2, "time_budget": {"done": True}}, run / "last.pt")
    torch.save({"epoch": 1, "time_budget": {"done": False}}, run / "prior" / "last.pt")
    monkeypatch.setattr(ladder, "load_checkpoint", lambda path: torch.load(path, weights_only=True))
    run_main(ladder.main, ["--points", "h8-k32", "--out", tmp_path], capsys)
    assert len(commands) == 1 and "train_prior.py" in commands[0] and f"--resume {run / 'prior'}" in commands[0]


def test_unknown_points_a_failed_trainer_and_an_out_that_is_a_file_are_one_line_errors(tmp_path, monkeypatch, capsys):
    assert_one_line_error(run_main(ladder.main, ["--points", "h8-k32,h2-k2", "--out", tmp_path], capsys),
                          "unknown --points h2-k2")
    (tmp_path / "a file").write_text("")
    assert_one_line_error(run_main(ladder.main, ["--out", tmp_path / "a file"], capsys), "is a file, not a folder")
    monkeypatch.setattr(families.subprocess, "run", lambda cmd, **kwargs: SimpleNamespace(returncode=1))
    assert_one_line_error(run_main(ladder.main, ["--points", "h8-k32", "--out", tmp_path / "l"], capsys),
                          "train.py for ladder point h8-k32 failed")


def test_a_ladder_json_ladder_py_did_not_write_is_never_written_over_and_its_own_is(tmp_path, monkeypatch, capsys):
    commands = fake_runs(monkeypatch)
    (tmp_path / "ladder.json").write_text('{"mine": true}')
    refused = run_main(ladder.main, ["--points", "h8-k32", "--out", tmp_path], capsys)
    assert_one_line_error(refused, f"{tmp_path / 'ladder.json'} is there and was not written by ladder.py",
                          "choose another --out, or remove it")
    assert refused.returncode == 2 and not commands and (tmp_path / "ladder.json").read_text() == '{"mine": true}'
    for _ in range(2):  # a new folder, then the rerun on ladder.py's own
        run = run_main(ladder.main, ["--points", "h8-k32", "--out", tmp_path / "new"], capsys)
        assert run.returncode == 0, run.stderr
    assert read_ladder(tmp_path / "new") == [(tmp_path / "new" / "h8-k32" / "best.pt", None)]


def test_a_trainer_flag_is_checked_before_the_first_point_trains(tmp_path, monkeypatch, capsys):
    commands = fake_runs(monkeypatch)
    for flags, message in ((["--prior-epochs", "0"], "invalid --prior-epochs 0"),
                           (["--prior-minutes", "-1"], "invalid --prior-minutes -1.0"),
                           (["--epochs", "0"], "invalid --epochs 0"), (["--threads", "0"], "--threads must be")):
        r = run_main(ladder.main, [*flags, "--out", tmp_path / "l"], capsys)
        assert r.returncode == 2
        assert_one_line_error(r, message)
    assert not commands and not (tmp_path / "l").exists()


def test_a_ladder_file_nested_too_deeply_is_one_line(tmp_path, capsys):
    (tmp_path / "ladder.json").write_text("[" * 100000 + "]" * 100000)
    r = run_main(compress.main, ["encode", "--ladder", tmp_path, "--split", "test", "--out", tmp_path / "o"], capsys)
    assert r.returncode == 2
    assert_one_line_error(r, "is not a ladder's list of points", "nested too deeply")
