"""data.source: csv on tiny generated trees: every row an item or a rejected manifest row with its line,
whole-file problems in one line, a split column read like split folders, and the splits of a folder tree."""
import csv
import io as _io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, make_tree, tiny_params, write_image, write_params
from test_data import manifest, run_prepare, splits_of
from test_stages import run_stage, stage_error
from transfer import cli, data
from transfer.params import ParamsError, validate


def csv_params(**data_params) -> dict:
    """Params for prepare on a csv source under ./raw (no source task: its classes would overlap)."""
    return tiny_params(pretrained={"source": "none"},
                       data={"source": "csv", "root": "raw", "classes": None, "image_size": 8, "train_per_class": None,
                             "eval_per_class": None, "max_rejected_fraction": 0.9, **data_params})


def write_table(path: Path, rows: list, delimiter=",", encoding="utf-8", lineterminator="\n") -> Path:
    with open(path, "w", encoding=encoding, newline="") as f:
        csv.writer(f, delimiter=delimiter, lineterminator=lineterminator).writerows(rows)
    return path


def truncated_png(path: Path) -> None:
    buf = _io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_each_bad_row_is_a_manifest_row_with_its_line_and_reason(in_tmp, monkeypatch):
    root = make_tree(in_tmp / "raw", classes=("cat", "dog"), per_class=6)
    (root / "cat" / "notes.txt").write_text("not an image")
    truncated_png(root / "cat" / "cut.png")
    write_image(root / "dog" / "blank.png", seed=97)
    write_image(root / "dog" / "unlisted.png", seed=98)
    write_image(in_tmp / "elsewhere.png", seed=99)
    good = [[f"{c}/img{i}.png", c] for c in ("cat", "dog") for i in range(6)]
    good[4] = [os.path.abspath("raw/cat/img4.png"), "cat"]  # absolute, inside data.root
    good[9] = ["dog\\img3.png", "dog"]  # written on Windows
    good[10] = [" dog/img4.png ", " dog "]  # padded
    bad = [  # (path, label) -> the reason after "labels.csv line N: "
        (["cat/missing.png", "cat"], "file not found"),
        (["cat/img0.png", "dog"], "duplicate path (of line 2)"),
        (["dog/blank.png", ""], "empty label"),
        (["", "cat"], "empty path"),
        (["cat/notes.txt", "cat"], "not an image extension (.txt)"),
        (["../elsewhere.png", "cat"], "path '../elsewhere.png' is outside data.root"),
        ([str(in_tmp / "elsewhere.png"), "cat"], f"path '{in_tmp / 'elsewhere.png'}' is outside data.root"),
        (["cat", "cat"], "not an image extension (none)"),
    ]
    write_table(root / "labels.csv", [["path", "label"], *good, *(row for row, _ in bad), ["cat/cut.png", "cat"]])
    write_params(in_tmp, csv_params())
    run_stage("prepare")

    rows = manifest(in_tmp / "data")[1]
    assert sorted(r["ref"] for r in rows if r["status"] == "used") == sorted(
        f"raw/{c}/img{i}.png" for c in ("cat", "dog") for i in range(6))
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert len(rejected) == len(bad) + 1 and len(rows) == len(good) + len(bad) + 1  # nothing dropped, nothing twice
    # A listed file the decoder cannot read is rejected as in a tree, under its path.
    assert [r["reason"] for r in rejected if r["ref"] == "raw/cat/cut.png"][0].startswith("unreadable or truncated image")
    for line, (row, reason) in enumerate(bad, start=len(good) + 2):
        hits = [r for r in rejected if r["reason"].startswith(f"labels.csv line {line}: ")]
        assert len(hits) == 1 and reason in hits[0]["reason"], (line, reason, hits)
        assert hits[0]["label"] == row[1].strip()
    assert {r["ref"] for r in rejected} >= {"raw/cat/missing.png", "raw/labels.csv:17", "../elsewhere.png"}
    metrics = json.loads((in_tmp / "metrics/prepare.json").read_text())
    assert metrics["rejected"] == len(bad) + 1 and metrics["inputs"] == len(rows) and metrics["classes"] == 2
    assert metrics["train_images"] + metrics["val_images"] + metrics["test_images"] == len(good)
    report = json.loads((in_tmp / "data/prepared/report.json").read_text())
    assert len(report["rejected"]) == len(bad) + 1 and report["classes"] == ["cat", "dog"]
    assert "1 image file under raw not listed in labels.csv: not used" in report["notes"]
    # The same budget as for a tree: 9 of 21 rejected is over 0.05 (checked after decoding: no progress bar).
    write_params(in_tmp, csv_params(max_rejected_fraction=0.05))
    monkeypatch.setenv("TRANSFER_PROGRESS", "0")
    assert "9 of 21 input files (42.9%) are unreadable, more than data.max_rejected_fraction=0.05" in stage_error("prepare")


