"""Models by name (see :mod:`deepfm.models.registry`)."""

from deepfm.models.registry import (
    BASE_EMBED_DIM,
    ModelConfig,
    ModelEntry,
    build_model,
    count_parameters,
    get_entry,
    model_names,
    parameter_count,
)

__all__ = [
    "BASE_EMBED_DIM",
    "ModelConfig",
    "ModelEntry",
    "build_model",
    "count_parameters",
    "get_entry",
    "model_names",
    "parameter_count",
]
