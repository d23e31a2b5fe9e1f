"""Our ``deepfm compare --criteo`` results beside the paper's Table IV, as Markdown.

``python benchmarks/criteo_vs_paper.py OUT [OUT_EXTRA ...] --paper ../shared/paper/table4.md``

``OUT`` is the ``--out`` directory of ``deepfm compare --criteo FILE``; more directories (e.g. a
run of ``--models poly2``) add their models' rows. Per protocol (Criteo-Random, -Sequential):
our test AUC and Logloss (mean ± sd over seeds), the paper's, and each model's rank by AUC in
both, so that the order of the models can be compared as well as the levels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy import stats

from deepfm.experiments.compare import CRITEO_PROTOCOLS, display

PAPER_COLUMNS = {"random": "Criteo-Random", "sequential": "Criteo-Sequential"}


def paper_table(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{protocol: {model label: {"auc", "logloss"}}}`` from the paper's Table IV (Markdown)."""
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out: dict[str, dict[str, dict[str, float]]] = {p: {} for p in PAPER_COLUMNS}
    for line in rows[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        for protocol, column in PAPER_COLUMNS.items():
            out[protocol][cells["model"]] = {
                "auc": float(cells[f"AUC {column}"]),
                "logloss": float(cells[f"Logloss {column}"]),
            }
    return out


def ours(directories: list[Path]) -> dict[str, dict[str, dict[str, float]]]:
    """``{protocol: {registry name: summary}}`` from compare outputs (later ones add models)."""
    out: dict[str, dict[str, dict[str, float]]] = {p: {} for p in CRITEO_PROTOCOLS}
    for directory in directories:
        for protocol in CRITEO_PROTOCOLS:
            summary = json.loads((directory / protocol / "compare.json").read_text())
            for name, record in summary["models"].items():
                out[protocol].setdefault(name, record)
    return out


def _pm(record: dict, metric: str) -> str:
    return f"{record[metric + '_mean']:.4f} ± {record[metric + '_std']:.4f}"


def ranks(values: dict[str, float]) -> dict[str, int]:
    """1 = highest."""
    order = sorted(values, key=values.get, reverse=True)
    return {name: order.index(name) + 1 for name in values}


def protocol_table(protocol: str, mine: dict, paper: dict) -> str:
    our_rank = ranks({n: r["auc_mean"] for n, r in mine.items() if display(n) in paper})
    paper_rank = ranks({label: v["auc"] for label, v in paper.items()})
    lines = [
        "| model | AUC (ours) | AUC (paper) | AUC rank ours / paper | Logloss (ours) "
        "| Logloss (paper) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in mine.items():
        label = display(name)
        theirs = paper.get(label)
        cells = [label, _pm(r, "auc")]
        if theirs:
            cells += [f"{theirs['auc']:.4f}", f"{our_rank[name]} / {paper_rank[label]}"]
        else:
            cells += ["–", "–"]
        cells += [_pm(r, "logloss"), f"{theirs['logloss']:.4f}" if theirs else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    shared = list(our_rank)
    theirs = [paper_rank[display(n)] for n in shared]
    rho, p = stats.spearmanr([our_rank[n] for n in shared], theirs)
    lines.append(
        f"\nSpearman correlation of the AUC ranks with the paper's: {rho:+.2f} "
        f"(p = {p:.2f}, {len(shared)} models)"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="+", type=Path, help="compare --criteo output directories")
    parser.add_argument("--paper", type=Path, required=True, help="the paper's table4.md")
    args = parser.parse_args()
    paper, mine = paper_table(args.paper), ours(args.out)
    for protocol in CRITEO_PROTOCOLS:
        print(f"### {PAPER_COLUMNS[protocol]}\n")
        print(protocol_table(protocol, mine[protocol], paper[protocol]) + "\n")


if __name__ == "__main__":
    main()
