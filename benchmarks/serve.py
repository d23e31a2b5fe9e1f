"""Serving speed: ``/rank`` with 100 candidates over HTTP against the bare forward pass.

``python benchmarks/serve.py [--bundle DIR] [--requests 3000] [--clients 32] [--cpus 0,1]
[--client raw|httpx] [--server-args OPTIONS ...] [--out benchmarks/results/serve.json]``

A DeepFM-D bundle (embedding 10, MLP 400-400-400, the Criteo feature map) is trained for one
epoch on the Criteo sample (``$DEEPFM_SHARED_DATA``) unless ``--bundle`` names one. Measured in
one run, on the same CPUs:

* the **bare ONNX Runtime forward pass** of one request's 100 rows, encoded beforehand (one
  intra-op thread; CPU milliseconds per call): the floor of a request's cost;
* for each runtime and each ``--server-args`` (repeat it to compare settings, e.g. ``''`` and
  ``'--max-batch-rows 1'`` for batching on and off), ``deepfm serve`` on loopback driven by an
  asynchronous load generator over ``--clients`` keep-alive connections: ``--warmup`` requests,
  then two timed phases of ``--requests`` each:

  * closed loop (``saturated``): each connection sends its next request when its answer
    arrives: the most requests/s. Its latencies are mostly queueing (on average clients /
    throughput).
  * open loop (``at_rate``): requests start on a fixed schedule of ``--rate`` per second (300,
    the issue's bar), at most ``--clients`` at once; latency counts from the scheduled start.

  Each phase reports requests/s, p50 / p90 / p99 latency (client side, to the whole response),
  and CPU milliseconds per request of the server process (all its threads) and of the load
  generator, the server's also over the bare forward pass (``cpu_over_bare_forward``);
* ``Predictor.predict_proba`` rows/s on raw records at ``--batch`` (encoding included).

Each request ranks 100 real Criteo rows (C7-C26 as the item, the integer fields and C1-C6 of the
first row as user and context) by CTR × bid; bodies and requests are built once, before timing.
The load generator shares the CPUs with the server (``--cpus`` pins both, e.g. ``0,1`` for the
issue's 2-core setting on a larger machine); ``--client raw`` (pre-serialised HTTP/1.1 on
asyncio streams) leaves the CPUs to the server, httpx spends about as much CPU per request as
the server. Bars of issue 15, read from the open loop at 300 requests/s: p99 ≤ 20 ms, and server
CPU per request ≤ 2× the bare forward pass.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from deepfm.data.formats import get_format
from deepfm.data.reader import BadRows

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("DEEPFM_SHARED_DATA", REPO.parent / "shared" / "data"))
SAMPLE = SHARED / "criteo" / "criteo_train_sample.txt"
BAR_P99_MS = 20.0
BAR_RPS = 300.0
#: server CPU per /rank over the bare ONNX Runtime forward pass of its rows (issue 15)
BAR_CPU_RATIO = 2.0


# -- data and bundle --------------------------------------------------------------------------


def criteo_rows(path: Path) -> list[dict]:
    """The sample's rows as JSON-ready records (label dropped)."""
    rows = []
    for chunk in get_format("criteo").read([path], BadRows()):
        for row in chunk.table.to_pylist():
            row.pop("label", None)
            rows.append(row)
    return rows


def rank_bodies(
    rows: list[dict], candidates: int, count: int, seed: int = 0, fresh_users: bool = False
) -> list[bytes]:
    """``count`` serialised /rank requests of ``candidates`` real rows each, with bids;
    ``fresh_users``: each request's context carries a user id (``C1``) no request had before."""
    rng = np.random.default_rng(seed)
    bodies = []
    for k in range(count):
        start = (k * candidates) % max(1, len(rows) - candidates)
        chunk = rows[start : start + candidates]
        user = {f"I{i}": chunk[0][f"I{i}"] for i in range(1, 14)}
        context = {f"C{i}": chunk[0][f"C{i}"] for i in range(1, 7)}
        if fresh_users:
            context["C1"] = f"u{k:07x}"
        items = [
            {**{f"C{i}": r[f"C{i}"] for i in range(7, 27)}, "bid": round(float(b), 4)}
            for r, b in zip(chunk, rng.lognormal(0.0, 1.0, len(chunk)), strict=True)
        ]
        body = {"user": user, "context": context, "candidates": items, "top": 10, "by": "ctr_bid"}
        bodies.append(json.dumps(body).encode())
    return bodies


