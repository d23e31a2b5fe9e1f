"""The HTTP service against real ``deepfm serve`` processes on ephemeral loopback ports, with a
real HTTP client: /predict equals ``deepfm predict`` on the same Criteo rows, /rank equals sorting
by the Predictor's scores (CTR and CTR × bid), /health, /model and /metrics say what they should,
bad input is refused with a 4xx naming the problem (and fuzzed payloads never get a 5xx), reload
under load loses no request and refuses a tampered bundle, the token guards every route but
/health, and the ONNX runtime serves the same probabilities as torch."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from deepfm.cli import main
from deepfm.serve.bundle import WEIGHTS, load_bundle
from deepfm.serve.predictor import Predictor
from serve_helpers import ServerProcess, criteo_bundle, criteo_records, split_for_rank

#: the record limit the main test server runs with (not the default, so the flag is exercised)
MAX_RECORDS = 1200
#: its body limit: above the largest valid body of these tests (~0.6 MB), far below the default
MAX_BODY = 3_000_000
#: ONNX Runtime vs PyTorch, the contract of the issue
ONNX_PARITY = 1e-5
TOKEN = "s3cret-token"
#: two float32 forward passes of one model through different thread counts (the server runs 1)
#: differ by a few ulps of the logit: ~1e-8 on a probability
FLOAT_GAP = 1e-6


# -- fixtures: the server starts once per module and configuration --------------------------


@pytest.fixture(scope="module")
def criteo_path(generated_criteo) -> Path:
    return generated_criteo.train


@pytest.fixture(scope="module")
def bundle(criteo_path) -> Path:
    return criteo_bundle(str(criteo_path))


@pytest.fixture(scope="module")
def predictor(bundle) -> Predictor:
    return Predictor.load(bundle)


@pytest.fixture(scope="module")
def server(bundle):
    process = ServerProcess(
        bundle, "--max-records", str(MAX_RECORDS), "--max-body-bytes", str(MAX_BODY)
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def rank_request(criteo_path) -> dict:
    """A /rank body: one user and context, 100 Criteo rows as candidates, each with a bid."""
    user, context, candidates = split_for_rank(criteo_records(criteo_path)[200:300])
    bids = np.random.default_rng(7).lognormal(0.0, 1.0, len(candidates))
    for candidate, bid in zip(candidates, bids, strict=True):
        candidate["bid"] = round(float(bid), 4)
    return {"user": user, "context": context, "candidates": candidates}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of sample ``name`` with ``labels`` in Prometheus exposition ``text`` (0 if
    absent: a counter that has not moved yet has no sample)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def assert_no_internal_errors(process: ServerProcess) -> None:
    log = "".join(process.log)
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]


# -- /predict and /rank ---------------------------------------------------------------------


def test_predict_equals_deepfm_predict_on_the_same_rows(server, bundle, criteo_path, tmp_path):
    lines = criteo_path.read_text().splitlines(keepends=True)
    records = criteo_records(criteo_path)
    assert len(records) == len(lines)  # record i is line i (no bad rows in the sample)
    # ~1000 rows from all over the file, in a shuffled order: the output must follow it
    picked = np.random.default_rng(0).permutation(np.arange(0, len(lines), 11)).tolist()
    data = tmp_path / "rows.txt"
    data.write_text("".join(lines[i] for i in picked))
    out = tmp_path / "ctr.txt"
    assert main(["predict", "--model", str(bundle), "--data", str(data), "--out", str(out)]) == 0
    expected = np.loadtxt(out)

    response = server.client.post("/predict", json={"records": [records[i] for i in picked]})
    assert response.status_code == 200, response.text
    got = np.array(response.json()["ctr"])
    assert got.shape == expected.shape == (len(picked),)
    assert got.std() > 1e-3  # a trained model, so a wrong order could not pass
    # the CLI prints 7 decimals (±5e-8); the two forward passes differ by float rounding only
    np.testing.assert_allclose(got, expected, rtol=0, atol=FLOAT_GAP + 5e-8)


def test_predict_equals_the_predictor_request_by_request(server, predictor, criteo_path):
    records = criteo_records(criteo_path, 300)
    expected = predictor.predict_proba(records)
    for start in (0, 1, 137):  # batches of different sizes and offsets
        chunk = records[start : start + 50 + start]
        got = server.client.post("/predict", json={"records": chunk}).json()["ctr"]
        np.testing.assert_allclose(
            got, expected[start : start + len(chunk)], rtol=0, atol=FLOAT_GAP
        )
    assert server.client.post("/predict", json={"records": []}).json() == {"ctr": []}


@pytest.mark.parametrize("by", ["ctr", "ctr_bid"])
def test_rank_order_equals_sorting_by_predictor_scores(server, predictor, rank_request, by):
    body = {**rank_request, "top": 1000, "by": by}
    response = server.client.post("/rank", json=body)
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    candidates = rank_request["candidates"]
    assert len(items) == len(candidates) == 100  # top beyond the candidates: all of them
    assert all(set(item) == {"index", "score", "ctr"} for item in items)

    shared = {**rank_request["user"], **rank_request["context"]}
    rows = [{**shared, **{k: v for k, v in c.items() if k != "bid"}} for c in candidates]
    ctr = predictor.predict_proba(rows)
    bids = np.array([c["bid"] for c in candidates])
    score = ctr * bids if by == "ctr_bid" else ctr
    got = [item["index"] for item in items]
    assert sorted(got) == list(range(len(candidates)))
    # the server's forward pass (1 thread) and this one may differ in the last float32 bits:
    # its order must sort the Predictor's scores up to that, and equal a sort where they are
    # well apart
    np.testing.assert_allclose([item["ctr"] for item in items], ctr[got], rtol=0, atol=FLOAT_GAP)
    np.testing.assert_allclose([item["score"] for item in items], score[got], rtol=FLOAT_GAP)
    assert np.all(np.diff(score[got]) <= FLOAT_GAP * score.max())
    expected = np.argsort(-score, kind="stable")
    apart = np.abs(score[got] - score[expected]) > FLOAT_GAP * score.max()
    assert not apart.any(), np.flatnonzero(apart)
    if by == "ctr_bid":  # the bids do reorder, so ranking by CTR alone could not pass
        assert np.any(np.diff(ctr[got]) > 0.01)


@pytest.mark.parametrize("top", [1, 7, 99])
def test_rank_returns_the_top_items(server, rank_request, top):
    full = server.client.post("/rank", json={**rank_request, "top": 100, "by": "ctr_bid"})
    part = server.client.post("/rank", json={**rank_request, "top": top, "by": "ctr_bid"})
    assert part.status_code == 200, part.text
    assert part.json()["items"] == full.json()["items"][:top]


# -- /health, /model, /metrics --------------------------------------------------------------


def test_health_and_model(server, bundle):
    assert server.client.get("/health").json() == {"status": "ok"}
    info = server.client.get("/model").json()
    loaded = load_bundle(bundle)
    assert info["model"] == "deepfm"
    assert info["created"] == loaded.info["created"]
    assert info["feature_map_sha256"] == loaded.feature_map.digest()
    assert info["runtime"] == "torch"
    assert info["metrics"]["valid"]["auc"] == pytest.approx(loaded.metrics["valid"]["auc"])
    assert info["metrics"]["test"]["logloss"] == pytest.approx(loaded.metrics["test"]["logloss"])


def test_metrics_count_requests_latency_and_errors(server, rank_request):
    def scrape() -> str:
        response = server.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return response.text

    before = scrape()
    for _ in range(3):
        assert server.client.post("/rank", json=rank_request).status_code == 200
    assert server.client.post("/rank", content=b"{not json").status_code == 400
    assert server.client.post("/rank", json={"candidates": [{"C7": {}}]}).status_code == 422
    after = scrape()

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("deepfm_requests_total", route="/rank", status="200") == 3
    assert moved("deepfm_requests_total", route="/rank", status="400") == 1
    assert moved("deepfm_requests_total", route="/rank", status="422") == 1
    assert moved("deepfm_request_duration_seconds_count", route="/rank") == 5
    assert moved("deepfm_request_duration_seconds_bucket", route="/rank", le="+Inf") == 5
    assert moved("deepfm_request_duration_seconds_sum", route="/rank") > 0
    assert moved("deepfm_request_errors_total", route="/rank", kind="bad_json") == 1
    assert moved("deepfm_request_errors_total", route="/rank", kind="invalid") == 1
    assert moved("deepfm_scored_rows_total", route="/rank") == 3 * len(rank_request["candidates"])
    assert metric(after, "deepfm_model_info", model="deepfm", runtime="torch") == 1


# -- bad input: 4xx naming the problem, never 5xx -------------------------------------------


def _records(n: int) -> bytes:
    return json.dumps({"records": [{"C1": "68fd1e64"}] * n}).encode()


BAD_INPUT = [
    # (route, body, status, words the message must hold)
    ("/predict", b"{", 400, "malformed JSON"),
    ("/predict", b"", 400, "empty body"),
    ("/predict", b"\xff\xfe{}", 400, "malformed JSON"),
    ("/predict", b"[]", 422, "body"),
    ("/predict", b'{"records": 5}', 422, "records"),
    ("/predict", b'{"records": ["C1"]}', 422, "records.0"),
    ("/predict", b'{"records": [], "limit": 3}', 422, "limit: unknown field"),
    ("/predict", b'{"records": [{"colour": "red"}]}', 422, "records[0], field 'colour'"),
    ("/predict", b'{"records": [{}, {"I3": "abc"}]}', 422, "records[1], field 'I3'"),
    ("/predict", b'{"records": [{"I1": [1, 2]}]}', 422, "field 'I1'"),
    ("/predict", b'{"records": [{"C2": {"a": 1}}]}', 422, "field 'C2'"),
    ("/predict", b'{"records": [{"I4": NaN}]}', 422, "field 'I4': NaN"),
    ("/predict", b'{"records": [{"I5": Infinity}]}', 422, "field 'I5': NaN or infinite"),
    ("/predict", b'{"records": [{"I6": -1e999}]}', 422, "field 'I6': NaN or infinite"),
    ("/predict", b'{"records": [{"C3": NaN}]}', 422, "field 'C3': NaN"),
    ("/predict", b'{"records": [{"I7": "inf"}]}', 422, "field 'I7': NaN or infinite"),
    ("/predict", b'{"records": [{"I8": 1%s}]}' % (b"0" * 400), 422, "field 'I8': number out of"),
    ("/predict", _records(MAX_RECORDS + 1), 413, f"exceed the limit of {MAX_RECORDS}"),
    ("/predict", b" " * (MAX_BODY + 1), 413, f"exceeds the limit of {MAX_BODY}"),
    ("/rank", b'{"candidates": [{}], "top": "3"}', 422, "top"),
    ("/rank", b'{"candidates": [{}], "top": 0}', 422, "top"),
    ("/rank", b'{"candidates": [{}], "by": "price"}', 422, "by"),
    ("/rank", b'{"candidates": [{}], "user": [1]}', 422, "user"),
    ("/rank", b'{"candidates": [{}], "extra": 1}', 422, "extra: unknown field"),
    ("/rank", b'{"user": {}}', 422, "candidates"),
    ("/rank", b'{"candidates": [{"bid": 2}, {}], "by": "ctr_bid"}', 422, "candidates[1]"),
    ("/rank", b'{"candidates": [{"bid": NaN}], "by": "ctr_bid"}', 422, "field 'bid': NaN"),
    ("/rank", b'{"candidates": [{"bid": -1}], "by": "ctr_bid"}', 422, "field 'bid'"),
    ("/rank", b'{"candidates": [{"bid": "x"}], "by": "ctr_bid"}', 422, "field 'bid'"),
    ("/rank", b'{"candidates": [{"bid": [1]}], "by": "ctr_bid"}', 422, "field 'bid'"),
    ("/rank", b'{"candidates": [{"bid": null}], "by": "ctr_bid"}', 422, "needs a bid"),
    ("/rank", b'{"candidates": [{"bid": 1%s}], "by": "ctr_bid"}' % (b"0" * 400), 422, "range"),
    ("/rank", b'{"user": {"I2": Infinity}, "candidates": [{}]}', 422, "field 'I2'"),
    ("/rank", b'{"context": {"C5": [[]]}, "candidates": [{}]}', 422, "field 'C5'"),
    ("/rank", b'{"candidates": [{"C9": 1}, {"bogus": 1}]}', 422, "candidates[1], field 'bogus'"),
    ("/rank", json.dumps({"candidates": [{}] * (MAX_RECORDS + 1)}).encode(), 413, "candidates"),
]


@pytest.mark.parametrize(
    ("route", "body", "status", "words"),
    BAD_INPUT,
    ids=[f"{route}:{body[:40]!r}" for route, body, *_ in BAD_INPUT],
)
def test_bad_input_is_refused_with_a_message(server, route, body, status, words):
    response = server.client.post(route, content=body)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_the_limits_are_inclusive(server):
    """MAX_RECORDS records pass (so the 413 above is the limit, not another refusal)."""
    response = server.client.post("/predict", content=_records(MAX_RECORDS))
    assert response.status_code == 200
    assert len(response.json()["ctr"]) == MAX_RECORDS


#: what a client might put where a feature value goes: huge and non-finite numbers, strings that
#: look like numbers or not, empty strings, booleans
_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 5e-324, 2.0**63, 2.0**64, 0.0, -0.0, 10**400, -(10**30)]),
    st.text(max_size=12),
    st.sampled_from(["", " ", "1", "1e400", "-inf", "nan", "0x10", "1_000", "68fd1e64", "\x00"]),
)
#: nested junk: lists and objects of anything
_NESTED = st.recursive(
    _LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)
_FIELDS = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]


#: values a valid request may hold, at their extremes: numbers for the numeric fields and bids,
#: strings or numbers for the categorical ones
_NUMBER = st.one_of(
    st.none(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324, 2.0**63, 0.0, -0.0, "7", " 3.5 ", "-1e30", ""]),
)
_TOKEN = st.one_of(st.none(), st.text(max_size=10), st.integers(), st.booleans())
_BID = st.one_of(st.floats(0, 1e308), st.integers(0, 10**30), st.sampled_from(["2.5", 0]))


class _Shapes:
    """Structural choices with set odds (a ``random.Random`` seeded by hypothesis: its own
    draws lean to edge cases, which would send most payloads to the first check). Half of the
    payloads are "clean" (every value a valid one, at its extremes) and reach the model; the
    other half carry junk here and there."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw
        self.random = draw(st.randoms(use_true_random=True))
        self.clean = self.pick(clean=1, dirty=1) == "clean"

    def pick(self, **weights: int) -> str:
        return self.random.choices(list(weights), list(weights.values()))[0]

    def value(self, key: str = "") -> object:
        """A valid value for ``key``; in a dirty payload, now and then anything at all (one bad
        value among valid ones, so that each check is reached on its own)."""
        if key and (self.clean or self.pick(valid=10, junk=1) == "valid"):
            return self.draw({"I": _NUMBER, "C": _TOKEN, "b": _BID}[key[0]])
        nested = self.pick(scalar=5, nested=1) == "nested"
        return self.draw(_NESTED if nested else _LEAF)

    def record(self, bid: bool) -> object:
        """Mostly an object of model fields (and a bid); sometimes an unknown key, or junk."""
        shape = "fields" if self.clean else self.pick(fields=40, unknown_key=1, junk=1)
        if shape == "junk":
            return self.value()
        keys = self.random.sample(_FIELDS, self.random.randint(0, 8))
        record = {key: self.value(key) for key in keys}
        if bid and self.pick(bid=3, none=1) == "bid":
            record["bid"] = self.value("bid")
        if shape == "unknown_key":
            record[self.draw(st.text(max_size=6))] = self.value()
        return record

    def records(self, bid: bool) -> object:
        if not self.clean and self.pick(records=20, junk=1) == "junk":
            return self.value()
        return [self.record(bid) for _ in range(self.random.randint(0, 8))]


