"""Optimisers the paper's models are trained with: Adam (torch) and FTRL-Proximal for LR."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def closure_loss(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """The loss of an optimiser step's ``closure`` (called with gradients on, as torch's own
    optimisers do inside their ``no_grad`` step), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class FTRL(torch.optim.Optimizer):
    """FTRL-Proximal, per coordinate (McMahan et al., KDD 2013, Algorithm 1).

    For each coordinate with gradient ``g``::

        σ = (sqrt(n + g²) − sqrt(n)) / α
        z ← z + g − σ·w
        n ← n + g²
        w = 0                                             if |z| ≤ λ1
        w = −(z − sign(z)·λ1) / ((β + sqrt(n)) / α + λ2)  otherwise

    The published rule is per example; with mini-batches it expects the gradient of the
    *summed* loss (``sums_loss = True`` tells the trainer), so that one batch moves a weight as
    far as the examples it holds would, and λ1, λ2 keep their per-example meaning.

    A table (a parameter of two or more dimensions, e.g. an embedding's ``[rows, 1]``) is
    updated on the rows with a non-zero gradient only. That is exact: with ``g = 0``, ``σ = 0``
    and ``z``, ``n`` and so ``w = f(z, n)`` stay as they are (for weights that start at
    ``f(0, 0) = 0``, as every FTRL model's do). A step then costs the rows a batch uses, not the
    table: for Poly-2's 2^20 hashed weights on the app market (batch 1024, one thread) 23 ms a
    step instead of 95 ms (BENCHMARKS.md, "Linear baselines").
    """

    sums_loss = True

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        alpha: float = 0.05,
        beta: float = 1.0,
        l1: float = 1.0,
        l2: float = 1.0,
    ) -> None:
        if alpha <= 0 or beta < 0 or l1 < 0 or l2 < 0:
            raise ValueError("FTRL needs alpha > 0 and beta, l1, l2 >= 0")
        super().__init__(params, {"alpha": alpha, "beta": beta, "l1": l1, "l2": l2})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                state = self.state[w]
                if not state:
                    state["z"] = torch.zeros_like(w)
                    state["n"] = torch.zeros_like(w)
                z, n = state["z"], state["n"]
                g = w.grad
                if g.is_sparse:  # row-sparse (an embedding's): its rows; otherwise dense
                    g = g.coalesce() if g.sparse_dim() == 1 else g.to_dense()
                if g.is_sparse:
                    rows, g = g.indices()[0], g.values()
                elif w.dim() >= 2:
                    rows = g.reshape(len(g), -1).ne(0).any(dim=1).nonzero().squeeze(1)
                    g = g[rows]
                else:
                    ftrl_update(w, z, n, g, group)
                    continue
                w_rows, z_rows, n_rows = w[rows], z[rows], n[rows]
                ftrl_update(w_rows, z_rows, n_rows, g, group)
                for full, part in ((w, w_rows), (z, z_rows), (n, n_rows)):
                    full.index_copy_(0, rows, part)
        return loss


def ftrl_update(w: torch.Tensor, z: torch.Tensor, n: torch.Tensor, g: torch.Tensor, group) -> None:
    """One FTRL-Proximal step of the coordinates ``w`` (state ``z``, ``n``; all updated in
    place) with gradient ``g``."""
    alpha, beta, l1, l2 = group["alpha"], group["beta"], group["l1"], group["l2"]
    n_new = n + g * g
    sigma = (n_new.sqrt() - n.sqrt()) / alpha
    z.add_(g - sigma * w)
    n.copy_(n_new)
    shrunk = z - torch.sign(z) * l1
    w.copy_(
        torch.where(
            z.abs() <= l1,
            torch.zeros_like(w),
            -shrunk / ((beta + n.sqrt()) / alpha + l2),
        )
    )