def train_bundle(data: Path, out: Path, threads: int) -> Path:
    """DeepFM-D (the defaults: k=10, 400-400-400) trained one epoch on ``data``."""
    from deepfm.cli import main

    argv = ["train", "--data", str(data), "--format", "criteo", "--model", "deepfm"]
    argv += ["--epochs", "1", "--threads", str(threads), "--quiet", "--out", str(out)]
    with contextlib.redirect_stdout(sys.stderr):  # its metrics: not part of our table
        code = main(argv)
    if code != 0:
        raise SystemExit("training the benchmark bundle failed")
    return out


# -- the server -------------------------------------------------------------------------------


class Server:
    """``deepfm serve`` on 127.0.0.1 and a free port, pinned to ``cpus`` when given."""

    def __init__(self, model: Path, runtime: str, options: list[str], cpus: set[int] | None):
        command = [sys.executable, "-m", "deepfm", "serve", "--bundle", str(model)]
        command += ["--port", "0", "--runtime", runtime, *options]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        self.url = ""
        assert self.process.stderr is not None
        log = []
        for line in self.process.stderr:
            log.append(line)
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                self.url = found.group(1)
                break
        if not self.url:
            self.process.wait()
            raise SystemExit("deepfm serve did not start:\n" + "".join(log))
        # keep reading its log, so that a chatty server never blocks on a full pipe
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(latencies: list[float], failures: int, seconds: float) -> dict:
    ms = np.array(latencies) * 1e3
    return {
        "requests": len(latencies),
        "failures": failures,
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


class HttpxSlots:
    """Connection slots of one ``httpx.AsyncClient``; each slot sends prebuilt requests (one per
    body, built once: ``client.send`` then skips URL merging, header building, cookies)."""

    def __init__(self, url: str, bodies: list[bytes], clients: int) -> None:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        self.client = httpx.AsyncClient(base_url=url, limits=limits, timeout=60)
        headers = {"content-type": "application/json"}
        self.requests = [
            [self.client.build_request("POST", "/rank", content=b, headers=headers) for b in bodies]
            for _ in range(clients)
        ]

    async def send(self, slot: int, body: int) -> int:
        response = await self.client.send(self.requests[slot][body])
        return response.status_code

    async def close(self) -> None:
        await self.client.aclose()


class RawSlots:
    """One keep-alive HTTP/1.1 connection per slot, writing pre-serialised requests and reading
    the status line, headers and ``content-length`` body: a load generator that leaves the CPUs
    to the server (``--client raw``)."""

    def __init__(self, url: str, bodies: list[bytes], clients: int) -> None:
        address = httpx.URL(url)
        self.host, self.port = address.host, address.port
        self.clients = clients
        self.messages = [
            b"POST /rank HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (self.host.encode(), len(b), b)
            for b in bodies
        ]
        self.streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open(self) -> None:
        for _ in range(self.clients):
            self.streams.append(await asyncio.open_connection(self.host, self.port))

    async def send(self, slot: int, body: int) -> int:
        reader, writer = self.streams[slot]
        writer.write(self.messages[body])
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        return int(head[9:12])

    async def close(self) -> None:
        for _, writer in self.streams:
            writer.close()


async def drive(
    url: str,
    bodies: list[bytes],
    *,
    clients: int,
    requests: int,
    warmup: int,
    rate: float,
    pid: int,
    client: str = "httpx",
) -> dict:
    """Two phases after ``warmup`` requests, each of ``requests`` POST /rank over ``clients``
    connections:

    * ``saturated``: every client sends its next request as soon as its answer arrives (a
      closed loop): the most requests/s. Latency there is mostly queueing: by Little's law it
      averages clients / throughput.
    * ``at_rate``: requests start on a fixed schedule of ``rate`` per second, on at most
      ``clients`` connections at once (an open loop); latency counts from the scheduled start,
      so a server that falls behind shows it (no coordinated omission).

    CPU time per request of the server process and of this load generator comes with each.
    """
    async with httpx.AsyncClient(base_url=url, timeout=60) as probe:
        for _ in range(100):  # the server answers /health once it is up
            try:
                if (await probe.get("/health")).status_code == 200:
                    break
            except httpx.TransportError:
                await asyncio.sleep(0.1)
    slots = (RawSlots if client == "raw" else HttpxSlots)(url, bodies, clients)
    if isinstance(slots, RawSlots):
        await slots.open()
    sent = 0  # bodies are taken in turn across the phases (with --traffic fresh, none twice)

    def next_body() -> int:
        nonlocal sent
        sent += 1
        return (sent - 1) % len(bodies)

    async def saturated(total: int) -> dict:
        latencies: list[float] = []
        failures = issued = 0

        async def worker(slot: int) -> None:
            nonlocal issued, failures
            while issued < total:
                body = next_body()
                issued += 1
                start = time.perf_counter()
                status = await slots.send(slot, body)
                latencies.append(time.perf_counter() - start)
                failures += status != 200

        began = time.perf_counter()
        await asyncio.gather(*(worker(slot) for slot in range(clients)))
        return summary(latencies, failures, time.perf_counter() - began)

    async def at_rate(total: int) -> dict:
        latencies: list[float] = []
        failures = 0
        free: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(clients):
            free.put_nowait(slot)

        async def one(slot: int, body: int, due: float) -> None:
            nonlocal failures
            try:
                failures += await slots.send(slot, body) != 200
            finally:
                latencies.append(time.perf_counter() - due)
                free.put_nowait(slot)

        began = time.perf_counter()
        tasks = []
        for i in range(total):
            due = began + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            slot = await free.get()  # all connections busy: this request starts late
            tasks.append(asyncio.create_task(one(slot, next_body(), due)))
        await asyncio.gather(*tasks)
        result = summary(latencies, failures, time.perf_counter() - began)
        result["offered_per_s"] = rate
        return result

    try:
        await saturated(warmup)
        out = {}
        for name, phase in (("saturated", saturated), ("at_rate", at_rate)):
            server_cpu, client_cpu = cpu_seconds(pid), time.process_time()
            out[name] = await phase(requests)
            cpu = {
                "server": cpu_seconds(pid) - server_cpu,
                "client": time.process_time() - client_cpu,
            }
            for who, seconds in cpu.items():
                out[name][f"{who}_cpu_ms_per_request"] = round(seconds / requests * 1e3, 3)
    finally:
        await slots.close()
    return out


# -- in-process -------------------------------------------------------------------------------


def predict_rate(model: Path, runtime: str, rows: list[dict], batch: int, threads: int) -> dict:
    """``predict_proba`` rows/s on raw records at ``batch`` (median of timed repeats), and the
    share of that time spent encoding."""
    import torch

    from deepfm.serve.predictor import Predictor

    torch.set_num_threads(threads)
    predictor = Predictor.load(model, runtime=runtime, threads=threads)
    records = rows[:batch]
    predictor.predict_proba(records)  # warm-up: first-call allocations, kernel selection
    totals, encodes = [], []
    for _ in range(15):
        start = time.perf_counter()
        encoded = predictor.encode(records)
        middle = time.perf_counter()
        predictor.predict_encoded(encoded)
        end = time.perf_counter()
        totals.append(end - start)
        encodes.append(middle - start)
    total = statistics.median(totals)
    return {
        "batch": batch,
        "threads": threads,
        "rows_per_s": round(batch / total),
        "encode_share": round(statistics.median(encodes) / total, 3),
    }


def bare_forward(model: Path, body: bytes, calls: int = 2000) -> dict:
    """CPU milliseconds of one ONNX Runtime forward pass (one intra-op thread) of a /rank
    request's rows, encoded beforehand: the floor a server's CPU per request is compared with."""
    from deepfm.serve.predictor import Predictor

    predictor = Predictor.load(model, runtime="onnx", threads=1)
    request = json.loads(body)
    encoded = predictor.encode_rank(request["user"], request["context"], request["candidates"])
    for _ in range(50):  # warm-up
        predictor.forward(encoded.ids, encoded.values)
    start = time.thread_time()  # ONNX Runtime runs a one-thread session on the calling thread
    for _ in range(calls):
        predictor.forward(encoded.ids, encoded.values)
    return {
        "rows": len(encoded.ids),
        "calls": calls,
        "cpu_ms_per_call": round((time.thread_time() - start) / calls * 1e3, 4),
    }


def request_breakdown(
    model: Path, bodies: list[bytes], repeats: int = 300, warmup: int = 300
) -> dict:
    """Thread CPU milliseconds of the steps of one /rank request in-process, ONNX Runtime:
    parsing and checking the body, encoding its records, the forward pass, ranking, the answer's
    JSON; and all of them in a row.

    * ``least``: the least of ``repeats`` runs of each step alone on the first body (hot caches;
      the machine's noise only adds): each step's floor.
    * ``in_flow``: the steps in a row, request after request over ``bodies`` in turn, each body
      parsed afresh (new strings to hash, as in the server), after ``warmup`` untimed requests
      (as the server gets; they fill the encoding memo): the median over blocks of 32 requests
      of each step's mean. Each step pays for the caches the others used, as it does in the
      server."""
    from deepfm.serve.predictor import Predictor
    from deepfm.serve.server import RankRequest, _scores_json, check_structure, parse_body

    predictor = Predictor.load(model, runtime="onnx", threads=1)
    predictor.feature_map.prepare_row_keys()
    request = parse_body(RankRequest, bodies[0])

    def encode(request=request):
        return predictor.encode_rank(request.user, request.context, request.candidates, strict=True)

    encoded = encode()
    ctr = predictor.forward(encoded.ids, encoded.values)
    steps = {
        "parse": lambda: parse_body(RankRequest, bodies[0]),
        "encode": encode,
        "forward": lambda: predictor.forward(encoded.ids, encoded.values),
        "rank": lambda: predictor.ranked(ctr, request.candidates, top=10, by=request.by),
        "all": lambda: predictor.ranked(
            predictor.predict_encoded(encode()), request.candidates, top=10, by=request.by
        ),
    }
    least = {}
    for name, step in steps.items():
        step()
        best = float("inf")
        for _ in range(repeats):
            start = time.thread_time()
            step()
            best = min(best, time.thread_time() - start)
        least[f"{name}_ms"] = round(best * 1e3, 3)

    fields = len(predictor.encoder.names) + 1
    blocks: dict[str, list[float]] = {}
    warm = max(1, warmup // 32)
    for block in range(-warm, max(1, repeats // 32)):  # < 0: warm-up
        spent = dict.fromkeys(("parse", "encode", "forward", "rank", "answer"), 0.0)
        for k in range(32):
            raw = bodies[((block + warm) * 32 + k) % len(bodies)]
            t0 = time.thread_time()
            check_structure(raw, 1003, 1003 * fields + 5)  # as the server: the default limits
            body = parse_body(RankRequest, raw)
            t1 = time.thread_time()
            found = encode(body)
            t2 = time.thread_time()
            scores = predictor.predict_encoded(found)
            t3 = time.thread_time()
            items = predictor.ranked(scores, body.candidates, top=body.top, by=body.by)
            t4 = time.thread_time()
            _scores_json({"items": items})
            t5 = time.thread_time()
            for name, a, b in zip(spent, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5), strict=True):
                spent[name] += b - a
        if block >= 0:
            for name, seconds in spent.items():
                blocks.setdefault(name, []).append(seconds / 32 * 1e3)
    in_flow = {f"{name}_ms": round(statistics.median(v), 3) for name, v in blocks.items()}
    in_flow["all_ms"] = round(sum(in_flow.values()), 3)
    return {"least": least, "in_flow": in_flow}


# -- report -----------------------------------------------------------------------------------


def machine(cpus: set[int] | None) -> dict:
    import onnxruntime
    import torch

    model = platform.processor()
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_used": len(cpus) if cpus else len(os.sched_getaffinity(0)),
        "pinned_to": sorted(cpus) if cpus else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
    }


def markdown(results: dict) -> str:
    rate = results["rate"]
    bare = results["bare_forward"]["cpu_ms_per_call"]
    breakdown = results["request_breakdown"]
    least = ", ".join(f"{k[:-3]} {v:.3f}" for k, v in breakdown["least"].items())
    in_flow = ", ".join(f"{k[:-3]} {v:.3f}" for k, v in breakdown["in_flow"].items())
    lines = [
        f"Bare ONNX Runtime forward of {results['candidates']} rows: {bare:.3f} ms CPU per call.",
        f"One /rank in-process, thread CPU ms, least of 300 (each step alone): {least}.",
        f"The same in flow (bodies in turn, median of 32-request blocks): {in_flow}.",
        f"Traffic: {results['traffic']} (see --traffic).",
        "",
        f"| runtime, server options | requests/s ({results['clients']} clients, closed loop) | "
        f"p50 / p99 ms there | p50 / p99 ms at {rate:.0f} req/s | server CPU ms / request "
        f"at {rate:.0f} req/s (÷ bare forward) | same, closed loop | {results['client']} client "
        f"CPU ms / request | predict_proba rows/s (batch {results['batch']}, 1 / "
        f"{results['machine']['cpus_used']} threads) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, run in results["runs"].items():
        full, paced, local = run["saturated"], run["at_rate"], run["predict_proba"]
        rates = " / ".join(f"{r['rows_per_s']:,}" for r in local)
        lines.append(
            f"| {label} | {full['requests_per_s']:.0f} | {full['p50_ms']:.1f} / "
            f"{full['p99_ms']:.1f} | {paced['p50_ms']:.1f} / {paced['p99_ms']:.1f} | "
            f"{paced['server_cpu_ms_per_request']:.2f} ({paced['cpu_over_bare_forward']:.2f}x) | "
            f"{full['server_cpu_ms_per_request']:.2f} ({full['cpu_over_bare_forward']:.2f}x) | "
            f"{paced['client_cpu_ms_per_request']:.2f} | {rates} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="a bundle (default: train DeepFM-D on --data)")
    parser.add_argument("--data", type=Path, default=SAMPLE, help="the Criteo sample")
    parser.add_argument("--runtimes", default="torch,onnx", help="comma-separated")
    parser.add_argument("--requests", type=int, default=3000, help="timed requests per runtime")
    parser.add_argument("--warmup", type=int, default=300, help="untimed requests first")
    parser.add_argument("--clients", type=int, default=32, help="concurrent connections")
    parser.add_argument("--candidates", type=int, default=100, help="candidates per /rank")
    parser.add_argument(
        "--rate", type=float, default=BAR_RPS, help="requests/s of the paced (open-loop) phase"
    )
    parser.add_argument("--batch", type=int, default=1024, help="predict_proba batch size")
    parser.add_argument(
        "--traffic",
        choices=("repeat", "fresh"),
        default="repeat",
        help="repeat: 32 request bodies in turn; fresh: every request a user never seen "
        "(its own C1), its candidates in turn from the sample's rows (a catalog of ~11k)",
    )
    parser.add_argument(
        "--forward-calls", type=int, default=2000, help="timed calls of the bare forward pass"
    )
    parser.add_argument(
        "--server-args",
        action="append",
        help="extra `deepfm serve` options, e.g. '--threads 1 --concurrency 2'; repeat it to "
        "compare settings in one run (e.g. '' and '--max-batch-rows 1': batching off)",
    )
    parser.add_argument("--cpus", help="pin server and load generator to these CPUs, e.g. 0,1")
    parser.add_argument(
        "--client",
        choices=("httpx", "raw"),
        default="httpx",
        help="load generator: httpx.AsyncClient (default), or raw keep-alive HTTP/1.1 on asyncio "
        "streams (far less CPU, which on shared cores is left to the server)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve.json")
    args = parser.parse_args()

    cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else None
    if cpus:
        os.sched_setaffinity(0, cpus)
    threads = len(cpus) if cpus else len(os.sched_getaffinity(0))
    if not args.data.exists():
        raise SystemExit(f"{args.data} is absent: pass --data (the Criteo sample)")
    rows = criteo_rows(args.data)
    work = Path(tempfile.mkdtemp(prefix="deepfm-serve-bench-"))
    try:
        model = args.bundle or train_bundle(args.data, work / "bundle", threads)
        if args.traffic == "fresh":  # every request its own user; candidates from the sample
            count = args.warmup + 2 * args.requests
            bodies = rank_bodies(rows, args.candidates, count=count, fresh_users=True)
        else:
            bodies = rank_bodies(rows, args.candidates, count=32)
        variants = args.server_args or [""]
        results = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S +0000"),
            "command": " ".join(["python", *sys.argv]),
            "machine": machine(cpus),
            "load_average_before": os.getloadavg(),
            "model": json.loads((Path(model) / "model.json").read_text())["model"],
            "clients": args.clients,
            "traffic": args.traffic,
            "client": args.client,
            "candidates": args.candidates,
            "rate": args.rate,
            "requests": args.requests,
            "warmup": args.warmup,
            "batch": args.batch,
            "server_args": variants,
            "bar": {
                "p99_ms": BAR_P99_MS,
                "requests_per_s": BAR_RPS,
                "server_cpu_over_bare_forward": BAR_CPU_RATIO,
                "reading": "p99 and server CPU per request from the open loop at --rate; "
                "requests/s from the closed loop",
            },
            "bare_forward": bare_forward(Path(model), bodies[0], args.forward_calls),
            "request_breakdown": request_breakdown(Path(model), bodies, warmup=args.warmup),
            "runs": {},
        }
        bare = results["bare_forward"]["cpu_ms_per_call"]
        print(f"bare ONNX Runtime forward: {bare:.3f} ms CPU", file=sys.stderr, flush=True)
        for runtime in args.runtimes.split(","):
            local = [
                predict_rate(Path(model), runtime, rows, args.batch, n)
                for n in sorted({1, threads})
            ]
            for options in variants:
                # the load generator's heap (the sample's rows, the bodies, torch and ONNX
                # Runtime loaded above) frozen out of the collector: a full collection of it
                # mid-phase pauses every client for ~0.3 s, which the latencies would count
                gc.collect()
                gc.freeze()
                server = Server(Path(model), runtime, options.split(), cpus)
                try:
                    run = asyncio.run(
                        drive(
                            server.url, bodies, clients=args.clients, requests=args.requests,
                            warmup=args.warmup, rate=args.rate, pid=server.process.pid,
                            client=args.client,
                        )
                    )  # fmt: skip
                finally:
                    server.stop()
                for phase in ("saturated", "at_rate"):
                    cpu = run[phase]["server_cpu_ms_per_request"]
                    run[phase]["cpu_over_bare_forward"] = round(cpu / bare, 2)
                run["predict_proba"] = local
                run["meets_bar"] = (
                    run["saturated"]["requests_per_s"] >= BAR_RPS
                    and run["at_rate"]["p99_ms"] <= BAR_P99_MS
                    and run["at_rate"]["offered_per_s"] >= BAR_RPS
                    and run["at_rate"]["cpu_over_bare_forward"] <= BAR_CPU_RATIO
                    and not run["saturated"]["failures"] + run["at_rate"]["failures"]
                )
                label = f"{runtime} {options}".strip()
                if label in results["runs"]:  # the same settings again: a second sample of them
                    label += f" #{sum(key.split(' #')[0] == label for key in results['runs']) + 1}"
                results["runs"][label] = run
                print(f"{label}: {json.dumps(run)}", file=sys.stderr, flush=True)
        results["load_average_after"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(markdown(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
