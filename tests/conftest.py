"""Shared fixtures.

Tests that only need Criteo-shaped data read *generated* Criteo files (``criteo_train``,
``criteo_test``, ``criteo_test_unlabeled``, ``criteo_csv``: ``benchmarks/make_criteo.py``'s
generator, seeded, written once per test session), so the suite runs from a fresh clone. Only
the checks *about* the real samples read ../shared/data (``shared_file``,
``real_criteo_train``; never committed to this repo) and skip with the reason when the folder
is absent. Set DEEPFM_SHARED_DATA to point elsewhere.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DEEPFM_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "benchmarks"))  # make_criteo: the Criteo-format generator

#: rows of the generated Criteo file: as many as the real sample's, so that step counts per
#: epoch are the same, enough for a model to learn the planted effects within an epoch or two
CRITEO_ROWS = 11_212
CRITEO_TEST_ROWS = 2_000
CRITEO_CSV_ROWS = 200
#: values per field: with --min-count 10 most frequent values get ids, the tail goes to OOV
CRITEO_VOCAB_CAP = 2_000

# fixed thread count: float summation order, and so results, depend on it
torch.set_num_threads(2)


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data {path} is absent (set DEEPFM_SHARED_DATA to the shared data dir)")
    return path


@dataclass(frozen=True)
class CriteoFiles:
    """Generated Criteo-format files of one generator (one vocabulary, one click model): the
    training file, held-out rows with and without labels (Kaggle TSV), and headered CSV."""

    train: Path
    test: Path
    test_unlabeled: Path
    csv: Path


def write_criteo_files(directory: Path) -> CriteoFiles:
    import pyarrow.csv as pa_csv

    from make_criteo import CriteoGenerator, write_tsv

    directory.mkdir(parents=True, exist_ok=True)
    files = CriteoFiles(*(directory / n for n in ("train.txt", "test.txt", "test-x.txt", "s.csv")))
    generator = CriteoGenerator(0, vocab_cap=CRITEO_VOCAB_CAP)
    write_tsv(files.train, [generator.table(CRITEO_ROWS)])
    held_out = generator.table(CRITEO_TEST_ROWS)
    write_tsv(files.test, [held_out])
    write_tsv(files.test_unlabeled, [held_out.drop_columns(["label"])])
    pa_csv.write_csv(generator.table(CRITEO_CSV_ROWS), files.csv)
    return files


@pytest.fixture(scope="session")
def generated_criteo(tmp_path_factory) -> CriteoFiles:
    """Written once per session (a few tenths of a second), shared read-only by the tests."""
    return write_criteo_files(tmp_path_factory.mktemp("criteo"))


@pytest.fixture
def criteo_train(generated_criteo) -> Path:
    return generated_criteo.train


@pytest.fixture
def criteo_test(generated_criteo) -> Path:
    """Labeled held-out rows of the training file's generator."""
    return generated_criteo.test


@pytest.fixture
def criteo_test_unlabeled(generated_criteo) -> Path:
    return generated_criteo.test_unlabeled


@pytest.fixture
def criteo_csv(generated_criteo) -> Path:
    return generated_criteo.csv


@pytest.fixture
def real_criteo_train() -> Path:
    """The real Criteo sample: only for checks about the real data."""
    return shared_file("criteo", "criteo_train_sample.txt")


def criteo_line(label: int | None = 0, ints=None, cats=None) -> str:
    """One Criteo TSV line; ``ints``/``cats`` override the default values."""
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{i:08x}" for i in range(26)]
    cells = ([] if label is None else [str(label)]) + list(ints) + list(cats)
    return "\t".join(cells) + "\n"
