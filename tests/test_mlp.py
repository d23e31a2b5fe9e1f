"""The MLP's dropout: the law of ``nn.Dropout`` (drop rate p, survivors scaled by 1/(1-p)),
identity in evaluation, and gradients through the kept units only."""

from __future__ import annotations

import pytest
import torch

from deepfm.errors import ConfigError
from deepfm.nn.mlp import MLP, Dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_drops_at_rate_p_and_scales_survivors(p):
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, requires_grad=True)
    layer = Dropout(p).train()
    y = layer(x)
    kept = y != 0
    # 10^6 Bernoulli draws: the kept fraction's std is sqrt(p(1-p)/1e6) <= 5e-4; 3e-3 is 6 sigma
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=3e-3)
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))


def test_dropout_masks_differ_between_calls_and_follow_the_seed():
    x = torch.ones(64, 64)
    layer = Dropout(0.5).train()
    torch.manual_seed(3)
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)


def test_dropout_is_the_identity_in_evaluation_and_at_zero():
    x = torch.randn(8, 5)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_mlp_rejects_a_keep_probability_given_as_a_drop_rate_above_one():
    with pytest.raises(ConfigError, match="drop rate"):
        MLP(4, (3,), dropout=1.0)
    assert any(isinstance(m, Dropout) for m in MLP(4, (3, 3), dropout=0.5).modules())
