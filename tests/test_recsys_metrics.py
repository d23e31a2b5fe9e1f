"""Top-L list metrics (Eq. 14-18) against small examples worked out by hand in exact fractions."""

from fractions import Fraction as F
from itertools import combinations

import numpy as np
import pytest

from deepfm.errors import ConfigError
from deepfm.experiments.recsys_metrics import (
    coverage,
    distance_matrix,
    personalization,
    popularity,
    top_l,
)

# four users in two groups, L = 2; shared items: u0-u1 {1}, u0-u3 {0}, u2-u3 {3}, others none
LISTS = np.array([[0, 1], [1, 2], [3, 4], [3, 0]])
GROUPS = np.array(["A", "A", "B", "B"])


def exact(value: float, fraction: F) -> None:
    # the metrics divide small integers: a float64 result is within 1e-15 of the exact value
    assert value == pytest.approx(float(fraction), abs=1e-15)


def test_distance_is_one_minus_shared_over_l():
    h = distance_matrix(LISTS)
    expected = [
        [0, F(1, 2), 1, F(1, 2)],
        [F(1, 2), 0, 1, 1],
        [1, 1, 0, F(1, 2)],
        [F(1, 2), 1, F(1, 2), 0],
    ]
    for a in range(4):
        for b in range(4):
            exact(h[a, b], F(expected[a][b]))


def test_personalization_averages_within_then_across_groups():
    p = personalization(LISTS, GROUPS)
    # within A: h(u0,u1) = 1/2; within B: h(u2,u3) = 1/2
    # across: h(u0,u2) = 1, h(u0,u3) = 1/2, h(u1,u2) = 1, h(u1,u3) = 1 → 7/8
    exact(p.between[0, 0], F(1, 2))
    exact(p.between[1, 1], F(1, 2))
    exact(p.between[0, 1], F(7, 8))
    exact(p.between[1, 0], F(7, 8))
    exact(p.within, F(1, 2))
    exact(p.across, F(7, 8))
    # mean over the group pairs {A,A}, {B,B}, {A,B}: (1/2 + 1/2 + 7/8) / 3 = 5/8
    exact(p.overall, F(5, 8))
    assert list(p.groups) == ["A", "B"]


def test_personalization_with_unequal_groups_and_a_singleton():
    # L = 3; group 0 = {u0, u1, u2}, group 1 = {u3} (no within pair), group 2 = {u4, u5}
    lists = np.array([[0, 1, 2], [0, 1, 3], [4, 5, 6], [0, 4, 7], [7, 8, 9], [9, 8, 7]])
    groups = np.array([0, 0, 0, 1, 2, 2])
    p = personalization(lists, groups)
    # within 0: h01 = 1 - 2/3 = 1/3, h02 = 1, h12 = 1 → mean 7/9
    exact(p.between[0, 0], F(7, 9))
    assert np.isnan(p.between[1, 1])
    # within 2: the same three items → 0
    exact(p.between[2, 2], F(0))
    # 0-1: u3 shares {0} with u0, {0} with u1, {4} with u2 → each 2/3 → 2/3
    exact(p.between[0, 1], F(2, 3))
    # 0-2: shares nothing → 1
    exact(p.between[0, 2], F(1))
    # 1-2: u3 shares {7} with u4 and with u5 → 2/3
    exact(p.between[1, 2], F(2, 3))
    exact(p.within, (F(7, 9) + 0) / 2)
    exact(p.across, (F(2, 3) + 1 + F(2, 3)) / 3)
    exact(p.overall, (F(7, 9) + 0 + F(2, 3) + 1 + F(2, 3)) / 5)


def test_personalization_matches_brute_force_pairs():
    rng = np.random.default_rng(3)
    lists = np.stack([rng.choice(30, 7, replace=False) for _ in range(40)])
    groups = rng.integers(0, 4, 40)
    p = personalization(lists, groups)
    for i, j in [(0, 0), (1, 3), (2, 2), (0, 2)]:
        values = [
            1 - F(len(set(lists[a]) & set(lists[b])), 7)
            for a, b in combinations(range(40), 2)
            if {groups[a], groups[b]} == {i, j} and (i != j or groups[a] == i)
        ]
        exact(p.between[i, j], sum(values, F(0)) / len(values))


def test_identical_and_disjoint_lists_are_the_extremes():
    same = np.tile([4, 2, 7], (6, 1))
    assert personalization(same, np.repeat([0, 1], 3)).overall == 0.0
    disjoint = np.arange(18).reshape(6, 3)
    assert personalization(disjoint, np.repeat([0, 1], 3)).overall == 1.0


def test_coverage_counts_distinct_items_over_all_items():
    exact(coverage(LISTS, 6), F(5, 6))  # items 0..4 of 0..5
    exact(coverage(LISTS, 10), F(1, 2))


def test_popularity_mean_and_population_variance_of_list_means():
    pop = np.array([6, 5, 4, 3, 2, 1], dtype=float)
    mean, var = popularity(LISTS, pop)
    # list means: 11/2, 9/2, 5/2, 9/2 → mean 17/4; E[x²] = 77/4 → var = 77/4 - 289/16 = 19/16
    exact(mean, F(17, 4))
    exact(var, F(19, 16))


def test_top_l_orders_best_first_and_keeps_ties_in_column_order():
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]])
    np.testing.assert_array_equal(top_l(scores, 3), [[1, 3, 2], [0, 1, 2]])


@pytest.mark.parametrize(
    "lists",
    [np.array([[0, 0], [1, 2]]), np.array([1, 2, 3]), np.zeros((0, 3), int), np.array([[0.5, 1]])],
)
def test_bad_lists_raise_config_errors(lists):
    with pytest.raises(ConfigError):
        coverage(lists, 5)


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="item indices"):
        coverage(np.array([[0, 7]]), 5)
    with pytest.raises(ConfigError, match="one group per list"):
        personalization(LISTS, GROUPS[:3])
    with pytest.raises(ConfigError, match="at least two users"):
        personalization(LISTS[:1], GROUPS[:1])
    with pytest.raises(ConfigError, match="list size"):
        top_l(np.zeros((2, 3)), 4)
