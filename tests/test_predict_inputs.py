"""predict on the inputs users have: file names that are not UTF-8, links that lead nowhere or in a
circle, folders and files it may not read, a full disk for the CSV. The model is a stand-in that
calls an image light or dark by its mean brightness: the file handling is under test, not a network."""
import csv
import errno
import io as _io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, plain_spec
from stages import predict
from transfer import export
from transfer.io import write_json

# The stand-in model, in the process that runs predict: logits for (dark, light) from the mean brightness.
STAND_IN = """
import sys
import numpy as np
from stages import predict
from transfer import cli

def brightness(batch):
    m = batch.reshape(len(batch), -1).mean(1) / 255.0
    return np.stack([1 - m, m], axis=1).astype(np.float32) * 10

predict.make_runner = lambda model_dir, meta, spec, onnx, device: (brightness, "a stand-in model")
cli.run("predict", lambda: predict.main(sys.argv[1:]))
"""


def brightness(batch: np.ndarray) -> np.ndarray:
    m = batch.reshape(len(batch), -1).mean(1) / 255.0
    return np.stack([1 - m, m], axis=1).astype(np.float32) * 10


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "export"
    write_json(folder / "model.json", dict(classes=["dark", "light"], image_size=8, preprocess=export.preprocess_entry(plain_spec(8))))
    return folder


def image(path, value: int) -> None:
    """A flat image, written through a bytes path when the name is not UTF-8."""
    Image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(os.fsencode(path), format="PNG")


