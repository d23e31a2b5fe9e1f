"""The README's Python examples run as written: every ```python block, in order, in one
namespace, in a folder holding what they read (``train.txt``: generated Criteo rows;
``runs/criteo``: a small bundle trained on them)."""

from __future__ import annotations

import re
import shutil

from conftest import REPO
from serve_helpers import criteo_bundle

#: enough rows for every model of the examples to train, few enough to keep the test quick
ROWS = 3000


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_every_python_example_of_the_readme_runs(tmp_path, monkeypatch, generated_criteo):
    blocks = python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 4  # the predictor, the estimator, cross-validation, serving
    assert any("CTRClassifier" in block for block in blocks)
    lines = generated_criteo.train.read_text().splitlines(keepends=True)
    (tmp_path / "train.txt").write_text("".join(lines[:ROWS]))
    shutil.copytree(criteo_bundle(str(generated_criteo.train)), tmp_path / "runs" / "criteo")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    assert (tmp_path / "runs" / "notebook" / "bundle.json").exists()
    assert namespace["search"].best_params_["embed_dim"] in (4, 10)
