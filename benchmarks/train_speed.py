"""Training speed of DeepFM-D (embedding 10, MLP 400-400-400, dropout 0.5, Adam) from a store.

``python benchmarks/train_speed.py [--device cpu|cuda] [--rows N | --store DIR] [--json out]``

CPU (default): batch 4096, training samples/s of the trainer with dense Adam vs sparse row
updates (lazy Adam) and asynchronous vs synchronous batch loading, each with the ratio of the
MLP's achieved FLOP/s (6·B·Σ in·out per step: forward, and both backward products) to a plain
``torch.matmul`` of the same shapes measured in the same run (best of interleaved repeats, so
a busy machine slows both alike); and 2 processes (torchrun, gloo, 1 thread each) over 1 process
(2 threads) on the same rows. Table I of the paper, our version: async over sync reading, and
2 processes over 1.

CUDA (``benchmarks/gpu_suite.sh`` runs it; ``--short``: 2M generated rows and the quick steps):
named steps, each time-limited and written to the JSON file when it ends (a rerun with the same
``--json`` continues after the last finished step): the time from a store on disk to the first
training step; eager training at batch 4096 with TF32 matmuls (dense and sparse updates) and
65536 bf16; the matmul rate; predict rows/s (TF32, bf16); dense vs sparse updates with a
10M-row table; then compiled training (static shapes, CUDA graphs) at 4096 TF32 and 65536
bf16, and compiled predict. The full run adds 65536 TF32, streamed (async/sync) batches and
compiled TF32 predict. "fp32" training on CUDA runs its matmuls in TF32 (the trainer turns it
on), and the results say ``tf32``.
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
import threading
import time
from dataclasses import dataclass
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
from deepfm.outputs import write_json
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
    """Samples/s of the trainer (its best epoch, so the first one's warm-up, or compilation,
    is left out; ``first_epoch_s`` shows it)."""
    torch.manual_seed(0)
    model = build_model(InputLayout.of(store.feature_map), MODEL)
    config = TrainConfig(epochs=epochs, progress=False, lr=1e-3, **options)
    result = Trainer(config).fit(model, get_entry("deepfm"), train, None)
    seconds = min(h["seconds"] for h in result.history)
    samples = result.train_samples / len(result.history)
    first = round(result.history[0]["seconds"], 2)
    return {"samples_per_s": round(samples / seconds), "first_epoch_s": first, **result.setup}


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


class StepTimeout(Exception):
    pass


class Steps:
    """The CUDA suite as named steps, each time-limited, its result written to the JSON file as
    soon as it ends (``{"status": "ok", ...}`` or ``"error"``), so that a later failure loses
    nothing. A step that overruns its limit is recorded as ``"timeout"`` and the process exits
    (code 3): ``gpu_suite.sh`` starts it again and it continues with the next step (a step
    found ``"started"`` was killed from outside: recorded as ``"killed"``, not retried)."""

    def __init__(self, path: Path, results: dict) -> None:
        self.path, self.results = path, results
        previous = json.loads(path.read_text()) if path.exists() else {}
        self.done: dict = previous.get("steps", {})
        for entry in self.done.values():
            if entry.get("status") == "started":
                entry["status"] = "killed"
        results["steps"] = self.done
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2) + "\n")
        os.replace(tmp, self.path)

    def run(self, name: str, limit_s: float, measure) -> dict | None:
        if name in self.done:
            print(f"  {name}: {self.done[name]['status']} before, skipped", flush=True)
            return self.done[name] if self.done[name]["status"] == "ok" else None
        self.done[name] = {"status": "started", "limit_s": limit_s}
        self.write()
        started = time.perf_counter()

        def overrun() -> None:
            self.done[name] = {"status": "timeout", "limit_s": limit_s}
            self.write()
            print(f"  {name}: timed out after {limit_s:.0f} s", flush=True)
            os._exit(3)

        watchdog = threading.Timer(limit_s, overrun)
        watchdog.daemon = True
        watchdog.start()
        try:
            entry = {"status": "ok", **measure()}
        except Exception as exc:  # recorded; the next step may still work
            entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]}
        finally:
            watchdog.cancel()
        entry["wall_s"] = round(time.perf_counter() - started, 1)
        self.done[name] = entry
        self.write()
        keys = ("samples_per_s", "rows_per_s", "tflops", "seconds", "error")
        shown = {k: v for k, v in entry.items() if k in keys}
        print(f"  {name}: {shown} ({entry['wall_s']} s)", flush=True)
        return entry if entry["status"] == "ok" else None


def matmul_label(precision: str) -> str:
    """What the matmuls run in (the trainer's ``setup["precision"]`` says the same): the
    trainer turns TF32 on for CUDA, so "fp32" means TF32 there."""
    return "bf16" if precision == "bf16" else "tf32"


@dataclass(frozen=True)
class Sizes:
    """The CUDA suite's sizes; ``REHEARSAL`` runs every step on the CPU at toy sizes (a check
    of the script before spending device time, it measures nothing)."""

    small_batch: int = 4096
    large_batch: int = 65536
    predict_batch: int = 1 << 18
    large_table: int = 10_000_000
    rows: int | None = None  # training rows used (None: the whole split)


REHEARSAL = Sizes(small_batch=256, large_batch=1024, predict_batch=4096, large_table=200_000,
                  rows=8192)  # fmt: skip


def cuda_suite(args, store: Store, results: dict) -> None:
    device = torch.device(args.device)
    sizes = REHEARSAL if args.rehearse else Sizes()
    results["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "rehearsal"
    steps = Steps(Path(args.json), results)
    fields = store.feature_map.num_fields
    train = subset(store.split("train"), sizes.rows) if sizes.rows else store.split("train")
    short = args.short
    small, large = sizes.small_batch, sizes.large_batch
    # compiled runs: long enough that the second epoch is steady (the first compiles)
    compiled_rows = 200 * small if short else len(train)

    def store_to_first_step() -> dict:
        """From the store on disk to the end of the first step: open, move, build, step."""
        started = time.perf_counter()
        first: dict[str, float] = {}
        opened = Store.open(store.path)
        torch.manual_seed(0)
        model = build_model(InputLayout.of(opened.feature_map), MODEL)

        class FirstStep(Exception):
            pass

        def stop_after_first(step: int) -> None:
            sync(device)
            first["seconds"] = time.perf_counter() - started
            raise FirstStep

        config = TrainConfig(epochs=1, progress=False, batch_size=small, device=args.device)
        with contextlib.suppress(FirstStep):
            Trainer(config).fit(
                model, get_entry("deepfm"), opened.split("train"), None, on_step=stop_after_first
            )
        return {"seconds": round(first["seconds"], 2)}

    steps.run("store_to_first_step", 120, store_to_first_step)

    def training(rows: EncodedArrays, **options):
        def measure() -> dict:
            return train_rate(store, rows, device=args.device, epochs=args.epochs, **options)

        return measure

    for batch, precision in ((small, "fp32"), (large, "bf16")):
        for updates in ("dense", "sparse") if batch == small else ("dense",):
            name = f"eager/{batch}/{matmul_label(precision)}/{updates}"
            steps.run(name, 90, training(
                train, batch_size=batch, precision=precision, embedding_updates=updates
            ))  # fmt: skip
    if not short:
        steps.run(f"eager/{large}/tf32/dense", 90, training(train, batch_size=large))
        # Table I: the same run with batches streamed from host memory, async vs sync reading
        streamed = subset(train, 200 * small)
        for loading in ("async", "sync"):

            def measure_streamed(loading=loading) -> dict:
                planned = trainer_module.plan_residency
                trainer_module.plan_residency = lambda *a: (False, False)
                try:
                    return training(
                        streamed, batch_size=small, embedding_updates="dense",
                        sync_loading=loading == "sync",
                    )()  # fmt: skip
                finally:
                    trainer_module.plan_residency = planned

            steps.run(f"eager/{small}/tf32/dense/streamed-{loading}", 90, measure_streamed)

    def matmul_rate() -> dict:
        flops = mlp_flops(small, fields)
        return {"tflops": round(flops / matmul_seconds(small, fields, device) / 1e12, 1)}

    steps.run(f"matmul/{small}/tf32", 60, matmul_rate)

    def predict(precision: str, compiled: bool):
        def measure() -> dict:
            torch.manual_seed(0)
            model = build_model(InputLayout.of(store.feature_map), MODEL).to(device).eval()
            data = trainer_module.Batches(train, device)
            net = torch.compile(model, mode="reduce-overhead", dynamic=False) if compiled else model
            batch = sizes.predict_batch
            predict_logits(net, data, batch, precision=precision, as_tensor=True, static=compiled)
            sync(device)  # warm-up (compilation included) done
            started = time.perf_counter()
            predict_logits(net, data, batch, precision=precision, as_tensor=True, static=compiled)
            sync(device)
            return {"rows_per_s": round(len(data) / (time.perf_counter() - started))}

        return measure

    for precision in ("fp32", "bf16"):
        steps.run(f"predict/eager/{matmul_label(precision)}", 60, predict(precision, False))

    def large_table(updates: str):
        """Dense vs sparse updates with a 10M-row table (the data uses its first rows): the
        cost of a dense step over the whole table, for the auto rule's factor (64 on one GPU:
        equal costs near 64 x 4096 x 39 = 10M rows)."""

        def measure() -> dict:
            global_layout = InputLayout.of(store.feature_map)
            layout = InputLayout(sizes.large_table, global_layout.field_slots)
            torch.manual_seed(0)
            model = build_model(layout, MODEL)
            config = TrainConfig(
                epochs=2, progress=False, lr=1e-3, batch_size=small, device=args.device,
                embedding_updates=updates,
            )  # fmt: skip
            rows = subset(train, 100 * small)
            result = Trainer(config).fit(model, get_entry("deepfm"), rows, None)
            seconds = min(h["seconds"] for h in result.history)
            return {"samples_per_s": round(len(rows) / seconds), "table_rows": sizes.large_table}

        return measure

    for updates in ("dense", "sparse"):
        steps.run(f"eager/{small}/tf32/{updates}/10M-rows", 120, large_table(updates))
    # compiled (static shapes, CUDA graphs) last: the slowest to start and the likeliest to fail
    compiled_limit = 180 if short else 400
    for batch, precision in ((small, "fp32"), (large, "bf16")):
        name = f"compiled/{batch}/{matmul_label(precision)}/dense"
        rows = subset(train, compiled_rows) if batch == small else train

        def measure_compiled(rows=rows, batch=batch, precision=precision) -> dict:
            rate = training(
                rows, batch_size=batch, precision=precision, embedding_updates="dense",
                compile=True,
            )()  # fmt: skip
            if not rate.get("compiled"):
                raise RuntimeError("torch.compile was not available: the run was eager")
            return rate

        steps.run(name, compiled_limit, measure_compiled)
    steps.run("predict/compiled/bf16", compiled_limit / 2, predict("bf16", True))
    if not short:
        steps.run("predict/compiled/tf32", compiled_limit / 2, predict("fp32", True))


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
    parser.add_argument("--short", action="store_true", help="CUDA: the quick subset of steps")
    parser.add_argument(
        "--rehearse", action="store_true", help="the CUDA steps on the CPU at toy sizes"
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--updates", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "ddp":
        ddp_worker(args)
        return 0
    device = torch.device(args.device)
    name = "train_speed_cuda.json" if device.type == "cuda" else "train_speed_cpu.json"
    if args.rehearse:
        name = "train_speed_rehearsal.json"
    args.json = str(Path(args.json or HERE / "results" / name))
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
        if device.type == "cuda" or args.rehearse:
            cuda_suite(args, store, results)
        else:
            cpu_suite(args, store, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(results, args.json)
    return 0


def write_results(results: dict, path: str) -> None:
    """Print ``results`` with the load average after the run and write them to ``path`` as
    strict JSON, atomically (every benchmark of the training step writes its figures so)."""
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
