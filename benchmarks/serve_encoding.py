"""Encoding cost of one 100-candidate ``/rank`` by how much of it the memo has seen.

``python benchmarks/serve_encoding.py [--requests 1000] [--out FILE.json]``

DeepFM-D trained one epoch on the Criteo sample (``$DEEPFM_SHARED_DATA``; as ``serve.py``), its
``Predictor``, and ``encode_rank`` (strict, as the server calls it) timed in thread CPU, mean of
``--requests`` requests built beforehand, for: every candidate and user seen before; a user never
seen (its own ``C1``); 10% of the candidates new (a new ``C7``); every candidate new; and the
same seen and all-new requests without the memo (``RecordColumns(memo_values=0)``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from deepfm.outputs import write_json  # noqa: E402
from deepfm.serve.encoding import RecordColumns  # noqa: E402
from deepfm.serve.predictor import Predictor  # noqa: E402
from deepfm.serve.server import RankRequest, parse_body  # noqa: E402
from serve import SAMPLE, criteo_rows, rank_bodies, train_bundle  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="a bundle (default: train DeepFM-D)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve_encoding.json")
    args = parser.parse_args()
    if not SAMPLE.exists():
        raise SystemExit(f"{SAMPLE} is absent: set DEEPFM_SHARED_DATA")
    work = Path(tempfile.mkdtemp(prefix="deepfm-encoding-bench-"))
    try:
        model = args.bundle or train_bundle(SAMPLE, work / "bundle", 1)
        predictor = Predictor.load(model, runtime="torch")
        seen = [parse_body(RankRequest, b) for b in rank_bodies(criteo_rows(SAMPLE), 100, 50)]

        def changed(i: int, user: bool = False, new_share: float = 0.0) -> RankRequest:
            request = seen[i % len(seen)]
            context = {**request.context, "C1": f"u{i:07d}"} if user else request.context
            candidates = [dict(c) for c in request.candidates]
            for k in range(int(len(candidates) * new_share)):
                candidates[k]["C7"] = f"n{i:06d}{k:03d}"
            return RankRequest.model_construct(
                user=request.user, context=context, candidates=candidates, top=10, by="ctr_bid"
            )

        def cpu_ms(requests: list[RankRequest]) -> float:
            start = time.thread_time()
            for r in requests:
                predictor.encode_rank(r.user, r.context, r.candidates, strict=True)
            return round((time.thread_time() - start) / len(requests) * 1e3, 4)

        n = args.requests
        cases = {
            "seen": lambda i: seen[i % len(seen)],
            "fresh_user": lambda i: changed(i, user=True),
            "new_candidates_10pct": lambda i: changed(i, new_share=0.1),
            "all_candidates_new": lambda i: changed(i, new_share=1.0),
        }
        results: dict[str, float] = {}
        for memo in (True, False):
            predictor.encoder = RecordColumns(
                predictor.feature_map, **({} if memo else {"memo_values": 0})
            )
            cpu_ms(seen)  # what a running server has seen
            for name, make in cases.items():
                if memo or name in ("seen", "all_candidates_new"):
                    label = name if memo else f"{name}_without_memo"
                    results[label] = cpu_ms([make(i) for i in range(n)])
                    print(f"{label}: {results[label]:.3f} ms", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(
        args.out,
        {
            "date": time.strftime("%Y-%m-%d %H:%M:%S +0000", time.gmtime()),
            "command": " ".join(["python", *sys.argv]),
            "requests": n,
            "encode_rank_cpu_ms": results,
        },
    )
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
