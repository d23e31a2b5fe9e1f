"""Hostile input: a large table of broken files, configs, flags and HTTP requests fed to every
command and to the server. For each: no traceback, no internal error, a non-zero exit with a
message where the input is refused (or a counted success where a policy allows it), nothing
outside the command's output path changed; for the server, never a 5xx.

Everything runs in this process on small generated inputs (a few seconds for the whole table).
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from deepfm.common import file_sha256
from safety_helpers import (
    CSV_SCHEMA,
    FAST,
    criteo_file,
    market_csv,
    run_cli,
    running_server,
    snapshot,
)

REFUSED, SYSTEM, OK = 2, 1, 0


# -- the workspace: good inputs, broken copies of them, and a user's own files ----------------


def _rehash(bundle: Path, name: str) -> None:
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["files"][name] = file_sha256(bundle / name)
    (bundle / "bundle.json").write_text(json.dumps(manifest))


def _broken_files(bad: Path, train: Path, test: Path, csv: Path) -> None:
    rows = train.read_bytes()
    lines = rows.splitlines(keepends=True)
    cells = lines[0].rstrip(b"\n").split(b"\t")

    def row(**changes: bytes) -> bytes:
        changed = list(cells)
        for index, value in changes.items():
            changed[int(index[1:])] = value
        return b"\t".join(changed) + b"\n"

    files: dict[str, bytes] = {
        "empty.txt": b"",
        "newline.txt": b"\n",
        "blank_lines.txt": b"\n\n\n",
        "crlf.txt": rows.replace(b"\n", b"\r\n"),
        "bom.txt": b"\xef\xbb\xbf" + rows,
        "bom_only.txt": b"\xef\xbb\xbf",
        "cut.txt.gz": gzip.compress(rows)[:300],
        "fake.txt.gz": rows,
        "empty.txt.gz": gzip.compress(b""),
        "garbage.txt.gz": bytes(range(256)) * 4,
        "binary.txt": np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes(),
        "nul.txt": b"\x00" * 500 + b"\n",
        "one_column.txt": b"1\n0\n1\n",
        "ten_columns.txt": b"\t".join([b"1"] * 10) + b"\n",
        "forty_one.txt": lines[0].rstrip(b"\n") + b"\textra\n",
        "nan.txt": row(c1=b"nan") + rows,
        "inf.txt": row(c1=b"inf") + rows,
        "huge.txt": row(c1=b"1e400") + rows,
        "underscore.txt": row(c1=b"1_000") + rows,
        "label_two.txt": row(c0=b"2") + rows,
        "label_text.txt": row(c0=b"yes") + rows,
        "latin1.txt": row(c20=b"caf\xe9") + rows,
        "bare_cr.txt": row(c20=b"a\rb") + rows,
        "truncated_last.txt": rows + lines[0][:20],
        "single_class.txt": b"".join(b"0" + line[1:] for line in lines),
        "header_only.csv": b"click,user,item,price\n",
        "csv_bom.csv": b"\xef\xbb\xbf" + csv.read_bytes(),
        "csv_crlf.csv": csv.read_bytes().replace(b"\n", b"\r\n"),
        "csv_quote.csv": csv.read_bytes() + b'1,"unbalanced,i1,2\n',
        "csv_short.csv": csv.read_bytes() + b"1,u1\n",
        "csv_no_label.csv": b"user,item,price,other\nu1,i1,1,x\n",
        "csv_dup_header.csv": b"click,user,user,price\n1,a,b,1\n",
        "not_parquet.parquet": rows,
        "test_unlabeled.txt": test.read_bytes(),
        "schema_list.yaml": b"- a\n- b\n",
        "schema_empty.yaml": b"",
        "schema_kind.yaml": b"fields: [{name: user, kind: bogus}]\n",
        "schema_types.yaml": b"fields: [{name: 3, max_len: x}]\nmin_count: many\n",
        "schema_label_field.yaml": b"label: user\nfields: [user, item]\n",
        "schema_latin1.yaml": "fields: [caf\xe9]\n".encode("latin-1"),
        "schema_bad_yaml.yaml": b"fields: [\n",
        "schema_typo.yaml": CSV_SCHEMA.replace("label: click", "label: clik").encode(),
        "preset_latin1.yaml": "description: caf\xe9\n".encode("latin-1"),
        "preset_list.yaml": b"- 1\n",
        "preset_keys.yaml": b"defaults: {dropout: 0.5}\n",
        "preset_keep.yaml": b"defaults: {keep_prob: 2}\n",
        "preset_hidden.yaml": b"defaults: {hidden: [-1]}\n",
        "preset_hidden_text.yaml": b"defaults: {hidden: lots}\n",
        "preset_model.yaml": b"models: {nonsense: {hidden: [1]}}\n",
        "config_lr.yaml": b"train: {lr: fast}\n",
        "config_list.yaml": b"train: [1, 2]\n",
        "config_epochs.yaml": b"train: {epochs: 2.5}\n",
        "config_seed.yaml": b"train: {seed: 3}\n",
        "config_device.yaml": b"train: {device: [cpu]}\n",
        "space_bad.yaml": b"lr: {low: 1, high: 0}\n",
        "space_list.yaml": b"- lr\n",
        "candidates_obj.json": b'{"a": 1}',
        "candidates_ints.json": b"[1, 2, 3]",
        "candidates_nested.json": b'[{"C7": {"x": 1}}]',
        "candidates_nan.json": b'[{"C7": "a", "bid": NaN}]',
        "candidates_bad.json": b"[{",
        "candidates_latin1.json": b'[{"C7": "caf\xe9"}]',
        "candidates_big_int.json": b'[{"I1": ' + b"9" * 5000 + b"}]",
        "candidates_empty.csv": b"",
        "candidates_short.csv": b"C7,C8\nx\n",
        "candidates_bom.csv": b"\xef\xbb\xbfC7,bid\nx,1\n",
        "candidates_bid.csv": b"C7,bid\nx,-1\ny,cheap\n",
        "user_list.json": b"[1]",
        "feature_map_list.json": b"[]",
        "feature_map_bad.json": b'{"format_version": 1, "fields": 3}',
        "report.md": b"# my own notes\n",
    }
    for name, content in files.items():
        (bad / name).write_bytes(content)


def _broken_bundles(root: Path, bundle: Path) -> None:
    """Copies of a good bundle, each damaged in one way."""

    def copy(name: str) -> Path:
        target = root / name
        shutil.copytree(bundle, target)
        return target

    (copy("no_weights") / "model.safetensors").unlink()
    (copy("no_manifest") / "bundle.json").unlink()
    flipped = copy("flipped")
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (flipped / "model.safetensors").write_bytes(bytes(data))
    for name, content in (
        ("model_unknown", '{"model": {"name": "nonsense"}, "format": "criteo"}'),
        ("model_types", '{"model": {"hidden": "wide"}, "format": "criteo"}'),
        ("model_format", '{"model": {}, "format": 7}'),
        ("model_list", "[1]"),
    ):
        damaged = copy(name)
        (damaged / "model.json").write_text(content)
        _rehash(damaged, "model.json")
    for name, content in (
        ("map_list", "[]"),
        ("map_version", '{"format_version": 99}'),
        ("map_fields", '{"format_version": 1, "schema": {"fields": ["a"]}, "fields": 5}'),
        ("map_text", "not json"),
    ):
        damaged = copy(name)
        (damaged / "feature_map.json").write_text(content)
        _rehash(damaged, "feature_map.json")
    manifest = copy("manifest_files")
    (manifest / "bundle.json").write_text('{"files": ["a"]}')


def _broken_stores(root: Path, store: Path) -> None:
    def copy(name: str) -> Path:
        target = root / name
        shutil.copytree(store, target)
        return target

    (copy("manifest_text") / "manifest.json").write_text("not json")
    (copy("manifest_list") / "manifest.json").write_text("[]")
    (copy("manifest_version") / "manifest.json").write_text('{"format": "deepfm-store"}')
    missing = copy("array_missing")
    (missing / "train" / "ids.i32").unlink()
    short = copy("array_short")
    ids = short / "train" / "ids.i32"
    ids.write_bytes(ids.read_bytes()[:-4])
    out_of_range = copy("ids_out_of_range")
    ids = out_of_range / "valid" / "ids.i32"
    ids.write_bytes(np.int32(-5).tobytes() + ids.read_bytes()[4:])
    labels = copy("labels_nan") / "train" / "labels.f32"
    labels.write_bytes(np.float32(np.nan).tobytes() + labels.read_bytes()[4:])
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["feature_map"] = {"format_version": 1, "fields": "x"}
    (copy("map_damaged") / "manifest.json").write_text(json.dumps(manifest))
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["labeled"] = False
    for split in ("train", "valid", "test"):
        manifest["arrays"][split].pop("labels", None)
    (copy("unlabeled") / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def outs(tmp_path_factory) -> Path:
    """Where the cases' fresh output paths go (outside the workspace that must not change)."""
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    train = criteo_file(root / "train.txt", 400)
    test = criteo_file(root / "test.txt", 60, seed=1, labeled=False)
    csv = market_csv(root / "market.csv")
    (root / "schema.yaml").write_text(CSV_SCHEMA)
    assert run_cli("train", "--data", train, "--out", root / "bundle", *FAST).code == 0
    assert run_cli("prepare", "--input", train, "--out", root / "store", "--quiet").code == 0
    args = ["train", "--data", train, "--out", root / "ckpt_bundle", *FAST]
    assert run_cli(*args, "--checkpoint-every", "2").code == 0
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("my own file\n")
    (root / "readme.txt").write_text("a user's file\n")
    (root / "link_to_notes").symlink_to(root / "notes")
    (root / "link_to_train").symlink_to(train)
    (root / "link_to_bundle").symlink_to(root / "bundle")
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "ro").mkdir()
    for folder in ("bad", "bad_bundles", "bad_stores"):
        (root / folder).mkdir()
    _broken_files(root / "bad", train, test, csv)
    _broken_bundles(root / "bad_bundles", root / "bundle")
    _broken_stores(root / "bad_stores", root / "store")
    return root


