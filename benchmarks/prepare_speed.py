"""End-to-end ``deepfm prepare`` speed and peak memory on generated Criteo-format files.

``python benchmarks/prepare_speed.py [--rows 10000000] [--small-rows 1000000] [--json out.json]``
``python benchmarks/prepare_speed.py --long-tail [--rows 3000000] [--min-counts 1] [--before REF]``

For a file of ``--rows`` rows (about 240 bytes each, written by ``make_criteo.py``) and one of
``--small-rows`` rows, it runs ``deepfm prepare`` in a child process (random 9:1 split, Criteo
defaults) and reports rows/s over the command's whole wall time (interpreter start included) and
the child's peak RSS. The same-run baseline is PyArrow's CSV parser alone on the large file (all
40 columns, numbers as float64 and categoricals as strings, its own threads), also in a child.
Targets (issue 4): prepare >= 250,000 rows/s; peak RSS <= 1.5 GB and within 10% between the two
sizes. Generated files and stores are written under ``--workdir`` and deleted afterwards unless
``--keep``.

``--long-tail`` (issue 12): rows whose C3, C12, C16, C21 never stop bringing new values
(``make_criteo.py --long-tail``: ~10.8M distinct values at 3M rows). For each ``--min-counts``
it runs ``prepare`` with ``--workers 2`` (and, for the first min count, ``--workers 1``;
``--repeats N`` alternates N runs of each and reports the medians of their ratios), with
the peak memory of the whole process tree sampled every 50 ms (the sum of VmRSS, which counts
pages shared between processes once per process, and the sum of PSS, which splits them); then it
builds a DeepFM-D bundle (k = 10) over the store's feature map and measures the size of its JSON
files and ``Predictor.load`` in a fresh process (seconds and RSS growth). ``--before REF`` also
runs ``prepare`` of the git revision ``REF`` (exported with ``git archive``) on the same file.
Targets: 3M rows, min count 1: peak RSS <= 800 MB and >= 150,000 rows/s on 2 cores, bundle JSON
<= 5 MB, ``Predictor.load`` <= 0.5 s and <= 400 MB; 20M rows: peak RSS <= 1.5 GB at any min
count; 2 workers >= 1.7x the rows/s of 1.
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
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BYTES_PER_ROW = 245  # generated rows average about 240 bytes


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo.extend(int(c) for c in handle.read().split())
        except OSError:
            continue
    return out


def _memory_kb(pid: int) -> tuple[int, int, int]:
    """(VmRSS, PSS, VmHWM) of one process in KiB; zeros once it is gone. VmHWM is the process's
    own peak RSS so far: a spike between two samples still shows in it."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            status = handle.read()
        rss = int(status.split("VmRSS:")[1].split()[0])
        hwm = int(status.split("VmHWM:")[1].split()[0])
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            pss = int(handle.read().split("\nPss:")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return 0, 0, 0
    return rss, pss, hwm


class TreeMemory(threading.Thread):
    """Samples the summed memory of a process tree every ``every`` seconds; keeps the peaks."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_rss = self.peak_pss = self.peak_processes = self.largest_hwm = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pids = _tree(self.pid)
            sizes = [_memory_kb(p) for p in pids]
            self.peak_rss = max(self.peak_rss, sum(r for r, _, _ in sizes))
            self.peak_pss = max(self.peak_pss, sum(p for _, p, _ in sizes))
            self.largest_hwm = max(self.largest_hwm, *(h for _, _, h in sizes))
            self.peak_processes = max(self.peak_processes, len(pids))
            self.done.wait(self.every)


def measured(command: list[str], env: dict | None = None) -> dict:
    """Run ``command`` in a child: wall seconds, its own peak RSS and CPU time (wait4, children
    included), the peak summed RSS and PSS of its process tree (sampled), the largest peak RSS
    of one process of the tree (VmHWM), stdout.

    wait4's maxrss also counts this process's own RSS at the time of the fork (Linux records
    the old address space's peak when the child execs): this process must stay small (it
    builds bundles in a child) for that figure to be the child's."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, env=env)
        sampler = TreeMemory(child.pid)
        sampler.start()
        stdout = child.stdout.read() if child.stdout else b""
        sampler.done.set()
        sampler.join()
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        errors.seek(0)
        stderr = errors.read()
    code = os.waitstatus_to_exitcode(status)
    if code:
        sys.stderr.write(stderr.decode(errors="replace"))
        raise SystemExit(f"command failed ({code}): {' '.join(command)}")
    return {
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
        "tree_peak_rss_mb": round(sampler.peak_rss / 1024, 1),
        "tree_peak_pss_mb": round(sampler.peak_pss / 1024, 1),
        "largest_process_hwm_mb": round(sampler.largest_hwm / 1024, 1),
        "processes": sampler.peak_processes,
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "stdout": stdout.decode(),
    }


def parse_only(path: str) -> None:
    """The baseline, run in a child: stream the file through pyarrow.csv, print rows."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    names = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
    types = {n: pa.float64() for n in names[:14]} | {n: pa.string() for n in names[14:]}
    reader = pa_csv.open_csv(
        path,
        read_options=pa_csv.ReadOptions(column_names=names, block_size=32 << 20),
        parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pa_csv.ConvertOptions(column_types=types, null_values=[""]),
    )
    print(sum(batch.num_rows for batch in reader))


def generate(path: Path, rows: int, seed: int, cap: int, long_tail: bool = False) -> float:
    if path.exists() and path.stat().st_size > rows * 200:
        return 0.0
    started = time.perf_counter()
    command = [sys.executable, str(HERE / "make_criteo.py"), str(path), "--rows", str(rows)]
    command += ["--seed", str(seed), "--vocab-cap", str(cap)]
    command += ["--long-tail"] if long_tail else []
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--small-rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-cap", type=int, default=200_000, help="see make_criteo.py")
    parser.add_argument("--workdir", default="/tmp/deepfm-bench")
    parser.add_argument("--keep", action="store_true", help="keep generated files")
    parser.add_argument("--json", default="benchmarks/results/prepare_speed.json")
    parser.add_argument("--parse-only", help=argparse.SUPPRESS)
    parser.add_argument("--load-bundle", help=argparse.SUPPRESS)
    parser.add_argument("--build-bundle", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--long-tail", action="store_true", help="the issue-12 benchmark")
    parser.add_argument("--min-counts", default="1", help="long tail: min counts to prepare with")
    parser.add_argument("--workers", type=int, default=2, help="long tail: prepare's workers")
    parser.add_argument("--before", help="long tail: also prepare with this git revision")
    parser.add_argument(
        "--repeats", type=int, default=1, help="long tail: 2-worker and 1-worker runs, alternated"
    )
    parser.add_argument(
        "--prepare-only", action="store_true", help="long tail: no bundle, no 1-worker run"
    )
    args = parser.parse_args(argv)
    if args.parse_only:
        parse_only(args.parse_only)
        return 0
    if args.load_bundle:
        load_bundle_timed(args.load_bundle)
        return 0
    if args.build_bundle:
        print(json.dumps(build_bundle(*map(Path, args.build_bundle))))
        return 0
    if args.long_tail:
        return long_tail(args)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    need = int(args.rows * BYTES_PER_ROW * 2.8)  # file + provisional ids + final store
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, the benchmark needs {need / 1e9:.1f}")
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "python": sys.version.split()[0],
        },
        "command": "python " + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]]),
        "load_average_before": load_average(),
        "runs": {},
    }
    for rows in sorted({args.small_rows, args.rows}):
        data = work / f"criteo_{rows}_{args.seed}_cap{args.vocab_cap}.txt"
        generated = generate(data, rows, args.seed, args.vocab_cap)
        store = work / f"store_{rows}"
        entry: dict = {"rows": rows, "bytes": data.stat().st_size}
        if generated:
            entry["generate_seconds"] = round(generated, 1)
        if rows == args.rows:
            base = measured([sys.executable, __file__, "--parse-only", str(data)])
            assert int(base["stdout"].strip()) == rows, base["stdout"]
            entry["parse_only"] = {
                k: base[k] for k in ("seconds", "peak_rss_mb", "cpu_seconds")
            } | {"rows_per_s": round(rows / base["seconds"])}
        command = [sys.executable, "-m", "deepfm", "prepare", "--format", "criteo", "--input"]
        command += [str(data), "--out", str(store), "--overwrite", "--quiet", "--json"]
        run = measured(command)
        summary = json.loads(run["stdout"].strip().splitlines()[-1])
        assert summary["rows"]["total"] == rows and summary["rows"]["bad"] == 0, summary["rows"]
        entry["prepare"] = {k: run[k] for k in ("seconds", "peak_rss_mb", "cpu_seconds")} | {
            "rows_per_s": round(rows / run["seconds"]),
            "rows_per_s_in_manifest": summary["rows_per_s"],
            "splits": {k: summary["rows"][k] for k in ("train", "valid", "test")},
            "num_features": summary["num_features"],
            "distinct_values": sum(summary["distinct_values"].values()),
        }
        entry["store_bytes"] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        shutil.rmtree(store)
        if not args.keep:
            data.unlink()
        results["runs"][str(rows)] = entry
        print(json.dumps(entry), flush=True)
    results["load_average_after"] = load_average()
    big, small = results["runs"][str(args.rows)], results["runs"][str(args.small_rows)]
    results["summary"] = {
        "prepare_rows_per_s": big["prepare"]["rows_per_s"],
        "parse_only_rows_per_s": big["parse_only"]["rows_per_s"],
        "prepare_over_parse": round(
            big["prepare"]["rows_per_s"] / big["parse_only"]["rows_per_s"], 3
        ),
        "peak_rss_mb": big["prepare"]["peak_rss_mb"],
        "peak_rss_small_mb": small["prepare"]["peak_rss_mb"],
        "rss_ratio_big_over_small": round(
            big["prepare"]["peak_rss_mb"] / small["prepare"]["peak_rss_mb"], 3
        ),
    }
    print(json.dumps(results["summary"], indent=2))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "python": sys.version.split()[0],
    }


def build_bundle(store: Path, out: Path) -> dict:
    """A DeepFM-D bundle (k = 10) over the store's feature map, its weights as initialised (the
    cost of loading a bundle does not depend on their values). Run in a child (``--build-bundle``):
    the ~0.7 GB it holds would show in the next ``prepare``'s wait4 maxrss (see ``measured``)."""
    from deepfm.data.store import Store
    from deepfm.models.registry import ModelConfig, build_model
    from deepfm.nn import InputLayout
    from deepfm.serve.bundle import save_bundle

    feature_map = Store.open(store).feature_map
    config = ModelConfig("deepfm")
    model = build_model(InputLayout.of(feature_map), config)
    save_bundle(out, model, config, feature_map, data_format="criteo")
    json_bytes = sum(f.stat().st_size for f in out.rglob("*.json"))
    return {
        "json_mb": round(json_bytes / 1e6, 3),
        "vocabulary_mb": round(sum(f.stat().st_size for f in (out / "vocab").rglob("*")) / 1e6, 1),
        "weights_mb": round((out / "model.safetensors").stat().st_size / 1e6, 1),
        "num_features": feature_map.num_features,
    }


