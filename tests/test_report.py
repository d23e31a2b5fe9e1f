"""``deepfm report``: one Markdown file with every study's tables and plots, links that resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deepfm.cli import main
from deepfm.errors import ConfigError
from deepfm.experiments.compare import summarize, write_compare
from deepfm.experiments.efficiency import summarize_efficiency, write_efficiency
from deepfm.experiments.report import write_report


def _compare(out: Path) -> None:
    runs = lambda aucs: [  # noqa: E731
        {"seed": s, "test": {"auc": a, "logloss": 0.5 - a / 10}, "best_epoch": 1,
         "train_seconds": 1.0}
        for s, a in enumerate(aucs)
    ]  # fmt: skip
    summary = summarize({"fm": runs([0.70, 0.71]), "dnn": runs([0.72, 0.70]),
                         "deepfm": runs([0.74, 0.75])})  # fmt: skip
    summary["about"] = "fabricated numbers"
    write_compare(summary, out, "A comparison")


def _efficiency(out: Path) -> None:
    run = lambda s: {"train_seconds": s, "epochs_run": 1, "train_samples": 100,  # noqa: E731
                     "setup": {"device": "cpu", "embedding_updates": "dense"}}  # fmt: skip
    summary = summarize_efficiency({"lr": [run(1.0)], "deepfm": [run(4.0)]})
    summary.update(device="cpu", about="fabricated timings")
    write_efficiency(summary, out)


def test_report_links_every_table_and_plot(tmp_path, capsys):
    _compare(tmp_path)
    _efficiency(tmp_path / "cpu")
    assert main(["report", str(tmp_path)]) == 0
    assert "report.md" in capsys.readouterr().out
    text = (tmp_path / "report.md").read_text()
    assert "Model comparison" in text and "Efficiency relative to LR" in text
    assert "fabricated numbers" in text and "| DeepFM-D |" in text  # the tables inline
    # images embedded, sub-directory paths rebased onto the report's folder
    assert "![compare_metrics](compare_metrics.png)" in text
    assert "![efficiency_relative](cpu/efficiency_relative.png)" in text
    for study, folder in (("compare", "."), ("efficiency", "cpu")):
        for suffix in (".json", ".csv", ".md"):
            assert f"({Path(folder, study + suffix).as_posix()})" in text
    assert "cpu/efficiency_relative.json" in text  # the data behind the plot
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links and all((tmp_path / link).is_file() for link in links), links
    assert not re.search(r"^# [^S]", text, flags=re.MULTILINE)  # one top-level heading


def test_report_of_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no study"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
