"""Files in and out: atomic writes, the one safe weights loader, verified downloads.

- Every output goes through a temporary file in the same folder and os.replace, so a killed
  stage leaves either the old file or the new one, never half of one. The file gets the
  permissions the umask gives (0644 under 022), as open() would, not mkstemp's private 0600.
  A temporary file left by a killed write is removed by the next write of the same output.
- A full disk (or quota) is an OutputError, one line naming the output, about how much it needed
  and how much is free where it goes; the temporary file is removed.
- Weights are read from safetensors, or from torch files with weights_only=True and nothing
  else: a checkpoint that needs arbitrary unpickling is refused, never retried unsafely.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import pickle
import re
import signal
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterator

from safetensors import SafetensorError

from transfer.cli import UserError

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that handle tensors, not here: the file helpers also serve
# `predict --onnx`, which must run where only onnxruntime, Pillow and numpy are installed.

# Wrappers that training code adds in front of every key: DataParallel/DDP and torch.compile.
KEY_PREFIXES = ("module.", "_orig_mod.")

# Fault injection for the tests that prove writes are atomic, as "ACTION-POINT[:NAME]": at POINT of a
# file's write (named NAME, if given) ACTION happens. Points: "mid-write", after the first piece of the
# file has reached it (any writer: atomic_open's file checks after each write), "before-replace", with
# the data complete but not yet renamed. Actions: "kill" SIGKILLs this process, "enospc" raises the
# OSError a full disk gives. A fixed delay cannot land inside a write reliably.
FAULT_ENV = "TRANSFER_FAULT"
CHUNK = 1 << 20
# What a full file system or quota raises: the stage says so in one line (OutputError), not a traceback.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _fault_point(point: str, path: Path) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, _, name = spec.partition(":")
    action, _, where = kind.partition("-")
    if where != point or (name and path.name != name):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


class _FaultyFile:
    """The file atomic_open yields while FAULT_ENV is set: every write is flushed to the temporary file
    and followed by the mid-write fault point, so a fault lands inside the file whatever fills it
    (write_bytes' chunks, torch.save's records, a stream's pieces)."""

    def __init__(self, f: IO, path: Path):
        self._f, self._path = f, path

    def write(self, data) -> int:
        n = self._f.write(data)
        self._f.flush()
        _fault_point("mid-write", self._path)
        return n

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def _umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it, which
    would briefly give any other thread's new files the wrong mode)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class WeightsError(UserError):
    """A weights file is unsafe, unreadable or does not fit the model."""


class ChecksumError(WeightsError):
    """A downloaded file's sha256 is not the expected one."""


class OutputError(UserError):
    """An output cannot be written because its file system or the user's quota is full."""


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _mount_point(folder: Path) -> str:
    path = os.path.realpath(folder)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def no_space_error(path: Path, error: OSError, *, needed: int | None, written: int = 0,
                   reclaimed: int = 0) -> OutputError:
    """The one line for a write of `path` that found its disk or quota full. `needed`: the file's size
    where the writer knows it (else what had been written is a lower bound). The free space is what
    the user has to work with once the partial file is gone: read after it was removed, or plus the
    `reclaimed` bytes it still holds."""
    what = "disk quota exceeded" if error.errno == errno.EDQUOT else "no space left on device"
    need = f"needed ~{_size(needed)}" if needed else f"needed more than the {_size(written)} written"
    try:
        st = os.statvfs(path.parent)
        free = f"{_size(st.f_bavail * st.f_frsize + reclaimed)} free on {_mount_point(path.parent)}"
    except OSError:
        free = "free space unknown"
    return OutputError(f"could not write {path}: {what} ({need}, {free}); free some space there and re-run")


# mkstemp's names: the prefix, 8 random characters, the suffix.
_TEMP_RANDOM = r"[a-z0-9_]{8}"


def _remove_stale_temps(path: Path) -> None:
    """Delete temporary files of `path` left by writes that were killed (SIGKILL, power loss). A live
    writer holds an flock on its temporary file until it has renamed it, so it is never touched."""
    pattern = re.compile(re.escape(f".{path.name}.") + _TEMP_RANDOM + re.escape(".tmp"))
    with os.scandir(path.parent) as entries:
        stale = [e.path for e in entries if pattern.fullmatch(e.name)]
    for tmp in stale:
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a write in progress (another process)
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", *, size: int | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`. A full disk
    raises OutputError with `size` (the expected bytes, where the caller knows them) as what was needed."""
    path = Path(path)
    tmp = lock = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        while True:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            # Held until the rename (on a duplicate, as closing the file would release it): marks the
            # temporary file as in use for _remove_stale_temps in other processes.
            lock = os.dup(fd)
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:
                break
            # Another writer of the same output (torchrun ranks downloading one file) took it for stale
            # between mkstemp and the lock, and unlinked it: start on a new one.
            os.close(lock)
            os.close(fd)
            lock = tmp = None
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield _FaultyFile(f, path) if os.environ.get(FAULT_ENV) else f
            f.flush()
            os.fsync(f.fileno())
        _fault_point("before-replace", path)
        os.replace(tmp, path)
    except BaseException as e:
        if lock is not None:
            os.close(lock)  # before the unlink: an open descriptor would keep the file's space in use
        written = 0
        if tmp is not None:
            with contextlib.suppress(OSError):
                written = os.stat(tmp).st_size
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise no_space_error(path, e, needed=size, written=written) from None
        raise
    os.close(lock)


def write_bytes(path: str | Path, data: bytes) -> None:
    view = memoryview(data)
    with atomic_open(path, "wb", size=len(view)) as f:
        for start in range(0, len(view), CHUNK):
            f.write(view[start:start + CHUNK])


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Write tensors as safetensors, atomically. `meta` is kept as one sorted JSON string so that
    identical inputs give identical bytes (safetensors keeps several metadata keys in hash order)."""
    from safetensors.torch import save as st_save_bytes

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"meta": json.dumps(meta, sort_keys=True)} if meta is not None else None
    write_bytes(path, st_save_bytes(tensors, metadata=metadata))


