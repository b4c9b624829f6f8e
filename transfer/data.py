"""Datasets in, uint8 tensors out: sources, robust decoding, per-file splits, the manifest.

Every input file or array entry gets one manifest row: used (in a split), unused (over the
labelled budget or the evaluation cap), excluded (class not selected), ignored (hidden
files) or rejected (unreadable, with the reason). Images are decoded exactly once, here.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io as _io
import multiprocessing
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from transfer.cli import UserError
from transfer.io import write_text
from transfer.preprocess import INTERPOLATIONS, Spec

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# Where Debian's dataset-fashion-mnist package puts the IDX files.
FASHION_MNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
RESAMPLING = {name: Image.Resampling[name.upper()] for name in INTERPOLATIONS}  # a spec's interpolation -> PIL's filter


class DataError(UserError):
    """The dataset cannot be used as configured; the message says what to change."""


class BadImage(Exception):
    """One file cannot be used as an image; the message is the reason recorded in the manifest."""


@dataclass
class Item:
    ref: str  # file path or "<file>#<index>" for entries of an array file
    label: str  # class name
    key: str  # what the file's split is derived from: its path relative to data.root (posix), or the ref of an array entry
    presplit: str | None = None  # train/val/test for pre-split folder trees and CSV rows with a split column
    origin: str = ""  # the split folder it was read from ("Training/") or its CSV rows; empty for one tree
    path: Path | None = None
    array: np.ndarray | None = None  # (H, W) or (H, W, 3) uint8 for in-memory sources


@dataclass
class Collected:
    classes: list[str]  # every class the source has, in label order
    items: list[Item]
    skipped: list[dict] = field(default_factory=list)  # manifest rows for ignored/rejected-by-name files
    notes: list[str] = field(default_factory=list)
    layout: dict[str, str] = field(default_factory=dict)  # split -> its folder ("Testing/") or CSV rows, for pre-split data


# ---------------------------------------------------------------- decoding


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit scaled (not clipped), alpha composited over white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _resize_crop(img: Image.Image, spec: Spec) -> np.ndarray:
    """The shorter side resized to spec.resize_size with spec's filter, then the centre image_size square:
    the same pixels as torchvision's Resize(resize_size) + CenterCrop(image_size) on a PIL image (timm's
    eval transform is the same two steps)."""
    w, h = img.size
    r = spec.resize_size
    # The longer side as torchvision computes it: int(), not round().
    size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
    if size != img.size:
        img = img.resize(size, resample=RESAMPLING[spec.interpolation])
    s = spec.image_size
    left, top = int(round((size[0] - s) / 2.0)), int(round((size[1] - s) / 2.0))
    img = img.crop((left, top, left + s, top + s))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # (3, S, S)


def decode_file(path: Path, spec: Spec) -> np.ndarray:
    """Decode one image file fully and preprocess it as `spec` says, or raise BadImage with the reason."""
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            # Over Pillow's pixel limit is a decompression bomb: refuse it, don't just warn.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format == "JPEG":
                    # Decode at a reduced DCT scale (1/2, 1/4, 1/8) while the image stays at least the
                    # size it is resized to before the crop. 500x375 photos at 128 px (benchmarks/scale.py):
                    # mean |difference| 1.8 of 255 (p99 16) against a full decode, as much as choosing
                    # Lanczos (1.7, p99 12) or box (1.7, p99 13) over bilinear resizing changes; decode +
                    # resize 1.5x faster. At twice the target the difference was smaller, but draft never
                    # engaged there.
                    img.draft(None, (spec.resize_size, spec.resize_size))
                img.load()  # full decode: truncated data fails here (verify() would not notice)
                img = ImageOps.exif_transpose(img)
                return _resize_crop(_to_rgb(img), spec)
    except BadImage:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can read (wrong content for its extension?)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"unreadable or truncated image: {e}") from None


def decode_array(arr: np.ndarray, spec: Spec) -> np.ndarray:
    return _resize_crop(Image.fromarray(arr).convert("RGB"), spec)


# ---------------------------------------------------------------- sources


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_class_tree(folder: Path, root: Path, presplit: str | None, out: Collected) -> list[str]:
    """Items of one tree of class folders; hidden entries and non-image files get manifest rows."""
    names = []
    for class_dir in _class_dirs(folder):
        names.append(class_dir.name)
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() or p.is_symlink())
        if not any(f.suffix.lower() in IMAGE_EXTS and not _hidden(f, root) for f in files):
            out.notes.append(f"class folder {class_dir} has no image files; it is left out")
        for f in files:
            ref = str(f)
            if _hidden(f, root):
                out.skipped.append(dict(ref=ref, label=class_dir.name, split="", status="ignored", reason="hidden file or folder"))
            elif f.suffix.lower() not in IMAGE_EXTS:
                out.skipped.append(dict(ref=ref, label=class_dir.name, split="", status="rejected",
                                        reason=f"not an image extension ({f.suffix or 'none'})"))
            else:
                out.items.append(Item(ref=ref, label=class_dir.name, key=f.relative_to(root).as_posix(),
                                      presplit=presplit, path=f))
    for hidden_dir in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(".")):
        for f in sorted(p for p in hidden_dir.rglob("*") if p.is_file()):
            out.skipped.append(dict(ref=str(f), label="", split="", status="ignored", reason="hidden file or folder"))
    for f in sorted(folder.iterdir()):
        if f.is_file():
            status = "ignored" if f.name.startswith(".") else "rejected"
            out.skipped.append(dict(ref=str(f), label="", split="", status=status,
                                    reason="hidden file" if status == "ignored" else "file outside any class folder"))
    return names


# Folder names that real datasets use for their splits, compared case-insensitively.
SPLIT_FOLDER_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
LAYOUTS_EXPECTED = ("either class folders only (ROOT/<class>/<image>), or split folders only: one of train|training, "
                    "optionally one of val|valid|validation and one of test|testing (any letter case), each holding "
                    "class folders")


def split_of_folder(name: str) -> str | None:
    low = name.lower()
    return next((split for split, names in SPLIT_FOLDER_NAMES.items() if low in names), None)


def detect_layout(root: Path) -> dict[str, Path] | None:
    """The split folders of a pre-split tree ({"train": root/"Training", ...}), or None for one tree of
    class folders. Top-level folders that look like split names but do not form a valid layout are an
    error: read as classes, the model would learn which split a file came from."""
    folders = _class_dirs(root)
    by_split: dict[str, list[str]] = defaultdict(list)
    for folder in folders:
        split = split_of_folder(folder.name)
        if split:
            by_split[split].append(folder.name)
    if not by_split:
        return None
    others = [f.name for f in folders if not split_of_folder(f.name)]
    twice = {split: names for split, names in by_split.items() if len(names) > 1}
    found = ", ".join(f"{f.name}/" for f in folders)
    if others:
        problem = f"split folders beside other folders ({', '.join(others)})"
    elif twice:
        problem = "two folders for one split (" + "; ".join(" and ".join(n) for n in twice.values()) + ")"
    elif "train" not in by_split:
        problem = "no training folder"
    else:
        return {split: root / names[0] for split, names in by_split.items()}
    raise DataError(f"data.root: {root} holds {found}: {problem}. Expected {LAYOUTS_EXPECTED}.")


def _has_image(folder: Path, root: Path) -> bool:
    return any(f.suffix.lower() in IMAGE_EXTS and not _hidden(f, root) and (f.is_file() or f.is_symlink())
               for f in folder.rglob("*"))


def _require_folder(root: Path, what: str = "a folder of class sub-folders") -> None:
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder; point it at {what}")


def collect_imagefolder(root: Path) -> Collected:
    """One tree of class folders, or pre-split trees of class folders (see detect_layout)."""
    _require_folder(root)
    out = Collected(classes=[], items=[])
    layout = detect_layout(root)
    if layout:
        per_split = {split: _scan_class_tree(folder, root, split, out) for split, folder in layout.items()}
        out.layout = {split: folder.name + "/" for split, folder in layout.items()}
        for item in out.items:
            item.origin = out.layout[item.presplit]
        train_name = layout["train"].name
        train_classes = [c for c in per_split["train"] if any(i.label == c and i.presplit == "train" for i in out.items)]
        for split, names in per_split.items():
            missing, extra = sorted(set(train_classes) - set(names)), sorted(set(names) - set(train_classes))
            if split != "train" and (missing or extra):
                out.notes.append(f"class sets differ: {layout[split].name}/ lacks {missing or 'nothing'} and has "
                                 f"{extra or 'nothing'} beyond {train_name}/; only {train_name}/'s classes are used")
        out.classes = train_classes
        for item in out.items:
            if item.label not in train_classes:
                item.presplit = "excluded:" + f"class '{item.label}' has no training images in {train_name}/"
    else:
        names = _scan_class_tree(root, root, None, out)
        out.classes = [c for c in names if any(i.label == c for i in out.items)]
    if not out.classes:
        raise DataError(f"data.root: {root} has no class folders with images. Expected {LAYOUTS_EXPECTED}.")
    return out


# ---------------------------------------------------------------- labels in a CSV


CSV_DELIMITERS = ",;\t|"  # what data.delimiter: auto considers


@dataclass(frozen=True)
class CsvSpec:
    """Where a csv source's labels are: the data.csv file (relative to data.root) and its columns."""
    file: str = "labels.csv"
    path_column: str = "path"
    label_column: str = "label"
    split_column: str | None = None
    delimiter: str = "auto"  # auto | tab | one character

    @classmethod
    def from_params(cls, d) -> CsvSpec:
        """From params.yaml's data section (a Params or any object with these attributes)."""
        return cls(file=d.csv, path_column=d.path_column, label_column=d.label_column, split_column=d.split_column,
                   delimiter=d.delimiter)