@st.composite
def _payloads(draw: st.DrawFn, route: str) -> bytes:
    """A JSON body shaped like the route's (or not), perhaps truncated or with a stray byte."""
    shapes = _Shapes(draw)
    pick = shapes.pick
    body: object
    if route == "/predict":
        body = {"records": shapes.records(bid=False)}
    else:
        body = {"candidates": shapes.records(bid=True)}
        for key in ("user", "context"):
            if pick(present=2, absent=1) == "present":
                body[key] = shapes.record(bid=False)
        top = pick(number=6, edge=1, junk=1, absent=2)
        if top != "absent":
            body["top"] = {
                "number": shapes.random.randint(1, 120),
                "edge": shapes.random.choice([0, -1, 10**6, 10**6 + 1, 2**63]),
                "junk": shapes.value(),
            }[top]
        if pick(present=3, absent=1) == "present":
            body["by"] = pick(ctr=3, ctr_bid=5, bid=1, empty=1).replace("empty", "")
    shape = "kept" if shapes.clean else pick(kept=12, extra_key=1, dropped_key=1, not_an_object=1)
    if shape == "extra_key":
        body[draw(st.text(max_size=6))] = shapes.value()
    elif shape == "dropped_key":
        body.pop(shapes.random.choice(sorted(body)))
    elif shape == "not_an_object":
        body = shapes.value()
    text = json.dumps(body, allow_nan=True).encode()
    mutation = "none" if shapes.clean else pick(none=12, truncate=1, byte=1)
    if mutation == "truncate":
        text = text[: shapes.random.randint(0, len(text))]
    elif mutation == "byte":
        at = shapes.random.randint(0, len(text))
        text = text[:at] + bytes([shapes.random.randint(0, 255)]) + text[at:]
    return text


