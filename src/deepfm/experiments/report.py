"""``deepfm report RUN_DIR``: one Markdown file, ``RUN_DIR/report.md``, with every study found in
``RUN_DIR`` and its sub-directories (compare, efficiency, sweep, tune, workers): each study's
tables inline, its plots embedded, and links to its JSON and CSV files."""

from __future__ import annotations

import re
import time
from pathlib import Path

from deepfm.errors import ConfigError
from deepfm.outputs import write_text

REPORT = "report.md"
TITLE = "# Study report: "
STUDIES = ("compare", "efficiency", "sweep", "tune", "workers")
TITLES = {
    "compare": "Model comparison (Tables IV and V)",
    "efficiency": "Efficiency relative to LR (Fig. 9)",
    "sweep": "Hyper-parameter study (Fig. 10-14)",
    "tune": "Hyper-parameter search",
    "workers": "Multi-worker learning curves (Fig. 6)",
}
#: folders that hold runs or data, never studies
SKIP = {"runs", "stores"}
MAX_DEPTH = 3
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def find_studies(run_dir: Path) -> list[tuple[Path, str]]:
    """(folder relative to ``run_dir``, study) for every ``<study>.md`` found, shallow first."""
    found = []

    def visit(folder: Path, depth: int) -> None:
        for study in STUDIES:
            if (folder / f"{study}.md").is_file():
                found.append((folder.relative_to(run_dir), study))
        if depth < MAX_DEPTH:
            for child in sorted(p for p in folder.iterdir() if p.is_dir()):
                if child.name not in SKIP and not child.name.startswith("."):
                    visit(child, depth + 1)

    visit(run_dir, 0)
    return found


def _rebase(text: str, folder: Path) -> str:
    """Relative links of a study's Markdown, made relative to the report's folder."""
    if str(folder) == ".":
        return text

    def fix(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^[a-z]+://|^/|^#", target):
            return match.group(0)
        return f"{match.group(1)}{(folder / target).as_posix()}{match.group(3)}"

    return _LINK.sub(fix, text)


def _demote(text: str) -> str:
    """Headings two levels down: under the report's own sections (level 2)."""
    return re.sub(r"^(#+) ", lambda m: "##" + m.group(1) + " ", text, flags=re.MULTILINE)


def study_section(run_dir: Path, folder: Path, study: str) -> str:
    where = run_dir / folder
    text = _rebase((where / f"{study}.md").read_text(encoding="utf-8"), folder)
    label = TITLES[study] + ("" if str(folder) == "." else f": `{folder.as_posix()}`")
    lines = [f"## {label}", ""]
    files = [
        f"[{name}]({(folder / name).as_posix()})"
        for name in (f"{study}.json", f"{study}.csv", f"{study}.md")
        if (where / name).is_file()
    ]
    lines += ["Files: " + ", ".join(files), ""]
    lines += [_demote(text).strip(), ""]
    for plot in sorted(where.glob(f"{study}*.png")):
        link = (folder / plot.name).as_posix()
        data = plot.with_suffix(".json")
        data_link = (folder / data.name).as_posix()
        if link not in text:
            lines += [f"![{plot.stem}]({link})", ""]
        if data.is_file():
            lines += [
                f"Data behind [{plot.name}]({link}): [{data.name}]({data_link})",
                "",
            ]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.md`` from the studies found there; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory (give the --out of a study)")
    studies = find_studies(run_dir)
    if not studies:
        raise ConfigError(
            f"no study in {run_dir}: expected {', '.join(s + '.md' for s in STUDIES)} in it or "
            "in its sub-directories (run deepfm compare/efficiency/sweep/tune/workers first)"
        )
    lines = [
        f"{TITLE}{run_dir.name}",
        "",
        f"Written by `deepfm report` on {time.strftime('%Y-%m-%d %H:%M %Z')}. Studies:",
        "",
    ]
    for folder, study in studies:
        where = "" if str(folder) == "." else f" (`{folder.as_posix()}`)"
        lines.append(f"- {TITLES[study]}{where}")
    lines.append("")
    lines += [study_section(run_dir, folder, study) for folder, study in studies]
    path = run_dir / REPORT
    if path.exists() and not path.read_text(encoding="utf-8", errors="replace").startswith(TITLE):
        raise ConfigError(f"{path} exists and was not written by deepfm report: move it first")
    return write_text(path, "\n".join(lines))
