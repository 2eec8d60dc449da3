"""torchrun support: one process per device, gloo on CPU and nccl on GPU; rank 0 writes.

Every rank reads the whole data set, so the size of each global batch is known everywhere
and the loss can be normalised by it without communication; only gradients (by
DistributedDataParallel) and the logged metrics are summed across ranks.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from ..errors import IA3Error


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers across ranks (float64, so counts stay exact)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str | None = None) -> Dist:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise IA3Error(f"--device {device}: this torch sees no CUDA device; use --device cpu or a CUDA build of torch")
    if cuda:
        target = torch.device(device if device and ":" in device else f"cuda:{local_rank}")
        torch.cuda.set_device(target)
    else:
        target = torch.device(device or "cpu")
    if world == 1:
        return Dist(device=target)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=target, owns_group=owns)
