"""DDP on the CPU: 2 processes over gloo, under torchrun and under torch.multiprocessing.

One set of outputs from a torchrun run; weights and quantiser buffers identical on every rank; 2 ranks x batch b
equal 1 rank x batch 2b where no batch statistics are involved; --resume under DDP equals an uninterrupted run;
a failure on one rank stops every rank."""
import shutil
from contextlib import nullcontext
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

import train
from dataset import generate_demo
from helpers import TINY_MODEL, run_script, tiny_args
from modules import VQVAE, VQVAEConfig
from training.checkpoints import TrainConfig, load_checkpoint, load_split
from training.distributed import RankPlace, average_batchnorm_stats, fail_together
from training.schedule import LRSchedule, TimeBudget
from utils import UserError, seed_everything, unwrap

pytestmark = pytest.mark.xdist_group("ddp")  # one worker, so the module's torchrun run (ddp_run) happens once

ARGS = ("--lr-schedule", "constant", "--precision", "fp32", "--device", "cpu")  # CPU DDP, also where GPUs exist


def torchrun(*args):
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args)


@pytest.fixture(scope="session")  # not module: xdist may run another module's tests between this module's
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = generate_demo(root / "demo", size=32, n_patients=10, slices_per_patient=4)  # as conftest's demo_root
    out = root / "run"
    r = torchrun(*tiny_args(data, out, "--epochs", "2", *ARGS))
    assert r.returncode == 0, r.stderr
    return out, r


