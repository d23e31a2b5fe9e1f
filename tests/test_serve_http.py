"""The HTTP layer of ``deepfm serve`` with each parser it can use (httptools, h11): the read
deadlines against slow clients, the limit on request heads, keep-alive and pipelining, and the
raw-ASGI ``/predict`` and ``/rank`` (405 for other methods, the OpenAPI schema still listing
them). A real uvicorn server on generated data (no shared data needed)."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from types import SimpleNamespace

import pytest

from safety_helpers import FAST, criteo_file, run_cli, running_server

pytest.importorskip("httptools")

HTTP_PARSERS = ("httptools", "h11")
PREDICT = json.dumps({"records": [{"C1": "x"}]}).encode()
REQUEST = (
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(PREDICT), PREDICT)
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-http")
    result = run_cli("train", "--data", criteo_file(root / "train.txt"), "--out", root / "b", *FAST)
    assert result.code == 0, result.err
    return root / "b"


@pytest.fixture(scope="module", params=HTTP_PARSERS)
def server(request, bundle):
    """A server with half-second read deadlines, its port and the parser it uses."""
    from deepfm.serve.server import ServeSettings

    settings = ServeSettings(
        model_dir=bundle, port=0, header_timeout=0.5, body_timeout=0.5, http=request.param
    )
    with running_server(settings) as url:
        yield SimpleNamespace(url=url, port=int(url.rsplit(":", 1)[1]), http=request.param)


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=5)


def read_until_closed(sock: socket.socket, limit: float = 5) -> tuple[bytes, float]:
    """Everything the server sends until it closes ``sock``, and the seconds that took (fails
    past ``limit``: the server never closed it)."""
    started, reply = time.monotonic(), b""
    sock.settimeout(limit)
    while chunk := sock.recv(65536):
        reply += chunk
    return reply, time.monotonic() - started


def read_answers(sock: socket.socket, count: int = 1) -> list[bytes]:
    """``count`` answers (status line, headers and a content-length body) on a kept-alive
    ``sock``, in order. One read may hold the end of an answer and the next ones (pipelined
    answers are often sent together): nothing read is dropped."""
    data, answers = b"", []

    def more() -> bytes:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection mid-answer, after {data!r}"
        return chunk

    while len(answers) < count:
        while b"\r\n\r\n" not in data:
            data += more()
        head, rest = data.split(b"\r\n\r\n", 1)
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        while len(rest) < length:
            rest += more()
        answers.append(head + b"\r\n\r\n" + rest[:length])
        data = rest[length:]
    assert not data, f"more than {count} answers: {data!r}"
    return answers


def test_the_chosen_parser_is_used(server):
    from deepfm.serve.server import timed_protocol

    protocol = timed_protocol(1.0, 2.0, server.http)
    assert protocol.__name__ == {"h11": "TimedH11Protocol"}.get(
        server.http, "TimedHttpToolsProtocol"
    )
    assert (protocol.header_timeout, protocol.body_timeout) == (1.0, 2.0)


def test_a_silent_connection_is_closed_after_the_header_deadline(server):
    with connect(server) as sock:
        reply, seconds = read_until_closed(sock)
    # 0.5 s deadline; up to 2 s more of a loaded 2-core machine's scheduling
    assert reply == b"" and 0.4 < seconds < 2.5


def test_headers_trickled_byte_by_byte_are_cut_off(server):
    with connect(server) as sock:
        started = time.monotonic()
        for byte in b"POST /predict HTTP/1.1\r\nHost: x\r\n":  # one byte every 0.1 s: 3.4 s
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # closed by the server
                break
            time.sleep(0.1)
        read_until_closed(sock)
        # the deadline counts from the connection, not from the last byte
        assert time.monotonic() - started < 2.5


def test_a_body_that_never_comes_is_cut_off_without_a_5xx(server):
    with connect(server) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        reply, seconds = read_until_closed(sock)
    assert b" 500 " not in reply and seconds < 2.5


def test_the_header_deadline_restarts_after_each_answer(server):
    with connect(server) as sock:
        for _ in range(3):  # each request within the deadline: all served on one connection
            sock.sendall(REQUEST)
            assert read_answers(sock)[0].startswith(b"HTTP/1.1 200 ")
            time.sleep(0.3)
        sock.sendall(b"POST /predict HTTP/1.1\r\n")  # then a request that stops half-way
        reply, seconds = read_until_closed(sock)
    assert reply == b"" and seconds < 2.5


def test_pipelined_requests_are_all_answered_in_order(server):
    with connect(server) as sock:
        sock.sendall(REQUEST * 3 + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = read_answers(sock, 4)
    assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
    assert [json.loads(a.split(b"\r\n\r\n", 1)[1]).keys() for a in answers] == [
        {"ctr"},
        {"ctr"},
        {"ctr"},
        {"status"},
    ]


def test_a_head_larger_than_the_limit_is_refused_with_400(server):
    from deepfm.serve.server import MAX_HEAD_BYTES

    with connect(server) as sock:
        # h11 refuses a head once more than the limit of it waits unparsed (a longer head read
        # whole at once passes): the end comes after a pause
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * MAX_HEAD_BYTES)
        time.sleep(0.2)
        with contextlib.suppress(OSError):  # closed already
            sock.sendall(b"\r\n\r\n")
        reply, _ = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 400 ")
    with connect(server) as sock:  # just under it: served
        padding = b"a" * (MAX_HEAD_BYTES - 200)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + padding + b"\r\n\r\n")
        assert read_answers(sock)[0].startswith(b"HTTP/1.1 200 ")


def test_scored_routes_take_only_post_and_stay_documented(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=10) as http:
        for method in ("GET", "PUT", "DELETE", "HEAD"):
            response = http.request(method, "/rank")
            assert response.status_code == 405 and response.headers["allow"] == "POST"
        assert http.get("/predict").json() == {"detail": "Method Not Allowed"}
        paths = http.get("/openapi.json").json()["paths"]
        for path, model in (("/predict", "PredictRequest"), ("/rank", "RankRequest")):
            body = paths[path]["post"]["requestBody"]["content"]["application/json"]
            assert body["schema"]["title"] == model
        assert {"/health", "/model", "/metrics", "/reload"} <= paths.keys()