def _inside(root: Path, path: str) -> str | None:
    """`path` (relative to root, or absolute; / or \\ as separators) as a posix path relative to root, or
    None when it leads outside root. Lexical, like the keys of a folder tree: symlinks are not followed."""
    path = path.replace("\\", "/")  # CSVs written on Windows
    base = os.path.abspath(root)
    full = os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))
    rel = os.path.relpath(full, base)
    if rel == "." or rel == ".." or rel.startswith("../") or os.path.isabs(rel):
        return None
    return Path(rel).as_posix()


def _read_csv_text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: Excel's byte-order mark is dropped
            return f.read()
    except FileNotFoundError:
        raise DataError(f"data.csv: {path} not found; write the labels there or set data.csv (a path relative to "
                        "data.root)") from None
    except IsADirectoryError:
        raise DataError(f"data.csv: {path} is a folder; set data.csv to the CSV file (relative to data.root)") from None
    except UnicodeDecodeError as e:
        raise DataError(f"data.csv: {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 CSV") from None


def _csv_delimiter(path: Path, text: str, spec: CsvSpec) -> str:
    """data.delimiter, or for auto: tab for .tsv; else the one of CSV_DELIMITERS that splits the header
    into fields naming the path and label columns; else csv.Sniffer's guess (the header check then says
    which columns it found); else a comma."""
    if spec.delimiter != "auto":
        return "\t" if spec.delimiter == "tab" else spec.delimiter
    if path.suffix.lower() == ".tsv":
        return "\t"
    for d in CSV_DELIMITERS:
        header = next(csv.reader(_io.StringIO(text, newline=""), delimiter=d), [])
        if {spec.path_column, spec.label_column} <= {name.strip() for name in header}:
            return d
    try:
        return csv.Sniffer().sniff(text[:65536], delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        return ","


def _csv_columns(path: Path, header: list[str], delimiter: str, spec: CsvSpec) -> dict[str, int]:
    """The index of each column the params name, or a one-line DataError saying what to set."""
    names = [name.strip() for name in header]
    wanted = {"path_column": spec.path_column, "label_column": spec.label_column}
    if spec.split_column is not None:
        wanted["split_column"] = spec.split_column
    missing = {param: name for param, name in wanted.items() if name not in names}
    if not missing:
        return {param: names.index(name) for param, name in wanted.items()}
    shown = "auto-detected " if spec.delimiter == "auto" else ""
    if len(names) == 1:
        other = next((d for d in CSV_DELIMITERS if d != delimiter and d in names[0]), None)
        if other is not None:
            raise DataError(f"data.csv: {path}: read 1 column {names[0]!r} with the {shown}delimiter {delimiter!r}; "
                            f"it holds {other!r}: set data.delimiter: {'tab' if other == chr(9) else repr(other)}")
    lacking = " and ".join(f"no column {name!r} (data.{param})" for param, name in missing.items())
    raise DataError(f"data.csv: {path} has {lacking}; its header has {len(names)} column(s): "
                    f"{', '.join(map(repr, names))} (delimiter {delimiter!r}); set "
                    f"{' and '.join('data.' + p for p in missing)} to the header's name")


def _csv_rows(path: Path, text: str, delimiter: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and (line number, fields) of each record; a record spans lines when a quoted field does.
    Blank lines are left out."""
    reader = csv.reader(_io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DataError(f"data.csv: {path} is empty; its first line must be a header naming the columns")
        rows, start = [], reader.line_num + 1
        for fields in reader:
            if any(f.strip() for f in fields):
                rows.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"data.csv: {path}: line {reader.line_num}: {e}") from None
    return header, rows


def collect_csv(root: Path, spec: CsvSpec) -> Collected:
    """Items listed in a CSV of path and label columns (paths relative to root), optionally a split
    column. Each row is an item or a rejected manifest row whose reason names its line; a problem with
    the file as a whole (not found, empty, a column missing, rows of the wrong width) is a DataError."""
    _require_folder(root, "the folder that data.csv and the paths in it are relative to")
    if _inside(root, spec.file) is None:
        raise DataError(f"data.csv: {spec.file!r} is outside data.root; give a path relative to data.root "
                        "(prepare's dependency on data.root then covers it)")
    path = root / spec.file
    text = _read_csv_text(path)
    delimiter = _csv_delimiter(path, text, spec)
    header, rows = _csv_rows(path, text, delimiter)
    columns = _csv_columns(path, header, delimiter, spec)
    if not rows:
        raise DataError(f"data.csv: {path} has a header but no rows")
    out = Collected(classes=[], items=[])
    first_line: dict[str, int] = {}  # key -> the line that listed it first
    for line, fields in rows:
        if len(fields) != len(header):
            raise DataError(f"data.csv: {path}: line {line} has {len(fields)} fields, the header {len(header)} "
                            f"(delimiter {delimiter!r}); quote a field that contains the delimiter, or set data.delimiter")
        raw, label = fields[columns["path_column"]].strip(), fields[columns["label_column"]].strip()
        value = fields[columns["split_column"]].strip() if "split_column" in columns else None
        key = _inside(root, raw) if raw else None
        where = f"{spec.file} line {line}"
        reason, split = None, None
        if not raw:
            reason = "empty path"
        elif key is None:
            reason = f"path {raw!r} is outside data.root"
        elif Path(key).suffix.lower() not in IMAGE_EXTS:
            reason = f"not an image extension ({Path(key).suffix or 'none'})"
        elif key in first_line:
            reason = f"duplicate path (of line {first_line[key]})"
        elif not label:
            reason = "empty label"
        elif value is not None and (split := split_of_folder(value)) is None:
            reason = (f"split value {value!r} in column {spec.split_column!r} is not one of "
                      f"{', '.join(n for names in SPLIT_FOLDER_NAMES.values() for n in names)} (any letter case)")
        elif not (root / key).exists():
            reason = "file not found"
        elif not (root / key).is_file():
            reason = "not a file (a folder?)"
        if key is not None:
            first_line.setdefault(key, line)
        ref = str(root / key) if key is not None else (raw or f"{path}:{line}")
        if reason is not None:
            out.skipped.append(dict(ref=ref, label=label, split="", status="rejected", reason=f"{where}: {reason}"))
        else:
            out.items.append(Item(ref=ref, label=label, key=key, presplit=split, path=root / key))
    if not out.items:
        raise DataError(f"data.csv: {path}: none of its {len(rows)} rows is usable; the first: {out.skipped[0]['reason']}")
    # The order of a folder tree (class, then path): prepared outputs do not change when the same labels
    # are exported in another row order.
    out.items.sort(key=lambda item: (item.label, Path(item.key)))
    listed = set(first_line)
    unlisted = sum(1 for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file() and not _hidden(f, root)
                   and f.relative_to(root).as_posix() not in listed)
    if unlisted:
        which = "1 image file" if unlisted == 1 else f"{unlisted} image files"
        out.notes.append(f"{which} under {root} not listed in {spec.file}: not used")
    if "split_column" in columns:
        _csv_layout(out, spec)
    else:
        out.classes = sorted({item.label for item in out.items})
    return out


def _csv_layout(out: Collected, spec: CsvSpec) -> None:
    """Rows with a split column read like split folders: their layout, classes and notes (see collect_imagefolder)."""
    present = {item.presplit for item in out.items}
    rows_of = {split: f"{spec.file} rows with {spec.split_column}={split}" for split in SPLIT_FOLDER_NAMES if split in present}
    if "train" not in rows_of:
        raise DataError(f"data.split_column: no usable row of {spec.file} has a training value (train or training) in column "
                        f"{spec.split_column!r}; found {', '.join(sorted(present))}. Label some rows train, or set "
                        "data.split_column: null to split by data.val_fraction and data.test_fraction")
    out.layout = rows_of
    out.classes = sorted({item.label for item in out.items if item.presplit == "train"})
    for split in rows_of:
        names = {item.label for item in out.items if item.presplit == split}
        missing, extra = sorted(set(out.classes) - names), sorted(names - set(out.classes))
        if split != "train" and (missing or extra):
            out.notes.append(f"class sets differ: {rows_of[split]} lack {missing or 'nothing'} and have "
                             f"{extra or 'nothing'} beyond {rows_of['train']}; only the training rows' classes are used")
    for item in out.items:
        item.origin = rows_of[item.presplit]
        if item.label not in out.classes:
            item.presplit = "excluded:" + f"class '{item.label}' has no training images in {rows_of['train']}"


def class_names(source: str, root: str | Path, csv_spec: CsvSpec | None = None) -> list[str]:
    """The classes a dataset has, in label order, without decoding anything (what collect() would find)."""
    if source == "digits":
        return [str(c) for c in range(10)]
    if source == "fashion-mnist":
        return list(FASHION_MNIST_CLASSES)
    root = Path(root)
    if source == "csv":
        return collect_csv(root, csv_spec or CsvSpec()).classes  # reads the CSV and stats the files, no decoding
    _require_folder(root)
    layout = detect_layout(root)
    tree = layout["train"] if layout else root
    return [d.name for d in _class_dirs(tree) if _has_image(d, root)]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file ({arr.size} of {int(np.prod(shape))} values)")
    return arr.reshape(shape)


def fashion_mnist_folder(root: Path) -> Path:
    """data.root if it holds the IDX files, else Debian's package, else torchvision's download."""
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    for folder in (root, FASHION_MNIST_SYSTEM):
        if all((folder / n).is_file() for n in names):
            return folder
    try:  # online fallback: torchvision knows the official mirrors and checksums
        from torchvision.datasets import FashionMNIST
        FashionMNIST(root=str(root / "torchvision"), download=True)
    except Exception as e:  # noqa: BLE001 - any failure here means "not available offline"
        raise DataError(
            f"Fashion-MNIST not found in {root} or {FASHION_MNIST_SYSTEM}, and the download failed ({e}). "
            f"Install Debian's dataset-fashion-mnist (make setup does) or copy {', '.join(names)} into {root}") from None
    return root / "torchvision" / "FashionMNIST" / "raw"


def collect_fashion_mnist(root: Path) -> Collected:
    folder = fashion_mnist_folder(root)
    out = Collected(classes=list(FASHION_MNIST_CLASSES), items=[])
    for images_name, labels_name in FASHION_MNIST_FILES.values():
        images, labels = _read_idx(folder / images_name), _read_idx(folder / labels_name)
        if len(images) != len(labels):
            raise DataError(f"{folder}: {images_name} and {labels_name} disagree in length")
        for i, (img, lab) in enumerate(zip(images, labels)):
            ref = f"{images_name}#{i}"
            out.items.append(Item(ref=ref, label=FASHION_MNIST_CLASSES[lab], key=ref, array=img))
    return out


def collect_digits() -> Collected:
    from sklearn.datasets import load_digits
    digits = load_digits()
    # 8x8 intensities 0..16 -> 0..255 uint8
    images = np.clip(digits.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    classes = [str(c) for c in digits.target_names]
    items = [Item(ref=f"sklearn-digits#{i}", label=classes[t], key=f"sklearn-digits#{i}", array=img)
             for i, (img, t) in enumerate(zip(images, digits.target))]
    return Collected(classes=classes, items=items)


def collect(source: str, root: str | Path, csv_spec: CsvSpec | None = None) -> Collected:
    """Every item of the source; csv_spec says where a csv source's labels are (its defaults otherwise)."""
    root = Path(root)
    if source == "digits":
        return collect_digits()
    if source == "fashion-mnist":
        return collect_fashion_mnist(root)
    if source == "imagefolder":
        return collect_imagefolder(root)
    if source == "csv":
        return collect_csv(root, csv_spec or CsvSpec())
    raise DataError(f"data.source: {source!r} is not valid; choose one of: digits, fashion-mnist, imagefolder, csv")


def resolve_classes(requested: list | None, available: list[str], key: str) -> list[str]:
    """Class names from a list of names or indices into `available`. Names win: an int whose str() is a
    class name selects that class (YAML reads a folder named 10 as the int 10), and any other int is an
    index into `available`."""
    if requested is None:
        return list(available)
    names = []
    for c in requested:
        if isinstance(c, int) and str(c) in available:
            names.append(str(c))
        elif isinstance(c, int) and 0 <= c < len(available):
            names.append(available[c])
        elif isinstance(c, str) and c in available:
            names.append(c)
        else:
            raise DataError(f"{key}: {c!r} is not a class of this dataset; valid: "
                            f"{', '.join(available)} (or indices 0-{len(available) - 1})")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"{key}: {requested!r} names {twice} twice (an index and a name of the same class?)")
    return names


# ---------------------------------------------------------------- splitting


# A file's split is a function of the file alone (its key) and data.split_seed: never of the other
# files, the classes chosen, the budgets or the training seed, so changing any of those moves no
# test image, and adding files to a class moves none of the files it had.


def split_key(key: str, split_seed: int, salt: str = "") -> float:
    """The file's number in [0, 1): the first 8 bytes of sha256("<split_seed>\\0<salt><key>") over 2**64."""
    digest = hashlib.sha256(f"{split_seed}\0{salt}{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def split_keys(items: list[Item], split_seed: int, salt: str = "") -> np.ndarray:
    return np.array([split_key(item.key, split_seed, salt) for item in items], dtype=np.float64)


@dataclass(frozen=True)
class Cut:
    split: str
    fraction: float
    label: str  # how reasons and report.json name the bound: "data.test_fraction 0.2"


def in_key_order(idx: np.ndarray, u: np.ndarray) -> np.ndarray:
    """idx sorted by split key (ties, which sha256 all but rules out, by position: still deterministic)."""
    return idx[np.lexsort((idx, u[idx]))]


def cut_rules(cuts: list[Cut], rest: str) -> dict[str, str]:
    """Each split's range of split keys, in words: the "how" of report.json and the reasons' wording."""
    rules, lo, labels = {}, 0.0, []
    for cut in cuts:
        hi = lo + cut.fraction
        rules[cut.split] = (f"split_key < {cut.label}" if not labels else
                            f"split_key in [{lo:g}, {hi:g}): {cut.label} above {' + '.join(labels)}")
        lo, labels = hi, labels + [cut.label]
    rules[rest] = f"split_key >= {labels[0]}" if len(labels) == 1 else f"split_key >= {lo:g} = {' + '.join(labels)}"
    return rules


def hash_split(u: np.ndarray, labels: np.ndarray, *, cuts: list[Cut], rest: str, class_names: list[str], fix: str,
               where: str = "") -> tuple[np.ndarray, list[str]]:
    """The split of each index and why, from its split key u. The cuts stack up from 0 (the first takes
    u < its fraction, the next the following range); `rest` takes the remainder. Thresholds, not counts:
    adding files to a class moves none of the others.

    Minimum-one rule, which only classes of a few files meet: when a class has no file in the range of
    a cut with a fraction above 0, or of `rest`, the cuts of that class move (in split key order) by
    the fewest files that give each such split one. A class with fewer files than that needs is a
    DataError naming it; `fix` says what to change."""
    names = [c.split for c in cuts] + [rest]
    need = [int(c.fraction > 0) for c in cuts] + [1]
    bounds = np.cumsum([c.fraction for c in cuts])
    rules = cut_rules(cuts, rest)
    split_of, reasons = np.empty(len(u), dtype=object), [""] * len(u)
    for c in np.unique(labels):
        idx = in_key_order(np.flatnonzero(labels == c), u)
        if len(idx) < sum(need):
            parts = ", ".join(f"{k} {name}" for k, name in zip(need, names) if k)
            raise DataError(f"class '{class_names[c]}' has {len(idx)} images, too few for {sum(need)} ({parts}); {fix}")
        by_threshold = np.searchsorted(bounds, u[idx], side="right")  # the split each file's key alone gives
        ends = np.searchsorted(u[idx], bounds, side="left").tolist() + [len(idx)]
        start = 0
        for j, end in enumerate(ends):
            end = min(max(end, start + need[j]), len(idx) - sum(need[j + 1:]))
            for k in range(start, end):
                i = idx[k]
                split_of[i] = names[j]
                if by_threshold[k] == j:
                    reasons[i] = f"{names[j]}: {rules[names[j]].replace('split_key', f'split_key {u[i]:.6f}', 1)}{where}"
                else:
                    reasons[i] = (f"{names[j]}: minimum-one rule (a class of a few files): the cuts of class "
                                  f"'{class_names[c]}' moved so that each split has a file, which took this one "
                                  f"(split_key {u[i]:.6f}) out of {names[by_threshold[k]]}{where}")
            start = end
    return split_of, reasons


def rank_in_class(idx: np.ndarray, labels: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of idx (one split's files): its rank by split key among its class's files there (1 =
    lowest), and how many those are. A budget or cap of k keeps ranks 1..k, so k=5 is within k=50."""
    rank, of = np.zeros(len(idx), dtype=np.int64), np.zeros(len(idx), dtype=np.int64)
    position = {i: p for p, i in enumerate(idx.tolist())}
    for c in np.unique(labels[idx]):
        ordered = in_key_order(idx[labels[idx] == c], u)
        for r, i in enumerate(ordered.tolist(), start=1):
            rank[position[i]], of[position[i]] = r, len(ordered)
    return rank, of


def decode_item(array: np.ndarray | None, path: Path | None, spec: Spec) -> tuple[np.ndarray | None, str | None]:
    """An in-memory array or a file, decoded: (array, None), or (None, the reason it was rejected)."""
    try:
        return (decode_array(array, spec) if array is not None else decode_file(path, spec)), None
    except BadImage as e:
        return None, str(e)


_spool = None  # the Spool decode jobs write into; set before the pool forks, so workers inherit it
# Fewer image files than this are decoded in this process: for a handful, forking a pool and feeding it
# costs more than it saves. A module constant so that tests can make a pool start on tiny data.
POOL_MIN_FILES = 256


def _decode_job(job: tuple) -> tuple[str | None, str | None]:
    row, array, path, spec = job
    arr, reason = decode_item(array, path, spec)
    if arr is None:
        return None, reason
    # The worker writes the pixels and hashes them itself: sending 48 KB arrays back through a pipe to
    # be copied again by the parent cost a third of the throughput on 2 cores.
    _spool.write(row, arr)
    return image_digest(arr), None


def worker_count(workers: int) -> int:
    """runtime.workers: 0 means every core this process may run on."""
    return workers or len(os.sched_getaffinity(0))


def decode_stream(items: list[Item], spec: Spec, workers: int, spool, first_row: int = 0,
                  rows: list[int] | None = None) -> Iterator[tuple[str | None, str | None]]:
    """Decode each item once, in parallel over `workers` processes, item k into row first_row + k of
    `spool` (a storage.Spool), or into row rows[k] when `rows` is given. Yields (digest of the pixels
    or None, rejection reason or None) in input order whatever the worker count, so outputs are
    byte-identical. A stream: memory stays flat, and a caller that stops early stops the workers."""
    global _spool
    _spool = spool
    jobs = ((first_row + k if rows is None else rows[k], item.array, item.path, spec) for k, item in enumerate(items))
    files = sum(item.array is None for item in items)
    # Arrays already in memory (IDX, digits) only need a resize: shipping them to workers and back
    # cost more than it saved (Fashion-MNIST 5-9 at 128 px: 11.1 s inline, 16.9 s with 2 workers).
    if workers <= 1 or files < POOL_MIN_FILES:
        yield from map(_decode_job, jobs)
        return
    # fork: workers inherit the imported modules instead of re-importing torch (2 s each), and the
    # spool's descriptor; the parent has run no torch op yet, so no thread pool is copied mid-flight.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_decode_job, jobs, chunksize=max(16, min(256, len(items) // (workers * 8))))


def check_rejected_fraction(*, rejected: list[dict], inputs: int, max_fraction: float, what: str,
                            report_path: Path | None = None) -> None:
    """Stop when more than data.max_rejected_fraction of the inputs are unreadable, listing the first."""
    fraction = len(rejected) / max(inputs, 1)
    if fraction > max_fraction:
        first = "; ".join(f"{r['path']}: {r['reason']}" for r in rejected[:3])
        where = f"Full list in {report_path}; first ones: " if report_path else "First ones: "
        raise DataError(f"{len(rejected)} of {inputs} {what} ({fraction:.1%}) are unreadable, more than "
                        f"data.max_rejected_fraction={max_fraction}. Fix or remove them, or raise the limit. {where}{first}")


def image_digest(arr: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()


def find_leaks(digests: list[str], splits: list[str], refs: list[str]) -> list[list[str]]:
    """Groups of identical decoded images (by digest) that sit in more than one split (test data leaking
    into training)."""
    by_hash = defaultdict(list)
    for digest, split, ref in zip(digests, splits, refs):
        by_hash[digest].append((split, ref))
    return [[f"{s}:{r}" for s, r in group] for group in by_hash.values() if len({s for s, _ in group}) > 1]


# index: the file's row in its split's files ({split}.images.npy), so a test image evaluate names (top
# losses) leads back to its file; empty for files in no split.
MANIFEST_FIELDS = ["ref", "label", "split", "split_key", "origin", "status", "reason", "index"]


def write_manifest(path: Path, rows: list[dict]) -> None:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())
