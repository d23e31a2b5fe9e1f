"""``deepfm tune``: hyper-parameter search with Optuna (TPE sampler, median pruning on the
validation AUC of each epoch) over a declared search space; the best trial is saved as a study
config (``best.yaml``) that ``compare``, ``sweep``, ``efficiency`` and ``workers`` take as
``--config``.

A search space is a YAML mapping from parameter to its range::

    lr: {low: 1.0e-4, high: 1.0e-2, log: true}     # float
    batch_size: {choices: [256, 512, 1024]}
    keep_prob: {low: 0.5, high: 1.0, step: 0.1}     # the paper's keep probability
    hidden: {choices: [[200, 200, 200], [400, 400, 400]]}
    embed_dim: {low: 4, high: 16}                   # integer
    l2: {low: 1.0e-7, high: 1.0e-3, log: true}
    activation: {choices: [relu, tanh]}

Model parameters: ``embed_dim``, ``hidden`` (or ``layers`` and ``neurons``), ``activation``,
``keep_prob``, ``l2``; training parameters: ``lr``, ``batch_size``, ``lr_decay``. Trials are kept in
``OUT/tune.db`` (SQLite): running the same command again continues the study up to ``--trials``.

``deepfm train --auto MINUTES`` (:func:`auto_train`) searches with the same space language and
sampler, in memory, within a time box, around the model's own settings, and keeps the chosen
trial's trained model for the bundle.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from deepfm.common import read_yaml
from deepfm.data.pipeline import Dataset
from deepfm.errors import ConfigError
from deepfm.experiments.runs import (
    StudyConfig,
    canonical,
    fit_run,
    fmt,
    markdown_table,
    open_study_store,
    write_csv,
    write_json,
)
from deepfm.experiments.study_plots import trial_history
from deepfm.models.presets import dropout_of
from deepfm.models.registry import ModelConfig, ModelEntry, get_entry
from deepfm.outputs import make_dirs, write_text
from deepfm.train.run import TrainedModel, fit_and_evaluate
from deepfm.train.trainer import DEFAULT_LR, TrainConfig, Trainer, monitor_score

COMMAND = "tune"
INT_PARAMS = ("embed_dim", "layers", "neurons", "batch_size")
CHOICE_PARAMS = ("hidden", "activation")
MODEL_PARAMS = ("embed_dim", "hidden", "layers", "neurons", "activation", "keep_prob", "l2")
TRAIN_PARAMS = ("lr", "batch_size", "lr_decay")
PARAMS = MODEL_PARAMS + TRAIN_PARAMS
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"low": 3e-4, "high": 1e-2, "log": True},
    "keep_prob": {"low": 0.5, "high": 1.0, "step": 0.1},
    "hidden": {"choices": [[100, 100, 100], [200, 200, 200], [400, 400, 400]]},
    "l2": {"low": 1e-7, "high": 1e-3, "log": True},
}
DEFAULT_TRIALS = 20


# -- search spaces -------------------------------------------------------------------------------


def _number(value: Any, where: str, kind: type) -> float | int:
    try:
        number = float(value)  # YAML reads 1e-4 (no dot) as a string
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if kind is int:
        if number != int(number):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(number)
    return number


def parse_space(data: Any, source: str = "search space") -> dict[str, dict[str, Any]]:
    """Validate a search space (see the module docs); returns normalised specs."""
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{source}: a search space maps parameters to ranges, e.g. "
                          "lr: {low: 1.0e-4, high: 1.0e-2, log: true}")  # fmt: skip
    unknown = sorted(set(data) - set(PARAMS))
    if unknown:
        raise ConfigError(f"{source}: unknown parameters {unknown}; known: {', '.join(PARAMS)}")
    if "hidden" in data and ({"layers", "neurons"} & set(data)):
        raise ConfigError(f"{source}: give either hidden or layers/neurons, not both")
    space = {}
    for name, spec in data.items():
        where = f"{source}: {name}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected {{low, high}} or {{choices: [...]}}")
        if "choices" in spec:
            choices = spec["choices"]
            if set(spec) != {"choices"} or not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}: choices is a non-empty list (and nothing else)")
            space[name] = {"choices": [_choice(name, c, where) for c in choices]}
            continue
        if name in CHOICE_PARAMS:
            raise ConfigError(f"{where}: give a list of choices")
        extra = set(spec) - {"low", "high", "log", "step"}
        if extra or "low" not in spec or "high" not in spec:
            raise ConfigError(f"{where}: a range is {{low, high}} with optional log or step")
        kind = int if name in INT_PARAMS else float
        low, high = _number(spec["low"], where, kind), _number(spec["high"], where, kind)
        if not low < high:
            raise ConfigError(f"{where}: low must be below high, got {low} and {high}")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0")
        normal: dict[str, Any] = {"low": low, "high": high, "log": log}
        if "step" in spec:
            if log:
                raise ConfigError(f"{where}: step and log cannot be combined")
            normal["step"] = _number(spec["step"], where, kind)
        space[name] = normal
        _check_bounds(name, low, where)
        _check_bounds(name, high, where)
    return space


def _choice(name: str, value: Any, where: str) -> Any:
    if name == "hidden":
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where}: each choice is a list of layer sizes, got {value!r}")
        return [int(_number(v, where, int)) for v in value]
    if name == "activation":
        return str(value)
    number = _number(value, where, int if name in INT_PARAMS else float)
    _check_bounds(name, number, where)
    return number


def _check_bounds(name: str, value: float, where: str) -> None:
    if name == "keep_prob" and not 0 < value <= 1:
        raise ConfigError(f"{where}: keep_prob must be in (0, 1], got {value}")
    if name in INT_PARAMS and value < 1:
        raise ConfigError(f"{where}: must be at least 1, got {value}")
    if name in ("lr",) and value <= 0:
        raise ConfigError(f"{where}: must be positive, got {value}")
    if name == "l2" and value < 0:
        raise ConfigError(f"{where}: must be >= 0, got {value}")
    if name == "lr_decay" and not 0 < value <= 1:
        raise ConfigError(f"{where}: lr_decay must be in (0, 1], got {value}")


def load_space(path: str | Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return parse_space(DEFAULT_SPACE, "the default search space")
    return parse_space(read_yaml(path, "the search space file"), str(path))


def suggest(trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One point of ``space`` from an Optuna trial (lists are offered as labels: Optuna's
    categorical values must be scalars)."""
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if "choices" in spec:
            labels = [_label(c) for c in spec["choices"]]
            picked = trial.suggest_categorical(name, labels)
            params[name] = spec["choices"][labels.index(picked)]
        elif name in INT_PARAMS:
            params[name] = trial.suggest_int(
                name, spec["low"], spec["high"], step=spec.get("step", 1), log=spec["log"]
            )
        else:
            params[name] = trial.suggest_float(
                name, spec["low"], spec["high"], step=spec.get("step"), log=spec["log"]
            )
    return params