@contextlib.contextmanager
def tensor_stream(path: str | Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], meta: dict | None = None):
    """Write a safetensors file (atomically) whose tensors arrive in pieces, so that a large output
    (embeddings of a whole split) never has to be in memory at once. `layout` names each tensor's
    dtype and shape, in file order; yields put(name, piece), where pieces of each tensor come in row
    order, as tensors or raw bytes, and tensors are completed one after the other. Reads back with
    load_tensors / safetensors like save_tensors' files."""
    import torch

    dtypes = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64", torch.uint8: "U8"}
    header, offset, sizes = {}, 0, {}
    for name, (dtype, shape) in layout.items():
        sizes[name] = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": dtypes[dtype], "shape": list(shape), "data_offsets": [offset, offset + sizes[name]]}
        offset += sizes[name]
    if meta is not None:
        header["__metadata__"] = {"meta": json.dumps(meta, sort_keys=True)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    names, written = list(layout), dict.fromkeys(layout, 0)
    with atomic_open(path, "wb", size=8 + len(text) + offset) as f:
        f.write(len(text).to_bytes(8, "little") + text)

        def put(name: str, piece) -> None:
            if isinstance(piece, torch.Tensor):
                if piece.dtype != layout[name][0]:
                    raise ValueError(f"{name}: {piece.dtype} piece for a {layout[name][0]} tensor")
                piece = piece.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            earlier = names[:names.index(name)]
            if any(written[n] != sizes[n] for n in earlier) or written[name] + len(piece) > sizes[name]:
                raise ValueError(f"{name}: piece out of order or past the end of {path}")
            f.write(piece)
            written[name] += len(piece)

        yield put
        short = {n: (written[n], sizes[n]) for n in names if written[n] != sizes[n]}
        if short:
            raise ValueError(f"{path}: tensors not completely written (bytes written, expected): {short}")


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors file written by save_tensors: (tensors on CPU, meta)."""
    from safetensors.torch import load as st_load_bytes

    path = Path(path)
    data = _read_nonempty(path)
    try:
        tensors = st_load_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not a valid safetensors file ({e}); it may be truncated: "
                           "re-create it by re-running the stage that writes it") from None
    meta = json.loads(header.get("__metadata__", {}).get("meta", "null")) or {}
    return tensors, meta


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Training state (tensors, state dicts, numbers) via torch.save, atomically. Loadable with
    weights_only=True: only tensors and plain containers go in, never modules or classes."""
    import torch

    # The tensors' bytes: what the file needs, give or take the pickled structure around them.
    with atomic_open(path, "wb", size=_tensor_bytes(state)) as f:
        sink = _WriteErrors(f)
        try:
            torch.save(state, sink)
        except RuntimeError:
            # torch's zip writer swallows a failed write and then fails on a position check; the
            # write's own error (a full disk) is the one that says what happened.
            if sink.error is None:
                raise
            raise sink.error from None


class _WriteErrors:
    """A file that keeps the OSError its last failed write raised."""

    def __init__(self, f: IO):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def _tensor_bytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(map(_tensor_bytes, obj.values()))
    if isinstance(obj, (list, tuple)):
        return sum(map(_tensor_bytes, obj))
    return 0


def load_checkpoint(path: str | Path) -> dict:
    """Load a torch checkpoint on CPU with weights_only=True; refuse anything that needs unpickling."""
    import torch

    path = Path(path)
    _read_nonempty(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise WeightsError(
            f"{path}: refused: the file pickles Python objects (a whole model or a custom class), which could "
            f"run arbitrary code when loaded. Only weights (a state dict of tensors) are accepted. Ask for a "
            f"state_dict or a .safetensors file instead. [{first}]") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read this torch file ({type(e).__name__}: {e}); "
                           "it may be truncated or not a PyTorch checkpoint") from None
    return obj


def _read_nonempty(path: Path) -> bytes:
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    data = path.read_bytes()
    if not data:
        raise WeightsError(f"{path}: the file is empty (0 bytes); a download or a write was interrupted")
    return data


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel's `module.` and torch.compile's `_orig_mod.` wherever they lead keys."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in KEY_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


# Where training code nests the weights inside a checkpoint, in the order they are tried.
STATE_ENTRIES = ("state_dict", "model", "model_state_dict", "module", "net", "network", "ema", "model_ema",
                 "state_dict_ema", "teacher", "student")


def _tensors_only(obj) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj, path: Path, entry: str) -> tuple[dict, str]:
    """The state dict inside a checkpoint: the whole file when it is one, else `entry` (dotted for
    nesting, e.g. "ema.module"), else the first of STATE_ENTRIES that holds tensors only."""
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    if entry:
        node = obj
        for part in entry.split("."):
            if not isinstance(node, dict) or part not in node:
                raise WeightsError(f"pretrained.entry: {path} has no entry {entry!r}; its top-level keys: {sorted(obj)[:10]}")
            node = node[part]
        if not _tensors_only(node):
            raise WeightsError(f"pretrained.entry: {entry!r} in {path} is not a state dict of tensors")
        return node, entry
    if _tensors_only(obj) or not any(isinstance(v, dict) for v in obj.values()):
        return obj, ""
    for key in STATE_ENTRIES:
        if _tensors_only(obj.get(key)):
            return obj[key], key
    raise WeightsError(f"{path}: a checkpoint without a state dict under any of {', '.join(STATE_ENTRIES)}; its "
                       f"top-level keys: {sorted(obj)[:10]}. Name the one holding the weights in pretrained.entry")


