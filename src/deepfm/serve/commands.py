"""``deepfm serve``, ``deepfm export`` and ``deepfm rank``: a bundle as a service, as ONNX, and
ranking candidates from the command line."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

from deepfm.cli import add_flag
from deepfm.errors import ConfigError, DataError

TOKEN_ENV = "DEEPFM_TOKEN"


def register_commands(sub: argparse._SubParsersAction) -> None:
    from deepfm.cli import add_bundle_option

    serve = sub.add_parser(
        "serve",
        help="HTTP service: /predict, /rank, /model, /metrics, /reload (FastAPI + uvicorn)",
        description="Score and rank with a bundle over HTTP. SIGHUP or POST /reload loads the "
        "bundle directory again and swaps it in without failing a request.",
    )
    add_bundle_option(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=port_number, default=8000, help="port (0: any free port)")
    add_flag(
        serve,
        "--runtime",
        default=None,
        help="onnx (ONNX Runtime, the default when installed: less CPU per request; the model "
        "is exported when the bundle loads) or torch",
    )
    serve.add_argument(
        "--token",
        help=f"require 'Authorization: Bearer TOKEN' on every route but /health (or set "
        f"${TOKEN_ENV}, which keeps it out of the process list)",
    )
    serve.add_argument(
        "--max-records",
        type=int,
        default=1000,
        help="most records per /predict or candidates per /rank (more: 413)",
    )
    serve.add_argument(
        "--max-body-bytes", type=int, default=8 << 20, help="largest request body (more: 413)"
    )
    add_flag(serve, "--threads", default=1, help="intra-op threads of one forward pass (default 1)")
    serve.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="forward passes run at once, each in a worker thread (default: one per core but "
        "one, 1 to 4)",
    )
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="close a connection that has not sent a request's headers in time (default 10)",
    )
    serve.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="close a connection that has not sent the body after the headers in time (default 30)",
    )
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="how long a forward pass waits for more requests to score with the first one "
        "(default 0: requests that queue while the passes are busy are merged, none waits)",
    )
    serve.add_argument(
        "--max-batch-rows",
        type=int,
        default=4096,
        help="most rows merged into one forward pass (a request is never split; 1: no merging)",
    )
    serve.add_argument(
        "--http",
        choices=("httptools", "h11"),
        default=None,
        help="HTTP parser: httptools (the default when installed: less CPU per request) or h11",
    )
    serve.set_defaults(handler=cmd_serve)

    export = sub.add_parser(
        "export", help="write a bundle's model as ONNX (ids/values in, CTR out)"
    )
    add_bundle_option(export)
    export.add_argument("--format", choices=("onnx",), default="onnx")
    add_flag(export, "--out", required=True, help="output file, e.g. model.onnx")
    add_flag(export, "--overwrite", help="replace an existing --out")
    export.add_argument(
        "--check-rows",
        type=int,
        default=256,
        help="compare ONNX Runtime with PyTorch on this many random encoded rows (0: skip)",
    )
    export.set_defaults(handler=cmd_export)

    rank = sub.add_parser(
        "rank", help="rank candidates for one user and context by CTR or CTR x bid"
    )
    add_bundle_option(rank)
    rank.add_argument("--user", default="{}", help="user fields: a JSON object or @file.json")
    rank.add_argument("--context", default="{}", help="context fields: a JSON object or @file.json")
    rank.add_argument(
        "--candidates",
        required=True,
        help="a .json file (a list of objects) or a .csv file with a header; a 'bid' "
        "column or key holds the bids",
    )
    rank.add_argument("--top", type=int, default=10, help="how many to print (default 10)")
    rank.add_argument("--by", choices=("ctr", "ctr_bid"), default="ctr")
    add_flag(rank, "--runtime", default="torch")
    add_flag(rank, "--json", help="print {'items': [...]} as JSON")
    rank.set_defaults(handler=cmd_rank)


# -- serve -------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from deepfm.serve.server import ServeSettings, serve
    except ImportError as exc:
        raise ConfigError(
            f"serving needs the serve extra ({exc.name} is missing): pip install 'deepfm[serve]'"
        ) from None
    token = serve_token(args.token)
    settings = ServeSettings(
        model_dir=Path(args.bundle),
        runtime=args.runtime,
        host=args.host,
        port=args.port,
        token=token,
        max_records=args.max_records,
        max_body_bytes=args.max_body_bytes,
        threads=args.threads,
        concurrency=args.concurrency,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        batch_wait_ms=args.batch_wait_ms,
        max_batch_rows=args.max_batch_rows,
        http=args.http,
    )
    serve(settings)
    return 0


def serve_token(flag: str | None) -> str | None:
    """``--token``, else ``$DEEPFM_TOKEN``, else None (no authentication). A token that is
    given but empty (``--token "$UNSET"``, an empty variable) is refused, never read as
    "no token": that would switch authentication off silently."""
    if flag is not None:
        if not flag.strip():
            raise ConfigError("--token is empty: give a token, or leave --token out")
        return flag
    token = os.environ.get(TOKEN_ENV)
    if token is not None and not token.strip():
        raise ConfigError(f"${TOKEN_ENV} is set but empty: set a token, or unset the variable")
    return token


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0..65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port number, not {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in 0..65535 (0: any free port), not {port}")
    return port


# -- export ------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from deepfm.outputs import claim_file
    from deepfm.serve.bundle import load_bundle
    from deepfm.serve.onnx_export import TOLERANCE, OnnxScorer, export_onnx, onnx_gap

    if args.check_rows < 0:
        raise ConfigError(f"--check-rows must be >= 0, got {args.check_rows}")
    target = claim_file(args.out, overwrite=args.overwrite, inputs=[args.bundle])
    bundle = load_bundle(args.bundle)
    out = export_onnx(bundle, target)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 2**20:.1f} MiB, model {bundle.config.name})", file=sys.stderr)
    if args.check_rows > 0:
        gap = onnx_gap(bundle, OnnxScorer(out), args.check_rows)
        print(
            f"ONNX Runtime vs PyTorch on {args.check_rows} random rows: max |difference| {gap:.2e}",
            file=sys.stderr,
        )
        if not gap <= TOLERANCE:
            out.unlink()  # never keep a model that scores differently
            raise ConfigError(
                f"the exported model differs from PyTorch by {gap:.2e} (> {TOLERANCE:.0e})"
            )
    return 0


# -- rank --------------------------------------------------------------------------------------


def json_argument(text: str, what: str) -> dict[str, Any]:
    """A JSON object given inline or as ``@file``."""
    source = what
    if text.startswith("@"):
        source = text[1:]
        text = read_small_text(source, f"--{what}")
    try:
        value = json.loads(text)
    except ValueError as exc:  # not JSON, or an integer of thousands of digits
        raise DataError(f"not valid JSON: {exc}", path=source) from None
    if not isinstance(value, dict):
        raise DataError("expected a JSON object of field values", path=source)
    return value


#: JSON and CSV arguments of ``deepfm rank`` are read whole: a larger file is a mistake
MAX_ARGUMENT_BYTES = 256 << 20


def read_small_text(path: str | Path, flag: str) -> str:
    """A regular UTF-8 file of at most MAX_ARGUMENT_BYTES, as text."""
    path = Path(path)
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise ConfigError(f"{flag}: {path} {what}")
    try:
        if path.stat().st_size > MAX_ARGUMENT_BYTES:
            raise ConfigError(f"{flag}: {path} is larger than {MAX_ARGUMENT_BYTES >> 20} MiB")
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark is dropped
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text: {exc.reason}", path=str(path)) from None


def read_candidates(path: str | Path) -> list[dict[str, Any]]:
    """Candidates from a JSON list of objects, or from a CSV file with a header row (cells are
    strings; an empty cell is missing)."""
    path = Path(path)
    text = read_small_text(path, "--candidates")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:  # not JSON, or an integer of thousands of digits
            raise DataError(f"not valid JSON: {exc}", path=str(path)) from None
        if isinstance(data, dict) and "candidates" in data:
            data = data["candidates"]
        if not isinstance(data, list) or not all(isinstance(c, dict) for c in data):
            raise DataError("expected a JSON list of candidate objects", path=str(path))
        return data
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header:
        raise DataError("empty file, expected a header line", path=str(path), line=1)
    out = []
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(
                f"{len(row)} cells where the header has {len(header)}", path=str(path), line=line
            )
        out.append({k: (v if v != "" else None) for k, v in zip(header, row, strict=True)})
    return out


def cmd_rank(args: argparse.Namespace) -> int:
    from deepfm.cli import print_json
    from deepfm.serve.predictor import Predictor

    if args.top < 1:
        raise ConfigError("--top must be at least 1")
    user = json_argument(args.user, "user")
    context = json_argument(args.context, "context")
    candidates = read_candidates(args.candidates)
    predictor = Predictor.load(args.bundle, runtime=args.runtime)
    fields = predictor.encoder.names
    unused = sorted({k for c in candidates for k in c} - fields - {"bid"})
    if unused:
        print(f"note: not model fields, ignored: {', '.join(unused)}", file=sys.stderr)
    items = predictor.rank(user, context, candidates, top=args.top, by=args.by)
    if args.json:
        print_json({"items": items}, indent=None)
        return 0
    print(f"{'rank':>4}  {'index':>6}  {'score':>10}  {'ctr':>8}")
    for position, item in enumerate(items, start=1):
        print(f"{position:>4}  {item['index']:>6}  {item['score']:>10.6f}  {item['ctr']:>8.6f}")
    return 0