def load_bundle_timed(directory: str) -> None:
    """Run in a fresh child: ``Predictor.load`` seconds and RSS growth, then one record."""
    import torch  # noqa: F401 - imported before the measurement, as a server has it

    from deepfm.serve.predictor import Predictor

    def rss_mb() -> float:
        with open("/proc/self/status") as handle:
            return int(handle.read().split("VmRSS:")[1].split()[0]) / 1024

    before = rss_mb()
    started = time.perf_counter()
    predictor = Predictor.load(directory)
    seconds = time.perf_counter() - started
    after = rss_mb()
    score = predictor.predict_proba([{"I1": 3, "C3": "00000000", "C1": "68fd1e64"}])
    print(json.dumps({"seconds": round(seconds, 3), "rss_growth_mb": round(after - before, 1),
                      "first_score": float(score[0])}))  # fmt: skip


def old_source(ref: str, work: Path) -> Path:
    """``src`` of git revision ``ref``, exported under ``work``."""
    target = work / f"src-{ref}"
    if not target.exists():
        target.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", ref, "src"], cwd=HERE.parent, check=True,
                                 capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target / "src"


def prepare_run(data: Path, store: Path, min_count: int, workers: int | None, env=None) -> dict:
    command = [sys.executable, "-m", "deepfm", "prepare", "--format", "criteo", "--input"]
    command += [str(data), "--out", str(store), "--overwrite", "--quiet", "--json"]
    command += ["--min-count", str(min_count)]
    command += ["--workers", str(workers)] if workers else []
    run = measured(command, env)
    summary = json.loads(run["stdout"].strip().splitlines()[-1])
    rows = summary["rows"]["total"]
    keys = ("seconds", "cpu_seconds", "peak_rss_mb", "tree_peak_rss_mb", "tree_peak_pss_mb")
    keys += ("largest_process_hwm_mb",)
    return {k: run[k] for k in keys} | {
        "processes": run["processes"],
        "rows_per_s": round(rows / run["seconds"]),
        "distinct_values": sum(summary["distinct_values"].values()),
        "num_features": summary["num_features"],
    }


