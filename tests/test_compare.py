"""``deepfm compare``: Welch t-tests, Table V by hand, the command end to end, resuming an
interrupted study, the two Criteo protocols, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from conftest import criteo_line
from deepfm.cli import main
from deepfm.errors import ConfigError
from deepfm.experiments import compare, runs
from deepfm.experiments.compare import (
    DEEP_COMPONENT,
    relative_improvement,
    summarize,
    welch_p_value,
)
from deepfm.experiments.runs import parse_study_config, study_config
from study_helpers import TINY, assert_plot_with_data, market_store, read_json


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return market_store(tmp_path_factory.mktemp("compare"))


# -- statistics ----------------------------------------------------------------------------------

A = [0.8012, 0.8031, 0.7998, 0.8025, 0.8019]
B = [0.7950, 0.7991, 0.7902, 0.7968, 0.7941, 0.7935]


def test_welch_p_value_matches_scipy_and_the_formula():
    expected = stats.ttest_ind(A, B, equal_var=False).pvalue
    # 1e-12: the same computation in float64, only the order of a few operations differs
    assert welch_p_value(A, B) == pytest.approx(expected, rel=1e-12)
    # by hand: t = (mean_a - mean_b) / sqrt(s_a²/n_a + s_b²/n_b), Welch–Satterthwaite df
    va, vb = np.var(A, ddof=1) / len(A), np.var(B, ddof=1) / len(B)
    t = (np.mean(A) - np.mean(B)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(A) - 1) + vb**2 / (len(B) - 1))
    assert welch_p_value(A, B) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    # and it is Welch's test, not Student's pooled one (which gives another number here)
    student = stats.ttest_ind(A, B, equal_var=True).pvalue
    assert abs(welch_p_value(A, B) - student) > 1e-4 * student
    assert welch_p_value(A, B) == pytest.approx(welch_p_value(B, A), rel=1e-12)


def test_welch_p_value_undefined_cases_are_nan():
    assert math.isnan(welch_p_value([0.8], B))  # one value: no variance estimate
    assert math.isnan(welch_p_value([0.8, 0.8], [0.7, 0.7]))  # no spread on either side


def _runs(name, aucs, loglosses):
    return [
        {"seed": s, "test": {"auc": a, "logloss": ll}, "best_epoch": 1, "train_seconds": 1.0}
        for s, (a, ll) in enumerate(zip(aucs, loglosses, strict=True))
    ]


# SciPy warns about [0.80, 0.80] (no spread) when the test computes the expected p-value itself
@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")
def test_table_v_matches_a_hand_computation():
    per_model = {
        "fm": _runs("fm", [0.78, 0.78], [0.47, 0.47]),
        "dnn": _runs("dnn", [0.79, 0.77], [0.46, 0.48]),  # means 0.78, 0.47
        "ipnn": _runs("ipnn", [0.79, 0.79], [0.45, 0.45]),
        "deepfm": _runs("deepfm", [0.80, 0.80], [0.45, 0.45]),
        "deepfm_ip": _runs("deepfm_ip", [0.81, 0.81], [0.44, 0.44]),
    }
    summary = summarize(per_model)
    deepfm = summary["improvement"]["deepfm"]
    assert deepfm["deep_component"] == "dnn" and deepfm["fm_component"] == "fm"
    # (0.80 - 0.78) / 0.78 = 2.5641 %; (0.47 - 0.45) / 0.47 = 4.2553 %
    assert deepfm["over_fm_component"]["auc"] == pytest.approx(2.564102564, rel=1e-9)
    assert deepfm["over_fm_component"]["logloss"] == pytest.approx(4.255319149, rel=1e-9)
    assert deepfm["over_deep_component"]["auc"] == pytest.approx(2.564102564, rel=1e-9)
    ip = summary["improvement"]["deepfm_ip"]
    assert ip["deep_component"] == "ipnn"
    # (0.81 - 0.79) / 0.79 = 2.5316 %; (0.45 - 0.44) / 0.45 = 2.2222 %
    assert ip["over_deep_component"]["auc"] == pytest.approx(2.531645570, rel=1e-9)
    assert ip["over_deep_component"]["logloss"] == pytest.approx(2.222222222, rel=1e-9)
    models = summary["models"]
    assert models["dnn"]["auc_mean"] == pytest.approx(0.78)
    assert models["dnn"]["auc_std"] == pytest.approx(math.sqrt(2) * 0.01)  # ddof 1
    # p-values of every DeepFM model against every baseline (not against other DeepFM models)
    assert set(models["deepfm"]["p_values"]) == {"fm", "dnn", "ipnn"}
    assert "p_values" not in models["fm"]
    assert models["deepfm"]["p_values"]["dnn"]["auc"] == pytest.approx(
        stats.ttest_ind([0.80, 0.80], [0.79, 0.77], equal_var=False).pvalue
    )
    assert models["deepfm"]["p_values"]["dnn"]["auc_diff"] == pytest.approx(0.02)
    assert models["deepfm"]["p_values"]["dnn"]["logloss_diff"] == pytest.approx(-0.02)
    assert compare._p(models["deepfm"]["p_values"]["dnn"], "logloss").endswith("(+)")
    assert relative_improvement(0.45, 0.47, "logloss") > 0  # lower logloss is an improvement


def test_every_deepfm_variant_has_its_deep_component():
    assert DEEP_COMPONENT == {
        "deepfm": "dnn",
        "deepfm_ip": "ipnn",
        "deepfm_op": "opnn",
        "deepfm_star": "pnn_star",
    }


# -- end to end ----------------------------------------------------------------------------------


def test_compare_from_the_cli(store, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compare", "--store", str(store), "--models", "lr,poly2,fm,dnn,deepfm", "--seeds", "2"]
    assert main([*argv, *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Table IV" in printed and "Table V" in printed
    result = read_json(out / "compare.json")
    assert list(result["models"]) == ["lr", "poly2", "fm", "dnn", "deepfm"]
    for name, record in result["models"].items():
        assert record["seeds"] == [0, 1]
        for key in ("auc_mean", "auc_std", "logloss_mean", "logloss_std"):
            assert math.isfinite(record[key]), (name, key)
        assert 0.0 <= record["auc_mean"] <= 1.0
        assert record["auc_mean"] == pytest.approx(np.mean(record["auc"]))
    p_values = result["models"]["deepfm"]["p_values"]
    assert set(p_values) == {"lr", "poly2", "fm", "dnn"}
    assert all(0.0 <= p[m] <= 1.0 for p in p_values.values() for m in ("auc", "logloss"))
    assert result["improvement"]["deepfm"]["deep_component"] == "dnn"
    csv = (out / "compare.csv").read_text().splitlines()
    assert csv[0].startswith("model,auc_mean,auc_std") and len(csv) == 6
    data = assert_plot_with_data(out / "compare_metrics.png")
    assert data["auc_mean"] == [result["models"][n]["auc_mean"] for n in result["models"]]
    assert len(list((out / "runs").glob("fit-*.json"))) == 10
    report = (out / "report.md").read_text()
    assert "compare_metrics.png" in report and "compare.json" in report


def test_an_interrupted_compare_reuses_its_finished_runs(store, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["compare", "--store", str(store), "--models", "lr,deepfm", "--seeds", "2"]
    argv += [*TINY, "--out", str(out)]
    real_fit, calls = runs.fit_run, []

    def interrupted(*args, **kwargs):
        if len(calls) == 3:  # the 4th run is interrupted (3 finished)
            raise KeyboardInterrupt
        calls.append(args[1].name)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(runs, "fit_run", interrupted)
    assert main(argv) == 130
    assert len(list((out / "runs").glob("*.json"))) == 3
    assert not (out / "compare.json").exists()

    calls.clear()
    monkeypatch.setattr(
        runs, "fit_run", lambda *a, **k: calls.append(a[1].name) or real_fit(*a, **k)
    )
    assert main(argv) == 0
    assert calls == ["deepfm"]  # only the unfinished run trained
    first = read_json(out / "compare.json")

    calls.clear()
    assert main(argv) == 0  # all finished: nothing trains, the same numbers
    assert calls == []
    assert read_json(out / "compare.json")["models"] == first["models"]


def test_a_changed_setting_is_a_new_run(store, tmp_path):
    out = tmp_path / "out"
    base = ["compare", "--store", str(store), "--models", "fm", "--seeds", "1", "--out", str(out)]
    assert main([*base, *TINY]) == 0
    assert main([*base, *TINY, "--l2", "1e-4"]) == 0
    assert len(list((out / "runs").glob("*.json"))) == 2


def _criteo_file(path, rows=1500):
    """Criteo TSV lines whose label depends on C1 and I1 (learnable), in file order."""
    rng = np.random.default_rng(0)
    with open(path, "w") as handle:
        for _ in range(rows):
            c1, i1 = int(rng.integers(0, 20)), int(rng.integers(0, 50))
            label = int(rng.random() < (0.6 if c1 < 6 else 0.15) + 0.002 * i1)
            ints = [str(i1)] + [str(int(v)) for v in rng.integers(0, 30, 12)]
            cats = [f"{c1:08x}"] + [f"{int(v):08x}" for v in rng.integers(0, 15, 25)]
            handle.write(criteo_line(label, ints, cats))
    return path


def test_compare_runs_both_criteo_protocols_on_one_file(tmp_path):
    data = _criteo_file(tmp_path / "train.txt")
    out = tmp_path / "criteo"
    argv = ["compare", "--criteo", str(data), "--models", "lr,deepfm", "--seeds", "1"]
    argv += [*TINY, "--out", str(out)]
    assert main(argv) == 0
    stores = {p: read_json(out / "stores" / p / "manifest.json") for p in ("random", "sequential")}
    assert stores["random"]["split"]["spec"] == "random:9/10"
    assert stores["sequential"]["split"]["spec"] == "sequential:6/7"
    # sequential 6:1: the test rows are the last seventh of the file
    assert stores["sequential"]["rows"]["test"] == pytest.approx(1500 / 7, abs=1)
    combined = read_json(out / "compare.json")
    assert set(combined["protocols"]) == {"random", "sequential"}
    assert combined["protocols"]["random"]["preset"] == "criteo-random"
    assert combined["protocols"]["sequential"]["preset"] == "criteo-sequential"
    for protocol in ("random", "sequential"):
        assert (out / protocol / "compare.md").is_file()
        assert_plot_with_data(out / protocol / "compare_metrics.png")
    assert "sequential" in (out / "compare.md").read_text()
    created = stores["random"]["created"]
    assert main(argv) == 0  # again: the stores and the runs are reused
    assert read_json(out / "stores" / "random" / "manifest.json")["created"] == created
    report = (out / "report.md").read_text()
    assert "random/compare_metrics.png" in report and "sequential/compare.md" in report


# -- bad input -----------------------------------------------------------------------------------


def test_bad_options_are_clear_errors(store, tmp_path, capsys):
    out = ["--out", str(tmp_path / "x")]
    assert main(["compare", "--store", str(store), "--models", "lr,nope", *out]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["compare", *out]) == 2
    assert "--store STORE or --criteo FILE" in capsys.readouterr().err
    assert main(["compare", "--store", str(store), "--seeds", "0", *out]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
    argv = ["compare", "--store", str(store), "--resume", "somewhere", *out]
    assert main(argv) == 2
    assert "resumes the study" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    assert main(["compare", "--store", str(store), "--config", str(bad), *out]) == 2
    assert "unknown train settings ['epochz']" in capsys.readouterr().err
    bad.write_text("defaults:\n  dropout: 0.5\n")
    assert main(["compare", "--store", str(store), "--config", str(bad), *out]) == 2
    assert "keep_prob" in capsys.readouterr().err
    bad.write_text("train: [1, 2\n")
    assert main(["compare", "--store", str(store), "--config", str(bad), *out]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_a_store_without_a_test_split_is_refused(tmp_path, capsys):
    store = market_store(tmp_path, rows=500, split="none")
    assert main(["compare", "--store", str(store), "--out", str(tmp_path / "o")]) == 2
    assert "no test split" in capsys.readouterr().err


def test_study_config_layers(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "defaults: {keep_prob: 0.8, hidden: [32, 32]}\n"
        "models: {ipnn: {hidden: [16]}}\n"
        "train: {lr: 0.01, batch_size: 128}\n"
    )
    config = study_config("criteo-random", str(path))
    ipnn = config.model_config("ipnn")
    assert ipnn.activation == "tanh"  # from the preset
    assert ipnn.hidden == (16,) and ipnn.dropout == pytest.approx(0.2)  # from the config
    assert config.model_config("dnn", hidden=(4,)).hidden == (4,)  # a flag wins
    train = config.train_config(3, batch_size=64)
    assert (train.lr, train.batch_size, train.seed, train.threads) == (0.01, 64, 3, 1)
    with pytest.raises(ConfigError, match="must be at least 1"):
        parse_study_config({"train": {"epochs": 0}}, "x.yaml")
