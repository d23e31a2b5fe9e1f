"""The model zoo: names, embedding sizes, shared vs separate tables, FNN's pre-training and
parameter counts worked out by hand."""

import numpy as np
import pytest
import torch

from deepfm.data.encoded import EncodedArrays
from deepfm.errors import ConfigError
from deepfm.models import ModelConfig, build_model, count_parameters, get_entry, model_names
from deepfm.models.dnn import FNN
from deepfm.models.fm import FactorizationMachine
from deepfm.nn import InputLayout
from deepfm.train.trainer import Batches, TrainConfig, Trainer, evaluate

ZOO = (
    "lr",
    "poly2",
    "fm",
    "dnn",
    "fnn",
    "ipnn",
    "opnn",
    "pnn_star",
    "lr_dnn",
    "fm_dnn",
    "deepfm",
    "deepfm_ip",
    "deepfm_op",
    "deepfm_star",
)
DEEPFM_VARIANTS = ("deepfm", "deepfm_ip", "deepfm_op", "deepfm_star")
K_PLUS_1 = ("dnn", "fnn", "ipnn", "opnn", "pnn_star", "lr_dnn")

# a small layout with a multi-valued field (3 slots pooled into field 1) and values
LAYOUT = InputLayout(num_features=50, field_slots=(1, 3, 1, 1))


def batch(layout: InputLayout, rows: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, layout.num_features, (rows, layout.num_slots), generator=g)
    values = torch.rand(rows, layout.num_slots, generator=g) + 0.5
    return ids, values


def test_the_thirteen_models_and_poly2_in_listing_order():
    assert tuple(model_names()) == ZOO


@pytest.mark.parametrize("name", ZOO)
def test_every_model_maps_a_batch_to_finite_logits(name):
    torch.manual_seed(0)
    model = build_model(LAYOUT, ModelConfig(name=name, hidden=(16, 8), dropout=0.2))
    ids, values = batch(LAYOUT)
    out = model(ids, values)
    assert out.shape == (8,) and torch.isfinite(out).all()
    assert model(ids, None).shape == (8,)  # all-ones values may be omitted
    # every parameter takes part in the forward pass (nothing built and left unused)
    model(ids, values).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused


def test_embedding_size_rule():
    for name in ZOO:
        entry = get_entry(name)
        expected = 11 if name in K_PLUS_1 else 10
        if entry.embed != "none":
            assert entry.embed_dim(ModelConfig(name=name)) == expected, name
        assert entry.embed_dim(ModelConfig(name=name, embed_dim=7)) == 7  # the flag overrides
    assert build_model(LAYOUT, ModelConfig(name="ipnn")).embedding.dim == 11
    assert build_model(LAYOUT, ModelConfig(name="deepfm_ip")).embedding.dim == 10


def test_optimiser_and_pretraining_are_declared():
    linear = ("lr", "poly2")
    assert all(get_entry(n).optimizer == "ftrl" for n in linear)
    assert all(get_entry(n).optimizer == "adam" for n in ZOO if n not in linear)
    assert get_entry("fnn").pretrain == "fm"
    assert all(get_entry(n).pretrain is None for n in ZOO if n != "fnn")
    # DeepFM falls back to the LR that its order-1 part is (trained first, with FTRL)
    assert all(get_entry(n).fallback == "lr" for n in DEEPFM_VARIANTS)
    assert all(get_entry(n).fallback is None for n in ZOO if n not in DEEPFM_VARIANTS)


# -- shared and separate embeddings --------------------------------------------------------------


def component_outputs(model, ids, values):
    """Outputs of the model's wide part (FM, or LR) and deep part (the MLP) in one forward."""
    seen = {}
    wide = model.fm if hasattr(model, "fm") else model.linear
    hooks = [
        wide.register_forward_hook(lambda m, i, o: seen.__setitem__("wide", (i, o))),
        model.dnn.register_forward_hook(lambda m, i, o: seen.__setitem__("deep", (i, o))),
    ]
    if hasattr(model, "product"):
        hooks.append(
            model.product.register_forward_hook(lambda m, i, o: seen.__setitem__("prod", (i, o)))
        )
    model(ids, values)
    for h in hooks:
        h.remove()
    return seen


def reached(model, output) -> set[str]:
    """Parameters that a gradient from ``output`` alone reaches (non-zero)."""
    model.zero_grad(set_to_none=True)
    output.sum().backward(retain_graph=True)
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}


@pytest.mark.parametrize("name", DEEPFM_VARIANTS)
def test_deepfm_variants_share_one_embedding(name):
    torch.manual_seed(0)
    model = build_model(LAYOUT, ModelConfig(name=name, hidden=(16,), dropout=0.0))
    ids, values = batch(LAYOUT)
    seen = component_outputs(model, ids, values)
    # the FM interaction and the deep part's product layer read the very same tensor
    assert seen["wide"][0][0] is seen["prod"][0][0]
    tables = [n for n, p in model.named_parameters() if p.dim() == 2 and p.shape[0] == 50]
    assert tables == ["linear.weight.weight", "embedding.table.weight"]
    from_fm, from_deep = reached(model, seen["wide"][1]), reached(model, seen["deep"][1])
    assert "embedding.table.weight" in from_fm & from_deep
    assert not any(n.startswith("dnn.") for n in from_fm)


