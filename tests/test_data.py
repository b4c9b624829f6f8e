"""prepare on messy folders: every file accounted for, bad ones rejected with a reason."""
import csv
import hashlib
import io as _io
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_tree, plain_spec, write_image
from stages.prepare import prepare
from transfer import data, storage
from transfer.data import DataError
from transfer.io import load_tensors


def run_prepare(root, out, image_size=8, **kw):
    args = dict(source="imagefolder", root=str(root), classes=None, spec=plain_spec(image_size), val_fraction=0.2, test_fraction=0.2,
                train_per_class=None, eval_per_class=None, max_rejected_fraction=0.5, split_seed=0,
                out_dir=out / "prepared", metrics_path=out / "metrics.json")
    args.update(kw)
    return prepare(**args)


def manifest(out):
    with open(out / "prepared" / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    by_name = {Path(r["ref"]).name: r for r in rows}
    return by_name, rows


def split_key(key: str, split_seed: int = 0) -> float:
    """The README's rule written out again, so the tests check the rule and not the code's own helper."""
    return int.from_bytes(hashlib.sha256(f"{split_seed}\0{key}".encode()).digest()[:8], "big") / 2 ** 64


def by_rule(u: float, *cuts: tuple[str, float], rest: str = "train") -> str:
    """The split the thresholds give a split key: cuts stacked from 0, e.g. ("test", 0.2), ("val", 0.1)."""
    top = 0.0
    for split, fraction in cuts:
        top += fraction
        if u < top:
            return split
    return rest


def splits_of(out, status=("used",)) -> dict[str, str]:
    """ref -> split of the manifest rows with one of these statuses."""
    return {r["ref"]: r["split"] for r in manifest(out)[1] if r["status"] in status}


def test_messy_folder_every_file_accounted(tmp_path):
    root = make_tree(tmp_path / "raw", classes=("ants", "bees"), per_class=8)
    a = root / "ants"
    (a / "zero.jpg").write_bytes(b"")
    (a / "text.jpg").write_text("this is not a jpeg")
    buf = _io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(buf, format="JPEG")
    (a / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = _io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    (a / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (a / "notes.txt").write_text("hello")
    (a / ".DS_Store").write_bytes(b"\0\1")
    write_image(root / ".ipynb_checkpoints" / "x.png", seed=5)
    write_image(a / ".ipynb_checkpoints" / "y.png", seed=6)
    (root / "empty_class").mkdir()
    # Unusual but fine: upper-case extension, CMYK, grayscale, 16-bit, palette, RGBA.
    write_image(root / "bees" / "UPPER.PNG", seed=7)
    write_image(root / "bees" / "cmyk.jpg", seed=8, mode="CMYK")
    write_image(root / "bees" / "gray.png", seed=9, mode="L")
    Image.fromarray(np.full((10, 10), 65535, np.uint16)).save(root / "bees" / "white16.png")
    write_image(root / "bees" / "palette.png", seed=10, mode="P")
    Image.fromarray(np.zeros((10, 10, 4), np.uint8)).save(root / "bees" / "transparent.png")  # fully transparent

    counts = run_prepare(root, tmp_path / "out")
    rows, all_rows = manifest(tmp_path / "out")
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    assert sorted(r["ref"] for r in all_rows) == files and counts["inputs"] == len(files)  # one row per file
    for name in ("zero.jpg", "text.jpg", "cut.jpg", "cut.png", "notes.txt"):
        assert rows[name]["status"] == "rejected", name
    assert "empty" in rows["zero.jpg"]["reason"] and "truncated" in rows["cut.png"]["reason"]
    assert "extension" in rows["notes.txt"]["reason"]
    for name in (".DS_Store", "x.png", "y.png"):
        assert rows[name]["status"] == "ignored"
    for name in ("UPPER.PNG", "cmyk.jpg", "gray.png", "white16.png", "palette.png", "transparent.png"):
        assert rows[name]["status"] == "used", name
    report = json.loads((tmp_path / "out" / "prepared" / "report.json").read_text())
    assert {Path(r["path"]).name for r in report["rejected"]} == {"zero.jpg", "text.jpg", "cut.jpg", "cut.png", "notes.txt"}
    assert any("empty_class" in n for n in report["notes"])
    assert json.loads((tmp_path / "out" / "prepared" / "classes.json").read_text()) == ["ants", "bees"]
    assert counts["rejected"] == 5


def test_conversions_are_correct_not_clipped():
    assert data._to_rgb(Image.fromarray(np.full((2, 2), 65535, np.uint16))).getpixel((0, 0)) == (255, 255, 255)
    assert data._to_rgb(Image.fromarray(np.full((2, 2), 32768, np.uint16))).getpixel((0, 0)) == (128, 128, 128)
    assert data._to_rgb(Image.fromarray(np.zeros((2, 2, 4), np.uint8))).getpixel((0, 0)) == (255, 255, 255)
    assert data._to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_decompression_bomb_rejected(tmp_path, monkeypatch):
    path = write_image(tmp_path / "big.png", seed=0, size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px: over the limit, under 2x
    with pytest.raises(data.BadImage, match="decompression bomb"):
        data.decode_file(path, plain_spec(8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # over 2x: Pillow raises outright
    with pytest.raises(data.BadImage, match="decompression bomb"):
        data.decode_file(path, plain_spec(8))
    from PIL import ImageFile
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on globally


def test_too_many_rejections_stop_with_the_report(tmp_path):
    root = make_tree(tmp_path / "raw", per_class=4)
    for i in range(3):
        (root / "ants" / f"bad{i}.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"3 of 11 input files .* more than data.max_rejected_fraction=0.1"):
        run_prepare(root, tmp_path / "out", max_rejected_fraction=0.1)
    assert len(json.loads((tmp_path / "out" / "prepared" / "report.json").read_text())["rejected"]) == 3
    assert not (tmp_path / "out" / "prepared" / "train.safetensors").exists()


def test_root_without_class_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "a.png", seed=0)
    with pytest.raises(DataError, match="no class folders with images"):
        run_prepare(tmp_path / "flat", tmp_path / "out")
    with pytest.raises(DataError, match="is not a folder"):
        run_prepare(tmp_path / "missing", tmp_path / "out")


def test_presplit_trees_with_differing_classes_and_leaks(tmp_path):
    root = tmp_path / "hymenoptera"
    make_tree(root / "train", classes=("ants", "bees"), per_class=6, seed=1)
    make_tree(root / "val", classes=("ants", "bees", "wasps"), per_class=4, seed=2)
    shutil.copy(root / "train" / "ants" / "img0.png", root / "val" / "ants" / "leaked.png")
    counts = run_prepare(root, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "prepared" / "report.json").read_text())
    assert any("class sets differ" in n and "wasps" in n for n in report["notes"])
    assert report["splits"] == {"train": "train/", "val": "half of val/: split_key >= 0.5, at least one per class",
                                "test": "the other half of val/: split_key < 0.5, at least one per class"}
    assert len(report["leaks"]) == 1 and any("leaked.png" in r for r in report["leaks"][0])
    assert counts["leaked_groups"] == 1
    rows = [r for r in manifest(tmp_path / "out")[1] if "wasps" in r["ref"]]
    assert len(rows) == 4 and all(r["status"] == "excluded" for r in rows)
    assert counts["train_images"] == 12 and counts["val_images"] + counts["test_images"] == 9


def test_digits_split_budget_and_manifest(tmp_path):
    counts = run_prepare("unused", tmp_path / "out", source="digits", classes=[5, "6", 7], image_size=16,
                         train_per_class=5, eval_per_class=20)
    assert counts == {"inputs": 1797, "rejected": 0, "leaked_groups": 0, "classes": 3, "train_images": 15,
                      "val_images": 60, "test_images": 60}
    train, meta = storage.read_split(tmp_path / "out" / "prepared", "train")
    assert train["images"].dtype == torch.uint8 and train["images"].shape == (15, 3, 16, 16)
    assert torch.bincount(train["labels"]).tolist() == [5, 5, 5] and meta["classes"] == ["5", "6", "7"]
    statuses = [r["status"] for r in manifest(tmp_path / "out")[1]]
    from sklearn.datasets import load_digits
    selected = int(np.isin(load_digits().target, [5, 6, 7]).sum())
    assert statuses.count("used") == 135 and statuses.count("unused") == selected - 135
    assert statuses.count("excluded") == 1797 - selected
    again = run_prepare("unused", tmp_path / "again", source="digits", classes=[5, "6", 7], image_size=16,
                        train_per_class=5, eval_per_class=20)
    assert again == counts
    for name in ("train.images.npy", "train.safetensors"):
        assert (tmp_path / "again/prepared" / name).read_bytes() == (tmp_path / "out/prepared" / name).read_bytes()


def test_budget_larger_than_data_and_unknown_class(tmp_path):
    with pytest.raises(DataError, match="data.train_per_class: 500 is more than the training images"):
        run_prepare("x", tmp_path / "out", source="digits", classes=[1], train_per_class=500)
    with pytest.raises(DataError, match="data.classes: 'zebra' is not a class"):
        run_prepare("x", tmp_path / "out", source="digits", classes=["zebra"])


def test_fashion_mnist_from_idx_files(tmp_path):
    import gzip

    folder = tmp_path / "fm"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in imgs.shape) + imgs.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.tobytes())
    collected = data.collect("fashion-mnist", folder)
    assert len(collected.items) == 60 and collected.classes[9] == "Ankle boot"
    assert collected.items[41].ref == "t10k-images-idx3-ubyte.gz#1" and collected.items[41].label == "Trouser"


@pytest.mark.skipif(not data.FASHION_MNIST_SYSTEM.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_download_path_through_a_local_mirror(tmp_path, monkeypatch):
    """No IDX files in data.root or the system folder: torchvision's download runs, with its md5
    checks, against a mirror on 127.0.0.1 serving the real files."""
    import functools
    import http.server
    import threading

    from torchvision.datasets import FashionMNIST

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(data.FASHION_MNIST_SYSTEM))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(FashionMNIST, "mirrors", [f"http://127.0.0.1:{server.server_port}/"])
        # Debian re-compressed the archives, so torchvision's md5 table gets the served files' md5s.
        import hashlib
        served = [(name, hashlib.md5((data.FASHION_MNIST_SYSTEM / name).read_bytes()).hexdigest())
                  for name, _ in FashionMNIST.resources]
        monkeypatch.setattr(FashionMNIST, "resources", served)
        monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM", tmp_path / "no-system-copy")
        folder = data.fashion_mnist_folder(tmp_path / "root")
        assert folder == tmp_path / "root" / "torchvision" / "FashionMNIST" / "raw"
        assert len(data.collect("fashion-mnist", tmp_path / "root").items) == 70000
    finally:
        server.shutdown()
        server.server_close()
    # Offline (nothing listens there any more): a clear error saying how to supply the files.
    with pytest.raises(DataError, match="Install Debian's dataset-fashion-mnist"):
        data.fashion_mnist_folder(tmp_path / "elsewhere")


# ---------------------------------------------------------------- layouts as datasets ship them


def _rows_by_origin(out):
    _, rows = manifest(out)
    return rows


@pytest.mark.parametrize("train_name, test_name", [("train", "test"), ("Training", "Testing"), ("TRAIN", "Test")])
def test_train_and_test_folders_without_val(tmp_path, train_name, test_name):
    """train/ + test/ was read as one tree with classes 'test' and 'train': the model learnt the split."""
    root = tmp_path / "raw"
    make_tree(root / train_name, classes=("cat", "dog"), per_class=10, seed=1)
    make_tree(root / test_name, classes=("cat", "dog"), per_class=3, seed=2)
    counts = run_prepare(root, tmp_path / "out", val_fraction=0.2)
    assert json.loads((tmp_path / "out/prepared/classes.json").read_text()) == ["cat", "dog"]
    assert counts["test_images"] == 6 and counts["val_images"] + counts["train_images"] == 20
    rows = _rows_by_origin(tmp_path / "out")
    for r in rows:  # test files go to test and nowhere else; val is carved from the training folder by split key
        assert r["origin"] == (f"{test_name}/" if f"/{test_name}/" in r["ref"] else f"{train_name}/"), r
        assert (r["split"] == "test") == (r["origin"] == f"{test_name}/"), r
        if r["origin"] == f"{train_name}/" and "minimum-one" not in r["reason"]:
            assert r["split"] == by_rule(split_key(str(Path(r["ref"]).relative_to(root))), ("val", 0.2)), r
    assert {r["label"] for r in rows if r["split"] == "val"} == {"cat", "dog"}  # at least one per class
    report = json.loads((tmp_path / "out/prepared/report.json").read_text())
    assert report["splits"] == {"train": f"{train_name}/", "test": f"{test_name}/",
                                "val": f"carved from {train_name}/: split_key < data.val_fraction 0.2, at least one per class"}


def test_all_three_split_folders_any_case(tmp_path):
    root = tmp_path / "raw"
    make_tree(root / "Train", classes=("a", "b"), per_class=5, seed=1)
    make_tree(root / "VALIDATION", classes=("a", "b"), per_class=2, seed=2)
    make_tree(root / "testing", classes=("a", "b"), per_class=3, seed=3)
    counts = run_prepare(root, tmp_path / "out")
    assert (counts["train_images"], counts["val_images"], counts["test_images"]) == (10, 4, 6)
    rows = _rows_by_origin(tmp_path / "out")
    assert {(r["origin"], r["split"]) for r in rows} == {("Train/", "train"), ("VALIDATION/", "val"), ("testing/", "test")}


def test_train_folder_alone_is_split_like_one_tree(tmp_path):
    root = tmp_path / "raw"
    make_tree(root / "training", classes=("a", "b", "c"), per_class=10)
    counts = run_prepare(root, tmp_path / "out", val_fraction=0.1, test_fraction=0.2)
    assert counts["train_images"] + counts["val_images"] + counts["test_images"] == 30
    assert json.loads((tmp_path / "out/prepared/classes.json").read_text()) == ["a", "b", "c"]
    rows = [r for r in manifest(tmp_path / "out")[1] if r["status"] == "used"]
    assert {(r["label"], r["split"]) for r in rows} == {(c, s) for c in "abc" for s in ("train", "val", "test")}
    for r in rows:
        if "minimum-one" not in r["reason"]:
            assert r["split"] == by_rule(split_key(f"training/{r['label']}/{Path(r['ref']).name}"), ("test", 0.2), ("val", 0.1))


@pytest.mark.parametrize("folders, problem", [
    (("train", "cats"), "split folders beside other folders (cats)"),
    (("val", "test"), "no training folder"),
    (("train", "Training", "val"), "two folders for one split (Training and train)"),
])
def test_split_names_that_do_not_form_a_layout_stop(tmp_path, folders, problem):
    root = tmp_path / "raw"
    for i, name in enumerate(folders):
        make_tree(root / name, classes=("a", "b"), per_class=4, seed=i)
    with pytest.raises(DataError) as e:
        run_prepare(root, tmp_path / "out")
    msg = str(e.value)
    assert problem in msg and "Expected either class folders only" in msg and "\n" not in msg
    assert not (tmp_path / "out" / "prepared").exists()
    with pytest.raises(DataError, match="no training folder|beside other|two folders"):
        data.class_names("imagefolder", root)


def test_small_classes_split_per_class_or_name_the_key(tmp_path):
    """12 classes x 4 images ended in scikit-learn's ValueError; the minimum-one rule gives every class a
    file in each split, and a class too small for every split names it and the keys to change, in one line."""
    root = make_tree(tmp_path / "raw", classes=[f"c{i:02d}" for i in range(12)], per_class=4)
    counts = run_prepare(root, tmp_path / "out", val_fraction=0.1, test_fraction=0.2)
    assert counts["train_images"] + counts["val_images"] + counts["test_images"] == 48
    rows = [r for r in manifest(tmp_path / "out")[1] if r["status"] == "used"]
    for c in range(12):
        assert sorted({r["split"] for r in rows if r["label"] == f"c{c:02d}"}) == ["test", "train", "val"], c
    moved = [r for r in rows if "minimum-one" in r["reason"]]
    assert moved  # 4 files, 0.2 and 0.1: most classes lack a val file by the thresholds alone
    for r in rows:
        u = split_key(f"{r['label']}/{Path(r['ref']).name}")
        assert f"split_key {u:.6f}" in r["reason"] and (r in moved) == (r["split"] != by_rule(u, ("test", 0.2), ("val", 0.1))), r
    with pytest.raises(DataError) as e:
        run_prepare(root, tmp_path / "out2", val_fraction=0.1, test_fraction=0.2, train_per_class=3)
    assert "data.train_per_class: 3 is more than the training images" in str(e.value)
    fewest = min(sum(r["split"] == "train" and r["label"] == f"c{c:02d}" for r in rows) for c in range(12))
    assert f"lower it to at most {fewest}, or add images" in str(e.value) and fewest < 3
    small = make_tree(tmp_path / "small", classes=("a", "b"), per_class=2)
    with pytest.raises(DataError) as e:
        run_prepare(small, tmp_path / "out3", val_fraction=0.1, test_fraction=0.2)
    msg = str(e.value)
    assert "class 'a' has 2 images, too few for 3 (1 test, 1 val, 1 train)" in msg
    assert "data.val_fraction/data.test_fraction (now 0.1/0.2)" in msg and "\n" not in msg
    assert not (tmp_path / "out3" / "prepared" / "train.safetensors").exists()
    run_prepare(small, tmp_path / "out4", val_fraction=0.0, test_fraction=0.2)  # what the message suggests works


def test_split_sizes_are_checked_before_decoding(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "raw", classes=("a", "b"), per_class=2)
    monkeypatch.setattr(data, "decode_stream", lambda *a, **k: pytest.fail("decoded before the sizes were checked"))
    with pytest.raises(DataError, match="too few"):
        run_prepare(root, tmp_path / "out")


def test_halving_val_needs_two_per_class_and_says_so(tmp_path):
    root = tmp_path / "raw"
    make_tree(root / "train", classes=("a", "b"), per_class=5)
    make_tree(root / "val", classes=("a", "b"), per_class=1)
    with pytest.raises(DataError, match="in val/: halving it into val and test needs 2 per class"):
        run_prepare(root, tmp_path / "out")


def test_empty_test_folder_for_the_chosen_classes_is_an_error(tmp_path):
    root = tmp_path / "raw"
    make_tree(root / "train", classes=("a", "b"), per_class=5)
    make_tree(root / "test", classes=("c",), per_class=3)
    with pytest.raises(DataError, match="the test split is empty"):
        run_prepare(root, tmp_path / "out")


def test_class_names_match_what_collect_finds(tmp_path):
    root = tmp_path / "raw"
    make_tree(root / "Training", classes=("b", "a"), per_class=3)
    (root / "Training" / "empty").mkdir()
    make_tree(root / "Testing", classes=("a", "b"), per_class=2)
    assert data.class_names("imagefolder", root) == data.collect("imagefolder", root).classes == ["a", "b"]
    assert data.class_names("fashion-mnist", "anywhere")[0] == "T-shirt/top"
    assert data.class_names("digits", "anywhere") == [str(i) for i in range(10)]


def test_parallel_decode_gives_identical_outputs_for_any_worker_count(tmp_path):
    root = make_tree(tmp_path / "raw", classes=("a", "b", "c"), per_class=100, ext=".jpg")
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        counts = run_prepare(root, out, workers=workers)
        outs[workers] = {p.name: p.read_bytes() for p in sorted((out / "prepared").iterdir())}
        assert counts["rejected"] == 1 and counts["inputs"] == 301
    assert outs[1] == outs[2]


def reference(img: Image.Image, spec) -> np.ndarray:
    """torchvision's eval transform on the PIL image, independent of transfer.data: Resize(shorter side to
    round(S / crop_pct), spec's filter) + CenterCrop(S), as (3, S, S) uint8."""
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(round(spec.image_size / spec.crop_pct),
                                               interpolation=transforms.InterpolationMode(spec.interpolation)),
                             transforms.CenterCrop(spec.image_size)])
    return np.asarray(tf(img.convert("RGB"))).transpose(2, 0, 1)


def prepared_pixels(out) -> set[bytes]:
    return {bytes(np.ascontiguousarray(img)) for split in ("train", "val", "test")
            for img in storage.read_split(out / "prepared", split)[0]["images"][:].numpy()}


@pytest.mark.parametrize("interpolation, crop_pct", [("bicubic", 0.875), ("lanczos", 0.6)])
def test_prepare_resizes_and_crops_files_and_arrays_as_the_spec_says(tmp_path, interpolation, crop_pct):
    """Every prepared image is exactly torchvision's Resize + CenterCrop of its source with the spec's filter
    and crop: files of both orientations, and in-memory arrays (digits)."""
    spec = plain_spec(16, interpolation, crop_pct)
    root = tmp_path / "raw"
    for i in range(10):
        write_image(root / "ab"[i % 2] / f"{i}.png", seed=i, size=(23, 17) if i < 5 else (15, 26))
    run_prepare(root, tmp_path / "files", spec=spec)
    with_spec = {bytes(reference(Image.open(f), spec)) for f in root.rglob("*.png")}
    assert prepared_pixels(tmp_path / "files") == with_spec
    plain = {bytes(reference(Image.open(f), plain_spec(16))) for f in root.rglob("*.png")}
    assert not with_spec & plain  # the filter and the crop change every image

    run_prepare("unused", tmp_path / "arrays", source="digits", classes=[5, 6], spec=spec)
    arrays = [item.array for item in data.collect_digits().items if item.label in ("5", "6")]
    assert prepared_pixels(tmp_path / "arrays") == {bytes(reference(Image.fromarray(a), spec)) for a in arrays}
    assert json.loads((tmp_path / "arrays/prepared/preprocess.json").read_text()) == {
        "image_size": 16, "resize_size": round(16 / crop_pct), "crop_pct": crop_pct, "interpolation": interpolation, "origin": {}}


def test_jpeg_draft_targets_the_size_before_the_crop(tmp_path, monkeypatch):
    """Large JPEGs decode at a reduced DCT scale, never below the size they are resized to before the crop
    (128 px for a 64 px crop of half the image), and differ from a full decode by less than two ordinary
    resize filters differ from each other."""
    from dataclasses import replace

    from PIL import JpegImagePlugin
    from skimage import data as photos

    path = tmp_path / "cat.jpg"
    Image.fromarray(photos.chelsea()).resize((1000, 750), Image.Resampling.BICUBIC).save(path, quality=90)
    spec = plain_spec(64, "bilinear", crop_pct=0.5)
    drafts, real_draft = [], JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, size):
        result = real_draft(self, mode, size)
        drafts.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    drafted = data.decode_file(path, spec).astype(int)
    assert drafts == [((128, 128), (250, 188))]  # 1/4 scale; 1/8 (125 x 94) would be below 128

    def full(s):
        with Image.open(path) as img:
            img.load()
            return reference(img, s).astype(int)

    base = full(spec)
    filters = [np.abs(base - full(replace(spec, interpolation=m))).mean() for m in ("bicubic", "lanczos", "box")]
    difference = np.abs(drafted - base).mean()
    # Draft mode was used, and changed the image no more than choosing another standard filter does.
    assert 0 < difference <= max(filters), (difference, filters)


