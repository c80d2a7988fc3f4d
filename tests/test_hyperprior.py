"""hyperprior.py, the learned peer of the rate-distortion study: CompressAI's scale hyperprior trained on the same
slices, resumed, measured with its own entropy coder's bytes, and added to compress.py rd. compressai is optional:
without it the script says so in one line (the other tests here need it and are skipped)."""
import json
import sys
from dataclasses import fields

import pytest

import compress
import hyperprior
from helpers import assert_one_line_error, run_main
from training.checkpoints import load_checkpoint
from utils import read_csv

TINY = ["--n", "8", "--m", "8", "--batch-size", "4"]


def test_without_compressai_the_peer_is_one_line_saying_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "compressai", None)
    with pytest.raises(SystemExit) as stop:
        hyperprior.main(["train", "--dataset", "demo", "--data-root", str(tmp_path), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "pip install compressai" in err and len(err.strip().splitlines()) == 1


def test_the_peer_trains_resumes_and_joins_the_rd_study_on_the_same_slices(trained_models, tmp_path, capsys):
    pytest.importorskip("compressai")
    checkpoint, prior = trained_models
    demo = checkpoint.parent.parent / "demo"
    run = tmp_path / "hp"
    hyperprior.main(["train", "--dataset", "demo", "--data-root", str(demo), *TINY, "--max-minutes", "0.01",
                     "--out", str(run)])
    first = load_checkpoint(run / "last.pt", kind="hyperprior")
    assert first["step"] >= 1 and first["model_config"]["n"] == 8
    hyperprior.main(["train", "--resume", str(run), "--max-minutes", "0.01"])
    resumed = load_checkpoint(run / "last.pt", kind="hyperprior")
    assert resumed["step"] > first["step"] and resumed["seconds"] > first["seconds"]
    assert [r["step"] for r in read_csv(run / "metrics.csv")] == [first["step"], resumed["step"]]

    hyperprior.main(["rd", str(run), "--split", "test", "--out", str(tmp_path / "peer")])
    (tmp_path / "a file").write_text("mine")
    for out, message in ((tmp_path / "a file", "is a file"), (tmp_path / "peer", None)):
        r = run_main(hyperprior.main, ["rd", run, "--split", "test", "--out", out], capsys)
        if message:  # refused before a slice is measured; a rerun writes over its own files only
            assert_one_line_error(r, message)
        else:
            assert r.returncode == 0, r.stderr
    assert (tmp_path / "a file").read_text() == "mine"
    peer = json.loads((tmp_path / "peer" / "rd_hyperprior.json").read_text())
    row = peer["rows"][0]
    assert row["images"] == len(peer["files"]) == 4 and row["mean_bytes"] > hyperprior.HEADER_BYTES
    assert 0 < row["mean_psnr"] and -1 <= row["mean_ssim"] <= 1 and row["train_steps"] == resumed["step"]

    compress.main(["rd", "--checkpoint", str(checkpoint), "--prior", str(prior), "--budgets", "400", "--codecs",
                   "jpeg", "--no-verify", "--peer", str(tmp_path / "peer" / "rd_hyperprior.json"),
                   "--out", str(tmp_path / "rd")])
    rows = read_csv(tmp_path / "rd" / "rd.csv")
    assert [r["setting"] for r in rows if r["codec"] == hyperprior.NAME] == [row["setting"]]
    bd = json.loads((tmp_path / "rd" / "rd.json").read_text())["targets"]["bd_rate_percent"]
    assert hyperprior.NAME in bd  # None here: one VQ-VAE point and one peer point make no curves

    capsys.readouterr()
    with pytest.raises(SystemExit):
        compress.main(["rd", "--checkpoint", str(checkpoint), "--max-images", "2", "--budgets", "400", "--codecs",
                       "jpeg", "--peer", str(tmp_path / "peer" / "rd_hyperprior.json"), "--out", str(tmp_path / "rd2")])
    assert "measured other slices" in capsys.readouterr().err


def test_train_flags_come_from_the_config_dataclasses_each_with_one_line_of_help():
    from training.flags import field_help
    for cls in (hyperprior.HyperpriorTrainConfig, hyperprior.HyperpriorConfig):
        helps = field_help(cls)
        assert set(helps) == {f.name for f in fields(cls)} and all("\n" not in text for text in helps.values())


@pytest.mark.parametrize("command, message", [
    (["train", "--dataset", "demo", "--data-root", ".", "--lmbda", "inf"], "invalid --lmbda inf"),
    (["rd", "run", "--max-images", "0", "--out", "rd"], "--max-images must be at least 1, got 0"),
    (["rd", "run", "--threads", "0", "--out", "rd"], "--threads must be at least 1, got 0"),
])
def test_out_of_range_flags_are_one_line_before_anything_is_read(command, message, tmp_path, monkeypatch, capsys):
    pytest.importorskip("compressai")
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run_main(hyperprior.main, command, capsys), message)
    assert list(tmp_path.iterdir()) == []