def run_predict(cwd, *args, **env) -> subprocess.CompletedProcess:
    """The predict command (with the stand-in model), arguments passed as the bytes a shell would pass."""
    argv = [os.fsencode(a) for a in (sys.executable, "-c", STAND_IN, *args)]
    return subprocess.run(argv, cwd=cwd, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TRANSFER_PROGRESS": "0", **env})


def test_names_that_are_not_utf8_are_written_to_the_csv_and_the_table(tmp_path, model_dir):
    """`caf\\xe9.png` (Latin-1 bytes, not UTF-8) in a folder and named directly: classified, with the
    byte shown as \\xe9 in a CSV that is valid UTF-8 and in the printed table; a valid UTF-8 name as is."""
    new = tmp_path / "new"
    new.mkdir()
    latin1 = os.fsdecode(os.fsencode(new) + b"/caf\xe9.png")  # as Python gives a name it cannot decode
    image(latin1, 240)
    image(new / "café.png", 10)
    direct = os.fsdecode(b"direct-\xff.png")
    image(tmp_path / direct, 15)
    r = run_predict(tmp_path, "new", direct, "--out", "p.csv", "--model", model_dir)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    rows = {row["path"]: row for row in csv.DictReader(_io.StringIO((tmp_path / "p.csv").read_bytes().decode("utf-8")))}
    assert {p: (row["status"], row["label_1"]) for p, row in rows.items()} == {
        "new/caf\\xe9.png": ("ok", "light"), "new/café.png": ("ok", "dark"), "direct-\\xff.png": ("ok", "dark")}
    table = r.stdout.decode("utf-8").splitlines()
    assert {line.split()[0] for line in table[1:]} == set(rows)
    assert "3 images classified, 0 unreadable" in r.stderr.decode()
    # A terminal that cannot show é either: the table still prints, with \xe9 for it.
    r = run_predict(tmp_path, "new", "--out", "-", "--model", model_dir, PYTHONIOENCODING="ascii")
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert {line.split()[0] for line in r.stdout.decode("ascii").splitlines()[1:]} == {"new/caf\\xe9.png"}


@pytest.mark.timeout(120)  # a link loop followed for ever, or a read from a named pipe, would hang here
def test_every_path_gets_a_row_links_to_nowhere_and_loops_included(tmp_path, model_dir, monkeypatch):
    photos, other = tmp_path / "photos", tmp_path / "other"
    (photos / "sub").mkdir(parents=True)
    other.mkdir()
    image(photos / "good.png", 240)
    image(photos / "sub" / "deep.png", 10)
    image(other / "far.png", 240)
    os.symlink("nowhere.png", photos / "gone.png")  # broken
    os.symlink("missing_dir", photos / "gone_folder")  # broken, no image extension: could have been a folder
    os.symlink("loop.png", photos / "loop.png")  # a loop of one
    os.symlink(".", photos / "again")  # a cycle: the folder itself
    os.symlink("..", photos / "sub" / "up")  # a cycle: the folder above
    os.symlink(other, photos / "elsewhere")  # a linked folder: searched
    os.symlink("nowhere", photos / ".hidden")  # hidden: skipped, as hidden files are
    os.mkfifo(photos / "pipe.png")
    (tmp_path / "empty").mkdir()
    os.symlink("nowhere.jpg", tmp_path / "lost.jpg")
    os.symlink("b.jpg", tmp_path / "a.jpg")
    os.symlink("a.jpg", tmp_path / "b.jpg")
    monkeypatch.setattr(predict, "make_runner", lambda *a: (brightness, "a stand-in model"))
    rows, _, _ = predict.predict(targets=[str(photos), str(tmp_path / "lost.jpg"), str(tmp_path / "a.jpg"),
                                          str(tmp_path / "empty"), str(tmp_path / "missing.png")],
                                 model_dir=model_dir, top_k=1, batch_size=4, onnx=False, device="cpu", workers=1)
    got = [(r["path"][len(str(tmp_path)) + 1:], r["reason"] or r["label_1"]) for r in rows]
    assert got == [
        ("photos/elsewhere/far.png", "light"),
        ("photos/gone.png", "broken link (its target nowhere.png does not exist)"),
        ("photos/gone_folder", "broken link (its target missing_dir does not exist)"),
        ("photos/good.png", "light"),
        ("photos/loop.png", "symlink loop (too many levels of symbolic links)"),
        ("photos/pipe.png", "not a regular file (a pipe, socket or device)"),
        ("photos/sub/deep.png", "dark"),
        ("lost.jpg", "broken link (its target nowhere.jpg does not exist)"),
        ("a.jpg", "symlink loop (too many levels of symbolic links)"),
        ("empty", "a folder with no image files"),
        ("missing.png", "no such file"),
    ]


class Denied:
    """The os module, except that `paths` cannot be listed or opened: what a user without the
    permission meets (the tests may run as root, who may read everything)."""

    def __init__(self, *paths):
        self.paths = {str(p) for p in paths}

    def __getattr__(self, name):
        return getattr(os, name)

    def _check(self, path):
        if str(path) in self.paths:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def scandir(self, path):
        self._check(path)
        return os.scandir(path)

    def listdir(self, path):
        self._check(path)
        return os.listdir(path)

    def open(self, path, *args, **kw):
        self._check(path)
        return os.open(path, *args, **kw)


def test_a_folder_or_file_it_may_not_read_is_a_row_saying_so(tmp_path, model_dir, monkeypatch):
    photos = tmp_path / "photos"
    (photos / "locked").mkdir(parents=True)
    image(photos / "locked" / "inside.png", 10)
    image(photos / "secret.png", 10)
    image(photos / "open.png", 240)
    monkeypatch.setattr(predict, "os", Denied(photos / "locked", photos / "secret.png"))
    monkeypatch.setattr(predict, "make_runner", lambda *a: (brightness, "a stand-in model"))
    rows, _, _ = predict.predict(targets=[str(photos)], model_dir=model_dir, top_k=1, batch_size=4, onnx=False,
                                 device="cpu", workers=1)
    assert [(r["path"][len(str(photos)) + 1:], r["reason"] or r["label_1"]) for r in rows] == [
        ("locked", "permission denied"), ("open.png", "light"), ("secret.png", "permission denied")]


def test_a_full_disk_for_the_csv_is_one_line(tmp_path, model_dir):
    image(tmp_path / "a.png", 240)
    r = run_predict(tmp_path, "a.png", "--out", "out/p.csv", "--model", model_dir,
                    TRANSFER_FAULT="enospc-mid-write:p.csv")
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr.decode(), r.stderr.decode()
    assert lines[-1].startswith("predict: could not write out/p.csv: no space left on device (needed ~")
    assert list((tmp_path / "out").iterdir()) == []
