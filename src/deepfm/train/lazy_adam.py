"""Adam on the rows a batch uses ("lazy" Adam) for embedding tables with sparse gradients.

For each row ``r`` with a gradient in this step (duplicates summed), with step count ``t``::

    m_r ← β1·m_r + (1−β1)·g_r        v_r ← β2·v_r + (1−β2)·g_r²
    w_r ← w_r − lr · (m_r / (1−β1^t)) / (sqrt(v_r / (1−β2^t)) + ε)

Rows absent from the batch keep their weights and moments (dense Adam would still move them
with their decaying momentum). The same rule as ``torch.optim.SparseAdam``, written with
``index_select`` / ``index_copy_`` on the touched rows only: on CPU SparseAdam's sparse-dense
additions cost more than a dense Adam step over a 600k-row table (see BENCHMARKS.md), these
gathers cost a few milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from deepfm.nn.cpu_kernels import scatter_add_rows
from deepfm.train.optim import closure_loss


def coalesced_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row ids ``[n]`` sorted and unique, summed gradient rows ``[n, dim]``) of a sparse
    gradient ``[rows, dim]``: ``torch.unique`` and a scatter, half the time of
    ``Tensor.coalesce`` on CPU for a batch's 4096 x 39 ids (BENCHMARKS.md), same sums."""
    if grad.is_coalesced():
        return grad.indices()[0], grad.values()
    rows, inverse = torch.unique(grad._indices()[0], sorted=True, return_inverse=True)
    return rows, scatter_add_rows(inverse, grad._values(), len(rows))


class LazyAdam(torch.optim.Optimizer):
    """Row-wise Adam for parameters whose gradients are sparse COO tensors (``nn.Embedding``
    with ``sparse=True``)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError("LazyAdam needs lr > 0, eps > 0 and betas in [0, 1)")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for weight in group["params"]:
                if weight.grad is None:
                    continue
                grad = weight.grad
                if not grad.is_sparse:
                    raise RuntimeError(
                        "LazyAdam expects sparse gradients (nn.Embedding(sparse=True))"
                    )
                rows, values = coalesced_rows(grad)  # duplicates summed, rows sorted
                state = self.state[weight]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(weight)
                    state["exp_avg_sq"] = torch.zeros_like(weight)
                state["step"] += 1
                t = float(state["step"])
                m = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - beta1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2)
                v.addcmul_(values, values, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                denominator = v.div_(1 - beta2**t).sqrt_().add_(group["eps"])
                update = m.div_(denominator).mul_(-group["lr"] / (1 - beta1**t))
                # rows are unique after coalesce: a gather and a copy beat index_add_'s scatter
                weight.index_copy_(0, rows, weight.index_select(0, rows).add_(update))
        return loss
