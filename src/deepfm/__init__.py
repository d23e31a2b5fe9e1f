"""deepfm: click-through-rate prediction with the DeepFM framework (Guo et al., journal version)."""

from typing import Any

from deepfm.errors import BundleError, ConfigError, DataError, DeepFMError

__version__ = "0.1.0"

__all__ = ["BundleError", "CTRClassifier", "ConfigError", "DataError", "DeepFMError", "__version__"]


def __getattr__(name: str) -> Any:
    """``deepfm.CTRClassifier`` imports torch and scikit-learn on first use only, so that
    ``import deepfm`` (and the streaming ``deepfm prepare``) stays light."""
    if name == "CTRClassifier":
        from deepfm.api import CTRClassifier

        return CTRClassifier
    raise AttributeError(f"module 'deepfm' has no attribute {name!r}")
