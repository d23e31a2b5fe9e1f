"""One source of settings on the command line: a flag name means one thing in every command,
the bundle a command reads is ``--bundle`` (``--model`` is its deprecated alias), the data
commands share their format options (``--ratings`` in evaluate and predict too), and the
trainer flags are TrainConfig's fields."""

from __future__ import annotations

import argparse
import collections
from dataclasses import fields

import pytest

from deepfm.cli import build_parser, data_format_from, train_config_from
from deepfm.train.trainer import TrainConfig

#: flag names with a second meaning, and why it stays
SECOND_MEANINGS = {
    # export writes a file: --format is the output's (onnx); elsewhere the input data's
    "--format": {"export"},
    # the former name of --bundle, kept as a deprecated alias (train/studies: a registry name)
    "--model": {"evaluate", "predict", "serve", "rank", "export"},
}


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_each_flag_name_has_one_meaning_across_commands():
    meanings = collections.defaultdict(lambda: collections.defaultdict(set))
    for name, parser in commands().items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and name not in SECOND_MEANINGS.get(flag, ()):
                    kind = (action.dest, action.type, type(action), tuple(action.choices or ()))
                    meanings[flag][kind].add(name)
    several = {flag: dict(kinds) for flag, kinds in meanings.items() if len(kinds) > 1}
    assert not several, several


@pytest.mark.parametrize("command", ["evaluate", "predict", "serve", "rank", "export"])
def test_bundle_commands_take_bundle_and_the_deprecated_model(command, capsys):
    extra = {"evaluate": ["--data", "x"], "predict": ["--data", "x", "--out", "p"]}
    extra.update({"rank": ["--candidates", "c.json"], "export": ["--out", "m.onnx"]})
    parser = build_parser()
    args = parser.parse_args([command, "--bundle", "runs/b", *extra.get(command, [])])
    assert args.bundle == "runs/b" and "deprecated" not in capsys.readouterr().err
    args = parser.parse_args([command, "--model", "runs/b", *extra.get(command, [])])
    assert args.bundle == "runs/b" and "use --bundle DIR" in capsys.readouterr().err


def test_evaluate_and_predict_read_movielens_ratings_held_out_in_another_file():
    parser = build_parser()
    for argv in (["evaluate"], ["predict", "--out", "p.txt"]):
        args = parser.parse_args(
            [*argv, "--bundle", "b", "--data", "ml-100k", "--format", "movielens-100k",
             "--ratings", "ua.test"]
        )  # fmt: skip
        assert data_format_from(args).ratings == "ua.test"


def test_trainer_flags_are_trainconfig_fields():
    args = build_parser().parse_args(["train", "--data", "x", "--out", "o", "--epochs", "7"])
    config = train_config_from(args)
    assert config.epochs == 7
    names = {f.name for f in fields(TrainConfig)}
    train_parser = commands()["train"]
    groups = [g for g in train_parser._action_groups if g.title in ("training", "speed, scale "
              "and checkpoints")]  # fmt: skip
    dests = {a.dest for g in groups for a in g._group_actions} - {"quiet"}
    assert dests <= names, dests - names


def test_no_flag_is_defined_in_two_places():
    """A flag several commands take is defined once (``cli.FLAGS``, ``add_flag``) or by one
    option function (``add_model_options``, ``add_train_options``, ``add_format_options``, ...);
    ``add_argument("--x")`` appears once per name in the source."""
    import ast

    from conftest import REPO

    sites = collections.Counter()
    for path in (REPO / "src" / "deepfm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).startswith("--")
            ):
                sites[node.args[0].value] += 1
    twice = {flag: n for flag, n in sites.items() if n > 1 and flag not in SECOND_MEANINGS}
    assert not twice, twice