def test_a_class_without_readable_training_images_stops_prepare(tmp_path):
    """Pre-split: every b in train/ is unreadable while val/ and test/ have some; training without b and
    then scoring it on test would be silently wrong."""
    root = tmp_path / "raw"
    make_tree(root / "train", classes=("a",), per_class=6)
    for i in range(3):
        (root / "train" / "b").mkdir(parents=True, exist_ok=True)
        (root / "train" / "b" / f"bad{i}.png").write_bytes(b"")
    make_tree(root / "val", classes=("a", "b"), per_class=2, seed=1)
    make_tree(root / "test", classes=("a", "b"), per_class=2, seed=2)
    with pytest.raises(DataError, match=r"classes \['b'\] have no readable training images \(train/\)"):
        run_prepare(root, tmp_path / "out", max_rejected_fraction=0.5)


def test_a_class_named_twice_is_caught(tmp_path):
    with pytest.raises(DataError, match=r"names \['T-shirt/top'\] twice"):
        data.resolve_classes([0, "T-shirt/top"], data.FASHION_MNIST_CLASSES, "data.classes")


def test_integer_classes_are_folder_names_where_such_a_folder_exists(tmp_path):
    """Class folders 1..10 sort as 1, 10, 2, ...: `classes: [1, 2]` (ints, as YAML reads them) selects the
    folders 1 and 2, not the second and third folders (10 and 2); an int that names no class is an index.
    prepare (data.classes) and the source task (pretrained.train.classes) share the rule."""
    from transfer import params

    root = make_tree(tmp_path / "raw", classes=[str(i) for i in range(1, 11)], per_class=5)
    available = data.class_names("imagefolder", root)
    assert available[:3] == ["1", "10", "2"]
    assert data.resolve_classes([1, 2, 10], available, "data.classes") == ["1", "2", "10"]
    assert data.resolve_classes([0, "3"], available, "data.classes") == ["1", "3"]  # 0 names no folder: index 0
    with pytest.raises(DataError, match=r"data.classes: \[0, 1\] names \['1'\] twice"):
        data.resolve_classes([0, 1], available, "data.classes")
    run_prepare(root, tmp_path / "out", classes=[1, 2])
    assert json.loads((tmp_path / "out/prepared/classes.json").read_text()) == ["1", "2"]
    raw = params.defaults()
    raw["data"].update(source="imagefolder", root=str(root), classes=[2, 3])
    raw["pretrained"].update(source="train")
    raw["pretrained"]["train"]["classes"] = [1, 2]
    with pytest.raises(params.ParamsError, match=r"overlap on \['2'\]"):
        params.validate(raw)


