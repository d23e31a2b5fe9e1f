"""Training speed of DeepFM-D (embedding 10, MLP 400-400-400, dropout 0.5, Adam) from a store.

``python benchmarks/train_speed.py [--device cpu|cuda] [--rows N | --store DIR] [--json out]``

CPU (default): batch 4096, training samples/s of the trainer with dense Adam vs sparse row
updates (lazy Adam) and asynchronous vs synchronous batch loading, each with the ratio of the
MLP's achieved FLOP/s (6·B·Σ in·out per step: forward, and both backward products) to a plain
``torch.matmul`` of the same shapes measured in the same run (best of interleaved repeats, so
a busy machine slows both alike); and 2 processes (torchrun, gloo, 1 thread each) over 1 process
(2 threads) on the same rows. Table I of the paper, our version: async over sync reading, and
2 processes over 1.

CUDA (``benchmarks/gpu_suite.sh`` runs it on 10M generated rows): batch 4096 fp32 (TF32), batch
65536 bf16, dense vs sparse updates, streamed (async/sync) vs device-resident batches, predict
samples/s, and the time from a store on disk to the first training step.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deepfm.data.encoded import EncodedArrays
from deepfm.data.formats import get_format
from deepfm.data.prepare import prepare_store
from deepfm.data.splits import SplitSpec
from deepfm.data.store import Store
from deepfm.models import ModelConfig, build_model, get_entry
from deepfm.nn import InputLayout
from deepfm.train import trainer as trainer_module
from deepfm.train.distributed import Distributed
from deepfm.train.trainer import TrainConfig, Trainer, predict_logits
from make_criteo import write_criteo

HERE = Path(__file__).resolve().parent
HIDDEN = (400, 400, 400)
MODEL = ModelConfig("deepfm", embed_dim=10, hidden=HIDDEN, dropout=0.5)


def mlp_shapes(fields: int) -> list[tuple[int, int]]:
    widths = [fields * MODEL.embed_dim, *HIDDEN, 1]
    return list(itertools.pairwise(widths))


def mlp_flops(batch: int, fields: int) -> int:
    """Forward x·W, backward grad·Wᵀ and xᵀ·grad per layer: 6·B·in·out multiply-adds (x2)."""
    return 6 * batch * sum(i * o for i, o in mlp_shapes(fields))


def matmul_seconds(batch: int, fields: int, device: torch.device, repeats: int = 5) -> float:
    """Seconds for the MLP's matmuls alone (same shapes, fp32), best of ``repeats``."""
    shapes = mlp_shapes(fields)
    xs = [torch.randn(batch, i, device=device) for i, _ in shapes]
    ws = [torch.randn(i, o, device=device) for i, o in shapes]
    gs = [torch.randn(batch, o, device=device) for _, o in shapes]

    def once():
        for x, w, g in zip(xs, ws, gs, strict=True):
            torch.matmul(x, w), torch.matmul(g, w.T), torch.matmul(x.T, g)

    once()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        for _ in range(5):
            once()
        sync(device)
        best = min(best, (time.perf_counter() - started) / 5)
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def subset(data: EncodedArrays, rows: int) -> EncodedArrays:
    return data.take(slice(0, min(rows, len(data))))


def train_rate(store: Store, train: EncodedArrays, *, epochs: int = 2, **options) -> dict:
    """Samples/s of the trainer (its best epoch, so the first one's warm-up is left out)."""
    torch.manual_seed(0)
    model = build_model(InputLayout.of(store.feature_map), MODEL)
    config = TrainConfig(epochs=epochs, progress=False, lr=1e-3, **options)
    result = Trainer(config).fit(model, get_entry("deepfm"), train, None)
    seconds = min(h["seconds"] for h in result.history)
    samples = result.train_samples / len(result.history)
    return {"samples_per_s": round(samples / seconds), **result.setup}


