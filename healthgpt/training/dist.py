"""One home for ``torch.distributed``: the trainer and the evaluator both use :class:`Dist`.

Under ``torchrun`` the environment carries ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without it a
run is one process (rank 0 of 1) and every collective is a no-op, so the calling code never
branches on "distributed or not".

Public API::

    world_info() -> (rank, world_size, local_rank)
    Dist(backend=None, timeout=None)      .main .enabled .mean() .sum() .any() .gather() .barrier() .close()
    device_for(spec, local_rank) -> "cpu" | "cuda:N" | spec
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Dist", "device_for", "world_info"]


def world_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from an initialised process group, else the torchrun environment."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return rank, world, int(os.environ.get("LOCAL_RANK", rank))
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def device_for(spec: str, local_rank: int) -> str:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU; ``cuda`` -> this rank's GPU."""
    if spec == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return spec


class Dist:
    """This process's place in the job, and the few collectives the trainer and evaluator need.

    ``backend`` defaults to NCCL when CUDA is available and gloo otherwise; the process group is
    created only when ``WORLD_SIZE > 1`` and none exists yet (then :meth:`close` destroys it).
    ``timeout`` matters for the evaluator, whose ranks finish decoding at very different times.
    """

    def __init__(self, backend: str | None = None, timeout: timedelta | None = None) -> None:
        self.rank, self.world, self.local_rank = world_info()
        self.enabled = self.world > 1 and dist.is_available()
        self.own_group = False
        if self.enabled and not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
            dist.init_process_group(backend, **kwargs)
            self.own_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def mean(self, value: float) -> float:
        return self.sum(value) / self.world if self.enabled else value

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0) > 0

    def gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        if self.own_group and dist.is_initialized():
            dist.destroy_process_group()