def test_source_task_replaces_unreadable_files_and_decodes_alike_with_any_worker_count(tmp_path, monkeypatch):
    """pretrain's source task decodes into a spool, in parallel from data.POOL_MIN_FILES files (lowered
    here, so that classes of ~100 tiny files use a pool): every class gets per_class readable images,
    unreadable files are replaced and reported, no row is left unwritten, and 1 or 2 workers give the
    same images. The pools started are counted: a comparison of two inline decodes would prove nothing."""
    import multiprocessing

    from stages.pretrain import source_task

    started = []
    real_context = multiprocessing.get_context

    class Counting:
        """A multiprocessing context that records the size of each Pool it starts."""

        def __init__(self, method=None):
            self.ctx = real_context(method)

        def Pool(self, processes=None, *args, **kw):
            started.append(processes)
            return self.ctx.Pool(processes, *args, **kw)

        def __getattr__(self, name):
            return getattr(self.ctx, name)

    monkeypatch.setattr(data.multiprocessing, "get_context", Counting)
    monkeypatch.setattr(data, "POOL_MIN_FILES", 64)
    root = make_tree(tmp_path / "raw", classes=("a", "b", "c"), per_class=100, ext=".jpg")
    for i in range(4):
        (root / "a" / f"broken{i}.jpg").write_bytes(b"not a jpeg")
    seen, pools = {}, {}
    for workers in (1, 2):
        started.clear()
        with source_task(source="imagefolder", root=str(root), classes=None, spec=plain_spec(16), per_class=95, split_seed=0,
                         max_rejected_fraction=0.1, scratch=tmp_path / f"scratch{workers}", workers=workers) as task:
            images = torch.cat([task[s][0][:] for s in ("train", "val")])
            labels = torch.cat([task[s][1] for s in ("train", "val")])
            assert torch.bincount(labels).tolist() == [95, 95, 95]
            assert images.flatten(1).amax(1).min() > 0  # every image was written (an unwritten row reads as zeros)
            assert task["tried"] == 285 + len(task["rejected"]) and len(task["rejected"]) >= 1
            assert all("unreadable" in r["reason"] or "not an image" in r["reason"] for r in task["rejected"])
            seen[workers] = (images, labels, task["rejected"])
        pools[workers] = list(started)
        assert not (tmp_path / f"scratch{workers}").exists()
    assert pools == {1: [], 2: [2, 2, 2]}  # one pool of 2 workers per class with 2, none with 1
    assert torch.equal(seen[1][0], seen[2][0]) and torch.equal(seen[1][1], seen[2][1]) and seen[1][2] == seen[2][2]
    with pytest.raises(DataError, match="pretrained.train.per_class: 101 is more than the 100 readable images of source class 'a'"):
        with source_task(source="imagefolder", root=str(root), classes=None, spec=plain_spec(16), per_class=101, split_seed=0,
                         max_rejected_fraction=0.1, scratch=tmp_path / "scratch3", workers=2):
            pass


