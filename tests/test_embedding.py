"""The embedding lookup: ``index_select`` on CPU gives exactly what ``nn.Embedding`` gives, rows
and gradients (duplicated ids summed); sparse-gradient tables keep the embedding kernel."""

from __future__ import annotations

import torch
from torch import nn

from deepfm.nn.embedding import lookup


def test_lookup_equals_the_embedding_forward_and_backward():
    torch.manual_seed(0)
    table = nn.Embedding(50, 4)
    ids = torch.tensor([[1, 7, 7], [0, 49, 1]])  # duplicates: their gradients must add up
    upstream = torch.randn(2, 3, 4)
    rows = lookup(table, ids)
    rows.backward(upstream)
    ours = table.weight.grad.clone()
    table.weight.grad = None
    expected = table(ids)
    expected.backward(upstream)
    assert rows.shape == (2, 3, 4)
    torch.testing.assert_close(rows, expected, rtol=0, atol=0)
    torch.testing.assert_close(ours, table.weight.grad)
    assert ours[7].abs().sum() > 0 and ours[2].abs().sum() == 0


def test_sparse_tables_get_sparse_gradients():
    table = nn.Embedding(50, 4, sparse=True)
    lookup(table, torch.tensor([[3, 3]])).sum().backward()
    assert table.weight.grad.is_sparse
