"""Feature interactions over field embeddings ``e`` of shape ``[B, F, k]``."""

from __future__ import annotations

import torch
from torch import nn


class FMInteraction(nn.Module):
    """``Σ_{i<j} <e_i, e_j>`` in O(F·k) as ``½ Σ_d [(Σ_i e_id)² − Σ_i e_id²]``.

    ``[B, F, k] -> [B]``.
    """

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        square_of_sum = e.sum(dim=1).pow(2)
        sum_of_squares = e.pow(2).sum(dim=1)
        return 0.5 * (square_of_sum - sum_of_squares).sum(dim=1)
