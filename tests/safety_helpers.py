"""Helpers of the safety and hostile-input tests: small generated inputs (no shared data), the
CLI run in-process with its exit status and stderr, a snapshot of a directory tree, and a real
uvicorn server in a thread."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO
from deepfm.cli import main

sys.path.insert(0, str(REPO / "benchmarks"))
from make_criteo import write_criteo

#: the smallest training that exercises every step (one epoch of a tiny DeepFM-D)
FAST = ["--epochs", "1", "--hidden", "8", "--embed-dim", "4", "--batch-size", "128"]
FAST += ["--quiet", "--threads", "1"]
ROWS = 600


def criteo_file(path: Path, rows: int = ROWS, *, seed: int = 0, labeled: bool = True) -> Path:
    """Generated Criteo-format rows (Kaggle TSV), small vocabularies so that ids repeat."""
    write_criteo(path, rows, seed=seed, labeled=labeled, vocab_cap=40)
    return path


CSV_SCHEMA = """label: click
fields:
  - {name: user}
  - {name: item}
  - {name: price, kind: numeric, numeric: value}
"""


def market_csv(path: Path, rows: int = 400, *, bom: bool = False, label: str = "click") -> Path:
    """A small labeled CSV (user, item, price) whose click depends on the user."""
    lines = [f"{label},user,item,price"]
    for i in range(rows):
        user, item = i % 7, (i * 3) % 11
        lines.append(f"{int(user < 3 and item % 2 == 0)},u{user},i{item},{(i % 13) / 4}")
    text = "\n".join(lines) + "\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


@dataclass
class Result:
    code: int
    out: str
    err: str

    def clean(self) -> bool:
        """No traceback and no internal error: every failure was a one-line message."""
        text = self.out + self.err
        return "Traceback" not in text and "internal error" not in self.err and self.code != 70


def run_cli(*argv: str | Path) -> Result:
    """``deepfm ARGV`` in this process: exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Result(code, out.getvalue(), err.getvalue())


def snapshot(root: Path, *, skip: tuple[Path, ...] = (), content: bool = False) -> dict:
    """Every entry under ``root`` (but ``skip`` and what lies under them): its kind, mode and
    size, modification time and inode (or, with ``content``, its sha256), or a link's target.
    Equal snapshots: nothing was written, replaced, added or removed."""
    skipped = {os.fspath(p) for p in skip}
    out: dict[str, tuple] = {}

    def visit(folder: str) -> None:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.path in skipped:
                    continue
                relative = os.path.relpath(entry.path, root)
                info = entry.stat(follow_symlinks=False)
                if entry.is_symlink():
                    out[relative] = ("link", os.readlink(entry.path))
                elif entry.is_dir():
                    out[relative] = ("dir", info.st_mode)
                    visit(entry.path)
                elif content:
                    digest = hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()
                    out[relative] = ("file", info.st_mode, digest)
                else:
                    out[relative] = ("file", info.st_mode, info.st_size, info.st_mtime_ns,
                                     info.st_ino)  # fmt: skip

    visit(os.fspath(root))
    return out


@contextlib.contextmanager
def running_server(settings) -> Iterator[str]:
    """A real uvicorn server (the one ``deepfm serve`` builds) in a thread; yields its URL."""
    from deepfm.serve.server import build_server

    server, sock = build_server(settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    host, port = sock.getsockname()[:2]
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
