"""Helpers every step of the data flow uses, written once: the sigmoid that turns logits into
click probabilities (training, evaluation, serving, the simulated market), the sha256 of a file
(sources of a store, files of a bundle and of a checkpoint) and the reading of a settings file
(YAML schemas, study configs and search spaces; the JSON feature map) with precise errors."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from deepfm.errors import ConfigError

#: bytes read at a time when hashing a file
HASH_BLOCK = 8 << 20


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-logits))`` in float64; a very negative logit gives 0 without a warning
    (``exp`` overflows to inf)."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def file_sha256(path: str | Path, stop: threading.Event | None = None) -> str:
    """The hex sha256 of a file's bytes, read in blocks; "" if ``stop`` is set before the end
    (its caller gave up, e.g. on an error elsewhere: a large file is not read on for nothing)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            if stop is not None and stop.is_set():
                return ""
            digest.update(block)
    return digest.hexdigest()


def _read_settings(path: Path, what: str, parse: Callable[[str], Any], kind: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return parse(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except (ValueError, yaml.YAMLError) as exc:  # not UTF-8 (a ValueError), not YAML or JSON
        raise ConfigError(f"{what} {path} is not valid {kind}: {exc}") from None


def read_yaml(path: str | Path, what: str) -> Any:
    """The content of the YAML file ``path``; ``what`` names it in the ConfigError of a file
    that is missing, unreadable, not UTF-8 or not YAML (e.g. ``"the schema file"``)."""
    return _read_settings(Path(path), what, yaml.safe_load, "YAML")


def read_json(path: str | Path, what: str) -> Any:
    """:func:`read_yaml` for a JSON file."""
    return _read_settings(Path(path), what, json.loads, "JSON")
