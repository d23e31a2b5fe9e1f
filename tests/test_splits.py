from fractions import Fraction

import numpy as np
import pytest

from deepfm.data.splits import TEST, TRAIN, VALID, SplitSpec, assign
from deepfm.errors import ConfigError


def test_parse():
    assert SplitSpec.parse("random:0.9") == SplitSpec("random", Fraction(9, 10))
    assert SplitSpec.parse("sequential:6/7").train == Fraction(6, 7)
    for bad in ("random", "random:1.5", "sequential:0", "shuffle:0.9"):
        with pytest.raises(ConfigError):
            SplitSpec.parse(bad)


def test_random_split_is_disjoint_complete_seeded_and_close_to_its_share():
    n = 200_000
    ordinals = np.arange(n)
    codes = assign(SplitSpec.parse("random:0.9"), ordinals, valid_fraction=0.1, seed=3)
    # every row gets exactly one split (disjoint and complete by construction of `codes`)
    assert set(np.unique(codes)) == {TRAIN, VALID, TEST}
    # Bernoulli(0.1) over 200k rows: std of the share is 0.00067, so 0.005 is > 7 sigma
    assert abs((codes == TEST).mean() - 0.1) < 0.005
    assert abs((codes == VALID).mean() - 0.9 * 0.1) < 0.005
    # the same seed gives the same split whatever the chunking; another seed another split
    chunked = np.concatenate(
        [
            assign(SplitSpec.parse("random:0.9"), part, valid_fraction=0.1, seed=3)
            for part in np.array_split(ordinals, 7)
        ]
    )
    np.testing.assert_array_equal(codes, chunked)
    other = assign(SplitSpec.parse("random:0.9"), ordinals, valid_fraction=0.1, seed=4)
    assert (other != codes).mean() > 0.1


def test_sequential_split_puts_every_test_row_after_every_training_row():
    n = 7000
    codes = assign(SplitSpec.parse("sequential:6/7"), np.arange(n), total=n, valid_fraction=0.1)
    train, valid, test = (np.flatnonzero(codes == c) for c in (TRAIN, VALID, TEST))
    assert len(test) == 1000 and len(train) + len(valid) == 6000
    assert train.max() < valid.min() and valid.max() < test.min()
    assert len(valid) == 600
