"""Order-2 crosses of raw features for linear models (the paper's Sec. II-B, Eq. 2-3).

``Σ_{(f, g)} Σ_{s ∈ f, t ∈ g} w[c(id_s, id_t)] · x_s · x_t`` over crosses of fields ``f × g``:
one weight per pair of feature ids, looked up in a table, with no factorisation (unlike FM's
``<V_i, V_j>``). ``c`` is either exact (one row per pair of values of the two fields) or the hash
``h(i, j)`` of Eq. 3 into a fixed number of weights. Everything is integer arithmetic on int64
ids, so the same index is computed by PyTorch and by an exported ONNX graph.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from deepfm.errors import ConfigError
from deepfm.nn.embedding import InputLayout, Regularized, lookup

#: ``h(i, j) = (A·i + B·j) mod P``: a Carter-Wegman universal hash of the pair of global feature
#: ids (Eq. 3's h), then mod the table size. P = 2^31 - 1 is a prime above every int32 id and
#: A, B < P, so ``A·i + B·j < 2^63``: exact in int64 (no wrap-around in torch or in ONNX).
HASH_PRIME = 2**31 - 1
HASH_A = 0x5BD1E995
HASH_B = 0x27D4EB2F
#: what may join the two field names of a cross: ``category×hour``, ``category*hour``,
#: ``category x hour``
SEPARATORS = ("×", "*", "x")
_COLUMNS = ("left", "right", "exact", "stride", "shift", "size", "base")


def pair_hash(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``(A·i + B·j) mod P`` of int64 ids in ``[0, 2^31)``, elementwise: a value in ``[0, P)``."""
    return (i * HASH_A + j * HASH_B) % HASH_PRIME


def all_field_pairs(num_fields: int) -> list[tuple[int, int]]:
    """Every cross of two different fields, ``(f, g)`` with ``f < g`` (Poly-2)."""
    return list(itertools.combinations(range(num_fields), 2))


def resolve_crosses(crosses: Sequence[str], field_names: Sequence[str]) -> list[tuple[int, int]]:
    """Field index pairs ``(f, g)``, ``f < g``, of crosses written ``"a×b"`` (or ``a*b``,
    ``a x b``). A separator is read where both sides name fields, so a name may contain ``x``."""
    names = list(field_names)
    if not names:
        raise ConfigError("field crosses need the field names of a feature map")
    pairs: list[tuple[int, int]] = []
    for text in crosses:
        readings = {
            (text[:at].strip(), text[at + len(sep) :].strip())
            for sep in SEPARATORS
            for at in _positions(text, sep)
        }
        known = [(a, b) for a, b in readings if a in names and b in names]
        if not known:
            raise ConfigError(
                f"cross {text!r}: write two field names joined by × (or * or x); "
                f"fields: {', '.join(names)}"
            )
        if len(known) > 1:
            raise ConfigError(f"cross {text!r} reads as {sorted(known)}: join the names with ×")
        a, b = known[0]
        if a == b:
            raise ConfigError(f"cross {text!r}: a field crossed with itself (pick two fields)")
        pair = tuple(sorted((names.index(a), names.index(b))))
        if pair in pairs:
            raise ConfigError(f"cross {text!r} is given twice")
        pairs.append(pair)  # type: ignore[arg-type]
    return pairs


def _positions(text: str, sep: str) -> list[int]:
    return [i for i in range(len(text)) if text.startswith(sep, i)]


class PairCrossLinear(Regularized):
    """``Σ_{(f, g) ∈ crosses} Σ_{s ∈ f, t ∈ g} w[c(id_s, id_t)] x_s x_t``:
    ``forward(ids [B, S] int, values [B, S] float or None) -> [B]``.

    ``shared=True`` (Poly-2, Eq. 3): every cross is hashed into one table of ``buckets`` weights,
    ``c = h(i, j) mod buckets``. ``shared=False`` (chosen crosses, Eq. 2): each cross has its
    own table; exact, ``c = (i - offset_f) · |g| + (j - offset_g)``, when its ``|f| · |g|``
    pairs of values fit in ``buckets`` rows, hashed into ``buckets`` rows otherwise. A
    multi-valued field crosses each of its slots (values ``x_s``: 1/length for a mean bag, 0 for
    padding). Weights start at zero, as LR's order-1 weights do.
    """

    def __init__(
        self,
        layout: InputLayout,
        crosses: Sequence[tuple[int, int]],
        *,
        buckets: int,
        shared: bool,
        l2: float = 0.0,
    ) -> None:
        super().__init__(l2)
        if buckets < 1:
            raise ConfigError(f"cross_buckets must be positive, got {buckets}")
        slots = layout.slots_of_fields()
        # per crossed pair of slots: (left slot, right slot, exact, stride, shift, size, base)
        pairs: list[tuple[int, int, bool, int, int, int, int]] = []
        rows = buckets if shared else 0
        for f, g in crosses:
            exact = not shared and layout.field_sizes[f] * layout.field_sizes[g] <= buckets
            if exact:
                stride, size = layout.field_sizes[g], layout.field_sizes[f] * layout.field_sizes[g]
                shift = -(layout.field_offsets[f] * stride + layout.field_offsets[g])
            else:
                stride, size, shift = 0, buckets, 0
            base = 0 if shared else rows
            rows += 0 if shared else size
            pairs += [
                (s, t, exact, stride, shift, size, base)
                for s, t in itertools.product(slots[f], slots[g])
            ]
        self.weight = nn.Embedding(max(rows, 1), 1)
        nn.init.zeros_(self.weight.weight)
        columns = zip(*pairs, strict=True) if pairs else [()] * 7
        for name, column in zip(_COLUMNS, columns, strict=True):
            dtype = torch.bool if name == "exact" else torch.int64
            self.register_buffer(name, torch.tensor(column, dtype=dtype), persistent=False)
        kinds = {exact for _, _, exact, *_ in pairs}
        # one kind of table only (Poly-2: all hashed): skip computing the other index
        self.kind = "mixed" if len(kinds) > 1 else "exact" if kinds == {True} else "hashed"

    def index(self, ids: torch.Tensor) -> torch.Tensor:
        """The weight row of every crossed pair of slots: ``[B, S] -> [B, pairs]`` int64."""
        ids = ids.long()
        i, j = ids[:, self.left], ids[:, self.right]
        if self.kind == "hashed":
            return self.base + pair_hash(i, j) % self.size
        exact = self.base + i * self.stride + j + self.shift
        if self.kind == "exact":
            return exact
        return torch.where(self.exact, exact, self.base + pair_hash(i, j) % self.size)

    def forward(self, ids: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
        w = lookup(self.weight, self.index(ids)).squeeze(-1)  # [B, pairs]
        self._record(w)
        if values is not None:
            w = w * values[:, self.left] * values[:, self.right]
        return w.sum(dim=1)
