"""Errors a user can cause. Each message says what went wrong and what to do about it."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any


class DeepFMError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigError(DeepFMError):
    """A bad option, config file or schema."""


class DataError(DeepFMError):
    """Bad input data, located as precisely as the reader knows (file, line, field)."""

    def __init__(
        self,
        reason: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.reason = reason
        self.path = path
        self.line = line
        self.field = field
        self.hint = hint
        where = ":".join(str(p) for p in (path, line) if p is not None)
        parts = [where] if where else []
        if field is not None:
            parts.append(f"field {field!r}")
        prefix = ", ".join(parts)
        message = f"{prefix}: {reason}" if prefix else reason
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class BundleError(DeepFMError):
    """A model bundle that is missing, incomplete, tampered with or of another version."""


class OutputError(DeepFMError):
    """An output that could not be written (a full disk, no permission); nothing partial is
    left behind."""


class DeepFMWarning(UserWarning):
    """Something the user should know that does not stop the command (e.g. an undefined AUC
    written as null). The CLI prints these as one ``warning:`` line each."""


# -- type checks of settings a user gives (YAML, JSON and Python give values of any type) -----


def is_integer(value: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A finite real number (Python or NumPy), not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