# ---------------------------------------------------------------- a split that belongs to the file


def run_digits(out, **kw):
    args = dict(source="digits", classes=[5, 6, 7, 8, 9], image_size=8, train_per_class=5, eval_per_class=15)
    run_prepare("unused", out, **{**args, **kw})
    return {r["ref"]: (r["label"], r["split"]) for r in manifest(out)[1] if r["status"] == "used"}


@pytest.mark.parametrize("change", [dict(classes=[6, 7, 8, 9]), dict(classes=[5, 6, 7, 8]), dict(train_per_class=None),
                                    dict(train_per_class=50), dict(eval_per_class=30), dict(eval_per_class=None)])
def test_no_used_file_changes_split_when_other_data_params_change(tmp_path, change):
    """One random stream drawn class by class made the test split depend on everything: on digits,
    train_per_class 5 vs null kept 34 of 75 test images, and dropping class 5 kept 7 of the others' 60.
    Now the test split is the same whatever the classes and the budget, and a larger budget or cap
    only adds files (5 within 50 within all)."""
    base = run_digits(tmp_path / "base")
    other = run_digits(tmp_path / "other", **change)
    kept_classes = {str(c) for c in change.get("classes", [5, 6, 7, 8, 9])}
    base = {ref: v for ref, v in base.items() if v[0] in kept_classes}
    assert base.items() <= other.items()  # every file used before is used again, in the same split
    if "eval_per_class" not in change:
        assert {r for r, v in base.items() if v[1] == "test"} == {r for r, v in other.items() if v[1] == "test"}
    assert sum(v[1] == "test" for v in base.values()) == 15 * len(kept_classes)


