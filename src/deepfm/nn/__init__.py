"""Building blocks every model is composed of."""

from deepfm.nn.cross import PairCrossLinear, all_field_pairs, resolve_crosses
from deepfm.nn.embedding import (
    FeatureLinear,
    FieldEmbedding,
    InputLayout,
    Regularized,
    regularization,
    set_id_prior,
)
from deepfm.nn.interaction import FMInteraction
from deepfm.nn.mlp import MLP, activation
from deepfm.nn.product import InnerProduct, OuterProduct, ProductLayer

__all__ = [
    "MLP",
    "FMInteraction",
    "FeatureLinear",
    "FieldEmbedding",
    "InnerProduct",
    "InputLayout",
    "OuterProduct",
    "PairCrossLinear",
    "ProductLayer",
    "Regularized",
    "activation",
    "all_field_pairs",
    "regularization",
    "resolve_crosses",
    "set_id_prior",
]
