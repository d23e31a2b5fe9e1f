"""Helpers shared by the study tests: a tiny store of the simulated app market, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

from deepfm.experiments.runs import prepare_market_store

#: rows of the test store: ~2.4k train / 300 valid / 300 test, a second or two per tiny run
MARKET_ROWS = 3000
#: a tiny model and a short training, enough to exercise every step of a study
TINY = ["--hidden", "8", "--epochs", "2", "--batch-size", "256", "--quiet", "--threads", "1"]


def market_store(directory: Path, rows: int = MARKET_ROWS, split: str = "random:0.9") -> Path:
    return prepare_market_store(directory / "store", rows, seed=0, split=split)


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def assert_plot_with_data(png: Path) -> dict:
    """A PNG exists and the data behind it is saved beside it as JSON; returns that data."""
    assert png.is_file() and png.stat().st_size > 1000, png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = png.with_suffix(".json")
    assert data.is_file(), f"no data beside {png}"
    return read_json(data)