@pytest.mark.parametrize("name, delimiter, encoding, lineterminator", [
    ("labels.tsv", "\t", "utf-8", "\n"),
    ("labels.csv", ";", "utf-8", "\n"),
    ("labels.txt", "|", "utf-8", "\n"),
    ("labels.csv", ",", "utf-8-sig", "\r\n"),  # as Excel saves "CSV UTF-8": a byte-order mark, CRLF
    ("labels.csv", "\t", "utf-8", "\n"),  # tab in a .csv
])
def test_delimiter_bom_and_quoted_fields_are_read(tmp_path, name, delimiter, encoding, lineterminator):
    root = tmp_path / "raw"
    keys = {"cat/one, two; three.png": "cat", "cat/plain.png": "cat", 'dog/say "hi" | bye.jpg': "dog", "dog/x.png": "dog"}
    for i, key in enumerate(keys):
        write_image(root / key, seed=i)
    # The label column first, an extra column between: columns are found by name.
    rows = [["label", "notes, free text", "path"]] + [[label, "a, b; c", key] for key, label in keys.items()]
    write_table(root / name, rows, delimiter, encoding, lineterminator)
    spec = data.CsvSpec(file=name)
    got = data.collect("csv", root, spec)
    assert {item.key: item.label for item in got.items} == keys and not got.skipped
    assert got.classes == data.class_names("csv", root, spec) == ["cat", "dog"]
    assert [item.key for item in got.items] == sorted(keys, key=lambda k: (keys[k], Path(k)))  # a tree's order
    if delimiter != "\t":  # an explicit delimiter reads the same
        assert [i.key for i in data.collect("csv", root, data.CsvSpec(file=name, delimiter=delimiter)).items] == \
            [i.key for i in got.items]


def _labels(root: Path, text: str, name="labels.csv", encoding="utf-8") -> None:
    (root / name).write_bytes(text.encode(encoding))


BAD_FILES = [  # (labels file contents, or (text, file name, encoding); None: no file), data params, the message


    (None, {}, "data.csv: raw/labels.csv not found; write the labels there or set data.csv"),
    ("", {}, "data.csv: raw/labels.csv is empty; its first line must be a header naming the columns"),
    ("path,label\n", {}, "data.csv: raw/labels.csv has a header but no rows"),
    ("file,class\ncat/img0.png,cat\n", {},
     "has no column 'path' (data.path_column) and no column 'label' (data.label_column); its header has 2 column(s): "
     "'file', 'class' (delimiter ','); set data.path_column and data.label_column to the header's name"),
    ("path;label\ncat/img0.png;cat\n", {"delimiter": ","},
     "read 1 column 'path;label' with the delimiter ','; it holds ';': set data.delimiter: ';'"),
    (("path,label\ncat/img0.png,cat\n", "labels.tsv"), {"csv": "labels.tsv"},
     "read 1 column 'path,label' with the auto-detected delimiter '\\t'; it holds ',': set data.delimiter: ','"),
    ("path,label\ncat/img0.png,cat\ncat/one, two.png,cat\n", {},
     "line 3 has 3 fields, the header 2 (delimiter ','); quote a field that contains the delimiter"),
    (("path,label\ncat/img0.png,cat\n", "labels.csv", "utf-16"), {}, "is not UTF-8 text"),
    ("path,label\ncat/img0.png,cat\n", {"split_column": "fold"}, "no column 'fold' (data.split_column)"),
    ("path,label,split\ncat/img0.png,cat,test\ndog/img0.png,dog,val\n", {"split_column": "split"},
     "data.split_column: no usable row of labels.csv has a training value (train or training) in column 'split'; "
     "found test, val"),
    ("path,label\ncat/missing.png,cat\n", {}, "none of its 1 rows is usable; the first: labels.csv line 2: file not found"),
    (None, {"csv": "cat"}, "data.csv: raw/cat is a folder"),
    (None, {"csv": "../labels.csv"}, "data.csv: '../labels.csv' is not a file inside data.root (raw)"),
]