def _label(choice: Any) -> Any:
    return "-".join(map(str, choice)) if isinstance(choice, list) else choice


def apply_params(base: ModelConfig, params: dict[str, Any]) -> tuple[ModelConfig, dict[str, Any]]:
    """(model config, train overrides) of a point of the search space."""
    model: dict[str, Any] = {}
    for name in ("embed_dim", "activation", "l2"):
        if name in params:
            model[name] = params[name]
    if "keep_prob" in params:
        model["dropout"] = dropout_of(params["keep_prob"])
    if "hidden" in params:
        model["hidden"] = tuple(params["hidden"])
    elif "layers" in params or "neurons" in params:
        layers = params.get("layers", len(base.hidden))
        model["hidden"] = (params.get("neurons", base.hidden[0]),) * layers
    train = {name: params[name] for name in TRAIN_PARAMS if name in params}
    return base.replace(**model), train


def best_config_yaml(
    model: str, params: dict[str, Any], value: float, trial: int, base: ModelConfig
) -> str:
    """The best trial as a study config: tuned model settings under ``defaults`` (keep
    probability, as presets store it), tuned training settings under ``train``."""
    defaults: dict[str, Any] = {}
    for name in ("embed_dim", "activation", "keep_prob", "l2"):
        if name in params:
            defaults[name] = params[name]
    if {"hidden", "layers", "neurons"} & set(params):
        defaults["hidden"] = list(apply_params(base, params)[0].hidden)
    train = {name: params[name] for name in TRAIN_PARAMS if name in params}
    data: dict[str, Any] = {
        "name": f"tuned-{model}",
        "description": f"deepfm tune: best of {model}, trial {trial}, validation AUC {value:.5f}",
        "defaults": defaults,
    }
    if train:
        data["train"] = train
    header = (
        f"# Found by `deepfm tune` for model {model} (trial {trial}, validation AUC {value:.5f}).\n"
        "# Use it with --config in deepfm compare / sweep / efficiency / workers; the model\n"
        "# settings under `defaults` then apply to every model of those commands.\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False)


# -- running -------------------------------------------------------------------------------------


def _finished(study) -> int:
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sum(t.state in done for t in study.trials)


def _fail_interrupted(study) -> None:
    """Trials left RUNNING by a killed run are marked failed (one process runs a study)."""
    import optuna

    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.RUNNING:
            try:  # Optuna has no public call for this; without it the trial just stays RUNNING
                study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            except (AttributeError, NotImplementedError):
                return


def run_tune(
    store: str | Path,
    out: str | Path,
    *,
    model: str = "deepfm",
    space: dict[str, dict[str, Any]] | None = None,
    trials: int = DEFAULT_TRIALS,
    timeout: float | None = None,
    seed: int = 0,
    config: StudyConfig | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    pruner=None,
    progress: bool = True,
    fit: Callable[..., dict[str, Any]] = fit_run,
) -> dict[str, Any]:
    """Tune ``model`` on ``store`` until ``trials`` trials are finished (resumed from
    ``out/tune.db``); write ``tune.*``, ``best.yaml`` and ``space.yaml`` to ``out``."""
    import optuna

    if trials < 1:
        raise ConfigError("--trials must be at least 1")
    space = space or load_space(None)
    config = config or StudyConfig()
    data = open_study_store(store)
    base = config.model_config(model, **(model_overrides or {}))
    base_train = config.train_config(seed, **(train_overrides or {}))
    out = Path(out)
    make_dirs(out)
    write_text(out / "space.yaml", yaml.safe_dump(space, sort_keys=False))
    # the study's identity: a changed store, model, space or base config starts a new study
    identity = canonical([data.fingerprint, base.to_dict(), base_train.to_dict(), space, seed])
    name = f"{COMMAND}-{model}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    database = (out / "tune.db").resolve()
    try:
        study = optuna.create_study(
            study_name=name,
            storage=f"sqlite:///{database}",
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=seed),
            pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
            load_if_exists=True,
        )
        _fail_interrupted(study)
        reused = _finished(study)
    except Exception as exc:  # SQLAlchemy's and Optuna's errors: a damaged or foreign file
        raise ConfigError(
            f"{database} is not a usable Optuna database ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}): move it away to start the search anew"
        ) from None

    def objective(trial) -> float:
        params = suggest(trial, space)
        model_config, train_changes = apply_params(base, params)
        train_config = config.train_config(seed, **{**(train_overrides or {}), **train_changes})

        def report(record: dict[str, float]) -> None:
            auc = record.get("valid_auc")
            if auc is None or math.isnan(auc):
                return
            trial.report(auc, int(record["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {record['epoch']}: validation AUC {auc:.5f}")

        result = fit(data.dataset, model_config, train_config, on_epoch=report)
        trial.set_user_attr("test", result.get("test"))
        trial.set_user_attr("best_epoch", result["best_epoch"])
        return float(result["valid"]["auc"])

    remaining = trials - reused
    if progress and reused:
        print(f"{COMMAND}: {reused} finished trial(s) reused from {out / 'tune.db'}", flush=True)
    if remaining > 0:
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=timeout,
            show_progress_bar=progress,
            catch=(),
        )
    summary = tune_summary(study, model, space)
    summary.update(store=str(data.path), study=name, trials_reused=reused, seed=seed)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        write_tune(summary, out, model)
        raise ConfigError(
            f"no trial of {len(study.trials)} completed (all pruned or failed): widen the "
            "search space or run more trials"
        )
    best = study.best_trial
    write_text(
        out / "best.yaml",
        best_config_yaml(model, suggest_fixed(best.params, space), best.value, best.number, base),
    )
    write_tune(summary, out, model)
    return summary


def suggest_fixed(params: dict[str, Any], space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A finished trial's stored params mapped back to values (labels → lists)."""
    values = {}
    for name, value in params.items():
        spec = space.get(name, {})
        if "choices" in spec:
            labels = [_label(c) for c in spec["choices"]]
            values[name] = spec["choices"][labels.index(value)] if value in labels else value
        else:
            values[name] = value
    return values


def tune_summary(study, model: str, space: dict[str, Any]) -> dict[str, Any]:
    import optuna

    trials = []
    for t in study.trials:
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        trials.append(
            {
                "number": t.number,
                "state": t.state.name,
                "valid_auc": t.value if t.state == optuna.trial.TrialState.COMPLETE else last,
                "test": t.user_attrs.get("test"),
                "epochs_reported": len(t.intermediate_values),
                "params": suggest_fixed(t.params, space),
            }
        )
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = max(complete, key=lambda t: t["valid_auc"]) if complete else None
    return {"model": model, "space": space, "trials": trials, "best": best}


def write_tune(summary: dict[str, Any], out: Path, model: str) -> None:
    write_json(out / f"{COMMAND}.json", summary)
    params = list(summary["space"])
    header = ["trial", "state", "valid AUC", "test AUC", "test Logloss", "epochs", *params]
    ordered = sorted(summary["trials"], key=lambda t: -(t["valid_auc"] or -1.0))
    rows = [
        [t["number"], t["state"].lower(), fmt(t["valid_auc"], 5),
         fmt((t["test"] or {}).get("auc"), 5), fmt((t["test"] or {}).get("logloss"), 5),
         t["epochs_reported"], *(_show(t["params"].get(p)) for p in params)]
        for t in ordered
    ]  # fmt: skip
    best = summary["best"]
    lines = [f"# Tuning {model} (Optuna TPE, median pruning on validation AUC)", ""]
    if best is not None:
        lines += [
            f"Best: trial {best['number']}, validation AUC {best['valid_auc']:.5f}; "
            "config in [best.yaml](best.yaml) (use it with `--config`).",
            "",
        ]
    lines += [markdown_table(header, rows), "", "![trials](tune_history.png)", ""]
    write_text(out / f"{COMMAND}.md", "\n".join(lines))
    write_csv(out / f"{COMMAND}.csv", header, rows)
    trial_history(
        [t["number"] for t in summary["trials"]],
        [t["valid_auc"] for t in summary["trials"]],
        [t["state"] for t in summary["trials"]],
        out / f"{COMMAND}_history.png",
        title=f"Tuning {model}",
    )


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "-".join(map(str, value))
    if isinstance(value, float):
        return f"{value:.3g}"
    return "–" if value is None else str(value)


# -- train --auto: a time-boxed search around the defaults ---------------------------------------

#: the learning rate is searched within this factor of the default (log-uniform, both ways)
AUTO_LR_FACTOR = 3.0
#: the deep part's choices around the default shape, and the embedding sizes
AUTO_HIDDEN = ([200, 200, 200], [400, 400, 400], [400, 400])
AUTO_EMBED = (6, 16)
#: seconds kept back at the end of the box for calibration, test scoring and the bundle
AUTO_RESERVE_S = 2.0


def auto_space(entry: ModelEntry, base: ModelConfig, lr: float) -> dict[str, dict[str, Any]]:
    """The search space of ``train --auto`` around ``base`` and the learning rate ``lr``:
    the learning rate within ``AUTO_LR_FACTOR`` of it; for a model with a deep part (an Adam
    model with hidden layers) also the keep probability, the layer shapes and the embedding
    size. Every range contains the base point (the first trial)."""
    space: dict[str, Any] = {
        "lr": {"low": lr / AUTO_LR_FACTOR, "high": lr * AUTO_LR_FACTOR, "log": True}
    }
    if entry.optimizer == "adam":
        keep = round(1.0 - base.dropout, 12)
        space["keep_prob"] = {"low": min(0.3, keep), "high": max(0.9, keep)}
        hidden = [list(h) for h in AUTO_HIDDEN]
        if list(base.hidden) not in hidden:
            hidden.insert(0, list(base.hidden))
        space["hidden"] = {"choices": hidden}
        embed = entry.embed_dim(base)
        space["embed_dim"] = {"low": min(AUTO_EMBED[0], embed), "high": max(AUTO_EMBED[1], embed)}
    return parse_space(space, "the --auto search space")


def base_point(entry: ModelEntry, base: ModelConfig, lr: float) -> dict[str, Any]:
    """The defaults (or the flags given) as a point of :func:`auto_space`, in Optuna's terms."""
    point: dict[str, Any] = {"lr": lr}
    if entry.optimizer == "adam":
        point.update(
            keep_prob=round(1.0 - base.dropout, 12),
            hidden=_label(list(base.hidden)),
            embed_dim=entry.embed_dim(base),
        )
    return point


def auto_train(
    dataset: Dataset,
    base: ModelConfig,
    base_train: TrainConfig,
    minutes: float,
    *,
    say: Callable[[str], None] = print,
) -> tuple[TrainedModel, TrainConfig, dict[str, Any]]:
    """``deepfm train --auto MINUTES``: Optuna (TPE) trials of ``base`` around its settings,
    each scored by its validation AUC (the test split is not read until the chosen model is
    scored), within ``minutes`` in all: a trial that would run past the box is stopped within a
    few steps and scored on what it reached. The first trial is the base settings themselves,
    so the search never returns a model worse on validation than the defaults.

    Returns (the chosen trained model, its training config, a summary: every trial's settings,
    validation AUC/Logloss, epochs and seconds, and the chosen one)."""
    import optuna

    if not minutes > 0:
        raise ConfigError(f"--auto takes a positive number of minutes, got {minutes}")
    # PyTorch imports its compiler stack when the first optimiser is built (seconds; over 30 s
    # on a loaded machine): once per process, before the clock starts, not in the first trial
    import torch._dynamo  # noqa: F401

    started = time.perf_counter()
    deadline = started + 60.0 * minutes
    entry = get_entry(base.name)
    lr = base_train.lr if base_train.lr is not None else DEFAULT_LR[entry.optimizer]
    space = auto_space(entry, base, lr)
    search_rows = replace(dataset, test=None)  # trials never see the test rows
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=base_train.seed)
    )
    study.enqueue_trial(base_point(entry, base, lr))
    best: dict[str, Any] = {}
    trials: list[dict[str, Any]] = []

    def objective(trial) -> float:
        left = deadline - time.perf_counter() - AUTO_RESERVE_S
        if left <= 0 and best:
            study.stop()
            raise optuna.TrialPruned("out of time")
        params = suggest(trial, space)
        model_config, changes = apply_params(base, params)
        train_config = replace(base_train, **changes, time_limit=max(left, 1e-3))
        trial_started = time.perf_counter()
        trained = fit_and_evaluate(search_rows, model_config, train_config)
        valid = trained.metrics.get("valid", {"auc": math.nan, "logloss": math.nan})
        score = monitor_score(valid, "auc")
        trials.append(
            {
                "number": trial.number,
                "params": params,
                "valid": valid,
                "best_epoch": trained.metrics["best_epoch"],
                "epochs_run": trained.metrics["epochs_run"],
                "seconds": time.perf_counter() - trial_started,
            }
        )
        if not best or score > best["score"]:
            best.update(
                score=score, trained=trained, train_config=train_config, number=trial.number
            )
        elapsed = time.perf_counter() - started
        shown = ", ".join(f"{k}={_show(v)}" for k, v in params.items())
        say(
            f"auto: trial {trial.number} ({elapsed:.0f}s of {60 * minutes:.0f}s): {shown} -> "
            f"valid AUC {valid['auc']:.5f}, Logloss {valid['logloss']:.5f} "
            f"(best: trial {best['number']}, {best['score']:.5f})"
        )
        if deadline - time.perf_counter() <= AUTO_RESERVE_S:
            study.stop()
        return score

    study.optimize(objective, timeout=max(60.0 * minutes - AUTO_RESERVE_S, 1e-3), catch=())
    chosen: TrainedModel = best["trained"]
    if dataset.test is not None and len(dataset.test):
        chosen.metrics["test"] = Trainer(best["train_config"]).evaluate(chosen.model, dataset.test)
    train_config = replace(best["train_config"], time_limit=None)
    summary = {
        "minutes": minutes,
        "seconds": time.perf_counter() - started,
        "space": space,
        "trials": trials,
        "chosen": best["number"],
        "objective": "validation AUC",
    }
    return chosen, train_config, summary
