"""The server's fast paths answer as the plain ones do: orjson parsing (pydantic for anything
else, and for every refusal's message), and dynamic batching (each request gets the scores of
its own rows, whatever it was merged with)."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepfm.serve import server
from deepfm.serve.batching import ForwardBatcher
from deepfm.serve.server import HTTPProblem, PredictRequest, RankRequest, parse_body

# -- parsing ---------------------------------------------------------------------------------

_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
)
_JSONISH = st.recursive(
    _VALUE,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)
_RECORD = st.dictionaries(st.sampled_from(["C1", "I1", "bid"]), _VALUE, max_size=3)
_EDGES = st.sampled_from([0, 1, 10, 1_000_000, 1_000_001, -1, True, False, 2.0, "3", None])
#: each key: a valid value mostly (so that the whole body is often valid and a wrong value
#: stands alone), anything now and then
_RANK_KEYS = {
    "user": _RECORD,
    "context": _RECORD,
    "candidates": st.lists(_RECORD, max_size=4),
    "top": st.one_of(_EDGES, st.integers(-2, 1_000_002)),
    "by": st.sampled_from(["ctr", "ctr_bid", "CTR", None]),
}
_PREDICT_KEYS = {"records": st.lists(_RECORD, max_size=4)}


@st.composite
def _bodies(draw, keys: dict) -> bytes:
    # odds from a random.Random seeded by hypothesis: its own draws (and its randoms) lean to
    # their edges (0), which would spoil most bodies and leave few valid but for one value
    odds = random.Random(draw(st.integers(0, 2**32)))
    body = {key: draw(keys[key]) for key in keys if odds.random() < 0.8}
    for key in list(body):
        if odds.random() < 0.1:
            body[key] = draw(_JSONISH)  # a wrong type here and there
    if odds.random() < 0.1:
        body["extra"] = draw(_JSONISH)
    if odds.random() < 0.05:
        body = draw(_JSONISH)  # not an object at all
    text = json.dumps(body, allow_nan=True).encode()  # NaN, Infinity: pydantic reads them
    if odds.random() < 0.05:
        text = text[: odds.randint(0, len(text))]  # truncated
    return text


def _outcome(model, body: bytes) -> str:
    """The parsed request or the refusal, as text (NaN equals NaN there, -0.0 differs from 0)."""
    try:
        return json.dumps(parse_body(model, body).model_dump(), allow_nan=True, sort_keys=True)
    except HTTPProblem as problem:
        return f"{problem.status} {problem.message}"


@pytest.mark.parametrize(
    ("model", "keys"), [(PredictRequest, _PREDICT_KEYS), (RankRequest, _RANK_KEYS)]
)
@settings(
    max_examples=300,
    deadline=None,
    # monkeypatch.context() below undoes its change for every example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_orjson_parsing_accepts_and_refuses_as_pydantic(monkeypatch, model, keys, data):
    body = data.draw(_bodies(keys))
    fast = _outcome(model, body)
    with monkeypatch.context() as patched:
        patched.setattr(server, "orjson", None)  # pydantic parses and validates everything
        plain = _outcome(model, body)
    assert fast == plain


def test_the_fast_path_takes_plain_bodies():
    """A valid body never reaches pydantic's validation (else the speed claim is empty)."""
    body = json.dumps({"candidates": [{"C1": "a", "bid": 2}], "top": 3, "by": "ctr_bid"})
    parsed = server._plain_request(RankRequest, json.loads(body))
    assert parsed is not None and parsed.top == 3 and parsed.user == {}
    assert server._plain_request(RankRequest, {"candidates": [], "top": True}) is None
    assert server._plain_request(PredictRequest, {"records": [[]]}) is None