def test_torchrun_writes_one_set_of_outputs(ddp_run):
    out, r = ddp_run
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == sorted([
        ".lock", "best.pt", "checkpoints", "checkpoints/epoch_001.pt", "checkpoints/epoch_002.pt", "code_usage.csv",
        "code_usage.png", "codebook.png", "config.json", "last.pt", "loss.png", "metrics.csv", "recon",
        "recon/epoch_001.png", "recon/epoch_002.png", "ssim.png"])
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 2
    assert r.stdout.count("demo train: 32 slices") == 1 and r.stdout.count("epoch   2 |") == 1  # rank 0 only

    # The checkpoint loads into a plain model, and its metrics cover the whole dataset: every train image's
    # codes once per epoch (32 images x 4x4 codes), and validation as a single process computes it.
    state = load_checkpoint(out / "last.pt")
    model = VQVAE(VQVAEConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    assert state["world_size"] == 2
    usage = (out / "code_usage.csv").read_text().splitlines()
    assert all(sum(map(int, row.split(",")[1:])) == 32 * 4 * 4 for row in usage[1:])
    cfg = TrainConfig.from_dict(state["train_config"])
    val = load_split(cfg, "validate", verbose=False, masks=True)
    single, _ = train.evaluate(model, val, val.masks > 0, cfg, RankPlace(0, 1, 0, torch.device("cpu")), nullcontext())
    for key in ("val_loss", "val_ssim", "val_psnr", "val_ssim_brain", "val_psnr_brain"):
        assert single[key] == pytest.approx(state["metrics"][key], rel=1e-5), key


def test_resume_under_torchrun_equals_an_uninterrupted_run(ddp_run, tmp_path):
    out = shutil.copytree(ddp_run[0], tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    r = torchrun("--resume", str(out / "checkpoints" / "epoch_001.pt"), "--epochs", "2")  # as if stopped after 1
    assert r.returncode == 0, r.stderr
    a, b = load_checkpoint(ddp_run[0] / "last.pt"), load_checkpoint(out / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["metrics"]["val_loss"] == b["metrics"]["val_loss"]
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 2


def test_a_bad_flag_stops_every_rank(demo_root, tmp_path):
    r = torchrun(*tiny_args(demo_root, tmp_path / "run", "--epochs", "0"))
    assert r.returncode != 0 and "invalid --epochs 0" in r.stderr and "error (rank" in r.stderr
    assert "Exception ignored" not in r.stderr  # torchrun's SIGTERM to the other rank lands harmlessly
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# In-process checks: 2 ranks spawned here, each running train.train_epoch on its share of fixed images
# ---------------------------------------------------------------------------------------------------------

TINY = dict(**TINY_MODEL, codebook_size=16)


def epoch(model_cfg, images, batch_size, rank=0, world=1, shuffle=False, deadline=0.0):
    """One train_epoch of a fresh model as train.py builds it; returns the plain model and train_epoch's result."""
    seed_everything(0)
    model = VQVAE(model_cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # not Adam: it would hide a gradient scaled
    # by the number of ranks
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule("constant", 0, 1))
    budget = TimeBudget(0, 0, batch_size, verbose=False)
    budget.deadline = deadline
    if world > 1:
        model = DistributedDataParallel(model)
        model.broadcast_buffers = False
    sampler = DistributedSampler(range(len(images)), world, rank, shuffle=shuffle, drop_last=True)
    cfg = TrainConfig(batch_size=batch_size, channels_last=False)
    data = SimpleNamespace(images=images, image_shape=tuple(images.shape[1:]))
    result = train.train_epoch(model, opt, scheduler, data, sampler, cfg, torch.device("cpu"), nullcontext(), budget,
                               tqdm(disable=True))
    average_batchnorm_stats(unwrap(model))
    return unwrap(model), result


def same_on_every_rank(t: torch.Tensor) -> bool:
    t = t.double()  # exact for these values; gloo gathers no bool
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def worker(rank, world, init_file, images):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a deadlock fails the test instead of hanging it
    try:
        # Lockstep: BatchNorm, an EMA codebook with k-means init and dead-code restarts, each rank on other data.
        cfg = VQVAEConfig(**TINY, norm="batch", residual_blocks=1, codebook_update="ema", kmeans_init=True,
                          dead_code_threshold=1.0)
        model, (means, counts, seen, _) = epoch(cfg, images[:32], 8, rank, world, shuffle=True)
        for name, t in model.state_dict().items():
            assert same_on_every_rank(t), name
        assert same_on_every_rank(counts) and int(counts.sum()) == 32 * 4 * 4 and seen == 32
        assert same_on_every_rank(torch.tensor(list(means.values())))

        # A failure on one rank reaches the others instead of leaving them waiting in their next collective.
        with pytest.raises(UserError, match="another rank failed" if rank else "rank 0 only"):
            with fail_together(torch.device("cpu")):
                if rank == 0:
                    raise UserError("rank 0 only")

        # Ranks started with other flags: every rank stops, the one that differs saying how.
        process = RankPlace(rank, world, 0, torch.device("cpu"))
        with pytest.raises(UserError, match="another rank failed" if rank == 0 else
                           "rank 1 was started with other flags than rank 0 \\(epochs: 5 here, 40 there\\)"):
            train.check_same_config(TrainConfig(epochs=5 if rank else 40), VQVAEConfig(), process)
        train.check_same_config(TrainConfig(), VQVAEConfig(), process)  # the same flags pass

        # --max-minutes: rank 0's deadline has passed, rank 1's has not; both stop after step 10 of 12.
        _, (_, _, seen, _) = epoch(cfg, images, 2, rank, world, deadline=1.0 if rank == 0 else float("inf"))
        assert seen == 2 * 2 * 10

        # No batch statistics: 2 ranks x batch 4 on the same images as 1 rank x batch 8 (checked below).
        runs = {update: epoch(VQVAEConfig(**TINY, norm="group", codebook_update=update), images[:24], 4, rank, world)
                for update in ("ema", "loss")}
    finally:
        dist.destroy_process_group()
    if rank == 0:
        for update, (model, (means, counts, seen, _)) in runs.items():
            ref, (ref_means, ref_counts, ref_seen, _) = epoch(model.config, images[:24], 8)
            for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{update}: {name}")
            assert torch.equal(counts, ref_counts) and seen == ref_seen == 24
            assert means == pytest.approx(ref_means, rel=1e-5)


def test_ranks_stay_identical_and_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path):
    images = torch.randint(0, 256, (48, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mp.spawn(worker, args=(2, tmp_path / "rendezvous", images), nprocs=2)
