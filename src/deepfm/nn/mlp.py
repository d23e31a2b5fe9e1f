"""Fully connected stacks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deepfm.errors import ConfigError
from deepfm.nn.cpu_kernels import dropout, relu_dropout

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

    The same law as ``nn.Dropout``. On CPU the mask comes from the counter-based stream of
    :mod:`deepfm.nn.cpu_kernels` (PyTorch's CPU masks come from one single-threaded Mersenne
    Twister: the largest cost of a DeepFM step after the matmuls, see BENCHMARKS.md); CUDA keeps
    PyTorch's fused dropout kernel.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return F.dropout(x, self.p, training=True)  # a compiler fuses it itself
        return dropout(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MLP(nn.Module):
    """``[B, in] -> [B, out]``: (Linear → activation → dropout) per hidden layer, then Linear.

    ``dropout`` is the probability of *dropping* a unit (the paper reports the keep probability:
    keep 0.5 is dropout 0.5, keep 0.9 is dropout 0.1). In eager training on CPU, ReLU and
    dropout run as one fused pass (:func:`~deepfm.nn.cpu_kernels.relu_dropout`); under
    ``torch.compile`` the compiler fuses PyTorch's own ops.
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
        self.fused_relu_dropout = activation_name == "relu" and dropout > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fuse = self.training and self.fused_relu_dropout and x.device.type == "cpu"
        if not fuse or torch.compiler.is_compiling():
            return self.layers(x)
        *hidden, last = self.layers
        for linear, drop in zip(hidden[0::3], hidden[2::3], strict=True):
            x = relu_dropout(linear(x), drop.p)
        return last(x)
