"""Prepared splits on disk, read a batch at a time.

A split is `{split}.images.npy` (uint8 (N, 3, S, S), a plain .npy file) beside `{split}.safetensors`
(labels and metadata). Images are written as a stream and read by row with positioned file reads,
never loaded whole: a stage's memory holds the batch it works on, whatever N is. Every reader of
prepared data (extract, finetune, evaluate, convert, the benchmark) goes through this module.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from transfer.cli import UserError
from transfer.io import NO_SPACE, atomic_open, load_tensors, no_space_error, save_tensors

IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024  # buffers one preadv takes


def images_file(folder: Path, split: str) -> Path:
    return Path(folder) / f"{split}.images.npy"


def labels_file(folder: Path, split: str) -> Path:
    return Path(folder) / f"{split}.safetensors"


def gather_rows(images: "Images", idx: np.ndarray, chunk: int = 256) -> Iterator[np.ndarray]:
    """Rows idx of images, one at a time, read `chunk` rows per call."""
    for start in range(0, len(idx), chunk):
        yield from images[torch.from_numpy(np.asarray(idx[start:start + chunk]))].numpy()


def _row_bytes(row: np.ndarray, shape: tuple[int, ...], what: str) -> bytes:
    if row.shape != shape or row.dtype != np.uint8:
        raise ValueError(f"{what} is {row.dtype} {row.shape}, expected uint8 {shape}")
    return np.ascontiguousarray(row).tobytes()


def write_split(folder: Path, split: str, images: Iterable[np.ndarray], count: int, image_size: int,
                labels: torch.Tensor, meta: dict) -> None:
    """Stream `count` uint8 (3, S, S) images into the split's .npy file (atomically), then its labels."""
    shape = (count, 3, image_size, image_size)
    with atomic_open(images_file(folder, split), "wb", size=int(np.prod(shape))) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        written = 0
        for image in images:
            f.write(_row_bytes(image, shape[1:], f"image {written} of {split}"))
            written += 1
        if written != count:
            raise ValueError(f"{split}: {written} images written, {count} announced")
    save_tensors(labels_file(folder, split), {"labels": labels}, meta=meta)


def _aligned_rows(n: int, row_shape) -> np.ndarray:
    """An uninitialised uint8 (n, *row_shape) array on a 64-byte boundary (torch's allocator), where
    numpy and bytearray start 16 bytes past one: the kernel copied the page cache into those at
    0.6 GB/s, against 1.6 GB/s into aligned memory (preadv on this project's VM)."""
    return torch.empty((n, *row_shape), dtype=torch.uint8).numpy()


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int]:
    """One descriptor for all the reads of one access (a batch), not one per row."""
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


class Spool:
    """A scratch file of `capacity` raw uint8 rows, written in any order by row number (by prepare's
    decode workers, each through its own positioned writes) and read back through Images: every image
    is decoded once into it, then each split copies the rows it keeps, so memory does not grow with the
    dataset. Rows never written read as zeros (the file is sparse). Removed on exit, also on failure.
    Being sparse, it meets a full disk on a row's write, not when created: that is an OutputError
    saying what the whole spool needs."""

    def __init__(self, path: Path, row_shape: tuple[int, ...], capacity: int):
        self.path, self.row_shape, self.capacity = Path(path), tuple(row_shape), int(capacity)
        self.row_bytes = int(np.prod(self.row_shape))

    def __enter__(self) -> "Spool":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(self.fd, self.capacity * self.row_bytes)
        except OSError as e:
            error = self._no_space(e) if e.errno in NO_SPACE else None
            self.__exit__()
            if error:
                raise error from None
            raise
        return self

    def _no_space(self, error: OSError) -> Exception:
        # The rows written so far are freed with the file (on exit), so the whole spool is what it
        # needs, and the space they hold counts as free.
        held = 0
        with contextlib.suppress(OSError):
            held = os.fstat(self.fd).st_blocks * 512
        return no_space_error(self.path, error, needed=self.capacity * self.row_bytes, reclaimed=held)

    def write(self, index: int, row: np.ndarray) -> None:
        """Row `index` := row. Safe from forked workers: positioned writes share no file offset."""
        if not 0 <= index < self.capacity:
            raise IndexError(f"row {index} outside a spool of {self.capacity}")
        data, pos = memoryview(_row_bytes(row, self.row_shape, f"row {index}")), index * self.row_bytes
        try:
            while data:
                done = os.pwrite(self.fd, data, pos)
                data, pos = data[done:], pos + done
        except OSError as e:
            if e.errno in NO_SPACE:
                raise self._no_space(e) from None
            raise

    def rows(self) -> "Images":
        return Images(self.path, 0, (self.capacity, *self.row_shape))

    def __exit__(self, *exc) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


