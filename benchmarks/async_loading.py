"""Asynchronous vs synchronous data reading while training DeepFM-D from a store (Table I).

``python benchmarks/async_loading.py [--rows 400000] [--batch-size 4096] [--device cpu|cuda]``

Generates Criteo-format rows (``make_criteo.py``), prepares a store, then trains DeepFM-D
(embedding 10, MLP 400-400-400, dropout 0.5, Adam) on its memory-mapped training split with the
batch loader in synchronous mode (gather, convert, copy, then step) and in asynchronous mode
(batch n+1 prepared in a thread during step n), alternating runs, and reports training samples/s
of each and the speed-up (the paper measured 1.12-1.19x). Also reported: the time to prepare one
batch alone and one training step alone, which bound the possible gain.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deepfm.data.formats import get_format
from deepfm.data.loader import BatchLoader
from deepfm.data.prepare import prepare_store
from deepfm.data.splits import SplitSpec
from deepfm.data.store import Store
from deepfm.models import ModelConfig, build_model
from deepfm.nn import InputLayout
from make_criteo import write_criteo


def train_steps(model, optimizer, loader: BatchLoader, device) -> tuple[int, float]:
    """One pass over ``loader``: (samples, seconds); the device is synchronised at the end."""
    samples = 0
    started = time.perf_counter()
    for batch in loader:
        logits = model(batch.ids, batch.values)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        samples += len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return samples, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode (alternating)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default="benchmarks/results/async_loading.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="deepfm-async-"))
    try:
        data = work / "criteo.txt"
        write_criteo(data, args.rows, seed=0)
        result = prepare_store(
            get_format("criteo"), [str(data)], work / "store", split=SplitSpec.parse("none")
        )
        data.unlink()
        store = Store.open(result.path)
        train = store.split("train")
        layout = InputLayout.of(store.feature_map)
        config = ModelConfig("deepfm", embed_dim=10, hidden=(400, 400, 400), dropout=0.5)
        torch.manual_seed(0)
        model = build_model(layout, config).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        rows = args.steps * args.batch_size
        rng = np.random.default_rng(0)

        def loader(asynchronous: bool) -> BatchLoader:
            order = rng.permutation(len(train))[:rows]
            return BatchLoader(
                train, args.batch_size, order=order, device=device, asynchronous=asynchronous
            )

        train_steps(model, optimizer, loader(True), device)  # warm up: allocator, page cache
        runs: dict[str, list[float]] = {"sync": [], "async": []}
        for _ in range(args.repeats):
            for mode in ("sync", "async"):
                samples, seconds = train_steps(model, optimizer, loader(mode == "async"), device)
                runs[mode].append(samples / seconds)
        # the parts alone: preparing batches (no step), and steps on one prepared batch
        prepare_only = loader(False)
        started = time.perf_counter()
        prepared = [prepare_only.prepare(index) for index in prepare_only._indices()]
        load_ms = (time.perf_counter() - started) / len(prepared) * 1000
        batch = prepared[0]
        started = time.perf_counter()
        for _ in range(10):
            loss = F.binary_cross_entropy_with_logits(model(batch.ids, batch.values), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_ms = (time.perf_counter() - started) / 10 * 1000
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {mode: max(values) for mode, values in runs.items()}
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": "python " + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "rows": args.rows,
        "batch_size": args.batch_size,
        "samples_per_s": {m: [round(v) for v in values] for m, values in runs.items()},
        "best_samples_per_s": {m: round(v) for m, v in best.items()},
        "speedup_async_over_sync": round(best["async"] / best["sync"], 3),
        "prepare_batch_ms": round(load_ms, 2),
        "train_step_ms": round(step_ms, 2),
    }
    print(json.dumps(results, indent=2))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
