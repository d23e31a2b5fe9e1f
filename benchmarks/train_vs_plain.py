"""The CPU training-speed bar: ``deepfm train`` against a plain PyTorch DeepFM loop, same run.

``python benchmarks/train_vs_plain.py [--rows 1000000] [--repeats 2] [--threads 0 1]``

Generates Criteo-format rows (``make_criteo.py``), prepares a store, then alternates, for each
thread count (0: PyTorch's default, all cores): ``deepfm train --store`` (DeepFM-D 400-400-400,
dropout 0.5, Adam 1e-3, batch 4096, one epoch; its ``train_samples_per_s`` from
``metrics.json``) and ``benchmarks/plain_deepfm.py`` on the same training split (one epoch),
each in a fresh process. Best of ``--repeats`` interleaved runs each. On a shared machine the
load moves during a minute-long epoch, so the script also runs ``--pairs`` pairs of short
blocks in one process, alternating: the trainer (``Trainer.fit``, one epoch of ``--block-steps``
steps) and the plain loop on the same rows; the median of the pairs' ratios is steadier. Also:
the MLP's achieved FLOP rate (6·B·Σ in·out per step) over a plain ``torch.matmul`` of the same
shapes measured in the same run. JSON in ``benchmarks/results/train_vs_plain.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_speed import make_store, matmul_seconds, mlp_flops, write_results

HERE = Path(__file__).resolve().parent
BATCH = 4096


def deepfm_train(store: Path, out: Path, threads: int) -> float:
    command = [sys.executable, "-m", "deepfm", "train", "--store", str(store), "--out", str(out)]
    command += ["--model", "deepfm", "--hidden", "400,400,400", "--dropout", "0.5"]
    command += ["--embed-dim", "10", "--lr", "1e-3", "--batch-size", str(BATCH), "--epochs", "1"]
    command += ["--device", "cpu", "--quiet"] + (["--threads", str(threads)] if threads else [])
    subprocess.run(command, check=True, capture_output=True, text=True)
    metrics = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out)
    return float(metrics["train_samples_per_s"])


def plain_loop(store: Path, threads: int) -> float:
    command = [sys.executable, str(HERE / "plain_deepfm.py"), "--store", str(store)]
    command += ["--epochs", "1", "--batch-size", str(BATCH), "--threads", str(threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["samples_per_s"])


def paired_blocks(store: Path, pairs: int, steps: int) -> dict:
    """Median over ``pairs`` of (trainer samples/s) / (plain loop samples/s), each pair two
    back-to-back one-epoch blocks of ``steps`` steps on the same rows, in this process, after
    a measurement of the matmul rate (the trainer's MLP share of it, median over the pairs)."""
    from deepfm.data.store import Store
    from deepfm.models import ModelConfig, build_model, get_entry
    from deepfm.nn import InputLayout
    from deepfm.train.trainer import TrainConfig, Trainer
    from plain_deepfm import train as plain_train

    opened = Store.open(store)
    rows = opened.split("train").take(slice(0, steps * BATCH))
    ids = torch.from_numpy(rows.ids.astype("int64"))
    labels = torch.from_numpy(rows.labels.copy())
    layout = InputLayout.of(opened.feature_map)
    config = TrainConfig(epochs=1, batch_size=BATCH, lr=1e-3, progress=False, device="cpu")
    fields = opened.feature_map.num_fields
    flops = mlp_flops(BATCH, fields)
    ratios, ours_rates, plain_rates, shares = [], [], [], []
    for pair in range(pairs):
        matmul = flops / matmul_seconds(BATCH, fields, torch.device("cpu"))
        torch.manual_seed(pair)
        model = build_model(layout, ModelConfig("deepfm", hidden=(400, 400, 400), dropout=0.5))
        fit = Trainer(config).fit(model, get_entry("deepfm"), rows, None)
        ours = fit.train_samples_per_s
        plain = plain_train(
            ids, labels, layout.num_features, epochs=1, batch_size=BATCH, lr=1e-3, seed=pair
        )["samples_per_s"]
        ratios.append(ours / plain)
        ours_rates.append(ours)
        plain_rates.append(plain)
        shares.append(flops * ours / BATCH / matmul)
        print(f"    pair {pair}: {ours:,.0f} / {plain:,.0f} = {ours / plain:.2f}x", flush=True)
    return {
        "median_ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "trainer_median": round(statistics.median(ours_rates)),
        "plain_median": round(statistics.median(plain_rates)),
        "mlp_share_of_matmul_median": round(statistics.median(shares), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to generate")
    parser.add_argument("--store", help="an existing store (else one is generated)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[0], help="0: the default")
    parser.add_argument("--pairs", type=int, default=7, help="paired short blocks (0: none)")
    parser.add_argument("--block-steps", type=int, default=15)
    parser.add_argument("--json", default=str(HERE / "results" / "train_vs_plain.json"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="deepfm-vs-plain-"))
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": "python " + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]]),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "batch_size": BATCH,
    }
    env_threads = torch.get_num_threads()
    try:
        store = Path(args.store) if args.store else make_store(args.rows, work)[0]
        from deepfm.data.store import Store

        opened = Store.open(store)
        results["rows"] = opened.manifest["rows"]
        results["num_features"] = opened.feature_map.num_features
        fields = opened.feature_map.num_fields
        flops = mlp_flops(BATCH, fields)
        runs: dict[str, dict[str, float]] = {}
        for repeat in range(args.repeats):
            for threads in args.threads:
                torch.set_num_threads(threads or env_threads)
                key = f"threads={threads or env_threads}"
                run = runs.setdefault(key, {"deepfm_train": 0.0, "plain": 0.0, "matmul": 0.0})
                matmul = flops / matmul_seconds(BATCH, fields, torch.device("cpu"))
                ours = deepfm_train(store, work / "bundle", threads)
                plain = plain_loop(store, threads or env_threads)
                run["deepfm_train"] = max(run["deepfm_train"], ours)
                run["plain"] = max(run["plain"], plain)
                run["matmul"] = max(run["matmul"], matmul)
                print(
                    f"  repeat {repeat} {key}: deepfm train {ours:,.0f}, plain {plain:,.0f} "
                    f"samples/s ({ours / plain:.2f}x), matmul {matmul / 1e9:.1f} GFLOP/s",
                    flush=True,
                )
        for run in runs.values():
            run["ratio"] = round(run["deepfm_train"] / run["plain"], 3)
            run["mlp_share_of_matmul"] = round(
                flops * run["deepfm_train"] / BATCH / run["matmul"], 3
            )
            run["plain_mlp_share_of_matmul"] = round(
                flops * run["plain"] / BATCH / run["matmul"], 3
            )
            run["matmul_gflops"] = round(run.pop("matmul") / 1e9, 1)
            run["deepfm_train"], run["plain"] = round(run["deepfm_train"]), round(run["plain"])
        results["runs"] = runs
        if args.pairs:
            paired = {}
            for threads in args.threads:
                torch.set_num_threads(threads or env_threads)
                key = f"threads={threads or env_threads}"
                print(f"  paired blocks, {key}:", flush=True)
                paired[key] = paired_blocks(store, args.pairs, args.block_steps)
            results["paired_blocks"] = paired
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
