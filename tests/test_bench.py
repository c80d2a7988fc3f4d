"""bench.py end to end at a tiny size, and the fast path's promises: the speed-ups change no result, and a
training step never waits for the GPU."""
import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import bench
from dataset import generate_demo
from helpers import INDUCTOR, TINY_MODEL, assert_one_line_error, run_main, scripts_run_in_this_process
from modules import PRESETS, ConvTranspose2d, count_codes
from training import steps
from training.checkpoints import TrainConfig
from training.steps import train_step, vqvae_and_optimiser
from utils import UserError

TINY = ["--size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--peak-sizes", "64"]
TINY_OF = {"--quality": ["--batch-size", "2"], "--sampling": ["--steps", "1", "--warmup", "0"]}  # the flags each reads


def run_bench(capsys, *args):
    tiny = next((TINY_OF[a] for a in args if a in TINY_OF), TINY)
    return run_main(bench.main, [*tiny, *args], capsys)


@INDUCTOR
def test_bench_measures_everything_it_promises_against_the_yardstick_in_the_repo(tmp_path, capsys):
    assert bench.REFERENCE.is_file() and bench.REFERENCE.parent.parent == Path(bench.__file__).resolve().parent
    out = tmp_path / "bench.json"
    r = run_bench(capsys, "--json", out)
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    expected = {
        "machine": {"device", "name", "threads", "torch", "python"},
        "settings": {"preset", "size", "batch", "steps", "warmup", "precision", "channels_last", "compile"},
        "train": {"project_img_per_s", "reference_img_per_s", "speedup", "project_step_s", "reference_step_s"},
        "flops": {"per_step", "achieved_per_s", "peak_bf16_per_s", "peak_fp32_per_s", "fraction_of_bf16_peak",
                  "fraction_of_fp32_peak", "fraction_of_bf16_peak_for_train_target"},
        "ssim": {"images", "batched_img_per_s", "per_image_img_per_s", "speedup", "max_abs_diff",
                 "compiled_img_per_s", "compiled_speedup", "compiled_max_abs_diff", "compile_s"},
        "loader": {"project_wait_fraction", "reference_wait_fraction", "reference_batch_s", "project_decode_once_s",
                   "images"},
        "memory": {"what", "project_mib", "reference_mib"},
        "targets": {"train_speedup", "fraction_of_bf16_peak", "ssim_speedup", "ssim_max_abs_diff",
                    "loader_wait_fraction"},
    }
    assert {k: set(v) for k, v in results.items()} == expected
    assert results["train"]["project_img_per_s"] > 0 and results["flops"]["per_step"] > 0
    assert results["ssim"]["max_abs_diff"] <= 1e-4 and results["ssim"]["compiled_max_abs_diff"] <= 1e-4
    assert results["train"]["reference_img_per_s"] > 0 and results["loader"]["reference_batch_s"] > 0
    assert results["train"]["speedup"] == pytest.approx(results["train"]["project_img_per_s"]
                                                        / results["train"]["reference_img_per_s"])
    assert "training (img/s)" in r.stdout


@INDUCTOR
def test_without_native_bf16_the_bf16_peak_is_neither_timed_nor_judged(tmp_path, capsys, monkeypatch):
    timed_dtypes = []
    monkeypatch.setattr(bench, "use_bf16", lambda precision, device: precision == "bf16")
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype, device, sizes: timed_dtypes.append(dtype) or 1e9)
    out = tmp_path / "bench.json"
    r = run_bench(capsys, "--skip-reference", "--json", out)
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    assert timed_dtypes == [torch.float32] and results["settings"]["precision"] == "fp32"
    assert results["flops"]["peak_bf16_per_s"] is None and results["flops"]["fraction_of_bf16_peak"] is None
    assert results["targets"]["fraction_of_bf16_peak"] is None and results["flops"]["fraction_of_fp32_peak"] > 0
    assert "no native bf16 here" in r.stdout


def test_quality_compares_bf16_with_fp32_on_a_given_oasis_folder(tmp_path, capsys, monkeypatch):
    scripts_run_in_this_process(monkeypatch)
    generate_demo(tmp_path / "slices", size=32, n_patients=10, slices_per_patient=2)
    out = tmp_path / "quality.json"
    r = run_bench(capsys, "--quality", "--epochs", "1", "--data-root", tmp_path / "slices", "--json", out)
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    assert results["settings"]["data"] == str(tmp_path / "slices")
    assert results["val_ssim_bf16_minus_fp32"] == pytest.approx(results["bf16"]["val_ssim"]
                                                               - results["fp32"]["val_ssim"])
    assert f"on {tmp_path / 'slices'}: bf16" in r.stdout


def test_sampling_times_every_prior_and_the_raster_ones_also_by_recomputing(tmp_path, capsys):
    out = tmp_path / "sampling.json"
    r = run_bench(capsys, "--sampling", "--samples", "2", "--grid", "3", "--json", out)
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    priors = results["priors"]
    assert set(priors) == {"pixelcnn", "transformer", "multiscale"} and results["settings"]["grid"] == [3, 3]
    for arch, p in priors.items():
        assert p["incremental_s"] > 0 and p["train_codes_per_s"] > 0
        assert p["compiled_train_codes_per_s"] is None  # compiled with --compile only
        assert p["speedup_over_pixelcnn"] == pytest.approx(priors["pixelcnn"]["incremental_s"] / p["incremental_s"])
        if arch == "multiscale":
            assert (p["coding_order"], p["passes"], p["recomputing_s"], p["speedup"]) == ("passes", 5, None, None)
        else:
            assert (p["coding_order"], p["passes"]) == ("raster", 9)
            assert p["speedup"] == pytest.approx(p["recomputing_s"] / p["incremental_s"])
    assert set(results["targets"]) == {"sampling_64_s_pixelcnn", "sampling_64_s_transformer",
                                       "sampling_64_s_multiscale", "sampling_speedup_over_pixelcnn_multiscale"}
    assert "recomputing" in r.stdout and "transformer (128 ch, 4 layers" in r.stdout and "multiscale (64 ch" in r.stdout