@pytest.mark.parametrize("route", ["/predict", "/rank"])
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzzed_payloads_never_get_a_5xx(server, route, data):
    body = data.draw(_payloads(route))
    response = server.client.post(route, content=body)
    assert response.status_code < 500, (body[:300], response.text)
    if response.status_code != 200:
        assert response.status_code in (400, 413, 422), response.text
        assert response.json()["detail"]  # a message, not an empty refusal
    elif route == "/predict":  # an answer is a probability per record
        ctr = response.json()["ctr"]
        assert len(ctr) == len(json.loads(body)["records"])
        assert all(0.0 <= p <= 1.0 for p in ctr)
    else:  # the top items, best first
        sent = json.loads(body)
        items = response.json()["items"]
        assert len(items) == min(sent.get("top", 10), len(sent["candidates"]))
        scores = [item["score"] for item in items]
        assert scores == sorted(scores, reverse=True)
        assert all(0.0 <= item["ctr"] <= 1.0 and item["score"] >= 0 for item in items)
    assert_no_internal_errors(server)


# -- reload under load, SIGHUP, a tampered bundle -------------------------------------------


def _install(source: Path, target: Path) -> None:
    """Replace the bundle directory ``target`` by a copy of ``source`` (copied beside it, then
    swapped in by renames, as ``save_bundle`` does)."""
    staging = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    old = target.with_name(f".{target.name}.old")
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _ranking(response: httpx.Response) -> list[int]:
    return [item["index"] for item in response.json()["items"]]


