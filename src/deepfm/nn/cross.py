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
from typing import NamedTuple

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
_COLUMNS = ("left", "right", "exact", "stride", "shift", "size", "base", "origin", "salt")


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


class CrossTable(NamedTuple):
    """Where one cross ``f × g`` keeps its weights: rows ``[base, base + size)``, exact (one row
    per pair of values, ``stride`` = ``|g|``) or hashed."""

    left: int
    right: int
    exact: bool
    stride: int
    size: int
    base: int


def cross_tables(
    layout: InputLayout, crosses: Sequence[tuple[int, int]], buckets: int, shared: bool
) -> list[CrossTable]:
    """The table of every cross (see :class:`PairCrossLinear`)."""
    tables, rows = [], 0
    for f, g in crosses:
        exact = not shared and layout.field_sizes[f] * layout.field_sizes[g] <= buckets
        stride = layout.field_sizes[g] if exact else 0
        size = layout.field_sizes[f] * stride if exact else buckets
        tables.append(CrossTable(f, g, exact, stride, size, 0 if shared else rows))
        rows += 0 if shared else size
    return tables


class PairCrossLinear(Regularized):
    """``Σ_{(f, g) ∈ crosses} Σ_{s ∈ f, t ∈ g} w[c(id_s, id_t)] x_s x_t``:
    ``forward(ids [B, S] int, values [B, S] float or None) -> [B]``.

    ``shared=True`` (Poly-2, Eq. 3): every cross is hashed into one table of ``buckets`` weights.
    ``shared=False`` (chosen crosses, Eq. 2): each cross has its own table; exact,
    ``c = (i - offset_f) · |g| + (j - offset_g)``, when its ``|f| · |g|`` pairs of values fit
    in ``buckets`` rows, hashed into ``buckets`` rows otherwise. A multi-valued field crosses
    each of its slots (values ``x_s``: 1/length for a mean bag, 0 for padding). Weights start at
    zero, as LR's order-1 weights do.

    The hash reads the pair's *local* ids (ids within their fields), salted per cross:
    ``c = (A·l_i + B·l_j + salt) mod P mod buckets``, with ``salt = A·offset_f + B·offset_g``
    of the layout the model was first built on (a persistent buffer), so that it equals Eq. 3's
    ``h(i, j)`` of the global ids there and stays put when vocabularies grow and offsets move
    (warm starts, :mod:`deepfm.nn.growth`).
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
        self.crosses, self.buckets, self.shared = list(crosses), buckets, shared
        slots = layout.slots_of_fields()
        # a layout without field sizes (ids only) cannot grow: hash its global ids (salt 0)
        offsets = layout.field_offsets if layout.field_sizes else (0,) * len(slots)
        tables = cross_tables(layout, crosses, buckets, shared)
        # per crossed pair of slots: (left, right, exact, stride, shift, size, base, offset, salt)
        pairs = []
        for t in tables:
            origin = (offsets[t.left] * HASH_A + offsets[t.right] * HASH_B) % HASH_PRIME
            shift = -(offsets[t.left] * t.stride + offsets[t.right])
            pairs += [
                (s, u, t.exact, t.stride, shift, t.size, t.base, origin, origin)
                for s, u in itertools.product(slots[t.left], slots[t.right])
            ]
        rows = buckets if shared else sum(t.size for t in tables)
        self.weight = nn.Embedding(max(rows, 1), 1)
        nn.init.zeros_(self.weight.weight)
        columns = list(zip(*pairs, strict=True)) if pairs else [()] * len(_COLUMNS)
        for name, column in zip(_COLUMNS, columns, strict=True):
            dtype = torch.bool if name == "exact" else torch.int64
            # the salt is the model's own (saved); the rest follows the layout
            self.register_buffer(name, torch.tensor(column, dtype=dtype), persistent=name == "salt")
        kinds = {t.exact for t in tables}
        # one kind of table only (Poly-2: all hashed): skip computing the other index
        self.kind = "mixed" if len(kinds) > 1 else "exact" if kinds == {True} else "hashed"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a model saved before salts were saved hashed the global ids of its own layout: the
        # salt this module computed from that layout
        state_dict.setdefault(prefix + "salt", self.salt)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def index(self, ids: torch.Tensor) -> torch.Tensor:
        """The weight row of every crossed pair of slots: ``[B, S] -> [B, pairs]`` int64."""
        ids = ids.long()
        i, j = ids[:, self.left], ids[:, self.right]
        if self.kind != "exact":
            # (A·l_i + B·l_j + salt) mod P = (h(i, j) - origin + salt) mod P, with
            # origin = (A·o_f + B·o_g) mod P of this layout: every term in [0, P)
            salted = (pair_hash(i, j) + self.salt + (HASH_PRIME - self.origin)) % HASH_PRIME
            hashed = self.base + salted % self.size
            if self.kind == "hashed":
                return hashed
        exact = self.base + i * self.stride + j + self.shift
        if self.kind == "exact":
            return exact
        return torch.where(self.exact, exact, hashed)

    def grown_rows(self, old: InputLayout, new: InputLayout) -> dict[str, torch.Tensor]:
        """For :func:`deepfm.nn.growth.grow_state`: the row of each weight of this module built
        on ``old`` in this module (built on ``new``); -1 where a cross changed from exact to
        hashed (those weights start again from zero)."""
        before = cross_tables(old, self.crosses, self.buckets, self.shared)
        after = cross_tables(new, self.crosses, self.buckets, self.shared)
        rows = max(1, self.buckets if self.shared else sum(t.size for t in before))
        out = torch.full((rows,), -1, dtype=torch.int64)
        if self.shared:
            return {"weight.weight": torch.arange(rows)}
        for b, a in zip(before, after, strict=True):
            if b.exact and a.exact:
                left = torch.arange(old.field_sizes[b.left])[:, None]
                right = torch.arange(old.field_sizes[b.right])[None, :]
                where = (b.base + left * b.stride + right).reshape(-1)
                out[where] = (a.base + left * a.stride + right).reshape(-1)
            elif not b.exact and not a.exact:
                out[b.base : b.base + b.size] = a.base + torch.arange(b.size)
        return {"weight.weight": out}

    def forward(self, ids: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
        index = self.index(ids)
        w = lookup(self.weight, index).squeeze(-1)  # [B, pairs]
        self._record(w, index)
        if values is not None:
            w = w * values[:, self.left] * values[:, self.right]
        return w.sum(dim=1)