@given(st.lists(st.sampled_from(['{"a":1}', '"{:}"', '"x\\":{"', "[]", "{}"]), max_size=12))
@settings(max_examples=200, deadline=None)
def test_the_structure_check_counts_only_braces_and_colons_outside_strings(parts):
    """The check counts the bytes first and blanks the strings only when that count is too
    high: whatever the limits, it refuses exactly the bodies the exact count refuses."""
    body = ("[" + ",".join(parts) + "]").encode()
    bare = server._JSON_STRING.sub(b'""', body)
    exact = bare.count(b"{"), bare.count(b":")
    for limits in ((0, 0), (2, 2), (5, 3), (exact[0], exact[1]), (100, 100)):
        try:
            server.check_structure(body, *limits)
            refused = False
        except HTTPProblem as exc:
            refused = True
            assert (
                exc.status == 413 and f"holds {exact[0]} objects and {exact[1]} keys" in exc.message
            )
        assert refused == (exact[0] > limits[0] or exact[1] > limits[1]), (body, limits)


# -- batching --------------------------------------------------------------------------------


class _SlowModel:
    """A stand-in predictor: the score of a row is its first id; each pass takes ``delay``
    seconds and is recorded, so that requests queue behind it."""

    def __init__(self, delay: float = 0.01, fail: bool = False) -> None:
        self.delay, self.fail = delay, fail
        self.passes: list[int] = []
        self.lock = threading.Lock()

    def forward(self, ids: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        time.sleep(self.delay)
        if self.fail:
            raise ValueError("boom")
        with self.lock:
            self.passes.append(len(ids))
        scores = ids[:, 0].astype(np.float64)
        return scores if values is None else scores + values[:, 0]


def _rows(start: int, n: int, with_values: bool = False):
    ids = np.arange(start, start + n, dtype=np.int32)[:, None].repeat(3, axis=1)
    return ids, (np.full((n, 3), 0.5, np.float32) if with_values else None)


async def _score_all(batcher, jobs):
    return await asyncio.gather(*(batcher.score(model, ids, values) for model, ids, values in jobs))


@pytest.mark.parametrize("window", [0.0, 0.005])
def test_concurrent_requests_share_passes_and_each_gets_its_own_rows(window):
    model = _SlowModel()
    batcher = ForwardBatcher(workers=1, window=window, max_rows=50)
    try:
        sizes = [7, 1, 12, 30, 5, 9, 16, 2, 8, 20]
        starts = np.cumsum([0, *sizes])[:-1]
        jobs = [
            (model, *_rows(int(s), n, with_values=True)) for s, n in zip(starts, sizes, strict=True)
        ]
        results = asyncio.run(_score_all(batcher, jobs))
    finally:
        batcher.close()
    for (_, ids, values), got in zip(jobs, results, strict=True):
        np.testing.assert_array_equal(got, ids[:, 0] + values[:, 0])
    assert sum(model.passes) == sum(sizes)
    assert len(model.passes) < len(sizes)  # merged: they queued behind the first pass
    assert max(model.passes) <= 50  # never past max_rows (no request is bigger)


def test_a_request_is_never_merged_past_max_rows_nor_with_another_model():
    first, second = _SlowModel(), _SlowModel()
    batcher = ForwardBatcher(workers=1, max_rows=1)
    try:
        jobs = [(first if i % 2 else second, *_rows(10 * i, 4)) for i in range(6)]
        results = asyncio.run(_score_all(batcher, jobs))
    finally:
        batcher.close()
    assert first.passes == [4, 4, 4] and second.passes == [4, 4, 4]  # a request is never split
    for (_, ids, _), got in zip(jobs, results, strict=True):
        np.testing.assert_array_equal(got, ids[:, 0])


def test_a_failed_pass_fails_each_of_its_requests_and_the_batcher_goes_on():
    broken, fine = _SlowModel(fail=True), _SlowModel()
    batcher = ForwardBatcher(workers=2)

    async def run():
        failed = await asyncio.gather(
            *(batcher.score(broken, *_rows(i, 2)) for i in range(3)), return_exceptions=True
        )
        return failed, await batcher.score(fine, *_rows(5, 2))

    try:
        failed, after = asyncio.run(run())
    finally:
        batcher.close()
    assert all(isinstance(f, ValueError) for f in failed)
    np.testing.assert_array_equal(after, [5.0, 6.0])


class _ThreadModel(_SlowModel):
    """Records the thread each pass ran on."""

    def __init__(self) -> None:
        super().__init__(delay=0.0)
        self.threads: list[int] = []

    def forward(self, ids, values):
        self.threads.append(threading.get_ident())
        return super().forward(ids, values)


def test_a_lone_request_at_a_low_load_is_scored_on_the_loop_and_workers_take_the_rest():
    model = _ThreadModel()
    batcher = ForwardBatcher(workers=1, inline_below=0.5)

    async def one():
        return threading.get_ident(), await batcher.score(model, *_rows(3, 2))

    try:
        loop_thread, got = asyncio.run(one())
        np.testing.assert_array_equal(got, [3.0, 4.0])
        assert model.threads == [loop_thread]  # no hand-off to a worker
        assert 0 < batcher.load() < 0.5  # the pass counts in the load (it took under a second)
        # passes that took 90% of the last moments: the loop must keep reading, workers score
        batcher._busy, batcher._since = 0.9, time.monotonic()
        loop_thread, got = asyncio.run(one())
        np.testing.assert_array_equal(got, [3.0, 4.0])
        assert model.threads[-1] != loop_thread
        # three time constants later the share has decayed below the bar: on the loop again
        batcher._busy, batcher._since = 0.9, time.monotonic() - 3.0
        loop_thread, _ = asyncio.run(one())
        assert model.threads[-1] == loop_thread
    finally:
        batcher.close()


def test_without_inline_every_pass_runs_in_a_worker():
    model = _ThreadModel()
    batcher = ForwardBatcher(workers=1)

    async def one():
        return threading.get_ident(), await batcher.score(model, *_rows(0, 1))

    try:
        loop_thread, _ = asyncio.run(one())
    finally:
        batcher.close()
    assert model.threads and model.threads[0] != loop_thread


@pytest.mark.parametrize(("cores", "workers"), [(1, 1), (2, 1), (3, 2), (5, 4), (64, 4)])
def test_default_concurrency_leaves_a_core_to_the_event_loop(monkeypatch, cores, workers):
    monkeypatch.setattr(
        server.os, "sched_getaffinity", lambda _pid: set(range(cores)), raising=False
    )
    assert server.default_concurrency() == workers


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str):
        return f"info:{name}"


