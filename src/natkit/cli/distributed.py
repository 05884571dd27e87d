"""torchrun / DistributedDataParallel plumbing: one process per device.

Under ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the environment) the process
group uses NCCL on GPU and Gloo on CPU; without it everything runs as a world of one.
Only rank 0 logs and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .common import CLIError


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(name: Optional[str]) -> torch.device:
    """``auto``/None -> cuda if available else cpu; otherwise validates the name."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"--device {name!r} is not a device name ({err}); use auto, cpu, "
                       f"cuda or cuda:N") from None
    if device.type == "meta":
        raise CLIError(f"--device {name!r} holds no data; use auto, cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):  # mps, xpu, ...: the portable backend runs there
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CLIError(f"--device {name!r} is not available on this machine "
                           f"({reason[:120]})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name!r}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name!r}: this machine has {torch.cuda.device_count()} "
                       f"CUDA device(s)")
    return device


def setup(device_name: Optional[str] = None) -> Dist:
    """Initializes the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local_rank, device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        if d.device.type == "cuda":
            dist.barrier(device_ids=[d.device.index])
        else:
            dist.barrier()


def all_sum(d: Dist, values: list[float]) -> list[float]:
    """Sums a list of numbers over ranks (float64 for exact counts)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(d: Dist, obj):
    """Every rank's ``obj`` (a picklable value), in rank order."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(d: Dist, obj):
    """Rank 0's ``obj`` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation sampler: rank r takes items r, r+world, ... (no padding, no duplicates,
    so summed counts are exact)."""

    def __init__(self, n: int, d: Dist):
        self.indices = list(range(d.rank, n, d.world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
