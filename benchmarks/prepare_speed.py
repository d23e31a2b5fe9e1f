"""End-to-end ``deepfm prepare`` speed and peak memory on generated Criteo-format files.

``python benchmarks/prepare_speed.py [--rows 10000000] [--small-rows 1000000] [--json out.json]``

For a file of ``--rows`` rows (about 240 bytes each, written by ``make_criteo.py``) and one of
``--small-rows`` rows, it runs ``deepfm prepare`` in a child process (random 9:1 split, Criteo
defaults) and reports rows/s over the command's whole wall time (interpreter start included) and
the child's peak RSS. The same-run baseline is PyArrow's CSV parser alone on the large file (all
40 columns, numbers as float64 and categoricals as strings, its own threads), also in a child.
Targets (issue 4): prepare >= 250,000 rows/s; peak RSS <= 1.5 GB and within 10% between the two
sizes. Generated files and stores are written under ``--workdir`` and deleted afterwards unless
``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BYTES_PER_ROW = 245  # generated rows average about 240 bytes


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measured(command: list[str]) -> dict:
    """Run ``command`` in a child: wall seconds, its own peak RSS and CPU time (wait4), stdout."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors)
        stdout = child.stdout.read() if child.stdout else b""
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


def generate(path: Path, rows: int, seed: int, cap: int) -> float:
    if path.exists() and path.stat().st_size > rows * 200:
        return 0.0
    started = time.perf_counter()
    command = [sys.executable, str(HERE / "make_criteo.py"), str(path), "--rows", str(rows)]
    command += ["--seed", str(seed), "--vocab-cap", str(cap)]
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
    args = parser.parse_args(argv)
    if args.parse_only:
        parse_only(args.parse_only)
        return 0

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


if __name__ == "__main__":
    sys.exit(main())
