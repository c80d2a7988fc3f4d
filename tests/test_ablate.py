"""ablate.py trains each variant on the same data and budget, scores it on validation unless told otherwise, and
writes one table; finished variants are reused."""
import json
from types import SimpleNamespace

import pytest

import ablate
from helpers import assert_one_line_error, run_main, scripts_run_in_this_process
from training import families


def test_ablation_writes_one_table_and_reuses_finished_variants(demo_root, tmp_path, capsys, monkeypatch):
    scripts_run_in_this_process(monkeypatch)
    args = ["--dataset", "demo", "--data-root", demo_root, "--epochs", "1", "--batch-size", "8",
            "--variants", "seed,default-no-restart", "--out", tmp_path]
    first = run_main(ablate.main, args, capsys)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("=== ") == 2  # both variants trained
    rows = json.loads((tmp_path / "ablation.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["seed", "default-no-restart"]
    assert all(r["bits_per_slice"] == 4 * 4 * 5 and -1 <= r["ssim"] <= 1 for r in rows)  # 4x4 codes, K=32
    assert {r["split"] for r in rows} == {"validate"}
    assert len((tmp_path / "ablation.csv").read_text().splitlines()) == 3
    table = (tmp_path / "ablation.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| seed", "| default-no-restart"]

    again = run_main(ablate.main, args, capsys)
    assert again.returncode == 0 and "=== " not in again.stdout  # scored again, not retrained
    rescored = json.loads((tmp_path / "ablation.json").read_text())["rows"]
    # equal up to float rounding: on CUDA, cuDNN may pick other (equally valid) kernels the second time
    assert [{k: pytest.approx(v, rel=1e-4) if isinstance(v, float) else v for k, v in r.items()} for r in rows] \
        == rescored


def test_unknown_variant_and_an_out_that_is_a_file_are_one_line_errors(tmp_path, capsys):
    assert_one_line_error(run_main(ablate.main, ["--variants", "seed,huge", "--out", tmp_path], capsys),
                          "unknown --variants huge")
    (tmp_path / "a file").write_text("")
    assert_one_line_error(run_main(ablate.main, ["--out", tmp_path / "a file"], capsys), "is a file, not a folder")


def test_a_variant_runs_train_py_with_the_shared_budget_and_its_own_overrides(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(families.subprocess, "run",
                        lambda cmd, **kwargs: commands.append(cmd) or SimpleNamespace(returncode=0))
    args = SimpleNamespace(dataset="OASIS", data_root="/data", image_size=None, max_minutes=10.0, epochs=40,
                           batch_size=16, precision="auto", threads=None, seed=0, device="cpu")
    ablate.train_variant("default-no-warmup-no-clip", args, tmp_path / "run", resume=False)
    command = " ".join(commands[0])
    assert "--preset default" in command and "--epochs 40" in command and "--max-minutes 10.0" in command
    assert "--warmup-steps 0" in command and "--grad-clip 0.0" in command
    assert "--batch-size" not in command  # the preset's own
    ablate.train_variant("default-batch-16", args, tmp_path / "run16", resume=False)
    assert "--batch-size 16" in " ".join(commands[1])


def test_a_variant_stopped_by_its_deadline_is_finished_and_an_interrupted_one_is_resumed():
    assert families.training_finished({"epoch": 40}, epochs=40)
    assert families.training_finished({"epoch": 3, "time_budget": {"seconds_left": 0.0, "done": True}}, epochs=40)
    assert not families.training_finished({"epoch": 3, "time_budget": {"seconds_left": 412.0, "done": False}},
                                          epochs=40)
    assert not families.training_finished({"epoch": 3}, epochs=40)  # no budget recorded: resumed


def test_tables_ablate_py_did_not_write_are_never_written_over(tmp_path, monkeypatch, capsys):
    commands = []
    monkeypatch.setattr(families.subprocess, "run", lambda cmd, **kwargs: commands.append(cmd))
    (tmp_path / "ablation.md").write_text("my notes")
    r = run_main(ablate.main, ["--variants", "seed", "--out", tmp_path], capsys)
    assert r.returncode == 2 and not commands
    assert_one_line_error(r, f"{tmp_path / 'ablation.md'} is there and was not written by ablate.py")
    assert (tmp_path / "ablation.md").read_text() == "my notes"


def test_a_flag_train_py_would_refuse_is_refused_before_the_first_variant(tmp_path, monkeypatch, capsys):
    commands = []
    monkeypatch.setattr(families.subprocess, "run", lambda cmd, **kwargs: commands.append(cmd))
    r = run_main(ablate.main, ["--variants", "seed", "--max-minutes", "-5", "--out", tmp_path / "a"], capsys)
    assert r.returncode == 2 and not commands and not (tmp_path / "a").exists()
    assert_one_line_error(r, "invalid --max-minutes -5.0")
