"""Fully connected stacks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deepfm.errors import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}"
        ) from None


class Dropout(nn.Module):
    """Inverted dropout, ``[*] -> [*]``: each unit is zeroed with probability ``p`` in training
    and the survivors scaled by ``1/(1-p)``.

    The same law as ``nn.Dropout``; on CPU the mask comes from ``torch.rand_like`` compared in
    place, because ``bernoulli_`` costs about 3x as much there (19 vs 6 ms forward and backward
    for a 4096x400 activation: it was the largest cost of a DeepFM training step, see
    BENCHMARKS.md). CUDA keeps PyTorch's fused dropout kernel.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        scaled_keep = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * scaled_keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MLP(nn.Module):
    """``[B, in] -> [B, out]``: (Linear → activation → dropout) per hidden layer, then Linear.

    ``dropout`` is the probability of *dropping* a unit (the paper reports the keep probability:
    keep 0.5 is dropout 0.5, keep 0.9 is dropout 0.1).
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        *,
        out_dim: int = 1,
        activation_name: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout is a drop rate in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = in_dim
        for size in hidden:
            layers += [nn.Linear(width, size), activation(activation_name)]
            if dropout > 0:
                layers.append(Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)
