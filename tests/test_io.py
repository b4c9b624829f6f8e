import errno
import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT
from transfer import io
from transfer.io import ChecksumError, WeightsError


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "out.json"
    io.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_open(target, "w") as f:
            f.write('{"v": 2, "half')
            raise RuntimeError("killed")
    assert io.read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


# A writer that opens the target itself, as a naive `open(path, "wb")` would: the kill tests must fail on it.
# (It keeps the fault hook of atomic_open's file, so the kill lands at the same point of the write.)
NAIVE_WRITER = """
import contextlib, pathlib
from transfer import storage
@contextlib.contextmanager
def naive_open(path, mode="wb", **kw):
    with open(path, mode) as f:
        yield io._FaultyFile(f, pathlib.Path(path))
io.atomic_open = storage.atomic_open = naive_open
"""

# The writers whose outputs must never be half-written, with the file each writes in `folder`. `big`:
# the output a killed child writes (several writes, so the kill lands inside); else a small previous one.
TARGETS = {"save_tensors": "weights.safetensors", "save_checkpoint": "ckpt.pt", "tensor_stream": "emb.safetensors",
           "write_split": "train.images.npy"}
N = 4 * 2**20


def write(writer: str, folder, big: bool) -> None:
    from transfer import storage

    n, target = (N if big else 4), Path(folder) / TARGETS[writer]
    if writer == "save_tensors":
        io.save_tensors(target, {"w": torch.ones(n)})
    elif writer == "save_checkpoint":
        io.save_checkpoint(target, {"model": {"w": torch.ones(n)}, "epoch": n})
    elif writer == "tensor_stream":
        with io.tensor_stream(target, {"w": (torch.float32, (n,))}) as put:
            for piece in torch.ones(n).chunk(4):
                put("w", piece)
    else:
        rows = 64 if big else 2
        storage.write_split(Path(folder), "train", iter(np.ones((rows, 3, 128, 128), np.uint8)), count=rows,
                            image_size=128, labels=torch.zeros(rows, dtype=torch.long), meta={})


def complete(writer: str, target) -> bool:
    """The file is entirely the big output."""
    from transfer import storage

    try:
        if writer == "save_checkpoint":
            return io.load_checkpoint(target)["epoch"] == N
        if writer == "write_split":
            images = storage.Images.open(target)
            return len(images) == 64 and images[63].sum() == 3 * 128 * 128
        return io.load_tensors(target)[0]["w"].numel() == N
    except (WeightsError, EOFError, ValueError):
        return False


def killed_write(folder, fault: str, writer: str = "save_tensors", naive: bool = False) -> int:
    """Write the big output of `writer` into `folder` in a child that SIGKILLs itself at `fault` (the
    writers' own fault-injection points, so the kill lands inside the write every time); its exit code."""
    code = ("import sys; sys.path[:0] = [%r, %r]; import test_io; from transfer import io\n%s"
            "test_io.write(%r, %r, big=True)" % (str(ROOT), str(ROOT / "tests"), NAIVE_WRITER if naive else "", writer,
                                                 str(folder)))
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, io.FAULT_ENV: fault}).returncode


@pytest.mark.parametrize("fault", ["kill-mid-write", "kill-before-replace", "kill-mid-write:weights.safetensors"])
def test_sigkill_inside_a_write_leaves_old_file_intact(tmp_path, fault):
    target = tmp_path / "weights.safetensors"
    write("save_tensors", tmp_path, big=False)
    before = target.read_bytes()
    assert killed_write(tmp_path, fault) == -signal.SIGKILL
    assert target.read_bytes() == before
    # The leftover temporary file is named so that git and DVC ignore it (*.tmp in .gitignore and .dvcignore).
    assert [p.name.endswith(".tmp") for p in tmp_path.iterdir() if p != target] == [True]


