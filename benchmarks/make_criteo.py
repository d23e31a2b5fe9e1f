"""Write Criteo-format rows (Kaggle ``train.txt`` layout) for benchmarks, fast and seeded.

``python benchmarks/make_criteo.py OUT.txt --rows 10000000 [--seed 0] [--unlabeled] [--long-tail]``

Each row: label, I1-I13 (counts, empty when missing), C1-C26 (8 hex digits, empty when
missing), tab-separated, about 240 bytes like the real file. Missing rates per column follow the
real sample in ``../shared/data/criteo``. Categorical values are drawn from a log-uniform law
(P(rank r) ~ 1/r) over a fixed vocabulary per field whose size is the real field's distinct count
capped at ``--vocab-cap`` (default 200,000). With the cap, the ~600k values seen at least 10 times
in 10M rows are close to the real thresholded Criteo vocabulary (~1M), and every field's
vocabulary is nearly all seen within the first 1M rows, so a memory comparison between 1M and 10M
rows measures growth with rows, not with vocabulary; the real file's long tail of rare values
(33M distinct) costs memory per distinct value on top (reported by the benchmark). The label
follows a planted logistic model (order-1 effects on a few
fields and one order-2 interaction), click rate about 0.25, so a trained model has signal to find.

``--long-tail`` gives the four fields whose real vocabularies are the largest (C3, C12, C16, C21,
5-10M values each) the real file's unbounded tail: a share ``--tail-share`` (default 0.9) of their
values is new, never seen before (a per-field counter through a bijection of 32 bits, written as
8 hex digits like the others), the rest drawn as above. 3M rows then hold ~10.8M distinct values
and the count grows with the rows (~70M at 20M rows), as in the real logs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

# distinct values per field in the full Kaggle train.txt (45.8M rows), capped at 1M
REAL_CARDINALITY = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
CAP = 200_000
# share of empty cells per column, from the real sample (I1..I13 then C1..C26)
MISSING_INT = (0.44, 0.0, 0.21, 0.22, 0.04, 0.24, 0.04, 0.0, 0.04, 0.44, 0.04, 0.77, 0.22)
MISSING_CAT = (0.0,) * 5 + (0.14,) + (0.0,) * 5 + (0.03,) + (0.0,) * 3 + (0.03,) + (0.0,) * 2
MISSING_CAT += (0.45, 0.45, 0.03, 0.80, 0.0, 0.03, 0.45, 0.45)
INT_SCALE = (1.0, 2.5, 2.0, 1.5, 7.0, 4.0, 2.0, 2.3, 3.5, 0.5, 1.2, 0.8, 1.5)  # log-scale sizes
CHUNK_ROWS = 250_000
LONG_TAIL = (2, 11, 15, 20)  # C3, C12, C16, C21


def _fresh32(counter: np.ndarray, salt: int) -> np.ndarray:
    """Distinct uint32 values for distinct counters (a bijection of 32 bits, salted per field)."""
    x = (counter.astype(np.uint64) * 0x9E3779B1 + salt) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    x ^= x >> 16
    return x.astype(np.uint32)


def _hex8(x: np.ndarray) -> pa.Array:
    """uint32 values as 8-character lowercase hex strings (vectorised)."""
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    shifts = np.arange(28, -4, -4, dtype=np.uint32)
    chars = digits[(x[:, None] >> shifts[None, :]) & 0xF]
    return pa.array(np.ascontiguousarray(chars).view("S8").ravel()).cast(pa.string())


class CriteoGenerator:
    """Seeded source of Criteo-format tables; ``table(rows)`` draws the next ``rows`` rows."""

    def __init__(
        self,
        seed: int = 0,
        *,
        labeled: bool = True,
        vocab_cap: int = CAP,
        tail_share: float = 0.0,
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.labeled = labeled
        self.tail_share = tail_share
        self.fresh = dict.fromkeys(LONG_TAIL, 0)  # new values drawn so far, per long-tail field
        vocab_rng = np.random.default_rng(seed + 1_000_003)
        self.seed_salt = seed * 7919
        self.sizes = [min(c, vocab_cap) for c in REAL_CARDINALITY]
        # distinct random 32-bit "hashes" per field: draw with replacement, then deduplicate
        self.vocab: list[pa.Array] = []
        for size in self.sizes:
            values = np.unique(
                vocab_rng.integers(0, 2**32, size=int(size * 1.1) + 16, dtype=np.uint64)
            )
            values = vocab_rng.permutation(values)[:size].astype(np.uint32)
            self.vocab.append(_hex8(values))
        # planted effects: order 1 on C1, C2, C6, C9, C14, C17, I1; order 2 on C6 x C14
        self.effects = {j: vocab_rng.normal(0, 0.6, self.sizes[j]) for j in (0, 1, 5, 8, 13, 16)}
        self.pair = vocab_rng.normal(0, 0.8, (self.sizes[5], self.sizes[13]))

    def _ranks(self, size: int, rows: int) -> np.ndarray:
        """Zipf-like ranks in [0, size): rank = floor(size^u) - 1, u uniform (log-uniform law)."""
        u = self.rng.random(rows)
        return np.minimum(np.floor(np.power(float(size) + 1.0, u)) - 1, size - 1).astype(np.int64)

    def table(self, rows: int) -> pa.Table:
        rng = self.rng
        columns: dict[str, pa.Array] = {}
        logit = np.full(rows, -1.6)
        ints = []
        for i in range(13):
            x = np.floor(np.expm1(np.minimum(rng.exponential(INT_SCALE[i], rows), 21.0))).astype(
                np.int64
            )
            if i == 1:  # I2 holds small negative values in the real data
                x -= (rng.random(rows) < 0.05).astype(np.int64) * rng.integers(1, 4, rows)
            ints.append((x, rng.random(rows) < MISSING_INT[i]))
        logit += 0.3 * (np.log1p(np.maximum(ints[0][0], 0)) - 0.7) * ~ints[0][1]
        ranks = []
        for j, size in enumerate(self.sizes):
            r = self._ranks(size, rows)
            missing = rng.random(rows) < MISSING_CAT[j]
            ranks.append(r)
            if j in self.effects:
                logit += self.effects[j][r] * ~missing
            columns[f"C{j + 1}"] = (r, missing)
        logit += self.pair[ranks[5], ranks[13]]
        out: dict[str, pa.Array] = {}
        if self.labeled:
            out["label"] = pa.array((rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8))
        for i, (x, missing) in enumerate(ints):
            out[f"I{i + 1}"] = pa.array(x, mask=missing)
        for j in range(26):
            r, missing = columns[f"C{j + 1}"]
            taken = self.vocab[j].take(pa.array(r))
            if self.tail_share and j in self.fresh:
                new = np.flatnonzero(rng.random(rows) < self.tail_share)
                counter = self.fresh[j] + np.arange(len(new))
                self.fresh[j] += len(new)
                fresh = _hex8(_fresh32(counter, salt=1_000_003 * (j + 1) + self.seed_salt))
                mixed = np.zeros(rows, np.int64)
                mixed[new] = np.arange(1, len(new) + 1)
                taken = pa.concat_arrays([taken, fresh]).take(
                    pa.array(np.where(mixed > 0, rows + mixed - 1, np.arange(rows)))
                )
            out[f"C{j + 1}"] = pc.if_else(pa.array(missing), pa.scalar(None, pa.string()), taken)
        return pa.table(out)


def write_criteo(
    path: str | Path,
    rows: int,
    *,
    seed: int = 0,
    labeled: bool = True,
    vocab_cap: int = CAP,
    tail_share: float = 0.0,
) -> int:
    """Write ``rows`` generated rows to ``path``; returns the number of bytes written."""
    generator = CriteoGenerator(seed, labeled=labeled, vocab_cap=vocab_cap, tail_share=tail_share)
    sizes = [min(CHUNK_ROWS, rows - done) for done in range(0, rows, CHUNK_ROWS)]
    return write_tsv(path, (generator.table(n) for n in sizes))


def write_tsv(path: str | Path, tables) -> int:
    """Write tables of rows in the Kaggle layout (tab-separated, no header, no quoting); returns
    the number of bytes written."""
    options = pa_csv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    path = Path(path)
    with pa.OSFile(str(path), "wb") as sink:
        for table in tables:
            pa_csv.write_csv(table, sink, options)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unlabeled", action="store_true", help="no label column (test file)")
    parser.add_argument("--vocab-cap", type=int, default=CAP, help="values per field, at most")
    parser.add_argument("--long-tail", action="store_true", help="C3, C12, C16, C21 never end")
    parser.add_argument("--tail-share", type=float, default=0.9, help="new values among them")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    size = write_criteo(
        args.out,
        args.rows,
        seed=args.seed,
        labeled=not args.unlabeled,
        vocab_cap=args.vocab_cap,
        tail_share=args.tail_share if args.long_tail else 0.0,
    )
    seconds = time.perf_counter() - started
    print(f"wrote {args.rows:,} rows, {size / 1e9:.2f} GB to {args.out} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
