"""``deepfm workers``: learning curves of data-parallel training (Fig. 6).

Three runs of one model on one store: 1 worker; N workers at the same learning rate; N workers
at √N × the learning rate (the paper's rule). The N workers are N processes joined by PyTorch's
DDP exactly as ``torchrun`` joins them (:mod:`deepfm.train.distributed`; gloo on CPU, NCCL on
GPUs): each trains on its own shard with the same per-worker batch size, so one step of N workers
reads N batches. Rank 0 scores the test split every ``eval_every`` steps (the same steps for
every run); the curves are test AUC and Logloss against training steps. Early stopping is off:
every run trains the same number of epochs.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from deepfm.data.store import Store
from deepfm.errors import ConfigError
from deepfm.experiments.compare import display
from deepfm.experiments.runs import (
    RunCache,
    RunSpec,
    StudyConfig,
    fmt,
    markdown_table,
    open_study_store,
    run_all,
    write_csv,
    write_json,
)
from deepfm.experiments.study_plots import step_curves
from deepfm.models.registry import ModelConfig
from deepfm.nn import InputLayout
from deepfm.outputs import write_text
from deepfm.train.run import fit_and_evaluate, new_model
from deepfm.train.trainer import Batches, TrainConfig, evaluate

COMMAND = "workers"
DEFAULT_WORKERS = 2
DEFAULT_EPOCHS = 3
POINTS = 24  # test evaluations along the 1-worker run
CURVE_KEYS = ("step", "samples", "auc", "logloss")


def settings(workers: int) -> list[tuple[str, int, str]]:
    """(label, processes, learning-rate scaling) of the three runs."""
    return [
        ("1 worker", 1, "none"),
        (f"{workers} workers, lr", workers, "none"),
        (f"{workers} workers, √{workers}×lr", workers, "sqrt"),
    ]


# -- one run (in each process) -------------------------------------------------------------------


def train_with_curve(
    store: str | Path,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    eval_every: int,
    eval_rows: int | None,
) -> dict[str, Any]:
    """Train in this process (one rank of the process group, if one is joined) and score the
    test split on rank 0 every ``eval_every`` steps. Returns the curve (rank 0) or {}."""
    from deepfm.train.distributed import Distributed

    dist = Distributed.current()
    dataset = Store.open(store).dataset()
    assert dataset.test is not None
    test_rows = dataset.test if not eval_rows else dataset.test.take(slice(0, eval_rows))
    model = new_model(InputLayout.of(dataset.feature_map), model_config, train_config.seed)
    curve: dict[str, list[float]] = {"step": [], "samples": [], "auc": [], "logloss": []}
    test: list[Batches] = []
    steps = [0]

    def on_step(step: int) -> None:
        steps[0] = step
        if step % eval_every or not dist.is_main:
            return
        if not test:  # on the model's device, once the trainer has put it there
            test.append(Batches(test_rows, next(model.parameters()).device))
        metrics = evaluate(model, test[0], train_config.eval_batch_size)
        curve["step"].append(step)
        curve["samples"].append(step * train_config.batch_size * dist.world)
        curve["auc"].append(metrics["auc"])
        curve["logloss"].append(metrics["logloss"])

    # the curve is the test split's: the final metrics need only the validation split
    fit = fit_and_evaluate(
        replace(dataset, test=None), model_config, train_config, model=model, dist=dist,
        on_step=on_step,
    ).fit  # fmt: skip
    if not dist.is_main:
        return {}
    return {
        "curve": curve,
        "world": dist.world,
        "lr": fit.setup.get("lr"),
        "epochs_run": len(fit.history),
        "steps": steps[0],
        "train_seconds": fit.train_seconds,
        "history": fit.history,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world: int, port: int, job: dict[str, Any], result: str) -> None:
    """Entry point of a spawned process: join the group as torchrun would, train, report."""
    from deepfm.experiments.runs import write_json as _write
    from deepfm.train.distributed import Distributed, process_group_session

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    train_config = TrainConfig(**job["train"])
    context = Distributed.from_env(train_config.device)
    with process_group_session():
        out = train_with_curve(
            job["store"],
            ModelConfig.from_dict(job["model"]),
            train_config,
            eval_every=job["eval_every"],
            eval_rows=job["eval_rows"],
        )
        if context.is_main:
            _write(result, out)


def run_setting(store: str | Path, spec: RunSpec) -> dict[str, Any]:
    """One run of ``spec`` (``extra``: world, eval_every, eval_rows): in this process for one
    worker, in ``world`` spawned processes otherwise."""
    world = int(spec.extra["world"])
    options = {"eval_every": spec.extra["eval_every"], "eval_rows": spec.extra["eval_rows"]}
    if world == 1:
        return train_with_curve(store, spec.model, spec.train, **options)
    import torch.multiprocessing as mp

    job = {
        "store": str(store),
        "model": spec.model.to_dict(),
        "train": spec.train.to_dict(),
        **options,
    }
    with tempfile.TemporaryDirectory(prefix="deepfm-workers-") as tmp:
        result = Path(tmp) / "result.json"
        try:
            mp.start_processes(
                _worker,
                args=(world, _free_port(), job, str(result)),
                nprocs=world,
                join=True,
                start_method="spawn",
            )
        except mp.ProcessRaisedException as exc:
            raise ConfigError(f"a worker process failed:\n{exc}") from None
        import json

        return json.loads(result.read_text(encoding="utf-8"))


# -- the study -----------------------------------------------------------------------------------


def run_workers(
    store: str | Path,
    out: str | Path,
    *,
    model: str = "deepfm",
    workers: int = DEFAULT_WORKERS,
    config: StudyConfig | None = None,
    epochs: int = DEFAULT_EPOCHS,
    eval_every: int | None = None,
    eval_rows: int | None = None,
    seed: int = 0,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Three learning curves of ``model`` on ``store``; ``workers.*`` written to ``out``."""
    if workers < 2:
        raise ConfigError(f"--workers must be at least 2 (compared with 1), got {workers}")
    if epochs < 1:
        raise ConfigError("--epochs must be at least 1")
    config = config or StudyConfig()
    data = open_study_store(store)
    model_config = config.model_config(model, **(model_overrides or {}))
    # early stopping off: every run trains the same epochs
    overrides = {**(train_overrides or {}), "epochs": epochs, "patience": epochs}
    base = config.train_config(seed, **overrides)
    device = base.device if base.device != "auto" else "cpu"
    if device.startswith("cuda") and workers > torch.cuda.device_count():
        raise ConfigError(f"{workers} workers on CUDA need {workers} GPUs")
    steps_one = math.ceil(len(data.dataset.train) / base.batch_size) * epochs
    every = eval_every or max(1, steps_one // POINTS)
    if every < 1:
        raise ConfigError("--eval-every must be at least 1")
    specs = []
    for label, world, scaling in settings(workers):
        train_config = TrainConfig(**{**base.to_dict(), "lr_scaling": scaling, "device": device})
        extra = {"world": world, "eval_every": every, "eval_rows": eval_rows, "label": label}
        specs.append(RunSpec(COMMAND, data.fingerprint, model_config, train_config, extra))
    results = run_all(
        specs,
        lambda spec: run_setting(data.path, spec),
        RunCache(Path(out) / "runs"),
        desc=COMMAND,
        progress=progress,
    )
    runs = {}
    for spec, result in zip(specs, results, strict=True):
        curve = result["curve"]
        best = (
            max(range(len(curve["auc"])), key=lambda i: curve["auc"][i]) if curve["auc"] else None
        )
        runs[spec.extra["label"]] = {
            "world": spec.extra["world"],
            "lr_scaling": spec.train.lr_scaling,
            "lr": result["lr"],
            "steps": result["steps"],
            "train_seconds": result["train_seconds"],
            "final": {m: curve[m][-1] for m in ("auc", "logloss")} if curve["auc"] else None,
            "best_auc": None if best is None else {k: curve[k][best] for k in ("step", "auc")},
            "curve": curve,
        }
    summary = {
        "model": model,
        "workers": workers,
        "device": device,
        "epochs": epochs,
        "batch_size_per_worker": base.batch_size,
        "eval_every": every,
        "eval_rows": eval_rows or data.dataset.rows()["test"],
        "store": str(data.path),
        "rows": data.dataset.rows(),
        "runs": runs,
    }
    write_workers(summary, Path(out))
    return summary


def write_workers(summary: dict[str, Any], out: Path) -> None:
    write_json(out / f"{COMMAND}.json", summary)
    header = ["run", "processes", "lr", "steps", "final test AUC", "final test Logloss"]
    header += ["best test AUC (step)", "train seconds"]
    rows = []
    for label, r in summary["runs"].items():
        final, best = r["final"] or {}, r["best_auc"] or {}
        rows.append(
            [label, r["world"], fmt(r["lr"], 5), r["steps"], fmt(final.get("auc")),
             fmt(final.get("logloss")), f"{fmt(best.get('auc'))} ({best.get('step')})",
             fmt(r["train_seconds"], 1)]
        )  # fmt: skip
    title = f"{display(summary['model'])}: data-parallel training, {summary['device']}"
    lines = [
        f"# {title}",
        "",
        f"Store `{summary['store']}`; {summary['epochs']} epochs, batch "
        f"{summary['batch_size_per_worker']} per worker; test AUC/Logloss on "
        f"{summary['eval_rows']:,} test rows every "
        f"{summary['eval_every']} steps.",
        "",
        markdown_table(header, rows),
        "",
        f"![curves]({COMMAND}_curves.png)",
        "",
    ]
    write_text(out / f"{COMMAND}.md", "\n".join(lines))
    write_csv(
        out / f"{COMMAND}.csv",
        ["run", "step", "samples", "auc", "logloss"],
        [
            [label, s, n, a, ll]
            for label, r in summary["runs"].items()
            for s, n, a, ll in zip(*(r["curve"][k] for k in CURVE_KEYS), strict=True)
        ],
    )
    step_curves(
        {label: r["curve"] for label, r in summary["runs"].items()},
        out / f"{COMMAND}_curves.png",
        title=title,
    )
