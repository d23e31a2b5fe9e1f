"""Growing a model's tables when its feature map grows (daily warm starts).

A grown feature map keeps every field's local ids and appends new ones, so the global id of a
feature moves by its field's new offset (:func:`feature_rows`). Every block whose weights are
indexed by feature (the embedding ``V``, the order-1 ``w``, the cross tables of LR and Poly-2)
says where each of its old rows goes (``grown_rows``); :func:`grow_state` copies them there into
a freshly initialised model of the new layout, so the new rows start as a fresh model's would and
every old feature scores as before. Optimiser state (Adam's moments, FTRL's ``z`` and ``n``) is
remapped by the same rows, new rows starting from zero (:func:`grow_tensor`).
The new global id of an old one: :meth:`InputLayout.feature_rows`.
"""

from __future__ import annotations

import torch
from torch import nn

from deepfm.nn.embedding import InputLayout


def grown_rows(model: nn.Module, old: InputLayout, new: InputLayout) -> dict[str, torch.Tensor]:
    """State-dict key → new row of each old row (-1: not kept) for every feature-indexed
    tensor of ``model`` (built on ``new``): each block with such a tensor has a
    ``grown_rows(old, new)`` method."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if hasattr(module, "grown_rows"):
            prefix = f"{name}." if name else ""
            for key, where in module.grown_rows(old, new).items():
                out[prefix + key] = where
    return out


def grow_tensor(before: torch.Tensor, rows: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """``fresh`` (the new shape) with row ``rows[r]`` set to ``before[r]`` wherever
    ``rows[r] >= 0``."""
    assert len(rows) == len(before), (len(rows), before.shape)
    out = fresh.detach().clone()
    keep = rows >= 0
    out[rows[keep].to(out.device)] = before[keep.to(before.device)].to(out.device, out.dtype)
    return out


def grow_state(
    model: nn.Module, old_state: dict[str, torch.Tensor], old: InputLayout, new: InputLayout
) -> dict[str, torch.Tensor]:
    """The state of ``model`` (built on ``new``, freshly initialised) with the weights of
    ``old_state`` (a model of the same config built on ``old``) copied to their new rows."""
    maps = grown_rows(model, old, new)
    state = {}
    for key, fresh in model.state_dict().items():
        before = old_state[key]
        if key in maps:
            state[key] = grow_tensor(before, maps[key], fresh)
        else:
            assert before.shape == fresh.shape, f"{key}: {tuple(before.shape)} → {fresh.shape}"
            state[key] = before
    return state
