"""Imports every model module, in the order ``deepfm models`` lists them."""

from deepfm.models import deepfm, fm, lr  # noqa: F401
