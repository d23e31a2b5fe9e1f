"""Fully connected stacks."""

from __future__ import annotations

from collections.abc import Sequence

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
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)