@pytest.mark.parametrize("labels, params, message", BAD_FILES)
def test_a_bad_csv_file_ends_in_one_line(in_tmp, labels, params, message):
    root = make_tree(in_tmp / "raw", classes=("cat", "dog"), per_class=3)
    if labels is not None:
        _labels(root, *((labels,) if isinstance(labels, str) else labels))
    write_params(in_tmp, csv_params(**params))
    assert message in stage_error("prepare")
    assert not (in_tmp / "data/prepared").exists()


def test_python_m_stages_prepare_says_it_in_one_line_and_fails(in_tmp):
    root = make_tree(in_tmp / "raw", classes=("cat", "dog"), per_class=3)
    _labels(root, "path;label\ncat/img0.png;cat\n")
    write_params(in_tmp, csv_params(delimiter=","))
    r = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=in_tmp, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == cli.EXIT_USER_ERROR and r.stdout == ""
    assert r.stderr.splitlines() == ["prepare: data.csv: raw/labels.csv: read 1 column 'path;label' with the delimiter ','; "
                                     "it holds ';': set data.delimiter: ';'"]


SPELLINGS = {"train": ("train", "Training"), "val": ("VAL", "valid", "Validation"), "test": ("test", "TESTING")}


@pytest.mark.parametrize("layout", ["train", "train+val", "train+test", "train+val+test"])
def test_a_split_column_is_read_like_split_folders(tmp_path, layout):
    root = tmp_path / "raw"
    splits = layout.split("+")
    rows, split_of_key = [["path", "label", "split"]], {}
    for s, split in enumerate(splits):
        for c in ("a", "b"):
            for i in range(8 if split == "train" else 4):
                key = f"{split}/{c}/img{i}.png"
                write_image(root / key, seed=1000 * s + 100 * ord(c) + i)
                rows.append([key, c, SPELLINGS[split][i % len(SPELLINGS[split])]])  # any spelling, any case
                split_of_key[key] = split
    write_image(root / "extra" / "c.png", seed=7)
    write_image(root / "extra" / "x.png", seed=8)
    if len(splits) > 1:  # a class only in val or test rows
        rows.append(["extra/c.png", "c", splits[-1]])
    rows.append(["extra/x.png", "a", "holdout"])
    write_table(root / "labels.csv", rows)
    run_prepare(root, tmp_path / "out", source="csv", csv_spec=data.CsvSpec(split_column="split"))

    rows_of = {split: f"labels.csv rows with split={split}" for split in splits}
    report = json.loads((tmp_path / "out/prepared/report.json").read_text())
    assert report["splits"]["train"] == rows_of["train"]
    if "test" in splits:
        assert report["splits"]["test"] == rows_of["test"]
        assert report["splits"]["val"] == rows_of.get("val", report["splits"]["val"])
    if "val" not in splits:
        assert report["splits"]["val"].startswith("carved from labels.csv rows with split=train: ")
    if splits == ["train", "val"]:
        assert report["splits"]["test"].startswith("the other half of labels.csv rows with split=val: ")
    by_ref = {r["ref"]: r for r in manifest(tmp_path / "out")[1]}
    for key, split in split_of_key.items():
        r = by_ref[str(root / key)]
        assert r["status"] == "used" and r["origin"] == rows_of[split], r
        if split == "test" or (split == "val" and "test" in splits) or (split == "train" and "val" in splits):
            assert r["split"] == split and r["reason"] == f"{split}: in {rows_of[split]}", r
        elif split == "val":  # halved
            assert r["split"] in ("val", "test") and r["reason"].endswith(f"(in {rows_of['val']}, halved)"), r
        else:  # train rows, val (and test) carved by split key
            assert r["split"] in ("train", "val", "test") and r["reason"].endswith(f"(in {rows_of['train']})"), r
    holdout = by_ref[str(root / "extra/x.png")]
    assert holdout["status"] == "rejected" and holdout["reason"] == (
        f"labels.csv line {len(rows)}: split value 'holdout' in column 'split' is not one of train, training, val, valid, "
        "validation, test, testing (any letter case)")
    if splits == ["train"]:
        return
    c = by_ref[str(root / "extra/c.png")]
    assert c["status"] == "excluded" and c["reason"] == f"class 'c' has no training images in {rows_of['train']}"
    assert any(n.startswith(f"class sets differ: {rows_of[splits[-1]]} lack nothing and have ['c']") for n in report["notes"])


