"""Helpers of the serving tests: tiny bundles trained on the real Criteo sample (once per test
process), its rows as JSON records, and a real ``deepfm serve`` process on an ephemeral port."""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from deepfm.data.formats import get_format
from deepfm.data.pipeline import load_dataset
from deepfm.data.reader import BadRows
from deepfm.data.splits import SplitSpec
from deepfm.models.registry import ModelConfig
from deepfm.serve.bundle import save_bundle
from deepfm.train.run import fit_and_evaluate
from deepfm.train.trainer import TrainConfig

_WORK = Path(tempfile.mkdtemp(prefix="deepfm-serve-tests-"))
atexit.register(shutil.rmtree, _WORK, True)


@functools.cache
def _criteo_dataset(path: str):
    return load_dataset(get_format("criteo"), [path], split=SplitSpec.parse("random:0.9"), seed=0)


@functools.cache
def criteo_bundle(
    path: str,
    model: str = "deepfm",
    hidden: tuple[int, ...] = (32, 32),
    seed: int = 0,
    onnx: bool = False,
) -> Path:
    """A bundle of ``model`` trained one epoch on the Criteo sample at ``path`` (cached)."""
    dataset = _criteo_dataset(path)
    trained = fit_and_evaluate(
        dataset,
        ModelConfig(name=model, hidden=hidden),
        TrainConfig(epochs=1, patience=0, seed=seed, threads=2, progress=False),
    )
    out = _WORK / f"{model}-{'-'.join(map(str, hidden))}-{seed}{'-onnx' * onnx}"
    return save_bundle(
        out, trained.model, trained.config, dataset.feature_map, data_format="criteo",
        metrics=trained.metrics, onnx=onnx,
    )  # fmt: skip


@functools.cache
def _records(path: str) -> tuple[dict, ...]:
    chunks = get_format("criteo").read([path], BadRows())
    rows = [row for chunk in chunks for row in chunk.table.to_pylist()]
    for row in rows:
        row.pop("label", None)
    return tuple(rows)


def criteo_records(path: str | Path, n: int | None = None) -> list[dict]:
    """The file's rows as JSON-ready records (label dropped; numbers float, empty → None)."""
    rows = _records(str(path))
    return [dict(r) for r in (rows if n is None else rows[:n])]


def split_for_rank(rows: list[dict]) -> tuple[dict, dict, list[dict]]:
    """A /rank request from Criteo rows: the integer fields of the first row as the user, C1-C6
    of the first row as the context, C7-C26 of every row as the candidates."""
    user = {f"I{i}": rows[0][f"I{i}"] for i in range(1, 14)}
    context = {f"C{i}": rows[0][f"C{i}"] for i in range(1, 7)}
    candidates = [{f"C{i}": r[f"C{i}"] for i in range(7, 27)} for r in rows]
    return user, context, candidates


class ServerProcess:
    """``deepfm serve`` in a subprocess on 127.0.0.1 and a free port; ``client`` talks to it."""

    def __init__(self, model: Path, *args: str, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "deepfm", "serve", "--bundle", str(model), "--port", "0"]
        if "--runtime" not in args:  # the torch runtime starts at once (ONNX exports first)
            args = ("--runtime", "torch", *args)
        self.process = subprocess.Popen(
            [*command, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.log: list[str] = []
        self.url = self._wait_for_url(timeout=120)
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()
        # every POST declares JSON (the server answers 415 otherwise), as a real client does
        self.client = httpx.Client(
            base_url=self.url, timeout=30, headers={"content-type": "application/json"}
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not answer /health:\n" + "".join(self.log))
            time.sleep(0.1)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        assert self.process.stderr is not None
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.log.append(line)
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                return found.group(1)
        self.process.kill()
        raise RuntimeError("deepfm serve did not start:\n" + "".join(self.log))

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
