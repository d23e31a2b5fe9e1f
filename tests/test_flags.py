"""One source of settings on the command line: a flag name means one thing in every command,
the bundle a command reads is ``--bundle`` (``--model`` is its deprecated alias), the data
commands share their format options (``--ratings`` in evaluate and predict too), and the
trainer flags are TrainConfig's fields."""

from __future__ import annotations

import argparse
import collections
import dataclasses
from dataclasses import fields

import pytest

from deepfm.cli import build_parser, config_flags, data_format_from, train_config_from
from deepfm.experiments.runs import TRAIN_KEYS
from deepfm.experiments.study_commands import study_overrides
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


def test_a_flag_named_like_a_config_field_is_read_with_no_list_of_names():
    @dataclasses.dataclass
    class Config:
        alpha: int = 0
        beta: str = "b"

    def add_options(parser):
        parser.add_argument("--alpha", type=int)
        parser.add_argument("--gamma")  # not a field: left to the command

    args = argparse.Namespace(alpha=3, gamma="g")
    assert config_flags(args, add_options, Config) == {"alpha": 3}


def _non_default_trainer_flags() -> tuple[list[str], dict[str, object]]:
    """Every flag of train's trainer groups named like a TrainConfig field, each given a value
    other than its default (argv, {field: parsed value})."""
    argv, expected = [], {}
    names = {f.name for f in fields(TrainConfig)}
    for action in commands()["train"]._actions:
        if action.dest not in names or not action.option_strings:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
            expected[action.dest] = True
            continue
        if action.choices:
            value = next(c for c in action.choices if c != action.default)
        elif action.dest == "device":
            value = "cpu"
        else:
            value = {int: 3, float: 0.25}.get(action.type, "somewhere")
        argv += [flag, str(value)]
        expected[action.dest] = value
    return argv, expected


def test_every_trainer_flag_reaches_trainconfig_and_the_studies_take_the_same_ones():
    argv, expected = _non_default_trainer_flags()
    assert {"epochs", "lr", "compile", "lr_scaling", "resume"} <= set(expected)
    args = build_parser().parse_args(["train", "--data", "x", "--out", "o", *argv])
    config = train_config_from(args)
    assert {name: getattr(config, name) for name in expected} == expected
    # a study reads the same flags, less those a study config may not set (seeds, checkpoints)
    study = build_parser().parse_args(
        ["tune", "--store", "s", "--out", "o", "--embed-dim", "7", "--dropout", "0.2", *argv]
    )
    model, train = study_overrides(study)
    assert model == {"embed_dim": 7, "dropout": 0.2}
    assert train == {k: v for k, v in expected.items() if k in TRAIN_KEYS}
    assert "seed" not in train and "resume" not in train and "epochs" in train
