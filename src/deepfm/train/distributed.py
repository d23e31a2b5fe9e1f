"""Data parallelism with PyTorch's own engine (DDP), as launched by ``torchrun``.

``torchrun --nproc-per-node N -m deepfm train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment;
:meth:`Distributed.from_env` joins the process group (gloo on CPU, nccl on CUDA), each rank on
the GPU of its ``LOCAL_RANK``. Each rank trains on its own contiguous shard of the training rows,
DDP averages gradients, rank 0 writes the bundle and the metrics. The paper scales the learning
rate by √N for N workers at the same per-worker batch (``--lr-scaling sqrt``); ``linear``
multiplies by N.

Embedding tables with sparse (row) updates are left out of DDP: their gradients are averaged by
:meth:`Distributed.average_row_gradients`, which exchanges only the rows a step touched (NCCL
cannot all-reduce sparse tensors at all, and a dense all-reduce of a 10M-row table moves
440 MB per step, see BENCHMARKS.md).
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
from deepfm.train.lazy_adam import coalesced_rows

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
        """``auto``: this rank's GPU if there is one, else the CPU. Under torchrun every rank
        takes the GPU of its ``LOCAL_RANK`` (an explicit other index would put several ranks
        on one GPU: refused)."""
        if wanted == "auto":
            wanted = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(wanted)
        except RuntimeError:
            raise ConfigError(f"--device {wanted!r}: use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("--device cuda: no CUDA device is available")
            mine = self.local_rank if self.enabled else 0
            if self.enabled and device.index not in (None, mine):
                raise ConfigError(
                    f"--device {wanted} under torchrun: each rank uses the GPU of its "
                    f"LOCAL_RANK (this rank: cuda:{mine}); give --device cuda, and choose the "
                    "GPUs with CUDA_VISIBLE_DEVICES"
                )
            device = torch.device("cuda", mine if device.index is None else device.index)
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

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over the ranks (every rank gets it)."""
        if not self.enabled:
            return value
        total = value.clone()
        dist.all_reduce(total)
        return total

    def any_true(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is true on some rank (every rank gets the same answer); ``device``
        is the one this rank's collectives run on."""
        if not self.enabled:
            return flag
        return bool(self.sum(torch.tensor(int(flag), device=device)) > 0)

    def average_row_gradients(self, parameters: list[torch.Tensor]) -> None:
        """Average the sparse row gradients of ``parameters`` (``[rows, dim]`` tables) over the
        ranks, as DDP averages dense ones, by exchanging only the rows each rank touched.

        Each rank sums its duplicate rows (coalesce); all-gathers of dense tensors (the row
        counts, then per table the row ids and the gradient rows, padded to the longest rank)
        bring every rank's rows to every rank, where they are summed and divided by the world
        size. Dense collectives only: NCCL and gloo alike.
        """
        if not self.enabled or not parameters:
            return
        local = [_coalesced_rows(p) for p in parameters]
        counts = torch.tensor([len(ids) for ids, _ in local], device=parameters[0].device)
        per_table = self._gather_padded(counts, len(counts)).view(self.world, -1).T.tolist()
        for parameter, (ids, values), per_rank in zip(parameters, local, per_table, strict=True):
            longest, dim = max(per_rank), parameter.shape[1]
            if longest == 0:  # no rank touched this table (every rank sees the same counts)
                parameter.grad = None
                continue
            all_ids = self._gather_padded(ids, longest).view(self.world, longest)
            all_values = self._gather_padded(values.reshape(-1), longest * dim)
            all_values = all_values.view(self.world, longest, dim)
            merged = torch.sparse_coo_tensor(
                torch.cat([all_ids[r, :n] for r, n in enumerate(per_rank)]).unsqueeze(0),
                torch.cat([all_values[r, :n] for r, n in enumerate(per_rank)]),
                parameter.shape,
            )
            rows, grads = coalesced_rows(merged)
            parameter.grad = torch.sparse_coo_tensor(
                rows.unsqueeze(0), grads.div_(self.world), parameter.shape, is_coalesced=True
            )

    def _gather_padded(self, local: torch.Tensor, longest: int) -> torch.Tensor:
        """Every rank's 1-D ``local`` padded to ``longest``, concatenated in rank order."""
        padded = local.new_zeros(longest)
        padded[: len(local)] = local
        out = local.new_empty(longest * self.world)
        dist.all_gather_into_tensor(out, padded)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_(self, tensor: torch.Tensor) -> None:
        """Rank 0's ``tensor`` on every rank, in place."""
        if self.enabled:
            dist.broadcast(tensor, 0)

    def broadcast_flag(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's ``flag`` on every rank."""
        if not self.enabled:
            return flag
        value = torch.tensor([int(flag)], device=device)
        dist.broadcast(value, 0)
        return bool(value.item())


def _coalesced_rows(parameter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row ids ``[n]``, gradient rows ``[n, dim]``) of a parameter's sparse gradient, each row
    once (none when it has no gradient)."""
    grad = parameter.grad
    if grad is None:
        return (
            torch.zeros(0, dtype=torch.int64, device=parameter.device),
            parameter.new_zeros(0, parameter.shape[1]),
        )
    assert grad.is_sparse, "row exchange is for sparse gradients"
    return coalesced_rows(grad)


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