def ddp_worker(args) -> None:
    """Run under torchrun: every rank trains its shard; rank 0 prints samples/s (all ranks)."""
    torch.set_num_threads(1)
    context = Distributed.from_env("cpu")
    store = Store.open(args.store)
    train = subset(store.split("train"), args.steps * args.batch_size * context.world)
    rate = train_rate(
        store, train, batch_size=args.batch_size, device="cpu", embedding_updates=args.updates
    )
    if context.is_main:
        print(json.dumps(rate), flush=True)


def make_store(rows: int, work: Path) -> tuple[Path, float]:
    raw = work / "criteo.txt"
    write_criteo(raw, rows, seed=0)
    started = time.perf_counter()
    result = prepare_store(
        get_format("criteo"), [str(raw)], work / "store", split=SplitSpec.parse("random:0.9")
    )
    seconds = time.perf_counter() - started
    raw.unlink()
    return result.path, seconds


def cpu_suite(args, store: Store, results: dict) -> None:
    device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    fields = store.feature_map.num_fields
    flops = mlp_flops(args.batch_size, fields)
    train = subset(store.split("train"), args.steps * args.batch_size)
    runs = {}
    best_matmul = float("inf")
    for repeat in range(args.repeats):  # interleave: a busy machine slows every variant alike
        best_matmul = min(best_matmul, matmul_seconds(args.batch_size, fields, device))
        for updates in ("dense", "sparse"):
            for loading in ("async", "sync"):
                key = f"{updates}/{loading}"
                rate = train_rate(
                    store, train, batch_size=args.batch_size, device="cpu",
                    embedding_updates=updates, sync_loading=loading == "sync",
                )  # fmt: skip
                if key not in runs or rate["samples_per_s"] > runs[key]["samples_per_s"]:
                    runs[key] = rate
                print(f"  repeat {repeat}: {key} {rate['samples_per_s']:,} samples/s", flush=True)
    matmul_flops_per_s = flops / best_matmul
    for rate in runs.values():
        achieved = flops * rate["samples_per_s"] / args.batch_size
        rate["mlp_flops_ratio"] = round(achieved / matmul_flops_per_s, 3)
    results["matmul_gflops"] = round(matmul_flops_per_s / 1e9, 1)
    results["mlp_gflop_per_step"] = round(flops / 1e9, 2)
    results["runs"] = runs
    best = max(runs.values(), key=lambda r: r["samples_per_s"])
    results["best"] = best
    for updates in ("dense", "sparse"):
        a, s = runs[f"{updates}/async"], runs[f"{updates}/sync"]
        results[f"async_over_sync_{updates}"] = round(a["samples_per_s"] / s["samples_per_s"], 3)
    if not args.skip_ddp:
        updates = best["embedding_updates"]
        one = train_rate(
            store, subset(store.split("train"), args.steps * args.batch_size * 2),
            batch_size=args.batch_size, device="cpu", embedding_updates=updates,
        )  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [
            "--nproc-per-node",
            "2",
            __file__,
            "--worker",
            "ddp",
            "--store",
            args.store_path,
        ]
        command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
        done = subprocess.run(
            [*command, "--updates", updates], env=env, capture_output=True, text=True, check=False
        )
        if done.returncode:
            results["ddp_error"] = done.stderr[-2000:]
        else:
            two = json.loads(done.stdout.strip().splitlines()[-1])
            results["one_process"] = one
            results["two_processes"] = two
            results["two_over_one"] = round(two["samples_per_s"] / one["samples_per_s"], 3)


