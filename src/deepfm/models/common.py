"""Pieces several model files share."""

from __future__ import annotations

from deepfm.models.registry import ModelConfig
from deepfm.nn import MLP


def deep_mlp(in_dim: int, config: ModelConfig) -> MLP:
    """The deep component's fully connected stack ``[B, in_dim] -> [B, 1]``.

    Hidden sizes, activation and dropout (a drop rate) come from ``config``; dropout is the deep
    component's regulariser, as L2 is the FM component's.
    """
    return MLP(in_dim, config.hidden, activation_name=config.activation, dropout=config.dropout)