def test_a_missing_yardstick_is_named_with_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main([*TINY, "--reference", str(tmp_path / "nowhere.py"), "--json", str(tmp_path / "b.json")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "nowhere.py does not exist" in err and "--skip-reference" in err
    assert not (tmp_path / "b.json").exists()


def test_the_yardstick_is_independent_of_the_project_and_trains(tmp_path):
    nodes = list(ast.walk(ast.parse(bench.REFERENCE.read_text())))
    imported = {node.module for node in nodes if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    imported = {name.split(".")[0] for name in imported}
    assert imported <= {"pathlib", "numpy", "torch", "torchvision", "PIL"}, imported
    yardstick = bench.load_reference(bench.REFERENCE)
    generate_demo(tmp_path, size=32, n_patients=3, slices_per_patient=1)
    folder = yardstick.Folder(tmp_path / "keras_png_slices_train", 16)
    x = torch.stack([folder[0], folder[0]])
    assert x.shape == (2, 1, 16, 16) and -1 <= x.min() < x.max() <= 1
    torch.manual_seed(0)
    model = yardstick.SeedVQVAE()
    reconstruction, vq_loss = model(x)
    assert reconstruction.shape == x.shape and vq_loss.ndim == 0
    optimizer = torch.optim.Adam(model.parameters(), yardstick.LR)
    losses = [yardstick.step(model, optimizer, x) for _ in range(5)]
    assert losses[-1] < losses[0]


def test_conv_transpose_with_the_bias_outside_equals_torchs():
    torch.manual_seed(0)
    ours, theirs = ConvTranspose2d(8, 4, 4, stride=2, padding=1), nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    a, b = ours(x), theirs(x)
    torch.testing.assert_close(a, b)
    g = torch.randn_like(a)
    for u, v in zip(torch.autograd.grad(a, [x, ours.weight, ours.bias], g),
                    torch.autograd.grad(b, [x, theirs.weight, theirs.bias], g)):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("k", [1, 5, 32])
def test_code_counts_equal_bincount(k):
    indices = torch.randint(0, k, (1000,))
    assert torch.equal(count_codes(indices, k), torch.bincount(indices, minlength=k))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["seed", "default"])
def test_a_training_step_never_waits_for_the_gpu(name):
    device = torch.device("cuda")
    cfg = TrainConfig(preset=name, batch_size=4, grad_clip=1.0).resolved()
    model_cfg = replace(PRESETS[name].model, **TINY_MODEL)
    model, opt, scheduler = vqvae_and_optimiser(cfg, model_cfg, device, 10)
    x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    train_step(model, opt, scheduler, x, cfg, autocast)  # the first step may read the k-means flag, once
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(model, opt, scheduler, x, cfg, autocast)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_json_path_in_a_missing_folder_is_refused_before_the_benchmark_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main([*TINY, "--skip-reference", "--json", str(tmp_path / "missing" / "b.json")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"the folder {tmp_path / 'missing'} does not exist" in err
    assert "training" not in err  # nothing was timed


@pytest.mark.parametrize("flags, message", [
    (["--quality", "--grid", "8"], "bench.py --quality does not read --grid (a flag of bench.py --sampling); drop it"),
    (["--sampling", "--batch-size", "4"], "bench.py --sampling does not read --batch-size (a flag of bench.py or "
                                          "bench.py --quality)"),
    (["--quality", "--precision", "bf16"], "bench.py --quality does not read --precision"),
    (["--epochs", "3"], "bench.py does not read --epochs (a flag of bench.py --quality)"),
    (["--peak-sizes", "1024,0"], "argument --peak-sizes: invalid int_list value: '1024,0'"),
    (["--sampling", "--compile"], "--compile needs a C++ compiler"),
])
def test_a_flag_that_would_do_nothing_or_cannot_work_is_refused_before_the_benchmark_runs(
        flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(steps.shutil, "which", lambda name: None)  # no C++ compiler on this machine
    r = run_main(bench.main, [*flags, "--json", tmp_path / "b.json"], capsys)
    assert_one_line_error(r, message)
    assert list(tmp_path.iterdir()) == []


def test_json_never_replaces_a_file_bench_did_not_write(tmp_path, capsys):
    (tmp_path / "notes.json").write_text("mine")
    r = run_main(bench.main, [*TINY, "--json", tmp_path / "notes.json"], capsys)
    assert_one_line_error(r, f"{tmp_path / 'notes.json'} is there and was not written by bench.py")
    assert (tmp_path / "notes.json").read_text() == "mine"


def test_quality_runs_train_py_with_the_threads_asked_for(tmp_path, monkeypatch, capsys):
    given = []

    def run_script(script, values, threads, failure):
        given.append(threads)
        raise UserError("stopped here")
    monkeypatch.setattr(bench, "run_script", run_script)
    r = run_main(bench.main, ["--quality", "--threads", "1", "--json", tmp_path / "q.json"], capsys)
    assert r.returncode == 2 and given == [1]