def load_weights(path: str | Path, *, entry: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """A state dict from .safetensors or a torch file (saved on any device), on the CPU, and what was
    done to get it: which nested entry was used and which wrapper prefixes were stripped.

    Refuses non-tensor values and NaN/Inf."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        if entry:
            raise WeightsError(f"pretrained.entry: {entry!r} applies to torch checkpoints; {path} is a .safetensors file, "
                               "which holds one flat state dict: set pretrained.entry to \"\"")
        state, _ = load_tensors(path)
        used = ""
    else:
        state, used = _unwrap(load_checkpoint(path), path, entry)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {bad[:5]}; expected a state dict")
    stripped = sorted({p for k in state for p in KEY_PREFIXES if k.startswith(p)})
    state = strip_prefixes(state)
    check_finite(state, where=str(path))
    return state, {"entry": used, "wrapper_prefixes": stripped}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """load_weights without the account of what was unwrapped."""
    return load_weights(path)[0]


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    import torch

    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"{where}: NaN or Inf values in {bad[:5]}; the weights are corrupt "
                           "(a diverged run?) and would poison every prediction")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: str | Path, *, sha256: str | None = None, sha256_prefix: str | None = None) -> Path:
    """Fetch `url` (http(s) or file://) into `dest`, verifying its sha256 (full or prefix, as
    torchvision's file names carry). A cached file is reused only if it still verifies; a file
    that fails verification is deleted and never left in the cache."""
    dest = Path(dest)
    expected = (sha256 or sha256_prefix or "").lower()
    if dest.is_file() and expected and sha256_file(dest).startswith(expected):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, atomic_open(dest.with_name(dest.name + ".part")) as f:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        raise WeightsError(
            f"could not download {url} ({getattr(e, 'reason', e)}). Offline? Fetch the file on a machine with "
            f"network and put it at {dest}, or set pretrained.source: file and pretrained.path to it.") from None
    part = dest.with_name(dest.name + ".part")
    digest = h.hexdigest()
    if expected and not digest.startswith(expected):
        part.unlink()
        raise ChecksumError(f"{url}: sha256 {digest} does not match the expected {expected}; "
                            "the file was deleted, not cached. Check the URL and the checksum.")
    os.replace(part, dest)
    return dest


def torchvision_hash_prefix(url: str) -> str | None:
    """torchvision weight files are named `<name>-<first hex digits of sha256>.pth`."""
    m = re.search(r"-([a-f0-9]{6,})\.", url.rsplit("/", 1)[-1])
    return m.group(1) if m else None
