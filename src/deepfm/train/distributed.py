"""Data parallelism with PyTorch's own engine (DDP), as launched by ``torchrun``.

``torchrun --nproc-per-node N -m deepfm train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment;
:meth:`Distributed.from_env` joins the process group (gloo on CPU, nccl on CUDA). Each rank
trains on its own contiguous shard of the training rows, DDP averages gradients, rank 0 writes
the bundle and the metrics. The paper scales the learning rate by √N for N workers at the same
per-worker batch (``--lr-scaling sqrt``); ``linear`` multiplies by N.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deepfm.data.encoded import EncodedArrays
from deepfm.errors import ConfigError

LR_SCALINGS = ("none", "sqrt", "linear")


def lr_scale(mode: str, world: int) -> float:
    """Factor applied to the learning rate for ``world`` workers."""
    if mode not in LR_SCALINGS:
        raise ConfigError(f"--lr-scaling must be one of {', '.join(LR_SCALINGS)}, not {mode!r}")
    return {"none": 1.0, "sqrt": math.sqrt(world), "linear": float(world)}[mode]


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: ``rank`` of ``world`` (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> Distributed:
        """Join the process group described by torchrun's environment (once per process)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            cuda = device != "cpu" and torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(rank, world, local)

    @classmethod
    def current(cls) -> Distributed:
        """The process group already joined, or a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()

    def device(self, wanted: str = "auto") -> torch.device:
        """``auto``: this rank's GPU if there is one, else the CPU."""
        if wanted == "auto":
            wanted = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(wanted)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("--device cuda: no CUDA device is available")
            if device.index is None:
                device = torch.device("cuda", self.local_rank if self.enabled else 0)
        return device

    # -- data ------------------------------------------------------------------------------------

    def shard(self, data: EncodedArrays) -> EncodedArrays:
        """This rank's contiguous rows (a memory map is only read where its shard is)."""
        if not self.enabled:
            return data
        rows = len(data)
        return data.take(
            slice(rows * self.rank // self.world, rows * (self.rank + 1) // self.world)
        )

    def rows_per_rank(self, rows: int) -> int:
        """Rows every rank trains on per epoch: the smallest shard (equal step counts)."""
        return rows // self.world if self.enabled else rows

    # -- collectives -----------------------------------------------------------------------------

    def gather_rows(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """Concatenate the ranks' shards (rank order) of a 1-D tensor of ``total`` rows."""
        if not self.enabled:
            return local
        longest = -(-total // self.world) + 1
        padded = torch.zeros(longest, dtype=local.dtype, device=local.device)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        bounds = [total * r // self.world for r in range(self.world + 1)]
        return torch.cat([p[: bounds[r + 1] - bounds[r]] for r, p in enumerate(parts)])

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_flag(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's ``flag`` on every rank."""
        if not self.enabled:
            return flag
        value = torch.tensor([int(flag)], device=device)
        dist.broadcast(value, 0)
        return bool(value.item())


@contextmanager
def process_group_session() -> Iterator[None]:
    """Run the block, then leave the process group (if one was joined). After a normal end the
    ranks leave together: a rank that destroys the group while another still has gloo work in
    flight aborts the other ("terminate called without an active exception"). A failed rank
    leaves at once (a barrier could wait forever for ranks that will not come)."""
    try:
        yield
    except BaseException:
        _leave(together=False)
        raise
    _leave(together=True)


def _leave(*, together: bool) -> None:
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
