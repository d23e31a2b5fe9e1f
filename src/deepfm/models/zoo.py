"""Imports every model module; ``deepfm models`` lists them in this order (the paper's Table IV)."""

from deepfm.models import deepfm, dnn, fm, lr, pnn, wide_deep

MODULES = (lr, fm, dnn, pnn, wide_deep, deepfm)
