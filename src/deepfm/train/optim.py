"""Optimisers the paper's models are trained with: Adam (torch) and FTRL-Proximal for LR."""

from __future__ import annotations

from collections.abc import Iterable

import torch


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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            alpha, beta, l1, l2 = group["alpha"], group["beta"], group["l1"], group["l2"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad
                if g.is_sparse:
                    g = g.to_dense()
                state = self.state[w]
                if not state:
                    state["z"] = torch.zeros_like(w)
                    state["n"] = torch.zeros_like(w)
                z, n = state["z"], state["n"]
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
        return loss
