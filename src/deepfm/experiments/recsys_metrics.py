"""Metrics of top-L recommendation lists (paper, Sec. IV-D3, Eq. 14–18): pure NumPy functions.

A set of lists is an integer array ``lists`` of shape ``[U, L]``: row ``a`` holds user ``a``'s
top-L items (item indices in ``[0, n_items)``), best first, without repeats.

* **Inter-list distance** (Eq. 15) of users ``a`` and ``b``: ``h_ab(L) = 1 - q_ab(L) / L``, where
  ``q_ab(L)`` is the number of items the two top-L lists share (0: same items, 1: disjoint).
* **Personalization@L** (Eq. 16): users fall in groups (the simulator's user types). The distance
  between groups ``i`` and ``j`` is the mean of ``h_ab`` over the ordered pairs of distinct users
  ``a ∈ G_i``, ``b ∈ G_j`` (``i = j``: within the group; a group of one user has no pair and is
  left out). Personalization@L is the mean of these group distances over the unordered group
  pairs ``i ≤ j``; its two parts, the mean within groups (``i = j``) and the mean across groups
  (``i < j``), are reported as well. We could not read the paper's exact formula; this is the
  definition implemented, "averaged within and across user groups".
* **Coverage@L** (Eq. 17): the share of all items that appear in at least one list.
* **Popularity@L** (Eq. 18): the popularity of a list is the mean popularity of its L items
  (``item_popularity``, a number per item, given by the caller); popularity@L is the mean over
  the lists, reported with the variance (population variance, ``ddof=0``) of the per-list values.

Everything is vectorised: personalization never builds the ``[U, U]`` distance matrix; it uses the
per-group item counts ``C[g, i]`` (how many lists of group ``g`` hold item ``i``), since the sum of
``q_ab`` over all ordered pairs of groups ``i, j`` (self-pairs included) is ``(C C^T)_ij``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deepfm.errors import ConfigError


def check_lists(lists: np.ndarray, n_items: int | None = None) -> np.ndarray:
    """``lists`` as int64 ``[U, L]``, checked: shape, item range, no item twice in a row."""
    lists = np.asarray(lists)
    if lists.ndim != 2 or lists.shape[0] == 0 or lists.shape[1] == 0:
        raise ConfigError(f"top-L lists must be a non-empty [users, L] array, got {lists.shape}")
    if not np.issubdtype(lists.dtype, np.integer):
        raise ConfigError(f"top-L lists must hold integer item indices, got {lists.dtype}")
    lists = lists.astype(np.int64)
    if lists.min() < 0 or (n_items is not None and lists.max() >= n_items):
        raise ConfigError(f"item indices must lie in [0, {n_items}), got {lists.min()}..")
    ordered = np.sort(lists, axis=1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ConfigError("a top-L list repeats an item")
    return lists


def top_l(scores: np.ndarray, size: int) -> np.ndarray:
    """Each row's ``size`` best columns, best first; ties keep column order.

    ``scores``: ``[U, I]`` (user × item). Returns ``[U, size]`` item indices.
    """
    scores = np.asarray(scores)
    if not 1 <= size <= scores.shape[1]:
        raise ConfigError(f"list size must be in [1, {scores.shape[1]}], got {size}")
    return np.argsort(-scores, axis=1, kind="stable")[:, :size]


def distance_matrix(lists: np.ndarray) -> np.ndarray:
    """``h_ab(L) = 1 - q_ab(L)/L`` for every pair of users: ``[U, U]`` (small U only)."""
    lists = check_lists(lists)
    size = lists.shape[1]
    _, items = np.unique(lists, return_inverse=True)
    items = items.reshape(lists.shape)
    onehot = np.zeros((len(lists), items.max() + 1), dtype=np.float64)
    np.put_along_axis(onehot, items, 1.0, axis=1)
    return 1.0 - (onehot @ onehot.T) / size


@dataclass(frozen=True)
class Personalization:
    """Personalization@L and its parts. ``between[i, j]``: mean ``h_ab`` between groups i, j."""

    overall: float
    within: float
    across: float
    between: np.ndarray  # [t, t]; NaN on the diagonal for a group of one user
    groups: np.ndarray  # [t] the group labels, in the order of ``between``


def personalization(lists: np.ndarray, groups: np.ndarray) -> Personalization:
    """Personalization@L of ``lists`` ``[U, L]`` for users in ``groups`` ``[U]`` (any labels)."""
    lists = check_lists(lists)
    groups = np.asarray(groups)
    if groups.shape != (len(lists),):
        raise ConfigError(f"need one group per list: {groups.shape} groups, {len(lists)} lists")
    size = lists.shape[1]
    labels, group = np.unique(groups, return_inverse=True)
    _, item = np.unique(lists, return_inverse=True)
    n_groups, n_items = len(labels), int(item.max()) + 1
    # C[g, i]: how many lists of group g hold item i
    flat = np.repeat(group, size) * n_items + item.ravel()
    counts = np.bincount(flat, minlength=n_groups * n_items).reshape(n_groups, n_items)
    counts = counts.astype(np.float64)
    shared = counts @ counts.T  # Σ q_ab over a ∈ G_i, b ∈ G_j, self-pairs a = b included
    members = np.bincount(group, minlength=n_groups).astype(np.float64)
    pairs = np.outer(members, members)
    diagonal = np.arange(n_groups)
    shared[diagonal, diagonal] -= members * size  # q_aa = L: drop the self-pairs
    pairs[diagonal, diagonal] -= members
    with np.errstate(invalid="ignore", divide="ignore"):
        between = np.where(pairs > 0, 1.0 - shared / (size * np.where(pairs > 0, pairs, 1)), np.nan)
    upper = np.triu_indices(n_groups)
    within_values = between[diagonal, diagonal]
    across_values = between[np.triu_indices(n_groups, k=1)]
    if np.isnan(between[upper]).all():
        raise ConfigError("personalization needs at least two users")
    return Personalization(
        overall=float(np.nanmean(between[upper])),
        within=float(np.nanmean(within_values)) if (~np.isnan(within_values)).any() else np.nan,
        across=float(across_values.mean()) if len(across_values) else np.nan,
        between=between,
        groups=labels,
    )


def coverage(lists: np.ndarray, n_items: int) -> float:
    """Coverage@L: the share of the ``n_items`` items that appear in some list."""
    lists = check_lists(lists, n_items)
    return len(np.unique(lists)) / n_items


def popularity(lists: np.ndarray, item_popularity: np.ndarray) -> tuple[float, float]:
    """Popularity@L: (mean, population variance) over lists of the mean item popularity per list.

    ``item_popularity``: ``[n_items]``, any number per item (e.g. a download percentile).
    """
    item_popularity = np.asarray(item_popularity, dtype=np.float64)
    lists = check_lists(lists, len(item_popularity))
    per_list = item_popularity[lists].mean(axis=1)
    return float(per_list.mean()), float(per_list.var())