class Images:
    """The images of one split, indexed like a uint8 tensor (len, shape, slices, index tensors), each
    access reading just those rows from the file."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...]):
        """Rows of shape[1:] starting `offset` bytes into `path` (see open() for a .npy file)."""
        self.path, self._offset = Path(path), offset
        self.shape, self.dtype = torch.Size(shape), torch.uint8
        self._row = int(np.prod(shape[1:]))

    @classmethod
    def open(cls, path: Path) -> "Images":
        """The images of a .npy file written by write_split."""
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        if dtype != np.uint8 or fortran or len(shape) != 4:
            raise ValueError(f"{path}: expected uint8 (N, 3, S, S) images, found {dtype} {shape}")
        return cls(path, offset, shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _fill(self, fd: int, views: list[memoryview], row: int) -> None:
        """Fill `views` (whole rows, in order) with the file's consecutive rows from `row` on: one preadv
        per IOV_MAX buffers, and again after a short read, which the kernel may return at any size."""
        views, pos, i = [v for v in views if len(v)], self._offset + row * self._row, 0
        while i < len(views):
            got = os.preadv(fd, views[i:i + IOV_MAX], pos)
            if got == 0:
                raise EOFError(f"{self.path}: truncated; re-run prepare")
            pos += got
            while got:
                if got >= len(views[i]):
                    got -= len(views[i])
                    i += 1
                else:
                    views[i], got = views[i][got:], 0

    def _read(self, fd: int, start: int, stop: int) -> np.ndarray:
        n = max(0, stop - start)
        out = _aligned_rows(n, self.shape[1:])
        self._fill(fd, [memoryview(out.reshape(-1))], start)
        return out

    def read_into(self, out: np.ndarray, rows: "slice | np.ndarray") -> None:
        """Rows `rows` (a slice of step 1, or row numbers in any order, repeats allowed) into `out`, a
        C-contiguous uint8 array holding exactly that many rows. Nothing is allocated, so several
        threads can each fill their part of one staging buffer (see transfer.feed)."""
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step != 1:
                raise ValueError(f"read_into takes a slice of step 1, not {step}")
            count = max(0, stop - start)
        else:
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            count = len(rows)
            if count and (rows.min() < 0 or rows.max() >= len(self)):
                raise IndexError(f"index out of range for {len(self)} images")
        if out.dtype != np.uint8 or not out.flags.c_contiguous or out.size != count * self._row:
            raise ValueError(f"read_into needs a C-contiguous uint8 array of {count} rows, got {out.dtype} {out.shape}")
        if count == 0:
            return
        flat = memoryview(out.reshape(-1))
        with _opened(self.path) as fd:
            if isinstance(rows, slice):
                self._fill(fd, [flat], start)
                return
            # Sorted, each run of consecutive file rows is one call that scatters the rows straight to
            # their places in `out` (a shuffled batch is mostly runs of one).
            order = np.argsort(rows, kind="stable")
            runs = np.split(order, np.flatnonzero(np.diff(rows[order]) != 1) + 1)
            for run in runs:
                self._fill(fd, [flat[k * self._row:(k + 1) * self._row] for k in run.tolist()], int(rows[run[0]]))

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step < 0:
                return self[torch.arange(start, stop, step)]
            with _opened(self.path) as fd:
                rows = self._read(fd, start, stop)
            return torch.from_numpy(np.ascontiguousarray(rows[::step]) if step != 1 else rows)
        scalar = isinstance(key, (int, np.integer)) or (torch.is_tensor(key) and key.dim() == 0)
        idx = torch.as_tensor(key).reshape(-1).long()
        if scalar and len(idx) and idx[0] < 0:  # images[-1], as a tensor allows
            idx = idx + len(self)
        out = _aligned_rows(len(idx), self.shape[1:])
        self.read_into(out, idx.numpy())
        return torch.from_numpy(out[0] if scalar else out)

    def __iter__(self):
        for start in range(0, len(self), 256):
            yield from self[start:start + 256]

    def rows(self, start: int, stop: int) -> "Images":
        """Rows [start, stop) as another Images, still read lazily (a rank's share of a split)."""
        start, stop = max(0, min(start, len(self))), max(0, min(stop, len(self)))
        return Images(self.path, self._offset + start * self._row, (max(0, stop - start), *self.shape[1:]))

    def to(self, device) -> torch.Tensor:
        """The whole split as one tensor on `device` (for code that wants it resident, e.g. on a GPU)."""
        return self[:].to(device)


def read_split(folder: Path, split: str) -> tuple[dict, dict]:
    """({"images": Images, "labels": int64 tensor}, meta) of a prepared split."""
    tensors, meta = load_tensors(labels_file(folder, split))
    images = Images.open(images_file(folder, split))
    if len(images) != len(tensors["labels"]):
        raise ValueError(f"{folder}/{split}: {len(images)} images but {len(tensors['labels'])} labels; re-run prepare")
    return {"images": images, "labels": tensors["labels"]}, meta


class ClassMismatchError(UserError):
    """The prepared data's classes are not the classes a model or head was trained on."""


def check_classes(*, folder: Path, data_meta: dict, model_classes: list[str], model_file: Path, fix: str) -> None:
    """Stop unless the prepared split's class list (data_meta, from read_split) equals the model's, order
    included: labels index the one and outputs the other, so after data.classes changed without the
    later stages re-running, scores and predictions would be silently reported under the wrong names."""
    data_classes = list(data_meta.get("classes", []))
    if data_classes != list(model_classes):
        raise ClassMismatchError(f"{folder} holds classes {data_classes}, but {model_file} was trained on "
                                 f"{list(model_classes)}; {fix}")