# -- the CLI table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """``deepfm ARGV`` (``{ws}`` is the workspace, ``{out}`` a fresh output path) must exit
    with one of ``codes`` and leave everything but ``{out}`` unchanged; ``says``: a phrase of
    the message."""

    argv: str
    codes: tuple[int, ...] = (REFUSED,)
    says: str = ""
    setup: Callable[[Path], None] | None = field(default=None, compare=False)


def _damaged_tune_db(out: Path) -> None:
    out.mkdir()
    (out / ".deepfm-results").write_text("{}")
    (out / "tune.db").write_bytes(b"not sqlite" * 100)


def _user_checkpoints(out: Path) -> None:
    (out.parent / f"{out.name}.checkpoints").mkdir()
    (out.parent / f"{out.name}.checkpoints" / "mine.txt").write_text("a user's file")


def _users_report(out: Path) -> None:
    out.mkdir()
    (out / "compare.md").write_text("| model | AUC |\n|---|---|\n")
    (out / "report.md").write_text("# my own report, not deepfm's\n")


def _left_by_a_killed_writer(out: Path) -> None:
    (out.parent / f".{out.name}.tmp-999999999-abcd").mkdir()
    (out.parent / f".{out.name}.tmp-999999999-abcd" / "model.safetensors").write_bytes(b"x")


TRAIN = "train --data {ws}/train.txt --out {out} " + " ".join(FAST)
PREDICT = "predict --bundle {ws}/bundle --data {ws}/test.txt --out {out}"
PREPARE = "prepare --input {ws}/train.txt --out {out} --quiet"
CSV_PREPARE = "prepare --format csv --schema {ws}/schema.yaml --out {out} --quiet --input"
STORE = "--store {ws}/store --out {out} --quiet --threads 1"
RANK = "rank --bundle {ws}/bundle"

CASES: list[Case] = [
    # -- train: data --------------------------------------------------------------------------
    *(
        Case(f"train --data {{ws}}/bad/{name} --out {{out}} " + " ".join(FAST))
        for name in (
            "empty.txt",
            "newline.txt",
            "blank_lines.txt",
            "bom_only.txt",
            "cut.txt.gz",
            "fake.txt.gz",
            "empty.txt.gz",
            "garbage.txt.gz",
            "binary.txt",
            "nul.txt",
            "one_column.txt",
            "ten_columns.txt",
            "forty_one.txt",
            "nan.txt",
            "inf.txt",
            "huge.txt",
            "underscore.txt",
            "label_two.txt",
            "label_text.txt",
            "latin1.txt",
            "bare_cr.txt",
            "truncated_last.txt",
            "test_unlabeled.txt",
        )
    ),
    *(
        Case(
            f"train --data {{ws}}/bad/{name} --out {{out}} --bad-rows skip " + " ".join(FAST),
            codes=(OK,),
        )
        for name in (
            "nan.txt",
            "inf.txt",
            "underscore.txt",
            "label_two.txt",
            "latin1.txt",
            "bare_cr.txt",
            "truncated_last.txt",
            "crlf.txt",
            "bom.txt",
            "single_class.txt",
        )
    ),
    Case("train --data {ws}/notes --out {out} " + " ".join(FAST), says="directory"),
    Case("train --data {ws}/missing.txt --out {out} " + " ".join(FAST), says="does not exist"),
    Case("train --data {ws}/dangling --out {out} " + " ".join(FAST)),
    Case("train --data /dev/zero --out {out} " + " ".join(FAST), says="longer than"),
    Case("train --data {ws}/bundle/model.safetensors --out {out} " + " ".join(FAST)),
    Case(TRAIN + " --test {ws}/bad/cut.txt.gz", says="truncated"),
    Case(TRAIN + " --test {ws}/train.txt --split random:0.9", says="not both"),
    Case("train --format csv --data {ws}/market.csv --out {out} " + " ".join(FAST), says="schema"),
    *(
        Case(
            f"train --format csv --schema {{ws}}/bad/{schema} --data {{ws}}/market.csv "
            "--out {out} " + " ".join(FAST)
        )
        for schema in (
            "schema_list.yaml",
            "schema_empty.yaml",
            "schema_kind.yaml",
            "schema_types.yaml",
            "schema_label_field.yaml",
            "schema_latin1.yaml",
            "schema_bad_yaml.yaml",
            "schema_typo.yaml",
            "missing.yaml",
        )
    ),
    *(
        Case(
            f"train --format csv --schema {{ws}}/schema.yaml --data {{ws}}/bad/{name} "
            "--out {out} " + " ".join(FAST)
        )
        for name in (
            "header_only.csv",
            "csv_quote.csv",
            "csv_short.csv",
            "csv_no_label.csv",
            "csv_dup_header.csv",
            "empty.txt",
        )
    ),
    Case(
        "train --format csv --schema {ws}/schema.yaml --data {ws}/bad/csv_bom.csv "
        "--out {out} " + " ".join(FAST),
        codes=(OK,),
    ),
    Case(
        "train --format csv --schema {ws}/schema.yaml --data {ws}/bad/csv_crlf.csv "
        "--out {out} " + " ".join(FAST),
        codes=(OK,),
    ),
    Case(
        "train --format parquet --schema {ws}/schema.yaml --data {ws}/bad/not_parquet.parquet "
        "--out {out} " + " ".join(FAST),
        says="Parquet",
    ),
    # -- train: where it writes ---------------------------------------------------------------
    *(
        Case(f"train --data {{ws}}/train.txt --out {target} {extra}" + " ".join(FAST))
        for target in (
            "{ws}/notes",
            "{ws}",
            "{ws}/readme.txt",
            "{ws}/store",
            "{ws}/train.txt",
            "{ws}/link_to_notes",
            "{ws}/link_to_train",
            "{ws}/dangling",
            "{ws}/bundle/inner",
            "{ws}/store/inner",
            "{ws}/ckpt_bundle.checkpoints",
            "{ws}/readme.txt/inner",
            "{ws}/bundle",
        )
        for extra in ("", "--overwrite ")
        if not (target == "{ws}/bundle" and extra)
    ),
    Case(
        "train --data {ws}/train.txt --out {ws}/ckpt_bundle --checkpoint-every 2 " + " ".join(FAST),
        says="--overwrite",
    ),
    Case(
        "train --data {ws}/train.txt --out {out} --resume {ws}/notes " + " ".join(FAST),
        says="no intact checkpoint",
    ),
    Case("train --data {ws}/train.txt --out {out} --resume {ws}/missing " + " ".join(FAST)),
    Case(
        "train --data {ws}/train.txt --out {out} --resume {ws}/ckpt_bundle.checkpoints "
        "--lr 0.5 " + " ".join(FAST),
        says="another run",
    ),
    Case(
        "train --data {ws}/market.csv --format csv --schema {ws}/schema.yaml --out {out} "
        "--resume {ws}/ckpt_bundle.checkpoints " + " ".join(FAST),
        says="another run",
    ),
    # -- train: flags -------------------------------------------------------------------------
    *(
        Case(f"{TRAIN} {flags}")
        for flags in (
            "--lr nan",
            "--lr inf",
            "--lr -inf",
            "--lr 0",
            "--lr -1e-3",
            "--lr 1e400",
            "--threads -1",
            "--threads 0",
            "--device bogus",
            "--device cuda:x",
            "--device 5",
            "--embed-dim 1000000000",
            "--embed-dim 0",
            "--embed-dim -3",
            "--embed-dim 1e9",
            "--hidden 0",
            "--hidden x",
            "--hidden ,",
            "--hidden 999999999",
            "--dropout 1",
            "--dropout -0.5",
            "--dropout nan",
            "--l2 nan",
            "--l2 -1",
            "--l2 inf",
            "--epochs 0",
            "--epochs -1",
            "--batch-size 0",
            "--patience -1",
            "--seed -1",
            "--seed 99999999999999999999",
            "--seed x",
            "--valid-fraction 1",
            "--valid-fraction -0.1",
            "--valid-fraction nan",
            "--split random:nan",
            "--split random:1.5",
            "--split sequential:0/0",
            "--split bogus",
            "--min-count 0",
            "--min-count -2",
            "--checkpoint-every -1",
            "--activation bogus",
            "--model bogus",
            "--preset bogus",
            "--preset {ws}/bad/preset_latin1.yaml",
            "--preset {ws}/bad/preset_list.yaml",
            "--preset {ws}/bad/preset_keys.yaml",
            "--preset {ws}/bad/preset_keep.yaml",
            "--preset {ws}/bad/preset_hidden.yaml",
            "--preset {ws}/bad/preset_hidden_text.yaml",
            "--preset {ws}/bad/preset_model.yaml",
            "--preset {ws}/notes",
            "--monitor bogus",
            "--precision fp8",
            "--embedding-updates bogus",
            "--lr-scaling bogus",
            "--bad-rows maybe",
            "--format bogus",
            "--store {ws}/store",
            "--crosses C1xC2",
            "--model lr --crosses ,",
            "--model lr --crosses nope×C2",
            "--model lr --cross-buckets 0",
            "--model poly2 --cross-buckets -1",
            "--model poly2 --cross-buckets 1000000000000",
        )
    ),
    Case(f"{TRAIN} --lr 1e30", says="diverged"),
    Case(f"{TRAIN} --threads 1000000", says="up to 1024"),  # OpenMP would crash
    Case(
        f"{TRAIN} --checkpoint-every 2", says="not a checkpoint directory", setup=_user_checkpoints
    ),
    Case(TRAIN, codes=(OK,), setup=_left_by_a_killed_writer),
    Case(
        "train --data {ws}/train.txt --out {out}/" + "x" * 300 + " " + " ".join(FAST),
        codes=(SYSTEM,),
        says="File name too long",
    ),
    Case(
        "tune --store {ws}/store --out {out} --trials 1 --quiet",
        says="Optuna database",
        setup=_damaged_tune_db,
    ),
    # -- train from a store ---------------------------------------------------------------------
    *(
        Case(f"train --store {{ws}}/bad_stores/{name} --out {{out}} " + " ".join(FAST))
        for name in (
            "manifest_text",
            "manifest_list",
            "manifest_version",
            "array_missing",
            "array_short",
            "ids_out_of_range",
            "labels_nan",
            "map_damaged",
            "unlabeled",
        )
    ),
    Case("train --store {ws}/notes --out {out} " + " ".join(FAST), says="not a store"),
    Case("train --store {ws}/bundle --out {out} " + " ".join(FAST), says="not a store"),
    Case("train --store {ws}/store --out {ws}/store --overwrite " + " ".join(FAST)),
    # -- prepare --------------------------------------------------------------------------------
    *(
        Case(f"prepare --input {{ws}}/bad/{name} --out {{out}} --quiet")
        for name in (
            "empty.txt",
            "cut.txt.gz",
            "fake.txt.gz",
            "binary.txt",
            "nan.txt",
            "bare_cr.txt",
            "label_text.txt",
            "ten_columns.txt",
            "blank_lines.txt",
        )
    ),
    Case(
        "prepare --input {ws}/bad/underscore.txt --out {out} --quiet --bad-rows skip", codes=(OK,)
    ),
    Case("prepare --input {ws}/bad/bom.txt --out {out} --quiet", codes=(OK,)),
    *(
        Case(f"{CSV_PREPARE} {{ws}}/bad/{name}")
        for name in ("header_only.csv", "csv_quote.csv", "csv_no_label.csv", "empty.txt")
    ),
    Case(f"{CSV_PREPARE} {{ws}}/bad/csv_bom.csv", codes=(OK,)),
    Case(
        "prepare --format csv --schema {ws}/bad/schema_typo.yaml --input {ws}/market.csv "
        "--out {out}",
        says="no label column 'clik'",
    ),
    *(
        Case(f"prepare --input {{ws}}/train.txt --out {target} --quiet {extra}")
        for target in (
            "{ws}/notes",
            "{ws}",
            "{ws}/bundle",
            "{ws}/train.txt",
            "{ws}/readme.txt",
            "{ws}/store",
            "{ws}/link_to_notes",
            "{ws}/bundle/inner",
        )
        for extra in ("", "--overwrite")
        if not (target == "{ws}/store" and extra)
    ),
    Case("prepare --input {ws}/store --out {out} --quiet", says="directory"),
    *(
        Case(f"{PREPARE} {flags}")
        for flags in (
            "--block-mb 0",
            "--block-mb 100000",
            "--split bogus",
            "--valid-fraction 1",
            "--valid-fraction nan",
            "--min-count 0",
            "--format csv",
            "--format parquet --schema {ws}/schema.yaml",
            "--format movielens-100k",
            "--format ipinyou",
            "--featindex x",
            "--ratings x",
        )
    ),
    # -- predict and evaluate --------------------------------------------------------------------
    *(
        Case(f"predict --bundle {{ws}}/bundle --data {{ws}}/bad/{name} --out {{out}}")
        for name in (
            "empty.txt",
            "cut.txt.gz",
            "fake.txt.gz",
            "binary.txt",
            "nul.txt",
            "blank_lines.txt",
            "ten_columns.txt",
            "nan.txt",
            "latin1.txt",
            "bare_cr.txt",
            "bom_only.txt",
        )
    ),
    *(
        Case(
            f"predict --bundle {{ws}}/bundle --data {{ws}}/bad/{name} --out {{out}} "
            "--bad-rows skip",
            codes=(OK,),
        )
        for name in (
            "nan.txt",
            "latin1.txt",
            "bare_cr.txt",
            "crlf.txt",
            "bom.txt",
            "underscore.txt",
            "truncated_last.txt",
        )
    ),
    *(
        Case(f"predict --bundle {bundle} --data {{ws}}/test.txt --out {{out}}")
        for bundle in (
            "{ws}/notes",
            "{ws}/missing",
            "{ws}/store",
            "{ws}/readme.txt",
            *(
                f"{{ws}}/bad_bundles/{name}"
                for name in (
                    "no_weights",
                    "no_manifest",
                    "flipped",
                    "model_unknown",
                    "model_types",
                    "model_format",
                    "model_list",
                    "map_list",
                    "map_version",
                    "map_fields",
                    "map_text",
                    "manifest_files",
                )
            ),
        )
    ),
    *(
        Case(f"predict --bundle {{ws}}/bundle --data {{ws}}/test.txt --out {target} {extra}")
        for target in (
            "{ws}/test.txt",
            "{ws}/readme.txt",
            "{ws}/notes",
            "{ws}/bundle",
            "{ws}/bundle/model.safetensors",
            "{ws}/bundle/new.txt",
            "{ws}/store/train/ids.i32",
            "{ws}/link_to_train",
            "{ws}/ckpt_bundle.checkpoints/latest.json",
            "{ws}/readme.txt/inner",
            "{ws}/link_to_bundle/p.txt",
            "{ws}/link_to_bundle",
            "/dev/null",
        )
        for extra in ("", "--overwrite")
        if not (extra and target in ("{ws}/readme.txt", "{ws}/link_to_train"))  # allowed
    ),
    Case(PREDICT + " --data {ws}/test.txt {ws}/test.txt", says="one file"),
    Case(PREDICT + " --format bogus"),
    Case("evaluate --bundle {ws}/bundle --data {ws}/test.txt", says="no label"),
    Case("evaluate --bundle {ws}/bundle --data {ws}/bad/cut.txt.gz", says="truncated"),
    Case("evaluate --bundle {ws}/bundle --data {ws}/bad/single_class.txt --json", codes=(OK,)),
    Case("evaluate --bundle {ws}/bad_bundles/flipped --data {ws}/train.txt", says="sha256"),
    # -- export --------------------------------------------------------------------------------
    *(
        Case(f"export --bundle {{ws}}/bundle --out {target} {extra}")
        for target in (
            "{ws}/readme.txt",
            "{ws}/bundle/model.safetensors",
            "{ws}/notes",
            "{ws}/bundle",
            "{ws}/store/manifest.json",
            "/dev/null",
        )
        for extra in ("", "--overwrite")
        if not (extra and target == "{ws}/readme.txt")  # allowed: the user said --overwrite
    ),
    Case("export --bundle {ws}/bundle --out {out} --check-rows -1"),
    Case("export --bundle {ws}/bad_bundles/flipped --out {out}"),
    Case("export --bundle {ws}/notes --out {out}"),
    # -- rank ------------------------------------------------------------------------------------
    *(
        Case(f"{RANK} --candidates {{ws}}/bad/{name}")
        for name in (
            "candidates_obj.json",
            "candidates_ints.json",
            "candidates_nested.json",
            "candidates_bad.json",
            "candidates_latin1.json",
            "candidates_big_int.json",
            "candidates_empty.csv",
            "candidates_short.csv",
            "missing.json",
        )
    ),
    Case(RANK + " --candidates {ws}/bad/candidates_bid.csv --by ctr_bid"),
    Case(RANK + " --candidates {ws}/bad/candidates_nan.json --by ctr_bid"),
    Case(RANK + " --candidates {ws}/bad/candidates_nan.json", codes=(OK,)),  # bids unused
    Case(RANK + " --candidates {ws}/bad/candidates_bom.csv", codes=(OK,)),
    Case(RANK + " --candidates /dev/zero", says="not a regular file"),
    Case(RANK + " --candidates {ws}/notes", says="not a regular file"),
    *(
        Case(f"{RANK} --candidates {{ws}}/bad/candidates_bom.csv {flags}")
        for flags in (
            "--user @{ws}/bad/user_list.json",
            "--user @{ws}/missing.json",
            "--user '{'",
            "--user [1]",
            "--context @/dev/zero",
            "--top 0",
            "--top -1",
            "--by bogus",
            "--runtime bogus",
            """--user '{"I1": "x"}'""",
            """--user '{"C1": {"a": 1}}'""",
            """--user '{"I1": NaN}'""",
        )
    ),
    Case("rank --bundle {ws}/bad_bundles/model_list --candidates {ws}/bad/candidates_bom.csv"),
    # -- serve (every case is refused before a socket is opened) ----------------------------------
    *(
        Case(f"serve --bundle {{ws}}/bundle {flags}")
        for flags in (
            "--port 70000",
            "--port -1",
            "--port x",
            "--host http://x",
            "--host 'a b'",
            "--host ''",
            "--token ''",
            "--token ' '",
            "--max-records 0",
            "--max-body-bytes -1",
            "--threads 0",
            "--concurrency 0",
            "--header-timeout 0",
            "--header-timeout nan",
            "--body-timeout inf",
            "--body-timeout -1",
            "--runtime bogus",
        )
    ),
    *(
        Case(f"serve --bundle {bundle} --port 0")
        for bundle in (
            "{ws}/notes",
            "{ws}/missing",
            "{ws}/bad_bundles/flipped",
            "{ws}/bad_bundles/model_list",
        )
    ),
    # -- studies ---------------------------------------------------------------------------------
    *(
        Case(f"{study} {STORE} {flags}")
        for study in ("compare", "efficiency", "sweep --param layers", "tune", "workers")
        for flags in (
            "--config {ws}/bad/config_lr.yaml",
            "--config {ws}/bad/config_list.yaml",
            "--config {ws}/bad/config_epochs.yaml",
            "--config {ws}/missing.yaml",
            "--preset {ws}/bad/preset_latin1.yaml",
            "--threads 0",
            "--checkpoint-every 5",
            "--resume {ws}/notes",
            "--lr nan",
        )
    ),
    *(
        Case(f"{study} --store {store} --out {{out}} --quiet")
        for study in (
            "compare --models fm --seeds 1",
            "efficiency --models lr",
            "sweep --param layers --models fm",
            "tune --trials 1",
            "workers --workers 2",
        )
        for store in (
            "{ws}/notes",
            "{ws}/missing",
            "{ws}/bad_stores/unlabeled",
            "{ws}/bad_stores/ids_out_of_range",
            "{ws}/bundle",
        )
    ),
    *(
        Case(f"{study} --store {{ws}}/store --out {target} --quiet")
        for study in ("compare --models fm --seeds 1", "sweep --param layers --models fm")
        for target in (
            "{ws}/notes",
            "{ws}",
            "{ws}/bundle",
            "{ws}/store",
            "{ws}/readme.txt",
            "{ws}/ckpt_bundle.checkpoints",
            "{ws}/link_to_notes",
        )
    ),
    *(
        Case(f"{args} --store {{ws}}/store --out {{out}} --quiet")
        for args in (
            "compare --seeds 0",
            "compare --seeds 1000000000",
            "compare --models ,",
            "compare --models bogus",
            "efficiency --repeats 0",
            "efficiency --repeats 99999999",
            "sweep --param bogus",
            "sweep --param layers --values x",
            "sweep --param dropout --values 2",
            "sweep --param layers --depth 0",
            "sweep --param layers --hidden 8",
            "tune --trials 0",
            "tune --timeout -1",
            "tune --timeout nan",
            "tune --space {ws}/bad/space_bad.yaml",
            "tune --space {ws}/bad/space_list.yaml",
            "tune --space {ws}/missing.yaml",
            "tune --model bogus",
            "workers --workers 1",
            "workers --workers 1000000",
            "workers --eval-every 0",
            "workers --lr-scaling sqrt",
            "workers --device cuda:7",
        )
    ),
    Case("compare --criteo {ws}/bad/cut.txt.gz --out {out} --models fm --seeds 1 --quiet"),
    Case("compare --out {out} --quiet", says="--store"),
    Case("report {ws}/notes", says="no study"),
    Case("report {out}", says="not written by deepfm report", setup=_users_report),
    Case("report {ws}/missing"),
    Case("report {ws}/readme.txt"),
    *(
        Case(f"market-store --out {target} {flags}")
        for target, flags in (
            ("{out}", "--rows 0"),
            ("{out}", "--rows -5"),
            ("{out}", "--rows 1000000000000"),
            ("{out}", "--split bogus"),
            ("{ws}/notes", "--rows 2000"),
            ("{ws}/bundle", "--rows 2000"),
            ("{ws}/store", "--rows 2000"),
            ("{ws}/readme.txt", "--rows 2000"),
        )
    ),
    # -- demo and the online experiments ----------------------------------------------------------
    *(
        Case(f"demo --quiet --out {target} {flags}")
        for target, flags in (
            ("{out}", "--rows 10"),
            ("{out}", "--rows 1000000000000"),
            ("{out}", "--epochs 0"),
            ("{out}", "--threads 0"),
            ("{out}", "--hidden 0"),
            ("{out}", "--batch-size 0"),
            ("{out}", "--seed -1"),
            ("{ws}/notes", "--rows 500"),
            ("{ws}/bundle", "--rows 500"),
            ("{ws}/readme.txt", "--rows 500"),
            ("{ws}", "--rows 500"),
        )
    ),
    *(
        Case(f"{command} --quiet --out {target} {flags}")
        for command in ("simulate", "abtest")
        for target, flags in (
            ("{out}", "--types 9"),
            ("{out}", "--types 0"),
            ("{out}", "--users-per-type 1"),
            ("{out}", "--users-per-type 1000000000"),
            ("{out}", "--epochs 0"),
            ("{out}", "--threads 0"),
            ("{out}", "--hidden x"),
            ("{out}", "--seed -1"),
            ("{ws}/notes", "--types 2"),
            ("{ws}/bundle", "--types 2"),
        )
    ),
    *(
        Case(f"simulate --quiet --out {{out}} {flags}")
        for flags in (
            "--rows 10",
            "--rows 1000000000000",
            "--lists ''",
            "--lists 5,x",
            "--lists 0",
            "--hour 25",
            "--weekday 7",
        )
    ),
    *(
        Case(f"abtest --quiet --out {{out}} {flags}")
        for flags in (
            "--days 0",
            "--days 100000",
            "--initial-rows 5",
            "--list-size 0",
            "--visit-rate 0",
            "--visit-rate nan",
            "--visit-rate 2",
            "--daily-epochs 0",
            "--initial-rows 1000000000000",
        )
    ),
    *(
        Case(f"models --feature-map {path}")
        for path in (
            "{ws}/bad/feature_map_list.json",
            "{ws}/bad/feature_map_bad.json",
            "{ws}/bad/binary.txt",
            "{ws}/notes",
            "{ws}/missing.json",
            "{ws}/bad_bundles/map_fields/feature_map.json",
        )
    ),
    Case("models --preset {ws}/bad/preset_keep.yaml"),
    Case("models --hidden 0"),
    Case("bogus-command"),
    Case("train", says="required"),
    Case("--version", codes=(OK,)),
]


def _argv(case: Case, ws: Path, out: Path) -> list[str]:
    import shlex

    text = case.argv.replace("{ws}", str(ws)).replace("{out}", str(out))
    return shlex.split(text)


def _case_id(case: Case) -> str:
    return case.argv.replace("{ws}/", "").replace("{out}", "OUT")[:90]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_cli_hostile_input(ws, outs, case):
    out = outs / f"case-{CASES.index(case)}"
    if case.setup is not None:
        case.setup(out)
    before = snapshot(ws)
    result = run_cli(*_argv(case, ws, out))
    assert result.clean(), result.err[-2000:]
    assert result.code in case.codes, (result.code, result.err[-2000:])
    if result.code != OK:
        assert result.err.strip(), "a refusal says why"
        assert case.says in result.err, result.err
    assert snapshot(ws) == before
    if case.setup is _left_by_a_killed_writer:
        assert [p.name for p in outs.glob(f".{out.name}.*")] == []  # and it is cleaned up


def test_the_table_is_large():
    assert len(CASES) > 300


# -- the HTTP table ----------------------------------------------------------------------------

JSON = {"content-type": "application/json"}
DEEP = "[" * 100_000 + "]" * 100_000

#: (method, route, headers, body): none of them may get a 5xx
REQUESTS: list[tuple[str, str, dict, bytes | str | None]] = [
    *(
        ("POST", route, JSON, body)
        for route in ("/predict", "/rank")
        for body in (
            b"",
            b" ",
            b"null",
            b"[]",
            b"{}",
            b"0",
            b'"x"',
            b"{",
            b"}",
            b"\x00",
            b"\xff\xfe",
            b"\xef\xbb\xbf{}",
            DEEP,
            '{"records": ' + DEEP + "}",
            '{"candidates": ' + DEEP + "}",
            '{"records": "x"}',
            '{"records": [1]}',
            '{"records": [[]]}',
            '{"records": [null]}',
            '{"records": [{"C1": NaN}]}',
            '{"records": [{"I1": Infinity}]}',
            '{"records": [{"I1": 1e400}]}',
            '{"records": [{"I1": -1e400}]}',
            '{"records": [{"I1": ' + "9" * 5000 + "}]}",
            '{"records": [{"I1": "x"}]}',
            '{"records": [{"I1": true}]}',
            '{"records": [{"C1": [1, 2]}]}',
            '{"records": [{"C1": {"a": 1}}]}',
            '{"records": [{"C1": "\\u0000"}]}',
            '{"records": [{"C1": "' + "x" * 200_000 + '"}]}',
            '{"records": [{"nope": 1}]}',
            '{"records": [{"C1": "a", "C1": "b"}]}',
            '{"records": [{}], "extra": 1}',
            '{"records": [' + ",".join(['{"C1": "a"}'] * 51) + "]}",
            '{"candidates": []}',
            '{"candidates": [{}], "top": 0}',
            '{"candidates": [{}], "top": -1}',
            '{"candidates": [{}], "top": 1.5}',
            '{"candidates": [{}], "top": "3"}',
            '{"candidates": [{}], "top": 1e400}',
            '{"candidates": [{}], "by": "bid"}',
            '{"candidates": [{}], "by": "ctr_bid"}',
            '{"candidates": [{"bid": -1}], "by": "ctr_bid"}',
            '{"candidates": [{"bid": NaN}], "by": "ctr_bid"}',
            '{"candidates": [{"bid": "cheap"}], "by": "ctr_bid"}',
            '{"candidates": [{"bid": 1e308}, {"bid": 1e308}], "by": "ctr_bid"}',
            '{"user": [], "candidates": [{}]}',
            '{"user": {"I1": NaN}, "candidates": [{}]}',
            '{"context": "x", "candidates": [{}]}',
            '{"candidates": [{"C7": {"x": 1}}]}',
            '{"candidates": [1, 2]}',
            '{"candidates": {"C7": "x"}}',
            '{"records": [], "candidates": []}',
            '{"candidates": [{}], "top": 99999999999}',
        )
    ),
    ("POST", "/predict", {"content-type": "text/plain"}, b'{"records": []}'),
    ("POST", "/predict", {}, b'{"records": []}'),
    ("POST", "/predict", {"content-type": "application/json; charset=latin-1"}, b"{}"),
    ("POST", "/predict", {**JSON, "content-encoding": "gzip"}, gzip.compress(b"{}")),
    ("POST", "/predict", JSON, b"x" * (70 << 10)),  # over the server's 64 KiB body limit
    ("POST", "/reload", {"content-type": "text/plain"}, b""),
    ("POST", "/reload", JSON, b"garbage"),
    ("POST", "/health", JSON, b"{}"),
    ("POST", "/model", JSON, b"{}"),
    ("GET", "/predict", {}, None),
    ("GET", "/rank", {}, None),
    ("GET", "/reload", {}, None),
    ("PUT", "/predict", JSON, b"{}"),
    ("DELETE", "/model", {}, None),
    ("PATCH", "/rank", JSON, b"{}"),
    (
        "OPTIONS",
        "/predict",
        {"origin": "http://evil", "access-control-request-method": "POST"},
        None,
    ),
    ("HEAD", "/health", {}, None),
    ("GET", "/nowhere", {}, None),
    ("GET", "/model/", {}, None),
    ("GET", "/model?x=1&x=2", {}, None),
    ("GET", "/" + "a" * 3000, {}, None),
    ("GET", "/%00", {}, None),
    ("GET", "/docs", {}, None),
    ("GET", "/openapi.json", {}, None),
    ("GET", "/health", {"authorization": "Bearer " + "x" * 5000}, None),
    ("GET", "/model", {"authorization": "Basic Zm9vOmJhcg=="}, None),
]


@pytest.fixture(scope="module")
def servers(ws):
    """An open server and one with a token, both with small limits."""
    from contextlib import ExitStack

    import httpx

    from deepfm.serve.server import ServeSettings

    common = {"model_dir": ws / "bundle", "port": 0, "max_records": 50}
    common["max_body_bytes"] = 64 << 10
    with ExitStack() as stack:
        clients = {}
        for name, token in (("open", None), ("token", "s3cret")):
            url = stack.enter_context(running_server(ServeSettings(**common, token=token)))
            clients[name] = stack.enter_context(httpx.Client(base_url=url, timeout=30))
        yield clients


def _send(client, method: str, route: str, headers: dict, body) -> int:
    """The status of the answer (0: the connection was closed without one, which is how a
    server answers a request that breaks HTTP itself)."""
    import httpx

    content = body.encode() if isinstance(body, str) else body
    try:
        return client.request(method, route, headers=headers, content=content).status_code
    except httpx.HTTPError:
        return 0


@pytest.mark.timeout(300)
def test_http_hostile_requests_never_get_a_5xx(servers):
    failures = []
    for method, route, headers, body in REQUESTS:
        for name, client in servers.items():
            status = _send(client, method, route, headers, body)
            if status >= 500:
                failures.append((name, method, route, str(body)[:80], status))
    assert not failures, failures[:10]
    for name, client in servers.items():
        text = client.get("/metrics", headers={"authorization": "Bearer s3cret"}).text
        assert 'status="5' not in text, name
    assert len(REQUESTS) > 80


#: requests that break HTTP or that an HTTP client would refuse to send, sent as raw bytes
RAW: list[bytes] = [
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 999999999999\r\n\r\n{}",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: -1\r\n\r\n{}",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n" + b"ffff\r\n" + b"{" * 0xFFFF + b"\r\n0\r\n\r\n",
    b"GET /model HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \r\n\r\n",
    b"GET /model HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\xff\r\n\r\n",
    b"GET /model HTTP/1.1\r\nHost: x\r\nAuthorization: \xc3\xa9\r\n\r\n",
    b"GET /model HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    b"GET /model HTTP/1.0\r\n\r\n",
    b"GET /model HTTP/9.9\r\nHost: x\r\n\r\n",
    b"BREW /pot HTCPCP/1.0\r\n\r\n",
    b"GET /\x00\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\r\n\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on the plain port
]


def _raw(url: str, request: bytes) -> int:
    """Send raw bytes; the answer's status (0: closed without one)."""
    import socket

    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        except OSError:
            return 0
    parts = reply.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


@pytest.mark.timeout(120)
def test_http_raw_broken_requests_never_get_a_5xx(servers):
    for name, client in servers.items():
        url = str(client.base_url).rstrip("/")
        for request in RAW:
            status = _raw(url, request)
            assert status < 500, (name, request[:80], status)
        assert client.get("/health").status_code == 200  # and it still serves


@pytest.mark.timeout(120)
def test_http_wrong_tokens_are_401_not_500(servers):
    client = servers["token"]
    url = str(client.base_url).rstrip("/")
    for value in (b"", b"Bearer", b"bearer s3cret", b"Bearer s3cret x", b"Bearer s3cre",
                  "Bearer é".encode(), b"Token s3cret", b"Bearer  s3cret"):  # fmt: skip
        request = b"GET /model HTTP/1.1\r\nHost: x\r\nAuthorization: " + value + b"\r\n\r\n"
        assert _raw(url, request) == 401, value
    good = client.get("/model", headers={"authorization": "Bearer s3cret"})
    assert good.status_code == 200
