"""Everything DDP (torchrun) in one place: which rank this process is, the process group, and the collectives the
trainers and the quantiser use. Each is a no-op in a plain single process, so the same code runs either way."""
import math
import os
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from utils import UserError


class RankPlace(NamedTuple):
    """This process's place in the run: its rank among `world` processes, its rank on this node, its device."""
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) for a plain `python` run."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def join_process_group(place: RankPlace):
    """Under torchrun, join the process group (NCCL on GPUs, gloo on CPUs); nothing in a single process."""
    if place.world > 1 and not dist.is_initialized():
        cuda = place.device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=place.device if cuda else None)


def leave_process_group(finished: bool):
    """At the end of a command: all ranks tear down together once they finished (a rank tearing down while
    another still sends aborts); after a failure each leaves as it can."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t)
    return t


def broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(t, src=0)
    return t


def rank0_value(value):
    """Rank 0's `value` (any picklable object) on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(true: bool, device: torch.device) -> bool:
    """Whether `true` holds on any rank; every rank gets the same answer, so all take the same branch."""
    if not is_distributed():
        return true
    flag = torch.tensor([float(true)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def diverged_anywhere(loss_value: float, device: torch.device) -> bool:
    """Whether the loss is NaN or infinite on any rank: all stop together."""
    return any_rank(not math.isfinite(loss_value), device)


@contextmanager
def fail_together(device: torch.device):
    """Around a block that may fail on some ranks only (rank 0 saving, loading data): if it raises on any rank,
    every rank raises, instead of the others waiting forever in their next collective. Also a barrier; a
    no-op in a single process. Ctrl-C and SIGTERM pass straight through: they reach every rank anyway."""
    try:
        yield
    except Exception:
        any_rank(True, device)
        raise
    if any_rank(False, device):
        raise UserError("another rank failed (its error is printed above), so this one stops too")


def check_same_flags(mine: dict, place: RankPlace):
    """Under DDP every rank must have been started with the same flags: rank 0's {flag: value} is broadcast and
    compared, and a rank that differs stops every rank with one line (instead of a collective failing later)."""
    if place.world == 1:
        return
    theirs = rank0_value(mine)
    differ = sorted(k for k in mine if mine[k] != theirs.get(k))
    with fail_together(place.device):
        if differ:
            raise UserError(f"rank {place.rank} was started with other flags than rank 0 ({differ[0]}: "
                            f"{mine[differ[0]]!r} here, {theirs.get(differ[0])!r} there); start every process "
                            f"with the same command")


@torch.no_grad()
def average_batchnorm_stats(model: torch.nn.Module):
    """Average BatchNorm running statistics over the ranks (each rank's saw only its own batches), so that every
    rank validates, and rank 0 saves, the same model."""
    if not is_distributed():
        return
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # SyncBatchNorm is not a BatchNorm2d: its statistics agree already
            for t in (m.running_mean, m.running_var):
                all_reduce_sum(t).div_(dist.get_world_size())


def ddp_model(model: torch.nn.Module, place: RankPlace, sync_bn: bool) -> torch.nn.Module:
    """The model wrapped in DistributedDataParallel over several processes (SyncBatchNorm first if asked for, on
    CUDA); the model itself in a single process."""
    if place.world == 1:
        return model
    cuda = place.device.type == "cuda"
    if sync_bn and cuda:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = DistributedDataParallel(model, device_ids=[place.local_rank] if cuda else None)
    # Buffers are broadcast from rank 0 once, here, but not before every forward: the quantiser keeps its buffers
    # identical on every rank itself (all-reduced EMA statistics, restarts broadcast from rank 0), and BatchNorm
    # running statistics are averaged over the ranks once per epoch (average_batchnorm_stats). (Set as an
    # attribute: the constructor argument is deprecated in newer torch and would also skip the broadcast at
    # construction.)
    model.broadcast_buffers = False
    return model
