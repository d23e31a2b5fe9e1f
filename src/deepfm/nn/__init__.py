"""Building blocks every model is composed of."""

from deepfm.nn.embedding import (
    FeatureLinear,
    FieldEmbedding,
    InputLayout,
    Regularized,
    regularization,
)
from deepfm.nn.interaction import FMInteraction
from deepfm.nn.mlp import MLP, activation

__all__ = [
    "MLP",
    "FMInteraction",
    "FeatureLinear",
    "FieldEmbedding",
    "InputLayout",
    "Regularized",
    "activation",
    "regularization",
]