@pytest.mark.parametrize("tree", ["one tree", "Training/ + Testing/"])
def test_a_csv_of_a_trees_files_gives_the_trees_splits_and_pixels(tmp_path, tree):
    """A file's split key is its path relative to data.root whichever way its label arrives, and items
    are taken in a tree's order whatever the rows' order: the same files give the same splits and
    byte-identical prepared splits."""
    root = tmp_path / "raw"
    if tree == "one tree":
        make_tree(root, classes=("a", "b", "c"), per_class=10)
    else:
        make_tree(root / "Training", classes=("a", "b", "c"), per_class=8, seed=1)
        make_tree(root / "Testing", classes=("a", "b", "c"), per_class=3, seed=2)
    run_prepare(root, tmp_path / "tree")
    rows = [[p.relative_to(root).as_posix(), p.parent.name] + ([] if tree == "one tree" else [p.parts[-3]])
            for p in sorted(root.rglob("*.png"))]
    random.Random(0).shuffle(rows)
    write_table(root / "labels.csv", [["path", "label", "split"][: len(rows[0])], *rows])
    spec = data.CsvSpec(split_column=None if tree == "one tree" else "split")
    run_prepare(root, tmp_path / "csv", source="csv", csv_spec=spec)

    def placed(out):
        return {r["ref"]: (r["split"], r["split_key"], r["status"]) for r in manifest(out)[1] if r["ref"].endswith(".png")}

    assert placed(tmp_path / "tree") == placed(tmp_path / "csv") and len(placed(tmp_path / "csv")) == len(rows)
    assert splits_of(tmp_path / "tree") == splits_of(tmp_path / "csv")
    for f in sorted((tmp_path / "tree/prepared").glob("*")):
        if f.name.endswith((".npy", ".safetensors")) or f.name in ("classes.json", "preprocess.json"):
            assert f.read_bytes() == (tmp_path / "csv/prepared" / f.name).read_bytes(), f.name


def test_class_names_of_a_csv_feed_the_source_target_check(in_tmp):
    root = make_tree(in_tmp / "raw", classes=("cat", "dog", "owl"), per_class=2)
    write_table(root / "labels.csv", [["path", "label"], ["cat/img0.png", "cat"], ["dog/img0.png", "dog"],
                                      ["owl/img0.png", "owl"], ["owl/missing.png", "eel"]])
    assert data.class_names("csv", root) == ["cat", "dog", "owl"]  # eel's only row is rejected: no class
    p = csv_params(classes=["owl"])
    p["pretrained"]["source"] = "train"
    p["pretrained"]["train"]["classes"] = ["cat", "owl"]
    with pytest.raises(ParamsError, match=r"overlap on \['owl'\]"):
        validate(p)
    p["data"]["classes"] = [2]  # an index into the CSV's sorted classes
    with pytest.raises(ParamsError, match=r"overlap on \['owl'\]"):
        validate(p)


@pytest.mark.parametrize("change, message", [
    ({"delimiter": ";;"}, "data.delimiter: ';;' is not valid; give auto, tab, or one character"),
    ({"delimiter": "x"}, "data.delimiter: 'x' is not valid"),
    ({"csv": "/etc/labels.csv"}, "data.csv: '/etc/labels.csv' is not a file inside data.root (raw)"),
    ({"csv": "sub/../../labels.csv"}, "is not a file inside data.root"),
    ({"label_column": "path"}, "data.path_column and data.label_column both name the column 'path'"),
    ({"split_column": "label"}, "data.label_column and data.split_column both name the column 'label'"),
    ({"path_column": " "}, "data.path_column: empty"),
    ({"source": "tsv"}, "data.source: 'tsv' is not valid; choose one of: digits, fashion-mnist, imagefolder, csv"),
])
def test_csv_params_are_checked_on_load(change, message):
    with pytest.raises(ParamsError) as e:
        validate(csv_params(**change))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_csv_params_that_are_fine(tmp_path):
    p = validate(csv_params(delimiter="tab", csv="sub/labels.tsv", split_column="fold"))
    assert data.CsvSpec.from_params(p.data) == data.CsvSpec(file="sub/labels.tsv", split_column="fold", delimiter="tab")
    root = make_tree(tmp_path / "raw", classes=("a", "b"), per_class=2)
    write_table(root / "labels.csv", [["path", "label"], ["a/img0.png", "a"], ["b/img1.png", "b"]])
    abs_inside = data.CsvSpec(file=str(root / "labels.csv"))
    assert [i.key for i in data.collect("csv", root, abs_inside).items] == ["a/img0.png", "b/img1.png"]