@pytest.mark.parametrize(
    ("name", "wide_table", "deep_table"),
    [
        ("fm_dnn", "fm_embedding.table.weight", "embedding.table.weight"),
        ("lr_dnn", "linear.weight.weight", "embedding.table.weight"),
    ],
)
def test_fm_dnn_and_lr_dnn_have_separate_tables(name, wide_table, deep_table):
    torch.manual_seed(0)
    model = build_model(LAYOUT, ModelConfig(name=name, hidden=(16,), dropout=0.0))
    params = dict(model.named_parameters())
    assert params[wide_table].data_ptr() != params[deep_table].data_ptr()
    ids, values = batch(LAYOUT)
    seen = component_outputs(model, ids, values)
    from_wide, from_deep = reached(model, seen["wide"][1]), reached(model, seen["deep"][1])
    assert wide_table in from_wide and deep_table not in from_wide
    assert deep_table in from_deep and wide_table not in from_deep
    assert not from_wide & from_deep  # the two parts share no parameter at all


# -- FNN ----------------------------------------------------------------------------------------


def test_fnn_init_copies_fm_rows():
    torch.manual_seed(0)
    fnn = build_model(LAYOUT, ModelConfig(name="fnn", hidden=(8,)))
    fm_config = fnn.pretrain_config("fm")
    assert fm_config.embed_dim == 10 and fm_config.name == "fm"
    fm = build_model(LAYOUT, fm_config)
    with torch.no_grad():
        fm.linear.weight.weight.normal_()
    fnn.init_from_pretrained(fm)
    rows = fnn.embedding.weight
    torch.testing.assert_close(rows[:, :1], fm.linear.weight.weight, rtol=0, atol=0)
    torch.testing.assert_close(rows[:, 1:], fm.embedding.weight, rtol=0, atol=0)


def test_fnn_needs_room_for_the_order_one_weight():
    fnn = build_model(LAYOUT, ModelConfig(name="fnn", embed_dim=1, hidden=(8,)))
    with pytest.raises(ConfigError, match="embed-dim"):
        fnn.pretrain_config("fm")