def cuda_suite(args, store: Store, results: dict) -> None:
    device = torch.device(args.device)
    results["gpu"] = torch.cuda.get_device_name(device)
    fields = store.feature_map.num_fields
    # from the store on disk to the first finished step: open, move the split, build, step
    started = time.perf_counter()
    first: dict[str, float] = {}
    opened = Store.open(store.path)
    train = opened.split("train")
    torch.manual_seed(0)
    model = build_model(InputLayout.of(opened.feature_map), MODEL)

    class FirstStep(Exception):
        pass

    def stop_after_first(step: int) -> None:
        sync(device)
        first["seconds"] = time.perf_counter() - started
        raise FirstStep

    with contextlib.suppress(FirstStep):
        Trainer(TrainConfig(epochs=1, progress=False, batch_size=4096, device=args.device)).fit(
            model, get_entry("deepfm"), train, None, on_step=stop_after_first
        )
    results["store_to_first_step_s"] = round(first["seconds"], 2)
    runs = {}
    plans = [
        ("4096/fp32/dense", dict(batch_size=4096, precision="fp32", embedding_updates="dense")),
        ("4096/fp32/sparse", dict(batch_size=4096, precision="fp32", embedding_updates="sparse")),
        ("65536/bf16/dense", dict(batch_size=65536, precision="bf16", embedding_updates="dense")),
        ("65536/fp32/dense", dict(batch_size=65536, precision="fp32", embedding_updates="dense")),
    ]
    for key, options in plans:
        runs[key] = train_rate(store, train, device=args.device, epochs=args.epochs, **options)
        print(f"  {key}: {runs[key]['samples_per_s']:,} samples/s", flush=True)
    # Table I: the same run with batches streamed from host memory, async vs sync reading
    resident_check = trainer_module.fits_on
    trainer_module.fits_on = lambda device, data: False
    try:
        for loading in ("async", "sync"):
            key = f"4096/fp32/dense/streamed-{loading}"
            runs[key] = train_rate(
                store, subset(train, 200 * 4096), device=args.device, batch_size=4096,
                embedding_updates="dense", sync_loading=loading == "sync",
            )  # fmt: skip
            print(f"  {key}: {runs[key]['samples_per_s']:,} samples/s", flush=True)
    finally:
        trainer_module.fits_on = resident_check
    results["runs"] = runs
    a, s = runs["4096/fp32/dense/streamed-async"], runs["4096/fp32/dense/streamed-sync"]
    results["async_over_sync"] = round(a["samples_per_s"] / s["samples_per_s"], 3)
    # prediction: the training split on the device, large batches, inference mode
    model.to(device)
    data = trainer_module.Batches(train, device)
    flops = mlp_flops(4096, fields)
    results["matmul_tflops_fp32"] = round(flops / matmul_seconds(4096, fields, device) / 1e12, 1)
    for precision in ("fp32", "bf16"):
        predict_logits(model, data, 1 << 18, precision=precision, as_tensor=True)  # warm up
        sync(device)
        started = time.perf_counter()
        predict_logits(model, data, 1 << 18, precision=precision, as_tensor=True)
        sync(device)
        rate = len(data) / (time.perf_counter() - started)
        results[f"predict_samples_per_s_{precision}"] = round(rate)
        print(f"  predict {precision}: {rate:,.0f} samples/s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows to generate")
    parser.add_argument("--store", help="an existing store (else one is generated)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch (CPU)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (CUDA)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats (CPU)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--updates", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "ddp":
        ddp_worker(args)
        return 0
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="deepfm-train-speed-"))
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": "python " + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]]),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "model": MODEL.to_dict(),
        "batch_size": args.batch_size,
    }
    try:
        if args.store:
            args.store_path = args.store
        else:
            path, seconds = make_store(args.rows, work)
            args.store_path, results["prepare_seconds"] = str(path), round(seconds, 1)
        store = Store.open(args.store_path)
        results["rows"] = store.manifest["rows"]
        results["num_features"] = store.feature_map.num_features
        if device.type == "cuda":
            cuda_suite(args, store, results)
        else:
            cpu_suite(args, store, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))
    name = "train_speed_cuda.json" if device.type == "cuda" else "train_speed_cpu.json"
    out = Path(args.json or HERE / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
