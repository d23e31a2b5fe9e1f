import torch

from deepfm.nn import FMInteraction


def test_sum_square_equals_double_loop_over_pairs():
    torch.manual_seed(0)
    e = torch.randn(7, 9, 5, dtype=torch.float64)  # [batch, fields, k]
    explicit = torch.zeros(7, dtype=torch.float64)
    for i in range(9):
        for j in range(i + 1, 9):
            explicit += (e[:, i] * e[:, j]).sum(dim=1)
    torch.testing.assert_close(FMInteraction()(e), explicit, rtol=1e-12, atol=1e-12)


def test_single_field_has_no_pairs():
    e = torch.randn(4, 1, 3, dtype=torch.float64)
    torch.testing.assert_close(FMInteraction()(e), torch.zeros(4, dtype=torch.float64))
