"""The shared input of every model: one embedding table over all features, pooled per field."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepfm.nn.cpu_kernels import gather_rows


@dataclass(frozen=True)
class InputLayout:
    """What a model needs to know about its input: table size and slots per field.

    Built from a fitted feature map (``InputLayout.of(feature_map)``); a field with more than one
    slot is a multi-valued bag whose slot embeddings are pooled into one field embedding. The
    fields' names and sizes (ids per field, laid out one field after the other in the global
    table) are known when built from a feature map; only field crosses need them.
    """

    num_features: int
    field_slots: tuple[int, ...]
    field_names: tuple[str, ...] = ()
    field_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        assert not self.field_names or len(self.field_names) == len(self.field_slots)
        assert not self.field_sizes or sum(self.field_sizes) == self.num_features

    @classmethod
    def of(cls, feature_map) -> InputLayout:
        return cls(
            int(feature_map.num_features),
            tuple(int(s) for s in feature_map.field_slots),
            tuple(str(f.name) for f in feature_map.fields),
            tuple(int(s) for s in feature_map.field_sizes()),
        )

    @property
    def num_fields(self) -> int:
        return len(self.field_slots)

    @property
    def num_slots(self) -> int:
        return sum(self.field_slots)

    @property
    def field_offsets(self) -> tuple[int, ...]:
        """The first global id of each field (needs ``field_sizes``)."""
        return tuple(int(o) for o in np.cumsum((0, *self.field_sizes[:-1])))

    def feature_rows(self, grown: InputLayout) -> torch.Tensor:
        """The global id in ``grown`` (the same fields, each at least as large) of each global
        id of this layout: local ids are kept, offsets move (int64 ``[num_features]``)."""
        assert self.field_names == grown.field_names, "a grown layout has the same fields"
        parts = [
            after + torch.arange(size)
            for size, after in zip(self.field_sizes, grown.field_offsets, strict=True)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def slots_of_fields(self) -> list[range]:
        """The slot columns of each field in ``ids [B, S]``."""
        starts = np.cumsum((0, *self.field_slots))
        return [range(int(a), int(b)) for a, b in itertools.pairwise(starts)]


class Regularized(nn.Module):
    """A block whose training forward leaves an L2 ``penalty`` behind: per sample, ``Σ_s c_s ·
    ||row_s||²`` over the table rows ``s`` the sample used (``[B]``), with ``c_s = l2 +
    row_l2[id_s]``.

    The batch's penalty is its mean over the samples (:func:`regularization`), so only
    features present in the batch are regularised (the usual practice for sparse CTR tables;
    a dense weight decay would shrink every row at every step). ``l2`` is the same for every
    use of every row; ``row_l2`` (``[rows]``, set by the trainer on the tables of feature
    ids, :func:`set_id_prior`) varies per row.
    """

    def __init__(self, l2: float) -> None:
        super().__init__()
        self.l2 = float(l2)
        self.row_l2: torch.Tensor | None = None
        self.penalty: torch.Tensor | None = None

    def _record(self, rows: torch.Tensor, ids: torch.Tensor) -> None:
        """``rows [B, S]`` or ``[B, S, dim]``: the table rows (or weights) each sample looked
        up, at ``ids [B, S]``."""
        if not self.training or (self.l2 == 0 and self.row_l2 is None):
            self.penalty = None
            return
        squares = rows.pow(2).flatten(2).sum(dim=2) if rows.dim() > 2 else rows.pow(2)
        coefficient = self.l2 if self.row_l2 is None else self.row_l2[ids] + self.l2
        self.penalty = (coefficient * squares).sum(dim=1)


def set_id_prior(model: nn.Module, counts: torch.Tensor | None, strength: float) -> None:
    """Give every feature id's rows in ``model`` (its :class:`FieldEmbedding` and
    :class:`FeatureLinear` tables; not hashed crosses, whose rows are no ids) a Gaussian prior
    of precision ``2 · strength`` (std ``1 / sqrt(2 · strength)`` per coordinate), whatever
    the id's count in the training rows: each use of id ``i`` carries ``strength /
    counts[i]``, so that over an epoch the penalties of ``i`` add up to ``strength ·
    ||row_i||²`` against ``counts[i]`` summed losses.

    An id seen a few times is pulled to zero and one seen often keeps what its rows say: the
    shrinkage a per-use L2 cannot give (it scales both sides with the count). ``counts [rows]``
    (ids never trained count as 1); None or a zero strength: remove the prior."""
    # one tensor for every table (they share the feature ids): 4 bytes per id, not 8
    coefficients = None
    if counts is not None and strength != 0:
        coefficients = strength / counts.to(torch.float32).clamp(min=1)
    for module in model.modules():
        if isinstance(module, FieldEmbedding | FeatureLinear):
            module.row_l2 = coefficients


def lookup(table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """``table(ids)``: ``ids [*] -> [*, dim]``.

    On CPU with dense gradients the rows are gathered by :func:`gather_rows`, whose backward
    scatters in one threaded pass where ``embedding_dense_backward`` sorts the ids first
    (BENCHMARKS.md, training speed). Sparse-gradient tables and other devices use the
    embedding kernel itself, and so does a graph being compiled (the compiler writes its own).
    """
    if table.sparse or ids.device.type != "cpu" or torch.compiler.is_compiling():
        return table(ids)
    return gather_rows(table.weight, ids).view(*ids.shape, table.embedding_dim)


def regularization(model: nn.Module, weights: torch.Tensor | None = None) -> torch.Tensor | float:
    """The penalties left by the last training forward of ``model``'s blocks, averaged over
    the batch's samples (``weights [B]``: a weighted mean, 0 for rows that only pad a batch to
    its static shape)."""
    total: torch.Tensor | float = 0.0
    for module in model.modules():
        if isinstance(module, Regularized) and module.penalty is not None:
            if weights is None:
                total = total + module.penalty.mean()
            else:
                total = total + (module.penalty * weights).sum() / weights.sum()
    return total


class FieldEmbedding(Regularized):
    """``e_i = Σ_{s ∈ field i} V[id_s] · x_s``: the paper's ``e_i = V_field_i · x_field_i``.

    ``forward(ids [B, S] int, values [B, S] float or None) -> [B, F, dim]``.
    """

    def __init__(
        self, layout: InputLayout, dim: int, *, l2: float = 0.0, init_std: float = 0.01
    ) -> None:
        super().__init__(l2)
        self.layout = layout
        self.dim = dim
        self.table = nn.Embedding(layout.num_features, dim)
        nn.init.normal_(self.table.weight, std=init_std)
        self.pooled = layout.num_slots != layout.num_fields
        if self.pooled:
            # output_size: also buildable on the meta device (parameter counts without memory)
            slot_field = torch.repeat_interleave(
                torch.arange(layout.num_fields),
                torch.tensor(layout.field_slots),
                output_size=layout.num_slots,
            )
            self.register_buffer("slot_field", slot_field, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight

    def grown_rows(self, old: InputLayout, new: InputLayout) -> dict[str, torch.Tensor]:
        """Where each row of the table goes when the layout grows (:mod:`deepfm.nn.growth`)."""
        return {"table.weight": old.feature_rows(new)}

    def forward(self, ids: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
        rows = lookup(self.table, ids)  # [B, S, dim]
        self._record(rows, ids)
        if values is not None:
            rows = rows * values.unsqueeze(-1)
        if not self.pooled:
            return rows
        fields = rows.new_zeros(ids.shape[0], self.layout.num_fields, self.dim)
        return fields.index_add(1, self.slot_field, rows)


class FeatureLinear(Regularized):
    """Order-1 term ``<w, x> + b``: ``forward(ids [B, S], values [B, S] or None) -> [B]``."""

    def __init__(self, layout: InputLayout, *, l2: float = 0.0) -> None:
        super().__init__(l2)
        self.weight = nn.Embedding(layout.num_features, 1)
        nn.init.zeros_(self.weight.weight)
        self.bias = nn.Parameter(torch.zeros(1))

    def grown_rows(self, old: InputLayout, new: InputLayout) -> dict[str, torch.Tensor]:
        """Where each order-1 weight goes when the layout grows (:mod:`deepfm.nn.growth`)."""
        return {"weight.weight": old.feature_rows(new)}

    def forward(self, ids: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
        w = lookup(self.weight, ids).squeeze(-1)  # [B, S]
        self._record(w, ids)
        if values is not None:
            w = w * values
        return w.sum(dim=1) + self.bias