def test_the_training_seed_moves_no_file_and_split_seed_does(in_tmp):
    """prepare read `seed`, so a second training seed was also a second test set: seeds could not be
    compared on the same images. data.split_seed is now the only seed prepare reads."""
    from conftest import tiny_params, write_params
    from stages import prepare as stage

    outputs, test = {}, {}
    for seed, split_seed in ((0, 0), (7, 0), (0, 1)):
        write_params(in_tmp, tiny_params(seed=seed, data={"split_seed": split_seed}))
        stage.main()
        outputs[seed, split_seed] = {p.name: p.read_bytes() for p in sorted((in_tmp / "data/prepared").iterdir())}
        test[seed, split_seed] = {r for r, s in splits_of(in_tmp / "data").items() if s == "test"}
    assert outputs[0, 0] == outputs[7, 0]
    assert len(test[0, 0]) == len(test[0, 1]) == 75 and len(test[0, 0] & test[0, 1]) < 40  # another sample


@pytest.mark.parametrize("caps", [dict(), dict(train_per_class=5, eval_per_class=4)])
def test_adding_files_to_a_class_moves_none_of_its_files(tmp_path, caps):
    """New photos of a class reshuffled the whole class. Now a file keeps its split: without caps every
    file stays where it was (train only gains); with a budget and caps, new files can take the place of
    old ones (lower split keys come first), but no file moves between train, val and test."""
    root = make_tree(tmp_path / "raw", classes=("a", "b"), per_class=40)
    run_prepare(root, tmp_path / "before", **caps)
    for i in range(40, 60):
        write_image(root / "a" / f"img{i}.png", seed=5000 + i)
    run_prepare(root, tmp_path / "after", **caps)
    before, after = splits_of(tmp_path / "before", ("used", "unused")), splits_of(tmp_path / "after", ("used", "unused"))
    used_before, used_after = splits_of(tmp_path / "before"), splits_of(tmp_path / "after")
    assert all(after[ref] == split for ref, split in used_before.items() if ref in used_after)
    assert {r: s for r, s in used_before.items() if "/b/" in r} == {r: s for r, s in used_after.items() if "/b/" in r}
    if not caps:
        assert used_before.items() <= used_after.items()
        assert len([r for r, s in used_after.items() if s == "train" and "/a/" in r]) > \
            len([r for r, s in used_before.items() if s == "train" and "/a/" in r])
    assert len(before) == 80 and len(after) == 100


