"""The shipped presets carry the paper's Table III, cell by cell.

The table is written out here (``TABLE_III``), so the check runs from a fresh clone; when the
shared copy of the paper's table (``../shared/paper/table3.md``) is present, it is parsed too and
must say the same.
"""

from __future__ import annotations

import pytest

from conftest import SHARED_DATA
from deepfm.experiments.compare import DISPLAY
from deepfm.models.presets import load_preset

# Table III of the journal paper: activation; KEEP probability; hidden layers.
TABLE_III = """
| model | Criteo-Random | Criteo-Sequential |
|---|---|---|
| DNN | relu; 0.5; 400-400-400 | relu; 0.8; 800-800-800-800-800 |
| FNN | relu; 0.5; 400-400-400 | relu; 0.9; 1100-1000-900-800-700-600-500 |
| IPNN | tanh; 0.5; 400-400-400 | tanh; 0.8; 800-800-800 |
| OPNN | relu; 0.5; 400-400-400 | relu; 0.9; 800-800-800-800-800 |
| PNN* | relu; 0.5; 400-400-400 | relu; 0.8; 800-800-800-800-800 |
| LR & DNN | relu; 0.5; 400-400-400 | relu; 1.0; 1100-1000-900-800-700-600-500 |
| FM & DNN | relu; 0.5; 400-400-400 | tanh; 0.7; 1000-900-800-700-600 |
| DeepFM-D | relu; 0.5; 400-400-400 | relu; 0.9; 800-800-800-800-800-800-800 |
| DeepFM-IP | relu; 0.5; 400-400-400 | relu; 0.8; 800-800-800 |
| DeepFM-OP | relu; 0.5; 400-400-400 | relu; 0.9; 800-800-800-800-800 |
| DeepFM-*P | relu; 0.5; 400-400-400 | relu; 0.8; 800-800-800-800-800 |
"""
PRESETS = {"Criteo-Random": "criteo-random", "Criteo-Sequential": "criteo-sequential"}
REGISTRY_NAME = {label: name for name, label in DISPLAY.items()}

Cell = tuple[str, float, tuple[int, ...]]


def parse_table(text: str) -> dict[str, dict[str, Cell]]:
    """``{column: {registry name: (activation, keep, hidden)}}`` from the Markdown table."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    table: dict[str, dict[str, Cell]] = {column: {} for column in header[1:]}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = REGISTRY_NAME[cells[0]]
        for column, cell in zip(header[1:], cells[1:], strict=True):
            activation, keep, hidden = (part.strip() for part in cell.split(";"))
            table[column][name] = (activation, float(keep), tuple(map(int, hidden.split("-"))))
    return table


def test_the_embedded_table_is_whole():
    table = parse_table(TABLE_III)
    assert set(table) == set(PRESETS)
    for cells in table.values():
        assert len(cells) == 11  # every model of Table IV with a deep part (not LR, not FM)


@pytest.mark.parametrize("column", PRESETS)
def test_presets_hold_table_iii(column):
    preset = load_preset(PRESETS[column])
    assert not preset.assumed
    for name, (activation, keep, hidden) in parse_table(TABLE_III)[column].items():
        config = preset.model_config(name)
        assert config.activation == activation, name
        assert config.hidden == hidden, name
        # the paper's keep probability becomes the drop rate: keep 0.9 -> dropout 0.1
        assert config.dropout == pytest.approx(1.0 - keep, abs=1e-12), name


def test_the_shared_copy_of_the_paper_says_the_same():
    path = SHARED_DATA.parent / "paper" / "table3.md"
    if not path.is_file():
        pytest.skip(f"{path} is absent: checked against the embedded table only")
    assert parse_table(path.read_text(encoding="utf-8")) == parse_table(TABLE_III)