def long_tail(args: argparse.Namespace) -> int:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = args.rows
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine(),
        "command": "python " + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]]),
        "load_average_before": load_average(),
        "rows": rows,
    }
    data = work / f"criteo_longtail_{rows}_{args.seed}.txt"
    generated = generate(data, rows, args.seed, args.vocab_cap, long_tail=True)
    results["bytes"] = data.stat().st_size
    if generated:
        results["generate_seconds"] = round(generated, 1)
    store = work / f"store_longtail_{rows}"
    runs = {}
    for i, min_count in enumerate(int(m) for m in args.min_counts.split(",")):
        entry = {"workers_2": prepare_run(data, store, min_count, args.workers)}
        print(json.dumps({"min_count": min_count, **entry}), flush=True)
        if i == 0 and not args.prepare_only:
            bundle = work / "bundle_longtail"
            built = measured([sys.executable, __file__, "--build-bundle", str(store), str(bundle)])
            entry["bundle"] = json.loads(built["stdout"].strip().splitlines()[-1])
            load = measured([sys.executable, __file__, "--load-bundle", str(bundle)])
            entry["bundle"]["load"] = json.loads(load["stdout"].strip().splitlines()[-1])
            shutil.rmtree(bundle)
            runs_1, runs_2 = [], [entry["workers_2"]]
            for repeat in range(args.repeats):  # interleaved: both see the same machine
                runs_1.append(prepare_run(data, store, min_count, 1))
                if repeat + 1 < args.repeats:
                    runs_2.append(prepare_run(data, store, min_count, args.workers))
            entry["workers_1"] = runs_1[0]
            entry["workers_2_over_1"] = round(
                entry["workers_2"]["rows_per_s"] / entry["workers_1"]["rows_per_s"], 3
            )
            if args.repeats > 1:
                pairs = list(zip(runs_1, runs_2, strict=True))
                ratios = [b["rows_per_s"] / a["rows_per_s"] for a, b in pairs]
                cpu = [b["cpu_seconds"] / a["cpu_seconds"] for a, b in pairs]
                entry["repeats"] = {
                    "workers_2": runs_2,
                    "workers_1": runs_1,
                    "workers_2_over_1": [round(r, 3) for r in ratios],
                    "median_workers_2_over_1": round(statistics.median(ratios), 3),
                    "median_cpu_2_over_1": round(statistics.median(cpu), 3),
                    "load_average": load_average(),
                }
            if args.before:
                env = {**os.environ, "PYTHONPATH": str(old_source(args.before, work))}
                entry["before"] = {"ref": args.before} | prepare_run(
                    data, store, min_count, None, env
                )
            print(json.dumps({k: v for k, v in entry.items() if k != "workers_2"}), flush=True)
        runs[str(min_count)] = entry
    shutil.rmtree(store, ignore_errors=True)
    if not args.keep:
        data.unlink()
    results["runs"] = runs
    results["load_average_after"] = load_average()
    out = Path(args.json.replace("prepare_speed.json", f"prepare_longtail_{rows}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