def test_an_answer_head_leaves_with_its_body_in_one_write():
    async def run():
        loop = asyncio.get_running_loop()
        transport = _Transport()
        coalesced = server._OneWritePerTurn(transport, loop)
        coalesced.write(b"HTTP/1.1 200 OK\r\n\r\n")
        assert transport.writes == []  # held for the body
        coalesced.write(b"{}")
        assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
        coalesced.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # alone: sent at the turn's end
        await asyncio.sleep(0)
        assert transport.writes[-1] == b"HTTP/1.1 100 Continue\r\n\r\n"
        coalesced.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        coalesced.close()  # what is held goes first
        assert transport.writes[-1] == b"HTTP/1.1 400 Bad Request\r\n\r\n" and transport.closed
        await asyncio.sleep(0)  # the scheduled flush finds nothing held
        assert len(transport.writes) == 3
        assert coalesced.get_extra_info("peername") == "info:peername"

    asyncio.run(run())


# -- the heap --------------------------------------------------------------------------------


def test_settle_heap_collects_what_an_earlier_call_froze_then_freezes_what_lives():
    import gc
    import weakref

    class Node:
        pass

    cycle = Node()
    cycle.self = cycle  # freed by the cyclic collector only
    gone = weakref.ref(cycle)
    try:
        server.settle_heap()  # the cycle is alive: frozen
        del cycle
        gc.collect()
        assert gone() is not None  # a frozen cycle is out of the collector's reach
        server.settle_heap()  # so each call collects what the last one froze first
        assert gone() is None
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # this test process goes on as it was


def test_a_reload_settles_the_heap_only_where_serve_asked(monkeypatch):
    settled = []
    monkeypatch.setattr(server, "settle_heap", lambda: settled.append(True))
    monkeypatch.setattr(server.ModelHolder, "_load", lambda self: object())
    holder = server.ModelHolder(settings=None)  # type: ignore[arg-type]
    holder.reload()
    assert settled == []  # an app in someone else's process (tests, an embedding) is left alone
    holder.settle_heap = True
    holder.reload()
    assert settled == [True]