@pytest.mark.parametrize("writer", ["save_checkpoint", "tensor_stream", "write_split"])
def test_sigkill_inside_each_writer_leaves_the_old_file_and_no_temporary_file(tmp_path, writer):
    """Checkpoints, streamed embeddings and prepared splits, killed mid-write: the previous file stays
    whole, and the killed write's temporary file (a process killed by SIGKILL cannot remove it) is gone
    after the next write of that output."""
    write(writer, tmp_path, big=False)
    target = tmp_path / TARGETS[writer]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert killed_write(tmp_path, f"kill-mid-write:{target.name}", writer) == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before
    left = [p.name for p in tmp_path.iterdir() if p.name not in before]
    assert len(left) == 1 and left[0].startswith(f".{target.name}.") and left[0].endswith(".tmp"), left
    write(writer, tmp_path, big=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


@pytest.mark.parametrize("writer", ["save_tensors", "save_checkpoint", "tensor_stream", "write_split"])
def test_the_kill_test_fails_on_a_non_atomic_writer(tmp_path, writer):
    """The kill lands inside each writer's file: written in place, the file is left half-written."""
    write(writer, tmp_path, big=False)
    target = tmp_path / TARGETS[writer]
    before = target.read_bytes()
    assert killed_write(tmp_path, "kill-mid-write", writer, naive=True) == -signal.SIGKILL
    assert target.read_bytes() != before and not complete(writer, target)


def test_fault_injection_only_fires_for_the_named_file(tmp_path):
    assert killed_write(tmp_path, "kill-mid-write:other.safetensors") == 0
    assert complete("save_tensors", tmp_path / "weights.safetensors")


def test_a_write_in_progress_keeps_its_temporary_file(tmp_path):
    """Only temporary files no writer holds are removed: another process's write in progress is not
    disturbed (its flock is what tells them apart)."""
    import fcntl

    live, stale = tmp_path / ".out.json.abcd1234.tmp", tmp_path / ".out.json.wxyz6789.tmp"
    live.write_bytes(b"{")
    stale.write_bytes(b"{")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        io.write_json(tmp_path / "out.json", {"v": 1})
        assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out.json"]


NO_SPACE_LINE = (r"could not write {}: no space left on device \(needed ~[\d.]+ (bytes|kB|MB), [\d.]+ (bytes|kB|MB|GB) "
                 r"free on /[^)]*\); free some space there and re-run$")


@pytest.mark.parametrize("writer", ["save_tensors", "save_checkpoint", "tensor_stream", "write_split"])
def test_a_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch, writer):
    """The disk fills during the write (the writer's mid-write fault point raises ENOSPC, as a full disk
    does): an OutputError naming the output, what it needed and what is free; old file kept, no temporary file."""
    write(writer, tmp_path, big=False)
    target = tmp_path / TARGETS[writer]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setenv(io.FAULT_ENV, f"enospc-mid-write:{target.name}")
    with pytest.raises(io.OutputError, match=NO_SPACE_LINE.format(re.escape(str(target)))) as e:
        write(writer, tmp_path, big=True)
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_full_disk_while_decoding_into_the_spool_is_one_line(tmp_path, monkeypatch):
    """The spool is sparse: the disk fills on a row's write; the message gives the whole spool's size."""
    from transfer import storage

    def full(fd, data, pos):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    path = tmp_path / ".decoded.rows.tmp"
    with pytest.raises(io.OutputError, match=NO_SPACE_LINE.format(re.escape(str(path)))) as e:
        with storage.Spool(path, (3, 100, 100), 1000) as spool:
            monkeypatch.setattr(os, "pwrite", full)
            spool.write(0, np.zeros((3, 100, 100), np.uint8))
    assert "needed ~30.0 MB" in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MB file system (tmpfs), where the mount is permitted (root in a container that allows it)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("writer", ["save_tensors", "save_checkpoint", "tensor_stream", "write_split"])
def test_a_really_full_disk_is_one_line_and_leaves_the_old_file(tiny_disk, writer):
    """The same on a real 1 MB file system, where the error comes from the kernel at whichever call
    meets it (a write, the flush, torch's zip writer) and the free space is the real one."""
    write(writer, tiny_disk, big=False)
    target = tiny_disk / TARGETS[writer]
    before = {p.name: p.read_bytes() for p in tiny_disk.iterdir()}
    with pytest.raises(io.OutputError, match=NO_SPACE_LINE.format(re.escape(str(target)))) as e:
        write(writer, tiny_disk, big=True)
    assert f"B free on {tiny_disk})" in str(e.value) and "needed ~" in str(e.value)
    assert {p.name: p.read_bytes() for p in tiny_disk.iterdir()} == before


