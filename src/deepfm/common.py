"""Two helpers every step of the data flow uses, written once: the sigmoid that turns logits
into click probabilities (training, evaluation, serving, the simulated market) and the sha256
of a file (sources of a store, files of a bundle and of a checkpoint)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

#: bytes read at a time when hashing a file
HASH_BLOCK = 8 << 20


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-logits))`` in float64; a very negative logit gives 0 without a warning
    (``exp`` overflows to inf)."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()
