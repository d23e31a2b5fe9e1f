"""``deepfm models``: registry names, what each model is and, given a feature map, its size."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deepfm.cli import add_flag
from deepfm.errors import ConfigError
from deepfm.models.presets import Preset, load_preset
from deepfm.models.registry import get_entry, model_names, parameter_count

FEATURE_MAP_FILE = "feature_map.json"  # its name inside a bundle directory


def _layout_of(path: str):
    from deepfm.data.featuremap import FeatureMap
    from deepfm.nn import InputLayout

    target = Path(path)
    if target.is_dir():
        target = target / FEATURE_MAP_FILE
        if not target.is_file():
            raise ConfigError(f"{path} is a directory without {FEATURE_MAP_FILE} (not a bundle)")
    return InputLayout.of(FeatureMap.load(target))


def describe_models(
    layout=None, preset: Preset | None = None, **overrides: Any
) -> list[dict[str, Any]]:
    """One record per model: name, description, embedding size, optimiser, pre-training and,
    with a layout, the parameter count under ``preset`` and ``overrides`` (``hidden``, ...)."""
    preset = preset or Preset("none")
    rows = []
    for name in model_names():
        entry = get_entry(name)
        config = preset.model_config(name, **overrides)
        row: dict[str, Any] = {
            "name": name,
            "description": entry.description,
            "embed_dim": None if entry.embed == "none" else entry.embed_dim(config),
            "optimizer": entry.optimizer,
            "pretrain": entry.pretrain,
        }
        if layout is not None:
            row["parameters"] = parameter_count(layout, config)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    with_counts = rows and "parameters" in rows[0]
    width = max(len(r["name"]) for r in rows)
    lines = []
    for r in rows:
        embed = "-" if r["embed_dim"] is None else str(r["embed_dim"])
        train = r["optimizer"] + (f"+{r['pretrain']}" if r["pretrain"] else "")
        count = f"{r['parameters']:>14,}  " if with_counts else ""
        lines.append(f"{r['name']:<{width}}  k={embed:<3} {train:<8} {count}{r['description']}")
    header = f"{'model':<{width}}  {'emb':<5} {'train':<8} "
    header += f"{'parameters':>14}  " if with_counts else ""
    return "\n".join([header + "description", *lines])


def cmd_models(args: argparse.Namespace) -> int:
    layout = _layout_of(args.feature_map) if args.feature_map else None
    preset = load_preset(args.preset) if args.preset else None
    rows = describe_models(layout, preset, hidden=args.hidden, embed_dim=args.embed_dim)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_table(rows))
    if preset is not None and preset.assumed:
        print(f"\nnote: preset {preset.name}: {preset.description}")
    return 0


def register_commands(subparsers) -> None:

    parser = subparsers.add_parser(
        "models", help="list the models; with --feature-map, their parameter counts"
    )
    parser.add_argument(
        "--feature-map",
        metavar="PATH",
        help="a feature_map.json or a bundle directory: count each model's parameters for it",
    )
    add_flag(parser, "--preset", help="count with a preset's settings (criteo-random, ...)")
    add_flag(parser, "--hidden", help="hidden sizes, e.g. 400,400,400")
    add_flag(parser, "--embed-dim", help="override every model's embedding size")
    add_flag(parser, "--json", help="print a JSON list")
    parser.set_defaults(handler=cmd_models)
