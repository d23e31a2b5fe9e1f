"""The fused CPU kernels equal their PyTorch references bit for bit; the random stream behaves
like a uniform one; without a compiler the references run and training gives the same bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepfm.data.encoded import EncodedArrays
from deepfm.models import ModelConfig, build_model, get_entry
from deepfm.nn import InputLayout, cpu_kernels
from deepfm.nn.cpu_kernels import (
    dropout,
    gather_rows,
    keep_cut,
    keep_mask,
    random_words,
    relu_dropout,
)
from deepfm.train.trainer import TrainConfig, Trainer

needs_kernels = pytest.mark.skipif(
    cpu_kernels.library() is None, reason="no C compiler: the compiled kernels cannot be built"
)


@pytest.fixture
def without_kernels(monkeypatch):
    """The PyTorch references only (as on a machine without a C compiler)."""
    cpu_kernels.library.cache_clear()
    monkeypatch.setenv("DEEPFM_CPU_KERNELS", "0")
    yield
    monkeypatch.delenv("DEEPFM_CPU_KERNELS")
    cpu_kernels.library.cache_clear()


def splitmix_word(key: int, w: int) -> int:
    """One word of the stream in plain Python integers (the published splitmix64 mixer)."""
    mask = (1 << 64) - 1
    z = (key + (w + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_the_tensor_stream_is_splitmix64():
    key = (1 << 63) - 12345  # large keys: the int64 wrap-around must not change the bits
    words = random_words(key, 64).numpy().view(np.uint64)
    assert [int(w) for w in words] == [splitmix_word(key, w) for w in range(64)]


def test_keep_rate_and_independence_of_the_stream():
    n = 1 << 20
    for p in (0.1, 0.5, 0.9):
        keep = keep_mask(2024, n, p).numpy()
        # the kept share of n Bernoulli draws has std sqrt(p(1-p)/n) <= 5e-4: 5 std is 2.5e-3
        assert abs(keep.mean() - (1 - p)) < 2.5e-3
    keep = keep_mask(7, n, 0.5).numpy().astype(np.float64)
    # neighbours share a word (lanes) or are adjacent words: their correlation, like any
    # pair's, is 0 within 5/sqrt(n) ≈ 5e-3 for independent draws
    for lag in (1, 2, 3, 4, 400):
        assert abs(np.corrcoef(keep[:-lag], keep[lag:])[0, 1]) < 5e-3
    other = keep_mask(8, n, 0.5).numpy().astype(np.float64)  # the next key: another stream
    assert abs(np.corrcoef(keep, other)[0, 1]) < 5e-3


def test_quantised_rate_and_scale():
    assert keep_cut(0.5) == (0, 2.0)
    cut, scale = keep_cut(0.1)
    dropped = cut + 2**31
    assert abs(dropped / 2**32 - 0.1) <= 2**-33 and scale == 2**32 / (2**32 - dropped)
    assert keep_cut(0.0)[0] == -(2**31) and keep_cut(1.0)[0] == 2**31  # all kept, none kept


def reference_relu_dropout(y, p, key):
    keep = keep_mask(key, y.numel(), p).view(y.shape)
    return torch.where(keep, torch.relu(y) * keep_cut(p)[1], 0.0)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(4096, 400), (3, 7), (1, 4097 * 4 + 3)])
def test_compiled_dropout_equals_the_reference(threads, shape):
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for p in (0.5, 0.3):
            y = torch.randn(shape, requires_grad=True)
            out = relu_dropout(y, p, key=99)
            expected = reference_relu_dropout(y.detach(), p, 99)
            assert torch.equal(out, expected)
            grad = torch.randn(shape)
            out.backward(grad)
            assert torch.equal(y.grad, torch.where(expected > 0, grad * keep_cut(p)[1], 0.0))

            x = torch.randn(shape, requires_grad=True)
            plain = dropout(x, p, key=99)
            keep = keep_mask(99, x.numel(), p).view(shape)
            assert torch.equal(plain, torch.where(keep, x.detach() * keep_cut(p)[1], 0.0))
            plain.backward(grad)
            assert torch.equal(x.grad, torch.where(keep, grad * keep_cut(p)[1], 0.0))
    finally:
        torch.set_num_threads(before)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_compiled_scatter_equals_index_add(dtype):
    torch.manual_seed(0)
    weight = torch.randn(1000, 10, requires_grad=True)
    ids = torch.randint(0, 1000, (512, 39), dtype=dtype)
    ids[:, 0] = 3  # many duplicates of one row: their sum order must match index_add_'s
    grad = torch.randn(512 * 39, 10)
    gather_rows(weight, ids).backward(grad)
    expected = torch.zeros(1000, 10).index_add_(0, ids.reshape(-1).long(), grad)
    assert torch.equal(weight.grad, expected)
    assert torch.equal(gather_rows(weight, ids), weight.detach()[ids.reshape(-1).long()])


def test_same_seed_same_masks_and_new_draws_per_call():
    torch.manual_seed(5)
    first = [dropout(torch.ones(1000), 0.5) for _ in range(2)]
    torch.manual_seed(5)
    again = [dropout(torch.ones(1000), 0.5) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])


def tiny_training(dataset_rows=600, seed=0):
    """A few steps of DeepFM-D (dropout 0.5) on generated ids: the trained weights."""
    layout = InputLayout(num_features=300, field_slots=(1,) * 6)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (dataset_rows, 6), generator=generator)
    ids += torch.arange(6) * 50
    labels = (torch.rand(dataset_rows, generator=generator) < 0.3).float()
    data = EncodedArrays(
        ids.int().numpy(), None, labels.numpy(), np.arange(dataset_rows, dtype=np.int64)
    )
    torch.manual_seed(seed)
    model = build_model(layout, ModelConfig("deepfm", hidden=(32, 32), dropout=0.5))
    config = TrainConfig(epochs=2, batch_size=128, progress=False, threads=1, device="cpu")
    Trainer(config).fit(model, get_entry("deepfm"), data)
    return model.state_dict()


@needs_kernels
def test_training_without_a_compiler_gives_the_same_weights(without_kernels):
    assert cpu_kernels.library() is None
    fallback = tiny_training()
    cpu_kernels.library.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEEPFM_CPU_KERNELS", "1")
        assert cpu_kernels.library() is not None
        compiled = tiny_training()
    for name, value in compiled.items():
        assert torch.equal(value, fallback[name]), name


def test_a_missing_or_failing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPFM_CACHE", str(tmp_path))
    for compiler in ("no-such-compiler-anywhere", "false"):
        cpu_kernels.library.cache_clear()
        monkeypatch.setenv("CC", compiler)
        try:
            with pytest.warns(RuntimeWarning, match="PyTorch fallback"):
                assert cpu_kernels.library() is None
            torch.manual_seed(0)
            y = torch.randn(64, 8)
            assert torch.equal(relu_dropout(y, 0.5, key=3), reference_relu_dropout(y, 0.5, 3))
        finally:
            cpu_kernels.library.cache_clear()
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind
