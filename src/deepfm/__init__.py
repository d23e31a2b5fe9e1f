"""deepfm: click-through-rate prediction with the DeepFM framework (Guo et al., journal version)."""

from deepfm.errors import BundleError, ConfigError, DataError, DeepFMError

__version__ = "0.1.0"

__all__ = ["BundleError", "ConfigError", "DataError", "DeepFMError", "__version__"]
