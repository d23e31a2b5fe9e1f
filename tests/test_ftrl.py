"""FTRL-Proximal against the published update rule (McMahan et al. 2013, Algorithm 1),
worked by hand for a weight vector of three coordinates."""

import math

import torch

from deepfm.train.optim import FTRL


def reference(grads, alpha, beta, l1, l2):
    """Algorithm 1, one coordinate at a time, in plain Python floats."""
    z = [0.0] * len(grads[0])
    n = [0.0] * len(grads[0])
    w = [0.0] * len(grads[0])
    history = []
    for g in grads:
        for i, gi in enumerate(g):
            sigma = (math.sqrt(n[i] + gi * gi) - math.sqrt(n[i])) / alpha
            z[i] += gi - sigma * w[i]
            n[i] += gi * gi
            if abs(z[i]) <= l1:
                w[i] = 0.0
            else:
                w[i] = -(z[i] - math.copysign(l1, z[i])) / ((beta + math.sqrt(n[i])) / alpha + l2)
        history.append(list(w))
    return history


def test_matches_hand_computed_first_step():
    # alpha=0.5, beta=1, l1=0.3, l2=0.1, g = [2, -0.2, 0]:
    # coordinate 0: n=4, z=2 > l1 → w = -(2-0.3)/((1+2)/0.5+0.1) = -1.7/6.1
    # coordinate 1: z=-0.2, |z| ≤ 0.3 → w = 0 exactly (the L1 sparsity)
    # coordinate 2: no gradient → stays 0
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = FTRL([w], alpha=0.5, beta=1.0, l1=0.3, l2=0.1)
    w.grad = torch.tensor([2.0, -0.2, 0.0], dtype=torch.float64)
    optimizer.step()
    assert w[0].item() == -1.7 / 6.1
    assert w[1].item() == 0.0 and w[2].item() == 0.0


def test_matches_reference_over_several_steps():
    grads = [[2.0, -0.2, 0.5], [-1.0, -0.3, 0.5], [0.5, -0.4, -3.0], [0.1, 0.0, 1.0]]
    alpha, beta, l1, l2 = 0.5, 1.0, 0.3, 0.1
    expected = reference(grads, alpha, beta, l1, l2)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = FTRL([w], alpha=alpha, beta=beta, l1=l1, l2=l2)
    for g, want in zip(grads, expected, strict=True):
        w.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
        torch.testing.assert_close(w.detach(), torch.tensor(want, dtype=torch.float64))
    # coordinate 1 is held at exactly 0 while |z| <= l1 (step 1: z = -0.2) and leaves 0 once
    # the gradients accumulate past l1 (step 2: z = -0.5)
    assert expected[0][1] == 0.0 and expected[1][1] != 0.0


def test_a_table_is_updated_on_its_touched_rows_only_with_the_same_result():
    """Rows with a zero gradient are skipped; the result equals the rule applied to every
    coordinate (the reference), whether the gradient is dense or sparse."""
    g = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(4):
        grad = torch.randn(6, 2, generator=g, dtype=torch.float64)
        grad[torch.randperm(6, generator=g)[:3]] = 0.0  # half the rows untouched each step
        steps.append(grad)
    expected = reference([s.reshape(-1).tolist() for s in steps], 0.5, 1.0, 0.3, 0.1)
    for sparse in (False, True):
        w = torch.zeros(6, 2, dtype=torch.float64, requires_grad=True)
        optimizer = FTRL([w], alpha=0.5, beta=1.0, l1=0.3, l2=0.1)
        for grad, want in zip(steps, expected, strict=True):
            # sparse: row-sparse like an embedding's gradient (sparse rows, dense columns)
            w.grad = grad.to_sparse(1) if sparse else grad.clone()
            optimizer.step()
            torch.testing.assert_close(w.detach().reshape(-1), torch.tensor(want).double())
        never = steps[0].eq(0).all(1) & steps[1].eq(0).all(1) & steps[2].eq(0).all(1)
        never &= steps[3].eq(0).all(1)
        assert optimizer.state[w]["n"][never].eq(0).all()


def test_both_own_optimisers_step_with_a_closure_and_return_its_loss():
    from deepfm.train.lazy_adam import LazyAdam

    for sparse, make in ((False, lambda p: FTRL([p])), (True, lambda p: LazyAdam([p], lr=0.1))):
        table = torch.nn.Embedding(3, 2, sparse=sparse)
        torch.nn.init.ones_(table.weight)
        optimizer = make(table.weight)

        def closure(table=table, optimizer=optimizer):
            optimizer.zero_grad()
            loss = table(torch.tensor([0, 1, 2])).pow(2).sum()  # needs gradients on in step
            loss.backward()
            return loss

        assert optimizer.step(closure).item() == 6.0
        assert torch.all(table.weight < 1)  # the closure's gradients were applied
        assert optimizer.step() is None