def test_a_really_full_disk_while_decoding_into_the_spool(tiny_disk):
    from transfer import storage

    path = tiny_disk / ".decoded.rows.tmp"
    with pytest.raises(io.OutputError, match=NO_SPACE_LINE.format(re.escape(str(path)))):
        with storage.Spool(path, (3, 100, 100), 100) as spool:
            for i in range(100):
                spool.write(i, np.ones((3, 100, 100), np.uint8))
    assert list(tiny_disk.iterdir()) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_permissions_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        io.write_json(tmp_path / "m.json", {"a": 1})
        io.save_tensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
        io.save_checkpoint(tmp_path / "c.pt", {"w": torch.zeros(2)})
    finally:
        os.umask(old)
    for name in ("m.json", "w.safetensors", "c.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


class Payload:
    def __reduce__(self):
        return (print, ("PAYLOAD RAN",))


def test_pickled_module_and_custom_class_are_refused(tmp_path, capfd):
    whole = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), whole)
    with pytest.raises(WeightsError, match="refused: the file pickles Python objects"):
        io.load_state_dict(whole)
    evil = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(1), "x": Payload()}, evil)
    with pytest.raises(WeightsError, match="refused"):
        io.load_state_dict(evil)
    assert "PAYLOAD RAN" not in capfd.readouterr().out


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_empty_and_truncated_weights_are_clear_errors(tmp_path, suffix):
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        io.load_state_dict(empty)
    good = tmp_path / f"good{suffix}"
    state = {"w": torch.randn(1000)}
    io.save_tensors(good, state) if suffix == ".safetensors" else torch.save(state, good)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated"):
        io.load_state_dict(cut)


def test_nan_weights_refused_and_prefixes_stripped(tmp_path):
    path = tmp_path / "ddp_compiled.pt"
    torch.save({"module._orig_mod.fc.weight": torch.ones(2, 2), "module.fc.bias": torch.zeros(2)}, path)
    assert set(io.load_state_dict(path)) == {"fc.weight", "fc.bias"}
    bad = tmp_path / "nan.safetensors"
    io.save_tensors(bad, {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(WeightsError, match="NaN or Inf"):
        io.load_state_dict(bad)


def test_training_checkpoint_holds_state_dict(tmp_path):
    path = tmp_path / "ckpt.pt"
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    io.save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3})
    assert set(io.load_state_dict(path)) == {"weight", "bias"}
    assert io.load_checkpoint(path)["epoch"] == 3


def test_download_verifies_checksum_and_never_caches_a_bad_file(tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(b"real weights" * 1000)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    cache = tmp_path / "cache" / "weights.bin"
    with pytest.raises(ChecksumError, match="does not match"):
        io.download(src.as_uri(), cache, sha256="0" * 64)
    assert not cache.exists() and list(cache.parent.iterdir()) == []
    assert io.download(src.as_uri(), cache, sha256=digest).read_bytes() == src.read_bytes()
    src.unlink()  # a verified cached copy is reused without the network
    assert io.download(src.as_uri(), cache, sha256=digest) == cache
    with pytest.raises(WeightsError, match="could not download"):
        io.download(src.as_uri(), tmp_path / "other.bin", sha256=digest)


def test_identical_inputs_give_identical_bytes(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    meta = {"z": 1, "a": [1, 2], "m": {"y": 2, "b": 1}}
    io.save_tensors(a, {"x": torch.arange(5.0), "y": torch.ones(2)}, meta=meta)
    io.save_tensors(b, {"y": torch.ones(2), "x": torch.arange(5.0)}, meta=dict(reversed(list(meta.items()))))
    assert a.read_bytes() == b.read_bytes()
    assert io.load_tensors(a)[1] == meta


def test_tensor_stream_writes_a_safetensors_file_piece_by_piece(tmp_path):
    """Embeddings arrive batch by batch; the file must read back (with safetensors itself) exactly as
    the whole tensors would, and a stream that stops short or out of order leaves no file."""
    from safetensors.torch import load_file

    emb = torch.randn(10, 3).half()
    labels = torch.arange(10)
    layout = {"labels": (torch.int64, (10,)), "embeddings": (torch.float16, (10, 3))}
    target = tmp_path / "train.safetensors"
    with io.tensor_stream(target, layout, meta={"classes": ["a"]}) as put:
        put("labels", labels)
        put("embeddings", emb[:4])
        put("embeddings", emb[4:7].view(torch.uint8).numpy().tobytes())  # a rank's share, as raw bytes
        put("embeddings", emb[7:])
    tensors, meta = io.load_tensors(target)
    assert torch.equal(tensors["embeddings"], emb) and torch.equal(tensors["labels"], labels)
    assert meta == {"classes": ["a"]}
    assert torch.equal(load_file(target)["embeddings"], emb)

    with pytest.raises(ValueError, match="not completely written"):
        with io.tensor_stream(tmp_path / "short.safetensors", layout) as put:
            put("labels", labels)
            put("embeddings", emb[:9])
    with pytest.raises(ValueError, match="out of order"):
        with io.tensor_stream(tmp_path / "order.safetensors", layout) as put:
            put("embeddings", emb)
    with pytest.raises(ValueError, match="float32 piece"):
        with io.tensor_stream(tmp_path / "dtype.safetensors", layout) as put:
            put("labels", labels)
            put("embeddings", emb.float())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.safetensors"]
