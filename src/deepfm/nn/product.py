"""PNN's product layer (Qu et al., 2016): linear signals ``z`` and quadratic signals ``p``.

The first hidden layer of a PNN reads ``[z, p]`` (DeepFM paper, Eq. 9): ``z = [e_1, ..., e_m]``
and ``p`` the pairwise products of the field embeddings, inner (IPNN), outer (OPNN) or both
(PNN*). A linear layer on the concatenation equals the PNN paper's ``l_z + l_p + b``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deepfm.errors import ConfigError


class InnerProduct(nn.Module):
    """``p = (<e_i, e_j>)_{i<j}``: ``[B, F, k] -> [B, F(F-1)/2]``, pairs in row-major ``i<j`` order.

    Computed as the upper triangle of the Gram matrix ``e eᵀ`` (``[B, F, F]``), which needs
    ``F²`` rather than ``F²·k/2`` floats per sample of intermediate memory.
    """

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("pairs", rows * num_fields + cols, persistent=False)
        self.out_dim = num_fields * (num_fields - 1) // 2

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        gram = torch.bmm(e, e.transpose(1, 2))  # [B, F, F]
        return gram.flatten(1)[:, self.pairs]


class OuterProduct(nn.Module):
    """``p = f_Σ f_Σᵀ`` with ``f_Σ = Σ_i e_i`` (PNN's sum-pooled outer product, ``k×k``).

    ``[B, F, k] -> [B, k·k]``, flattened row-major. Sum pooling replaces the ``F(F-1)/2``
    outer products ``e_i e_jᵀ`` (each ``k×k``) by one, which is what makes OPNN affordable.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim * dim

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        f = e.sum(dim=1)  # [B, k]
        return (f.unsqueeze(2) * f.unsqueeze(1)).flatten(1)


PRODUCTS = ("inner", "outer")


class ProductLayer(nn.Module):
    """``[z, p_inner?, p_outer?]``: ``[B, F, k] -> [B, out_dim]`` with ``z = [e_1, ..., e_m]``.

    ``products`` is a subset of ``("inner", "outer")``; empty gives ``z`` alone (a DNN's input).
    """

    def __init__(self, num_fields: int, dim: int, products: Sequence[str] = ()) -> None:
        super().__init__()
        unknown = set(products) - set(PRODUCTS)
        if unknown:
            raise ConfigError(f"unknown products {sorted(unknown)}; choose from {PRODUCTS}")
        blocks = {"inner": lambda: InnerProduct(num_fields), "outer": lambda: OuterProduct(dim)}
        # fixed order (inner before outer) whatever the order asked for
        self.products = nn.ModuleList(blocks[name]() for name in PRODUCTS if name in products)
        self.out_dim = num_fields * dim + sum(p.out_dim for p in self.products)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        parts = [e.flatten(1), *(p(e) for p in self.products)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # z alone: no copy
