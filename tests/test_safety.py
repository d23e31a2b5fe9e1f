"""Issue 17: nothing lost, nothing silently wrong. One test (or more) per numbered case of the
issue, each on small generated data; every one of them failed before the fix."""

from __future__ import annotations

import errno
import gzip
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from deepfm.common import file_sha256
from deepfm.data.store import Store
from deepfm.train import checkpoint as ckpt
from safety_helpers import (
    CSV_SCHEMA,
    FAST,
    criteo_file,
    market_csv,
    run_cli,
    running_server,
    snapshot,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    train = criteo_file(root / "train.txt")
    test = criteo_file(root / "test.txt", 80, seed=1, labeled=False)
    bundle = root / "bundle"
    result = run_cli("train", "--data", train, "--out", bundle, *FAST)
    assert result.code == 0, result.err
    return SimpleNamespace(root=root, train=train, test=test, bundle=bundle)


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity (what any other JSON parser does)."""

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def rehash(bundle: Path, name: str) -> None:
    """Record the current sha256 of ``bundle/name`` in bundle.json (a tampered bundle whose
    hashes were recomputed)."""
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["files"][name] = file_sha256(bundle / name)
    (bundle / "bundle.json").write_text(json.dumps(manifest))


# -- 1. train --out never deletes a directory that is not a bundle ---------------------------


def test_1_train_never_empties_a_directory_that_is_not_a_bundle(data, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "input.csv").write_text("keep me\n")
    (work / "sub" / "notes.txt").write_text("and me\n")
    before = snapshot(tmp_path)
    result = run_cli("train", "--data", data.train, "--out", work, *FAST)
    assert result.code == 2 and "not a bundle" in result.err and result.clean()
    monkeypatch.chdir(work)  # `--out .`, even with --overwrite
    result = run_cli("train", "--data", data.train, "--out", ".", *FAST, "--overwrite")
    assert result.code == 2 and "not a bundle" in result.err and result.clean()
    assert snapshot(tmp_path) == before


def test_1_removing_a_replaced_tree_never_follows_its_links(tmp_path):
    from deepfm.outputs import remove_tree

    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "file").write_bytes(b"keep")
    (outside / "dir" / "inner").write_bytes(b"keep")
    old = tmp_path / "old"
    (old / "a" / "b").mkdir(parents=True)
    for i in range(20):  # more files than threads, of different sizes
        (old / "a" / "b" / f"f{i}").write_bytes(b"x" * (i * 1000))
    (old / "link_file").symlink_to(outside / "file")
    (old / "a" / "link_dir").symlink_to(outside / "dir")
    remove_tree(old)
    assert not old.exists()
    assert (outside / "file").read_bytes() == b"keep"
    assert (outside / "dir" / "inner").read_bytes() == b"keep"


def test_1_a_bundle_replaces_only_a_bundle_and_only_with_overwrite(data, tmp_path):
    out = tmp_path / "model"
    out.mkdir()  # an empty directory is fine
    assert run_cli("train", "--data", data.train, "--out", out, *FAST).code == 0
    first = (out / "model.safetensors").read_bytes()
    again = run_cli("train", "--data", data.train, "--out", out, *FAST, "--seed", "1")
    assert again.code == 2 and "--overwrite" in again.err
    assert (out / "model.safetensors").read_bytes() == first
    forced = run_cli(
        "train", "--data", data.train, "--out", out, *FAST, "--seed", "1", "--overwrite"
    )
    assert forced.code == 0, forced.err
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old copy


# -- 2. an output file is never an input or a bundle file --------------------------------------


def test_2_predict_never_writes_over_its_input_or_into_a_bundle(data, tmp_path):
    test = tmp_path / "test.txt"
    shutil.copy(data.test, test)
    bundle = tmp_path / "bundle"
    shutil.copytree(data.bundle, bundle)
    link = tmp_path / "link.txt"
    link.symlink_to(test)
    before = snapshot(tmp_path)
    refused = [
        (test, []),
        (test, ["--overwrite"]),
        (link, ["--overwrite"]),  # the input again, through a symbolic link
        (bundle / "model.safetensors", ["--overwrite"]),
        (bundle / "predictions.txt", []),  # nothing is added into a bundle either
        (bundle, ["--overwrite"]),
    ]
    for out, extra in refused:
        result = run_cli("predict", "--bundle", bundle, "--data", test, "--out", out, *extra)
        assert result.code == 2 and result.clean(), (out, result.err)
    assert snapshot(tmp_path) == before
    mine = tmp_path / "p.txt"
    mine.write_text("my own file\n")
    result = run_cli("predict", "--bundle", bundle, "--data", test, "--out", mine)
    assert result.code == 2 and "--overwrite" in result.err
    assert mine.read_text() == "my own file\n"
    result = run_cli("predict", "--bundle", bundle, "--data", test, "--out", mine, "--overwrite")
    assert result.code == 0 and len(mine.read_text().splitlines()) == 80


def test_2_train_out_equal_to_an_input_is_refused(data, tmp_path):
    train = tmp_path / "train.txt"
    shutil.copy(data.train, train)
    before = snapshot(tmp_path)
    result = run_cli("train", "--data", train, "--out", train, *FAST, "--overwrite")
    assert result.code == 2 and "is the input" in result.err
    result = run_cli("train", "--data", train, "--out", tmp_path, *FAST, "--overwrite")
    assert result.code == 2 and "holds the input" in result.err
    assert snapshot(tmp_path) == before  # no input moved aside to a hidden file


# -- 3. checkpoints belong to one run ----------------------------------------------------------


def _run_ids(directory: Path) -> set[str]:
    ids = set()
    for folder in directory.glob("ckpt-*"):
        record = json.loads((folder / "state.json").read_text())
        ids.add(ckpt.unflatten(record["state"], {})["run"]["id"])
    return ids


def test_3_a_new_run_refuses_the_checkpoints_of_an_earlier_run(data, tmp_path):
    out, directory = tmp_path / "run", tmp_path / "run.checkpoints"
    args = ["train", "--data", data.train, *FAST, "--epochs", "2", "--checkpoint-every", "2"]
    assert run_cli(*args, "--out", out).code == 0
    (first,) = _run_ids(directory)
    shutil.rmtree(out)  # the bundle is gone, its checkpoints are still there
    before = snapshot(directory)
    result = run_cli(*args, "--out", out, "--lr", "0.01")
    assert result.code == 2 and "checkpoints of an earlier run" in result.err
    assert snapshot(directory) == before
    # --overwrite starts over: then the directory holds the new run's checkpoints only
    assert run_cli(*args, "--out", out, "--lr", "0.01", "--overwrite").code == 0
    (second,) = _run_ids(directory)
    assert second != first
    latest = json.loads((directory / "latest.json").read_text())
    assert latest["run_id"] == second and (directory / latest["checkpoint"]).is_dir()


def test_3_resume_refuses_other_settings_or_data_naming_them(data, tmp_path):
    args = ["train", *FAST, "--epochs", "2", "--checkpoint-every", "3"]
    assert run_cli(*args, "--data", data.train, "--out", tmp_path / "a").code == 0
    directory = tmp_path / "a.checkpoints"
    resume = ["--resume", directory, "--out", tmp_path / "b"]
    result = run_cli(*args, "--data", data.train, *resume, "--lr", "0.01")
    assert result.code == 2 and "train.lr: None in the checkpoint, 0.01 now" in result.err
    other = criteo_file(tmp_path / "other.txt", seed=7)
    result = run_cli(*args, "--data", other, *resume)
    # other rows (the generator's capped vocabularies may give the same feature map): named
    assert result.code == 2 and "data.train" in result.err and "data.valid" in result.err
    # the same settings and data: resumed, and it ends where the uninterrupted run ended
    assert run_cli(*args, "--data", data.train, *resume).code == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    for split in ("valid", "test"):  # the same batches and weights: equal up to float order
        assert b[split]["logloss"] == pytest.approx(a[split]["logloss"], abs=1e-6)


def test_3_pruning_never_removes_the_newest_checkpoint(tmp_path):
    weights = {"w": torch.zeros(2)}

    def commit(step: int) -> None:
        state = {"run": {"id": "r", "identity": {}}}
        ckpt.commit(tmp_path, step, model=weights, best=None, optimizer={}, state=state)

    for step in (100, 110):  # an earlier stretch of the run, at higher steps
        commit(step)
    commit(10)  # the newest checkpoint has the lowest step number
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000000010"]
    assert ckpt.load_latest(tmp_path).step == 10
    for step in (20, 30, 40):
        commit(step)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000000030", "ckpt-000000040"]


# -- 4. the same seed and threads give the same result -----------------------------------------


def test_4_same_seed_same_metrics_through_the_cli(data, tmp_path):
    def metrics(out: str, seed: str) -> dict:
        result = run_cli(
            "train", "--data", data.train, "--out", tmp_path / out, *FAST, "--seed", seed
        )
        assert result.code == 0, result.err
        torch.rand(100)  # the process's random state moves on between runs
        return json.loads((tmp_path / out / "metrics.json").read_text())

    a, b, c = metrics("a", "3"), metrics("b", "3"), metrics("c", "4")
    for split in ("valid", "test"):
        assert a[split] == b[split]  # identical, not close
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert a["test"] != c["test"]  # and the seed does matter


def test_4_same_seed_same_metrics_through_the_study_runner(tmp_path):
    from deepfm.experiments.runs import StudyConfig, fit_run, open_study_store
    from deepfm.models import ModelConfig

    store = tmp_path / "store"
    source = criteo_file(tmp_path / "train.txt")
    assert run_cli("prepare", "--input", source, "--out", store, "--quiet").code == 0
    study = open_study_store(store)
    model = ModelConfig("deepfm", hidden=(8,), embed_dim=4)
    train = StudyConfig().train_config(5, epochs=2, batch_size=128)
    first = fit_run(study.dataset, model, train)
    torch.rand(100)
    second = fit_run(study.dataset, model, train)
    assert first["valid"] == second["valid"] and first["test"] == second["test"]


# -- 5. an empty token never switches authentication off ---------------------------------------


def test_5_an_empty_token_is_refused(data, monkeypatch):
    for token in ("", "   "):
        result = run_cli("serve", "--bundle", data.bundle, "--token", token)
        assert result.code == 2 and "--token is empty" in result.err
    monkeypatch.setenv("DEEPFM_TOKEN", "")  # e.g. DEEPFM_TOKEN=$UNSET_VARIABLE
    result = run_cli("serve", "--bundle", data.bundle)
    assert result.code == 2 and "DEEPFM_TOKEN is set but empty" in result.err


# -- 6. a BOM or a misspelt label never gives a silently unlabeled store -----------------------


def test_6_a_bom_header_is_read_with_its_label(tmp_path):
    schema = tmp_path / "schema.yaml"
    schema.write_text(CSV_SCHEMA)
    source = market_csv(tmp_path / "market.csv", bom=True)
    store = tmp_path / "store"
    args = ["prepare", "--format", "csv", "--schema", schema, "--input", source, "--out", store]
    result = run_cli(*args, "--quiet")
    assert result.code == 0, result.err
    opened = Store.open(store)
    assert opened.labeled and opened.manifest["rows"]["total"] == 400
    # a headerless Criteo file starting with a BOM: the first row is read like the others
    rows = criteo_file(tmp_path / "c.txt", 50).read_bytes()
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + rows)
    from deepfm.data.formats import get_format
    from deepfm.data.reader import BadRows

    chunks = list(get_format("criteo").read([tmp_path / "bom.txt"], BadRows()))
    assert sum(len(c) for c in chunks) == 50


def test_6_a_misspelt_label_is_an_error_naming_the_columns(tmp_path):
    schema = tmp_path / "schema.yaml"
    schema.write_text(CSV_SCHEMA.replace("label: click", "label: clik"))
    source = market_csv(tmp_path / "market.csv")
    store = tmp_path / "store"
    result = run_cli(
        "prepare", "--format", "csv", "--schema", schema, "--input", source, "--out", store
    )
    assert result.code == 2 and result.clean()
    assert "no label column 'clik'" in result.err
    assert "['click', 'user', 'item', 'price']" in result.err
    assert not store.exists()


# -- 7. JSON never holds NaN ---------------------------------------------------------------------


def test_7_single_class_data_gives_strict_json_and_a_warning(tmp_path):
    lines = criteo_file(tmp_path / "raw.txt").read_text().splitlines()
    one_class = tmp_path / "zeros.txt"
    one_class.write_text("".join("0" + line[1:] + "\n" for line in lines))
    result = run_cli("train", "--data", one_class, "--out", tmp_path / "b", *FAST)
    assert result.code == 0, result.err
    assert "warning: AUC is undefined" in result.err and "label 0" in result.err
    metrics = strict_json((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["test"]["auc"] is None and metrics["test"]["logloss"] > 0
    assert strict_json(result.out)["valid"]["auc"] is None  # the printed summary too


def test_7_the_server_answers_an_old_bundle_holding_nan(data, tmp_path):
    import httpx

    from deepfm.serve.server import ServeSettings

    bundle = tmp_path / "old"
    shutil.copytree(data.bundle, bundle)
    metrics = json.loads((bundle / "metrics.json").read_text())
    metrics["test"]["auc"] = math.nan  # what the previous version wrote
    (bundle / "metrics.json").write_text(json.dumps(metrics))
    rehash(bundle, "metrics.json")
    with running_server(ServeSettings(model_dir=bundle, port=0)) as url:
        response = httpx.get(f"{url}/model", timeout=30)
        assert response.status_code == 200
        assert strict_json(response.text)["metrics"]["test"]["auc"] is None
        json_type = {"content-type": "application/json"}
        reload = httpx.post(f"{url}/reload", headers=json_type, timeout=30)
        assert reload.status_code == 200, reload.text


# -- 8. blank lines are bad rows; one output line per input line -------------------------------


def test_8_blank_lines_are_bad_rows_and_predict_keeps_the_lines_aligned(data, tmp_path):
    rows = data.test.read_text().splitlines(keepends=True)[:20]
    rows[5:5] = ["\n"]
    rows[12:12] = ["\r\n"]
    rows.append("\n")
    source = tmp_path / "blank.txt"
    source.write_text("".join(rows))
    out = tmp_path / "p.txt"
    result = run_cli("predict", "--bundle", data.bundle, "--data", source, "--out", out)
    assert result.code == 2 and "blank.txt:6: empty line" in result.err
    skip = ["--bad-rows", "skip"]
    result = run_cli("predict", "--bundle", data.bundle, "--data", source, "--out", out, *skip)
    assert result.code == 0 and "bad rows: 3" in result.err
    scores = np.array([float(v) for v in out.read_text().split("\n") if v])
    assert len(scores) == len(rows) == 23
    assert np.flatnonzero(np.isnan(scores)).tolist() == [5, 12, 22]


# -- 9. a message, never a traceback -------------------------------------------------------------


def test_9_a_truncated_or_fake_gzip_is_a_message(data, tmp_path):
    packed = gzip.compress(data.test.read_bytes())
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(packed[: len(packed) // 2])
    fake = tmp_path / "fake.txt.gz"
    fake.write_bytes(data.test.read_bytes())
    for path, phrase in ((cut, "truncated"), (fake, "not a valid gzip file")):
        result = run_cli(
            "predict", "--bundle", data.bundle, "--data", path, "--out", tmp_path / "p"
        )
        assert result.code == 2 and result.clean() and phrase in result.err, result.err
        assert str(path) in result.err
    assert not (tmp_path / "p").exists()


def test_9_permission_errors_are_messages(data, tmp_path, monkeypatch):
    import deepfm.data.reader as reader
    import deepfm.serve.bundle as bundle_module

    def no_read(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    with monkeypatch.context() as patch:
        patch.setattr(reader, "open", no_read, raising=False)
        result = run_cli(
            "predict", "--bundle", data.bundle, "--data", data.test, "--out", tmp_path / "p"
        )
    assert result.code == 2 and result.clean() and "Permission denied" in result.err

    def no_write(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    before = snapshot(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(bundle_module.tempfile, "mkdtemp", no_write)
        result = run_cli("train", "--data", data.train, "--out", tmp_path / "b", *FAST)
    assert result.code == 1 and result.clean() and "Permission denied" in result.err
    with monkeypatch.context() as patch:
        patch.setattr(np, "savetxt", no_write)
        argv = ["predict", "--bundle", data.bundle, "--data", data.test, "--out", tmp_path / "p"]
        result = run_cli(*argv)
    assert result.code == 1 and result.clean() and "Permission denied" in result.err
    real_mkdir = Path.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "mkdir", read_only)
        for argv in (
            ["prepare", "--input", data.train, "--out", tmp_path / "ro" / "store", "--quiet"],
            ["demo", "--rows", "500", "--out", tmp_path / "ro" / "demo", "--quiet"],
        ):
            result = run_cli(*argv)
            assert result.code == 1 and result.clean() and "Permission denied" in result.err
    assert snapshot(tmp_path) == before  # nothing half-written anywhere


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_9_a_read_only_directory_is_a_message(data, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = run_cli(
            "predict", "--bundle", data.bundle, "--data", data.test, "--out", locked / "p"
        )
        assert result.code == 1 and result.clean() and "Permission denied" in result.err
    finally:
        locked.chmod(0o755)


def test_9_a_rehashed_damaged_or_nan_weights_file_is_refused(data, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(data.bundle, bundle)
    weights = bundle / "model.safetensors"
    state = load_file(str(weights))
    raw = bytearray(weights.read_bytes())
    raw[8:40] = b"{" * 32  # a damaged header, hashes recomputed
    weights.write_bytes(bytes(raw))
    rehash(bundle, "model.safetensors")
    out = tmp_path / "p.txt"
    result = run_cli("predict", "--bundle", bundle, "--data", data.test, "--out", out)
    assert result.code == 2 and result.clean() and "cannot load the model" in result.err
    name = next(iter(state))
    state[name] = torch.full_like(state[name], math.nan)
    save_file(state, str(weights))
    rehash(bundle, "model.safetensors")
    result = run_cli("predict", "--bundle", bundle, "--data", data.test, "--out", out)
    assert result.code == 2 and "NaN" in result.err and not out.exists()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_9_the_weights_hash_finds_every_non_finite_value_in_one_read(tmp_path, dtype):
    from deepfm.serve.bundle import weights_sha256

    # 3M float32 values span two hash blocks (8 MiB): the NaN sits at the very end of the second
    size = 3_000_000
    finite = torch.full((size,), torch.finfo(dtype).max, dtype=dtype)  # largest finite: accepted
    state = {"a_ids": torch.arange(5), "big": finite, "neg_inf": torch.zeros(3, dtype=dtype)}
    state["neg_inf"][1] = -math.inf
    path = tmp_path / "w.safetensors"
    save_file(state, str(path), metadata={"note": "x"})
    found: list[str] = []
    assert weights_sha256(path, found) == file_sha256(path) and found == ["neg_inf"]
    state["big"][-1] = math.nan
    save_file(state, str(path))
    found = []
    assert weights_sha256(path, found) == file_sha256(path) and sorted(found) == ["big", "neg_inf"]
    path.write_bytes(b"\xff" * 8 + b"{}")  # a header longer than the file: hashed, not read
    assert weights_sha256(path, []) == file_sha256(path)


NOT_OBJECTS = [
    (name, content)
    for name in ("bundle.json", "model.json", "metrics.json")
    for content in ("[]", '"text"', "3", "null", '{"files": 1}')
    if not (name == "metrics.json" and content.startswith("{"))  # any object is metrics
]


@pytest.mark.parametrize(("name", "content"), NOT_OBJECTS)
def test_9_bundle_json_files_that_are_not_objects(data, tmp_path, name, content):
    bundle = tmp_path / "bundle"
    shutil.copytree(data.bundle, bundle)
    (bundle / name).write_text(content)
    if name != "bundle.json":
        rehash(bundle, name)
    result = run_cli("predict", "--bundle", bundle, "--data", data.test, "--out", tmp_path / "p")
    assert result.code == 2 and result.clean() and "corrupt" in result.err, result.err


@pytest.mark.parametrize("name", ["../../../../../../dev/zero", "/dev/zero", "vocab", "."])
def test_9_a_manifest_naming_files_outside_the_bundle_is_refused(data, tmp_path, name):
    bundle = tmp_path / "bundle"
    shutil.copytree(data.bundle, bundle)
    (bundle / "vocab").mkdir(exist_ok=True)
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["files"][name] = "0" * 64  # /dev/zero would be hashed forever
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    result = run_cli("predict", "--bundle", bundle, "--data", data.test, "--out", tmp_path / "p")
    assert result.code == 2 and result.clean() and "is not a file of it" in result.err


BAD_FLAGS = [
    (["--lr", "nan"], "lr must be a finite number"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--lr", "-1"], "learning rate must be positive"),
    (["--threads", "-1"], "threads must be a positive integer"),
    (["--threads", "0"], "threads must be a positive integer"),
    (["--device", "bogus"], "unknown device"),
    (["--embed-dim", "1000000000"], "GiB of memory is available"),
    (["--hidden", "100000000,100000000"], "GiB of memory is available"),
    (["--embed-dim", "1e9"], "invalid int value"),
    (["--seed", "-1"], "seed must be an integer"),
    (["--seed", str(2**64)], "seed must be an integer"),
    (["--l2", "nan"], "l2 must be a finite number"),
    (["--dropout", "nan"], "dropout is a drop rate"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--batch-size", "-5"], "batch_size must be at least 1"),
    (["--valid-fraction", "nan"], "validation fraction"),
    (["--activation", "bogus"], "unknown activation"),
    (["--checkpoint-every", "-1"], "checkpoint_every"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_9_bad_numeric_flags_are_messages(data, tmp_path, flags, message):
    result = run_cli("train", "--data", data.train, "--out", tmp_path / "b", *FAST, *flags)
    assert result.code == 2 and result.clean() and message in result.err, result.err
    assert not (tmp_path / "b").exists()


SCHEMAS = [
    "fields: [{name: 3}]",
    "fields: [user]\nmin_count: many",
    "fields: [user]\nlabel: [click]",
    "fields: [{name: user, separator: 5}]",
    "fields: [{name: user, max_len: long}]",
    "fields: [{name: user, buckets: many}]",
    "fields: [user]\nhash_buckets: lots",
    "fields: [{name: user, kind: [categorical]}]",
    "fields: user",
    "fields: [user]\nignore: item",
    "- just\n- a list",
    "fields: [user, user]",
    "{{{ not yaml",
]


@pytest.mark.parametrize("text", SCHEMAS)
def test_9_schema_values_of_the_wrong_type_are_messages(tmp_path, text):
    schema = tmp_path / "schema.yaml"
    schema.write_text(text)
    source = market_csv(tmp_path / "m.csv")
    args = ["prepare", "--format", "csv", "--schema", schema, "--input", source]
    result = run_cli(*args, "--out", tmp_path / "s")
    assert result.code == 2 and result.clean() and "schema" in result.err + str(schema), result.err


def test_9_a_non_utf8_preset_is_a_message(data, tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_bytes("description: caf\xe9\ndefaults: {keep_prob: 0.5}\n".encode("latin-1"))
    result = run_cli(
        "train", "--data", data.train, "--out", tmp_path / "b", *FAST, "--preset", preset
    )
    assert result.code == 2 and result.clean() and "not UTF-8" in result.err


def _disk_full(real):
    """``real`` that writes part of its output, then fails like a full disk."""

    def write(*args, **kwargs):
        real(*args, **kwargs)
        target = Path(str(args[1] if real.__name__ == "save_file" else args[0]))
        target.write_bytes(target.read_bytes()[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def test_9_a_full_disk_during_train_leaves_nothing_behind(data, tmp_path, monkeypatch):
    import deepfm.serve.bundle as bundle_module

    out = tmp_path / "b"
    assert run_cli("train", "--data", data.train, "--out", out, *FAST).code == 0
    before = snapshot(tmp_path)
    monkeypatch.setattr(bundle_module, "save_file", _disk_full(bundle_module.save_file))
    for target, extra in ((tmp_path / "new", []), (out, ["--overwrite"])):
        result = run_cli("train", "--data", data.train, "--out", target, *FAST, *extra)
        assert result.code == 1 and result.clean() and "No space left" in result.err
        assert snapshot(tmp_path) == before  # no temporary directory; the old bundle intact


def test_9_a_full_disk_or_a_kill_during_predict_leaves_the_old_file(data, tmp_path, monkeypatch):
    out = tmp_path / "p.txt"
    out.write_text("previous predictions\n")
    stale = tmp_path / ".p.txt.tmp-999999999-0a0b0c"  # left by a writer killed with -9
    stale.write_text("half")
    argv = ["predict", "--bundle", data.bundle, "--data", data.test, "--out", out, "--overwrite"]
    with monkeypatch.context() as patch:
        patch.setattr(np, "savetxt", _disk_full(np.savetxt))
        result = run_cli(*argv)
    assert result.code == 1 and result.clean() and "No space left" in result.err
    assert out.read_text() == "previous predictions\n"

    def killed(path, *args, **kwargs):
        Path(path).write_text("0.5\n")
        raise KeyboardInterrupt  # the user's Ctrl-C in the middle of the write

    with monkeypatch.context() as patch:
        patch.setattr(np, "savetxt", killed)
        assert run_cli(*argv).code == 130
    assert out.read_text() == "previous predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]  # the stale file went too
    assert run_cli(*argv).code == 0 and len(out.read_text().splitlines()) == 80


def test_9_a_full_disk_during_prepare_leaves_no_store(data, tmp_path, monkeypatch):
    import deepfm.data.store as store_module

    def full(path, data, **settings):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "write_json", full)
    result = run_cli("prepare", "--input", data.train, "--out", tmp_path / "s", "--quiet")
    assert result.code == 1 and result.clean() and "No space left" in result.err
    assert list(tmp_path.iterdir()) == []  # neither the store nor its partial directory


def test_9_store_arrays_damaged_in_range_are_refused(tmp_path):
    store = tmp_path / "store"
    source = criteo_file(tmp_path / "train.txt")
    assert run_cli("prepare", "--input", source, "--out", store, "--quiet").code == 0
    out = tmp_path / "b"
    for name, value in (("ids.i32", np.int32(2**31 - 1)), ("labels.f32", np.float32(2.0))):
        path = store / "train" / name
        original = path.read_bytes()
        path.write_bytes(value.tobytes() + original[4:])  # same size, one value out of range
        result = run_cli("train", "--store", store, "--out", out, *FAST)
        assert result.code == 2 and result.clean() and "the store is damaged" in result.err
        assert not out.exists()
        path.write_bytes(original)
    assert run_cli("train", "--store", store, "--out", out, *FAST).code == 0


def test_9_a_sharded_store_damaged_in_range_is_refused_naming_the_shard(tmp_path):
    store = tmp_path / "store"
    source = criteo_file(tmp_path / "train.txt")
    argv = ["prepare", "--input", source, "--out", store, "--shards", "3", "--quiet"]
    assert run_cli(*argv).code == 0
    out = tmp_path / "b"
    assert run_cli("train", "--store", store, "--out", out, *FAST).code == 0  # sound: trains
    shard = store / "train" / "labels.00001.f32"
    original = shard.read_bytes()
    shard.write_bytes(original[:-4] + np.float32(0.5).tobytes())  # its last row's label
    result = run_cli("train", "--store", store, "--out", out, *FAST, "--overwrite")
    assert result.code == 2 and result.clean() and "labels other than 0 and 1" in result.err
    assert str(shard) in result.err, result.err


def test_9_bad_rows_skip_skips_rows_pyarrow_rejects_with_their_line(tmp_path):
    schema = tmp_path / "schema.yaml"
    schema.write_text(CSV_SCHEMA)
    lines = market_csv(tmp_path / "clean.csv").read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",1_000"  # Python reads it as a number, PyArrow not
    lines[5] = lines[5].rsplit(",", 1)[0] + ",\u0663"  # an Arabic-Indic digit 3
    source = tmp_path / "m.csv"
    source.write_text("\n".join(lines) + "\n")
    args = ["prepare", "--format", "csv", "--schema", schema, "--input", source, "--quiet"]
    result = run_cli(*args, "--out", tmp_path / "s1")
    assert result.code == 2 and "m.csv:3, field 'price': '1_000' is not a number" in result.err
    result = run_cli(*args, "--out", tmp_path / "s2", "--bad-rows", "skip")
    assert result.code == 0, result.err
    manifest = Store.open(tmp_path / "s2").manifest
    assert manifest["rows"]["bad"] == 2 and manifest["rows"]["total"] == 398
    assert [e["line"] for e in manifest["bad_rows"]["examples"]] == [3, 6]


def _criteo_days(tmp_path: Path, days: int = 3) -> list[Path]:
    """``days`` generated Criteo files (one block each: with ``--workers 2`` each goes to a
    worker process)."""
    return [criteo_file(tmp_path / f"day_{d}.txt", seed=d) for d in range(days)]


def _break_line(path: Path, line: int, make_bad) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = make_bad(lines[line - 1])
    path.write_text("\n".join(lines) + "\n")


def test_9_bad_rows_in_prepare_workers_are_located_or_skipped(tmp_path):
    days = _criteo_days(tmp_path)
    _break_line(days[1], 100, lambda text: text + "\textra")  # one column too many
    _break_line(days[2], 200, lambda text: "1\t1_000" + text[text.index("\t", 2) :])  # I1
    pattern = tmp_path / "day_*.txt"
    argv = ["prepare", "--input", pattern, "--workers", "2", "--shards", "2", "--quiet"]
    before = snapshot(tmp_path)
    result = run_cli(*argv, "--out", tmp_path / "s1")  # --bad-rows error
    assert result.code == 2 and result.clean(), result.err
    assert f"{days[1]}:100: expected 40 columns, found 41" in result.err
    assert snapshot(tmp_path) == before  # neither store nor partial nor work files
    result = run_cli(*argv, "--out", tmp_path / "s2", "--bad-rows", "skip")
    assert result.code == 0, result.err
    manifest = Store.open(tmp_path / "s2").manifest
    assert manifest["rows"]["bad"] == 2 and manifest["rows"]["total"] == 3 * 600 - 2
    assert manifest["workers"] == 2 and manifest["shards"] == 2  # parsed in worker processes
    examples = [(e["path"], e["line"]) for e in manifest["bad_rows"]["examples"]]
    assert examples == [(str(days[1]), 100), (str(days[2]), 200)]


def test_9_truncated_or_fake_zstd_inputs_and_empty_globs_are_messages(tmp_path):
    import pyarrow as pa

    (tmp_path / "in").mkdir()
    days = _criteo_days(tmp_path / "in")
    packed = tmp_path / "in" / "day_3.txt.zst"
    with pa.CompressedOutputStream(str(packed), "zstd") as stream:
        stream.write(criteo_file(tmp_path / "plain.txt", 2000, seed=3).read_bytes())
    (tmp_path / "plain.txt").unlink()
    whole = packed.read_bytes()
    packed.write_bytes(whole[: len(whole) // 2])
    argv = ["prepare", "--workers", "2", "--quiet", "--out", tmp_path / "out" / "s"]
    inputs = ["--input", *days, "--input", packed]
    before = snapshot(tmp_path)
    result = run_cli(*argv, *inputs)
    assert result.code == 2 and result.clean(), result.err
    assert f"{packed}: the compressed file is truncated or damaged" in result.err
    packed.write_bytes(days[0].read_bytes())  # not zstd at all
    before = snapshot(tmp_path)
    result = run_cli(*argv, *inputs)
    assert result.code == 2 and result.clean() and str(packed) in result.err, result.err
    result = run_cli(*argv, "--input", tmp_path / "in" / "nothing_*.gz")
    assert result.code == 2 and result.clean() and "no file matches this pattern" in result.err
    assert snapshot(tmp_path) == before


def test_9_a_killed_prepare_worker_is_a_system_error_not_a_traceback(tmp_path, monkeypatch):
    from deepfm.data import prepare

    pool = prepare._Pool(2, {})
    try:  # a worker killed (by the OOM killer, say) while it holds a task
        with pytest.raises(MemoryError, match="a prepare worker process died"):
            list(pool.imap(os._exit, [9, 9]))
    finally:
        pool.close()

    def killed(*args, **kwargs):
        raise MemoryError("a prepare worker process died (test)")

    monkeypatch.setattr(prepare, "_count_all", killed)
    source = criteo_file(tmp_path / "in.txt")
    result = run_cli("prepare", "--input", source, "--out", tmp_path / "s", "--quiet")
    assert result.code == 1 and result.clean() and "worker process died" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]  # no partial store


# -- 10. the server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(data):
    import httpx

    from deepfm.serve.server import ServeSettings

    settings = ServeSettings(model_dir=data.bundle, port=0, max_records=50)
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http


def test_10_post_needs_application_json(client):
    body = json.dumps({"records": [{"C1": "x"}]})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None, "text/json"):
        headers = {} if content_type is None else {"content-type": content_type}
        for route in ("/predict", "/rank", "/reload"):
            response = client.post(route, content=body, headers=headers)
            assert response.status_code == 415, (route, content_type, response.text)
    for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        response = client.post("/predict", content=body, headers={"content-type": content_type})
        assert response.status_code == 200, response.text


def test_10_too_many_records_are_refused_before_parsing(client, monkeypatch):
    import deepfm.serve.server as server

    def never(*args):
        raise AssertionError("the body was parsed")

    monkeypatch.setattr(server, "parse_body", never)
    json_type = {"content-type": "application/json"}
    for body in (
        '{"records": [' + ",".join(["{}"] * 100_000) + "]}",  # 600 kB of empty objects
        '{"records": [{' + ",".join(f'"k{i}": 1' for i in range(20_000)) + "}]}",  # keys
    ):
        response = client.post("/predict", content=body, headers=json_type)
        assert response.status_code == 413, response.text


def test_10_port_and_host_are_checked(data):
    from deepfm.errors import ConfigError
    from deepfm.serve.server import ServeSettings

    for flags in (["--port", "70000"], ["--port", "-1"], ["--port", "http"]):
        result = run_cli("serve", "--bundle", data.bundle, *flags)
        assert result.code == 2 and "port" in result.err and result.clean()
    for host in ("http://example.com", "a host", ""):
        result = run_cli("serve", "--bundle", data.bundle, "--host", host)
        assert result.code == 2 and "--host" in result.err and result.clean()
    with pytest.raises(ConfigError, match="port"):
        ServeSettings(model_dir=data.bundle, port=70000)


def _metrics(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/metrics", timeout=10).text


def test_10_a_client_leaving_mid_body_is_not_a_server_error(data, caplog):
    from deepfm.serve.server import ServeSettings

    settings = ServeSettings(model_dir=data.bundle, port=0)
    with running_server(settings) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n" + b'{"records": ['
            )
            time.sleep(0.3)
        deadline = time.monotonic() + 10
        while 'status="499"' not in _metrics(url) and time.monotonic() < deadline:
            time.sleep(0.05)
        text = _metrics(url)
    assert 'deepfm_requests_total{route="/predict",status="499"} 1.0' in text
    assert 'status="500"' not in text and 'kind="internal"' not in text
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]


def _closed_after(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closes ``sock`` (reads until EOF; fails past ``limit``)."""
    started = time.monotonic()
    sock.settimeout(limit)
    while sock.recv(4096):
        pass
    return time.monotonic() - started


def test_10_slow_headers_and_bodies_are_cut_off(data):
    import httpx

    from deepfm.serve.server import ServeSettings

    settings = ServeSettings(model_dir=data.bundle, port=0, header_timeout=0.5, body_timeout=0.5)
    with running_server(settings) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as idle:
            assert _closed_after(idle, 5) < 3  # connected, never said anything
        with socket.create_connection(("127.0.0.1", port)) as trickle:
            started = time.monotonic()
            for byte in b"POST /predict HTTP/1.1\r\nHost":  # one byte every 0.1 s
                try:
                    trickle.sendall(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.1)
            assert time.monotonic() - started + _closed_after(trickle, 5) < 4
        with socket.create_connection(("127.0.0.1", port)) as slow_body:
            slow_body.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            reply = b""
            slow_body.settimeout(5)
            while chunk := slow_body.recv(4096):
                reply += chunk
            assert b" 500 " not in reply
        # an ordinary client is served as before
        response = httpx.post(f"{url}/predict", json={"records": [{"C1": "x"}]}, timeout=10)
        assert response.status_code == 200
