"""PNN product blocks against their definitions, computed the slow way (float64, random inputs).

Tolerance 1e-12: the blocks and the loops sum at most F·k ≈ 60 products of O(1) numbers in
float64 (unit round-off 1.1e-16), so any discrepancy above ~1e-13 is a wrong formula, not noise.
"""

import pytest
import torch

from deepfm.errors import ConfigError
from deepfm.nn import InnerProduct, OuterProduct, ProductLayer

B, F, K = 5, 7, 4
TOL = {"rtol": 1e-12, "atol": 1e-12}


@pytest.fixture
def e() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(B, F, K, dtype=torch.float64)


def inner_by_loop(e: torch.Tensor) -> torch.Tensor:
    columns = []
    for i in range(F):
        for j in range(i + 1, F):
            columns.append(sum(e[:, i, d] * e[:, j, d] for d in range(K)))
    return torch.stack(columns, dim=1)


def outer_by_hand(e: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(B, K * K, dtype=e.dtype)
    for b in range(B):
        f = [sum(e[b, i, d] for i in range(F)) for d in range(K)]
        for r in range(K):
            for c in range(K):
                out[b, r * K + c] = f[r] * f[c]
    return out


def test_inner_product_equals_loop_over_pairs(e):
    block = InnerProduct(F)
    p = block(e)
    assert p.shape == (B, F * (F - 1) // 2) == (B, block.out_dim)
    torch.testing.assert_close(p, inner_by_loop(e), **TOL)


def test_inner_product_pairs_are_distinct_fields(e):
    # a field's own square must not appear: zeroing every field but one leaves no pair
    lone = torch.zeros_like(e)
    lone[:, 3] = e[:, 3]
    torch.testing.assert_close(InnerProduct(F)(lone), torch.zeros(B, F * (F - 1) // 2).double())


def test_outer_product_equals_sum_pooled_outer_by_hand(e):
    block = OuterProduct(K)
    p = block(e)
    assert p.shape == (B, K * K) == (B, block.out_dim)
    torch.testing.assert_close(p, outer_by_hand(e), **TOL)
    # symmetric k×k matrix
    square = p.view(B, K, K)
    torch.testing.assert_close(square, square.transpose(1, 2), **TOL)


def test_pnn_star_layer_concatenates_z_inner_outer(e):
    layer = ProductLayer(F, K, ("outer", "inner"))  # order asked does not matter
    out = layer(e)
    expected = torch.cat([e.reshape(B, F * K), inner_by_loop(e), outer_by_hand(e)], dim=1)
    assert out.shape == (B, layer.out_dim) == expected.shape
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize(
    ("products", "extra"),
    [((), 0), (("inner",), F * (F - 1) // 2), (("outer",), K * K)],
)
def test_product_layer_parts(e, products, extra):
    layer = ProductLayer(F, K, products)
    out = layer(e)
    assert out.shape == (B, F * K + extra) == (B, layer.out_dim)
    torch.testing.assert_close(out[:, : F * K], e.reshape(B, F * K), **TOL)


def test_product_layer_has_no_state():
    # no parameters and no persistent buffers: bundles of DeepFM-D written before the product
    # layer existed still load
    layer = ProductLayer(F, K, ("inner", "outer"))
    assert not list(layer.parameters()) and not layer.state_dict()


def test_unknown_product_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown products"):
        ProductLayer(F, K, ("kernel",))