@pytest.mark.parametrize("layout", ["train+val", "train+test"])
def test_presplit_folders_keep_their_meaning_and_carving_is_per_file(tmp_path, layout):
    """Folders decide: train/ files only ever train (or carved val), test/ files only test. What is carved
    (val from train/, test as half of val/) went by one random stream, so dropping a class or adding
    files moved the others; now it is the file's split key alone."""
    root = tmp_path / "raw"
    other = "val" if layout == "train+val" else "test"
    make_tree(root / "train", classes=("a", "b", "c"), per_class=12, seed=1)
    make_tree(root / other, classes=("a", "b", "c"), per_class=12, seed=2)
    runs = {"all": dict(), "no a": dict(classes=["b", "c"])}
    for name, kw in runs.items():
        run_prepare(root, tmp_path / name, **kw)
    for i in range(12, 18):
        write_image(root / "train" / "b" / f"img{i}.png", seed=7000 + i)
        write_image(root / other / "b" / f"img{i}.png", seed=8000 + i)
    run_prepare(root, tmp_path / "added")
    seen = [splits_of(tmp_path / name) for name in ("all", "no a", "added")]
    for ref in seen[0]:
        folder = Path(ref).relative_to(root).parts[0]
        splits = {s[ref] for s in seen if ref in s}
        assert len(splits) == 1, (ref, splits)  # the same split in every run that uses the file
        split = splits.pop()
        u = split_key(Path(ref).relative_to(root).as_posix())
        if folder == "test":
            assert split == "test"
        elif folder == "val":  # halved: split key below 0.5 to test
            assert split == by_rule(u, ("test", 0.5), rest="val")
        elif other == "val":
            assert split == "train"
        else:  # no val/: val carved from train/ by data.val_fraction (0.2 in run_prepare)
            assert split == by_rule(u, ("val", 0.2)), ref
    for r in manifest(tmp_path / "all")[1]:  # and the manifest says which rule placed each file
        if r["status"] == "used":
            folder = Path(r["ref"]).relative_to(root).parts[0]
            carved = folder == "val" or (folder == "train" and other == "test")
            why = f"(in {folder}/{', halved' if folder == 'val' else ''})" if carved else f": in {folder}/"
            assert r["reason"].startswith(f"{r['split']}: ") and r["reason"].endswith(why), r