def test_reload_under_load_loses_no_request(bundle, criteo_path, rank_request, tmp_path):
    first = bundle
    second = criteo_bundle(str(criteo_path), "fm")  # another model: other scores, other name
    served = tmp_path / "served"
    shutil.copytree(first, served)
    process = ServerProcess(served)
    try:
        client = process.client
        body = json.dumps({**rank_request, "top": 20, "by": "ctr"}).encode()
        ranking_first = _ranking(client.post("/rank", content=body))

        stop = threading.Event()
        results: list[tuple[int, list[int] | str]] = []

        def hammer() -> None:
            json_type = {"content-type": "application/json"}
            with httpx.Client(base_url=process.url, timeout=30, headers=json_type) as own:
                while not stop.is_set():
                    try:
                        response = own.post("/rank", content=body)
                    except httpx.HTTPError as exc:  # a lost request is a failure too
                        results.append((-1, repr(exc)))
                        continue
                    ok = response.status_code == 200
                    results.append((response.status_code, _ranking(response) if ok else ""))

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            _wait_for(lambda: len(results) >= 20, "requests before the reload")
            _install(second, served)
            reloaded = client.post("/reload")
            assert reloaded.status_code == 200, reloaded.text
            assert client.get("/model").json()["model"] == "fm"
            ranking_second = _ranking(client.post("/rank", content=body))
            _wait_for(
                lambda: any(r[1] == ranking_second for r in results), "answers of the new model"
            )

            _install(first, served)  # and back, by SIGHUP
            process.signal(signal.SIGHUP)
            _wait_for(lambda: client.get("/model").json()["model"] == "deepfm", "SIGHUP reload")
            done = len(results)
            _wait_for(lambda: len(results) >= done + 20, "requests after SIGHUP")
        finally:
            stop.set()
            for thread in threads:
                thread.join()

        assert ranking_first != ranking_second  # the two models are told apart by their answers
        failed = [r for r in results if r[0] != 200]
        assert not failed, failed[:5]
        answers = [tuple(r[1]) for r in results]
        assert set(answers) == {tuple(ranking_first), tuple(ranking_second)}
        assert _ranking(client.post("/rank", content=body)) == ranking_first
        assert client.get("/model").json()["reloads"] == 2

        # a tampered weights file: the reload is refused and the old model keeps serving
        weights = served / WEIGHTS
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        refused = client.post("/reload")
        assert refused.status_code == 409, refused.text
        detail = refused.json()["detail"]
        assert "previous model is still served" in detail
        assert WEIGHTS in detail and "sha256" in detail
        assert client.get("/model").json()["reloads"] == 2
        assert _ranking(client.post("/rank", content=body)) == ranking_first

        # no bundle at all there: refused too, and the model still serves
        shutil.rmtree(served)
        refused = client.post("/reload")
        assert refused.status_code == 409 and "not a model bundle" in refused.json()["detail"]
        assert _ranking(client.post("/rank", content=body)) == ranking_first
        text = client.get("/metrics").text
        assert metric(text, "deepfm_reloads_total", result="ok") == 2
        assert metric(text, "deepfm_reloads_total", result="failed") == 2
        assert_no_internal_errors(process)
    finally:
        process.stop()