def toy_arrays(rows: int, seed: int, pairs: bool = True) -> EncodedArrays:
    """Labels from an order-1 + order-2 rule on a single-slot layout of 4 fields (``pairs``
    False: the order-1 part only, a rule an LR fits exactly)."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.integers(0, 10, rows) + 10 * f for f in range(4)], axis=1)
    logit = (ids[:, 0] % 10 - 4.5) / 3
    if pairs:
        logit = logit + np.where((ids[:, 1] % 2) == (ids[:, 2] % 2), 1.0, -1.0)
    labels = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return EncodedArrays(ids.astype(np.int32), None, labels, np.arange(rows))


def test_trainer_pretrains_fnn_with_an_fm_and_counts_its_time(monkeypatch):
    layout = InputLayout(num_features=40, field_slots=(1, 1, 1, 1))
    captured = {}
    original = FNN.init_from_pretrained

    def spy(self, teacher):
        original(self, teacher)
        captured["teacher"] = teacher
        captured["rows"] = self.embedding.weight.detach().clone()

    monkeypatch.setattr(FNN, "init_from_pretrained", spy)
    torch.manual_seed(0)
    model = build_model(layout, ModelConfig(name="fnn", hidden=(8,), dropout=0.0))
    train, valid = toy_arrays(2000, 0), toy_arrays(500, 1)
    config = TrainConfig(epochs=2, batch_size=256, patience=5, progress=False, seed=0)
    result = Trainer(config).fit(model, get_entry("fnn"), train, valid)
    teacher = captured["teacher"]
    assert isinstance(teacher, FactorizationMachine)
    w, v = teacher.linear.weight.weight, teacher.embedding.weight
    assert w.abs().max() > 1e-3  # the FM was trained (its order-1 weights start at zero)
    torch.testing.assert_close(captured["rows"], torch.cat([w, v], 1), rtol=0, atol=0)
    # FM epochs and FNN epochs both count as training
    assert result.train_samples == 2 * 2 * len(train)
    assert len(result.history) == 2
    # after pre-training the FNN itself trained on: its rows moved away from the FM's
    assert not torch.equal(model.embedding.weight, captured["rows"])


# -- DeepFM falls back to its LR ------------------------------------------------------------------


@pytest.mark.parametrize("name", DEEPFM_VARIANTS)
def test_deepfm_becomes_its_lr_exactly(name):
    torch.manual_seed(0)
    model = build_model(LAYOUT, ModelConfig(name=name, hidden=(8,))).eval()
    lr_config = model.pretrain_config("lr")
    assert lr_config.name == "lr"
    lr = build_model(LAYOUT, lr_config).eval()
    with torch.no_grad():
        lr.linear.weight.weight.normal_()
        lr.linear.bias.fill_(-1.5)
    model.init_from_pretrained(lr)
    ids, values = batch(LAYOUT)
    with torch.no_grad():
        # no FM term and no deep term: the fallback scores as the LR, bit for bit
        assert torch.equal(model(ids, values), lr(ids, values))


@pytest.mark.parametrize("pairs", [True, False])
def test_deepfm_falls_back_to_its_lr_unless_it_beats_it_beyond_the_noise(pairs):
    """Labels with a pairwise term: the trained DeepFM beats the LR by far more than the
    validation AUC's standard error (about 0.02 on 500 rows) and is kept. Labels an LR fits
    exactly: no epoch does (the best gains 0.008), and DeepFM becomes its LR (epoch 0)."""
    layout = InputLayout(num_features=40, field_slots=(1, 1, 1, 1))
    torch.manual_seed(0)
    model = build_model(layout, ModelConfig(name="deepfm", hidden=(16,), dropout=0.0))
    train, valid = toy_arrays(4000, 0, pairs), toy_arrays(500, 1, pairs)
    # the fallback rule alone: no id prior, which slows the first epochs (its own tests:
    # test_id_prior.py)
    config = TrainConfig(epochs=4, batch_size=256, patience=4, progress=False, seed=0, id_prior=0)
    result = Trainer(config).fit(model, get_entry("deepfm"), train, valid)
    assert len(result.history) == 4  # 4 trained epochs either way (patience 4)
    best_auc = max(h["valid_auc"] for h in result.history)
    assert result.setup["fallback"]["kept"] is not pairs  # said in metrics.json and the CLI
    if pairs:
        assert result.best_epoch >= 1
        assert result.best_valid["auc"] == best_auc
    else:
        assert result.best_epoch == 0
        # the kept model scores as the LR did, not as any trained epoch
        assert result.best_valid["auc"] != best_auc
        kept = evaluate(model, Batches(valid))
        assert kept["auc"] == pytest.approx(result.best_valid["auc"], abs=1e-12)


# -- parameter counts ----------------------------------------------------------------------------


def mlp_count(width: int, hidden: tuple[int, ...]) -> int:
    total = 0
    for size in (*hidden, 1):
        total += width * size + size  # weights + biases
        width = size
    return total


def test_parameter_counts_on_a_criteo_shaped_map():
    # Criteo: 13 bucketised integer fields + 26 categorical ones, one slot each
    n, fields, hidden = 12_345, 39, (40, 20)
    layout = InputLayout(num_features=n, field_slots=(1,) * fields)
    k = 10
    pairs = fields * (fields - 1) // 2  # 741
    lr, fm_part = n + 1, n + 1 + n * k  # order-1 weights + bias; + V
    dnn_table = n * (k + 1)
    expected = {
        "lr": lr,
        "poly2": lr + 2**20,  # one hashed table of the default 2^20 cross weights
        "fm": fm_part,
        "dnn": dnn_table + mlp_count(fields * (k + 1), hidden),
        "fnn": dnn_table + mlp_count(fields * (k + 1), hidden),
        "ipnn": dnn_table + mlp_count(fields * (k + 1) + pairs, hidden),
        "opnn": dnn_table + mlp_count(fields * (k + 1) + (k + 1) ** 2, hidden),
        "pnn_star": dnn_table + mlp_count(fields * (k + 1) + pairs + (k + 1) ** 2, hidden),
        "lr_dnn": lr + dnn_table + mlp_count(fields * (k + 1), hidden),
        "fm_dnn": fm_part + n * k + mlp_count(fields * k, hidden),
        "deepfm": fm_part + mlp_count(fields * k, hidden),
        "deepfm_ip": fm_part + mlp_count(fields * k + pairs, hidden),
        "deepfm_op": fm_part + mlp_count(fields * k + k * k, hidden),
        "deepfm_star": fm_part + mlp_count(fields * k + pairs + k * k, hidden),
    }
    # spot check of the arithmetic for DeepFM-D: 12,345 weights + 1 bias + 123,450 V entries +
    # MLP 390·40+40 + 40·20+20 + 20+1 = 15,640 + 820 + 21
    assert expected["deepfm"] == 12_345 + 1 + 123_450 + 15_640 + 820 + 21
    for name, count in expected.items():
        model = build_model(layout, ModelConfig(name=name, hidden=hidden))
        assert count_parameters(model) == count, name


def test_l2_regularises_the_fm_part_only():
    from deepfm.nn import Regularized

    for name in ZOO:
        model = build_model(LAYOUT, ModelConfig(name=name, hidden=(8,), l2=0.1))
        regularized = {n for n, m in model.named_modules() if isinstance(m, Regularized) and m.l2}
        if name in ("dnn", "fnn", "ipnn", "opnn", "pnn_star"):
            assert regularized == set(), name  # no FM / LR component
        elif name in DEEPFM_VARIANTS or name == "fm":
            assert regularized == {"linear", "embedding"}, name  # V is the FM's
        elif name == "fm_dnn":
            assert regularized == {"linear", "fm_embedding"}, name
        elif name == "poly2":
            assert regularized == {"linear", "crosses"}, name  # all of it is the linear model
        else:  # lr, lr_dnn
            assert regularized == {"linear"}, name