def test_manifest_records_each_files_split_key_and_why(tmp_path):
    """Used rows had an empty reason and unused ones said 'over the labelled budget or evaluation cap'."""
    run_prepare("unused", tmp_path / "out", source="digits", classes=[5, 6], image_size=8, val_fraction=0.1,
                train_per_class=5, eval_per_class=15)
    rows = manifest(tmp_path / "out")[1]
    assert set(rows[0]) == set(data.MANIFEST_FIELDS) and "split_key" in rows[0]
    ranks = defaultdict(list)
    for r in rows:
        u = split_key(r["ref"])
        assert r["split_key"] == f"{u:.6f}", r
        if r["status"] not in ("used", "unused"):
            continue
        pool = by_rule(u, ("test", 0.2), ("val", 0.1))
        rule = {"test": f"test: split_key {u:.6f} < data.test_fraction 0.2;",
                "val": f"val: split_key {u:.6f} in [0.2, 0.3): data.val_fraction 0.1 above data.test_fraction 0.2;",
                "train": f"train: split_key {u:.6f} >= 0.3 = data.test_fraction 0.2 + data.val_fraction 0.1;"}[pool]
        cap, key = (5, "data.train_per_class") if pool == "train" else (15, "data.eval_per_class")
        rank, of = (int(x) for x in r["reason"].split("; rank ")[1].split(" by")[0].split(" of "))
        assert r["reason"] == f"{rule} rank {rank} of {of} by split_key among its class's {pool} files, " \
                              f"{'within' if r['status'] == 'used' else 'over'} {key} {cap}", r
        assert (r["status"] == "used") == (rank <= cap) and r["split"] == (pool if r["status"] == "used" else "")
        ranks[r["label"], pool].append((u, rank))
    for pairs in ranks.values():  # rank 1 is the lowest split key of the class's files in that split
        assert [rank for _, rank in sorted(pairs)] == list(range(1, len(pairs) + 1))
    report = json.loads((tmp_path / "out/prepared/report.json").read_text())
    assert report["splits"]["test"] == ("split_key < data.test_fraction 0.2, at least one per class; "
                                        "the 15 lowest split_keys of each class (data.eval_per_class)")
    assert "sha256('0\\0<key>')" in report["split_key"]