# -- token ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server(bundle):
    process = ServerProcess(bundle, "--token", TOKEN)
    yield process
    process.stop()


GUARDED = [
    ("POST", "/predict", {"records": [{}]}),
    ("POST", "/rank", {"candidates": [{}]}),
    ("GET", "/model", None),
    ("GET", "/metrics", None),
    ("POST", "/reload", None),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
]


@pytest.mark.parametrize(("method", "route", "body"), GUARDED, ids=[r for _, r, _ in GUARDED])
def test_token_is_required_on_every_route_but_health(token_server, method, route, body):
    client = token_server.client
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = client.request(method, route, json=body, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
    good = client.request(method, route, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert good.status_code == 200, good.text


def test_health_needs_no_token(token_server):
    assert token_server.client.get("/health").status_code == 200


# -- ONNX runtime ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_server(bundle):
    process = ServerProcess(bundle, "--runtime", "onnx")
    yield process
    process.stop()


def test_onnx_runtime_serves_the_same_probabilities(server, onnx_server, criteo_path, rank_request):
    records = criteo_records(criteo_path)[::20]
    torch_ctr = np.array(server.client.post("/predict", json={"records": records}).json()["ctr"])
    response = onnx_server.client.post("/predict", json={"records": records})
    assert response.status_code == 200, response.text
    onnx_ctr = np.array(response.json()["ctr"])
    assert onnx_ctr.shape == torch_ctr.shape == (len(records),)
    assert torch_ctr.std() > 1e-3
    np.testing.assert_allclose(onnx_ctr, torch_ctr, rtol=0, atol=ONNX_PARITY)
    assert onnx_server.client.get("/model").json()["runtime"] == "onnx"
    ranked = onnx_server.client.post("/rank", json={**rank_request, "top": 100}).json()["items"]
    reference = server.client.post("/rank", json={**rank_request, "top": 100}).json()["items"]
    np.testing.assert_allclose(
        sorted(i["ctr"] for i in ranked), sorted(i["ctr"] for i in reference), atol=ONNX_PARITY
    )