def test_source_task_files_and_their_split_belong_to_the_files(tmp_path):
    """The source task drew its files and its 90/10 split from `seed`: a larger per_class re-split the
    files it shared with a smaller one. Now per_class 20 uses the first 20 of per_class 40's files in
    the same split, and val is the files with split_key < 0.1 (at least one per class)."""
    from stages.pretrain import source_task

    root = make_tree(tmp_path / "raw", classes=("a", "b"), per_class=60)
    key_of = {data.decode_file(p, plain_spec(16)).tobytes(): p.relative_to(root).as_posix() for p in root.rglob("*.png")}
    assert len(key_of) == 120  # every image distinct
    chosen = {}
    for per_class in (20, 40):
        with source_task(source="imagefolder", root=str(root), classes=None, spec=plain_spec(16), per_class=per_class,
                         split_seed=0, max_rejected_fraction=0.0, scratch=tmp_path / "scratch") as task:
            chosen[per_class] = {split: {key_of[img.numpy().tobytes()] for img in task[split][0][:]} for split in ("train", "val")}
    for split in ("train", "val"):
        assert chosen[20][split] <= chosen[40][split]
    for per_class, parts in chosen.items():
        for c in "ab":
            mine = {k: split for split, keys in parts.items() for k in keys if k.startswith(f"{c}/")}
            assert len(mine) == per_class
            below = {k for k in mine if split_key(k) < 0.1}
            # the threshold, or the minimum-one rule: the lowest split key when none is below 0.1
            assert {k for k, s in mine.items() if s == "val"} == (below or {min(mine, key=split_key)})


def test_prepare_decodes_only_the_files_the_splits_take(tmp_path, monkeypatch):
    """With a budget and caps, prepare decodes the files the splits take and no others. An unreadable one
    among them is rejected and the next readable file by split key takes its place, so the splits are
    exactly the ones a run decoding every file gives (here: the caps' lowest keys of its splits). An
    unreadable file beyond the caps is never opened: unused, not rejected, and report.json says how many
    files were not decoded."""
    root = make_tree(tmp_path / "raw", classes=("a", "b"), per_class=40)
    key = {p: split_key(str(p.relative_to(root))) for p in root.rglob("*.png")}
    train_a = sorted((u, p) for p, u in key.items() if p.parent.name == "a" and by_rule(u, ("test", 0.2), ("val", 0.2)) == "train")
    taken_bad, ignored_bad = train_a[0][1], train_a[-1][1]  # the lowest train key of class a, and the highest
    for p in (taken_bad, ignored_bad):
        p.write_bytes(b"not an image")
    full = run_prepare(root, tmp_path / "full")  # no caps: every file is decoded
    decoded = []
    real = data.decode_stream

    def counting(items, *a, **k):
        decoded.extend(i.ref for i in items)
        return real(items, *a, **k)

    monkeypatch.setattr(data, "decode_stream", counting)
    capped = run_prepare(root, tmp_path / "capped", train_per_class=3, eval_per_class=4)
    rows = {r["ref"]: r for r in manifest(tmp_path / "capped")[1]}
    used = [ref for ref, r in rows.items() if r["status"] == "used"]
    assert capped["train_images"] == 6 and capped["val_images"] + capped["test_images"] >= 14
    # Decoded: the used files and the one unreadable file the budget reached for, each once.
    assert sorted(decoded) == sorted(used + [str(taken_bad)]) and len(set(decoded)) == len(decoded)
    assert rows[str(taken_bad)]["status"] == "rejected" and rows[str(ignored_bad)]["status"] == "unused"
    assert capped["rejected"] == 1 and full["rejected"] == 2
    # The splits are the full run's, cut to the lowest split keys of each class.
    whole = splits_of(tmp_path / "full")
    for split, cap in (("train", 3), ("val", 4), ("test", 4)):
        for c in ("a", "b"):
            expect = sorted((key[Path(ref)], ref) for ref, s in whole.items() if s == split and Path(ref).parent.name == c)[:cap]
            got = sorted((key[Path(ref)], ref) for ref in used if rows[ref]["split"] == split and Path(ref).parent.name == c)
            assert got == expect, (split, c)
    assert str(train_a[1][1]) in used  # the next train file of class a took the unreadable one's place
    notes = json.loads((tmp_path / "capped" / "prepared" / "report.json").read_text())["notes"]
    assert any(n.startswith(f"{80 - len(used) - 1} of 80 files of the selected classes were not decoded") for n in notes), notes
