import hashlib
import os
import signal
import subprocess
import sys

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
NAIVE_WRITER = """
import contextlib
@contextlib.contextmanager
def naive_open(path, mode="wb"):
    with open(path, mode) as f:
        yield f
io.atomic_open = naive_open
"""


def killed_write(target, fault: str, naive: bool = False) -> int:
    """Write 64 MiB of ones over `target` in a child that SIGKILLs itself at `fault` (the writer's own
    fault-injection points, so the kill lands inside the write every time); return its exit code."""
    code = ("import sys; sys.path.insert(0, %r); import torch; from transfer import io\n%s"
            "io.save_tensors(%r, {'w': torch.ones(16 * 2**20)})" % (str(ROOT), NAIVE_WRITER if naive else "", str(target)))
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, io.FAULT_ENV: fault}).returncode


def intact(target, before: bytes) -> bool:
    """The file is the old one, or completely the new one."""
    if target.read_bytes() == before:
        return True
    try:
        return io.load_tensors(target)[0]["w"].numel() == 16 * 2**20
    except WeightsError:
        return False


@pytest.mark.parametrize("fault", ["kill-mid-write", "kill-before-replace", "kill-mid-write:weights.safetensors"])
def test_sigkill_inside_a_write_leaves_old_file_intact(tmp_path, fault):
    target = tmp_path / "weights.safetensors"
    io.save_tensors(target, {"w": torch.zeros(4)})
    before = target.read_bytes()
    assert killed_write(target, fault) == -signal.SIGKILL
    assert target.read_bytes() == before
    # The leftover temporary file is named so that git and DVC ignore it (*.tmp in .gitignore and .dvcignore).
    assert [p.name.endswith(".tmp") for p in tmp_path.iterdir() if p != target] == [True]


def test_the_kill_test_fails_on_a_non_atomic_writer(tmp_path):
    target = tmp_path / "weights.safetensors"
    io.save_tensors(target, {"w": torch.zeros(4)})
    before = target.read_bytes()
    assert killed_write(target, "kill-mid-write", naive=True) == -signal.SIGKILL
    assert not intact(target, before)


def test_fault_injection_only_fires_for_the_named_file(tmp_path):
    target = tmp_path / "weights.safetensors"
    assert killed_write(target, "kill-mid-write:other.safetensors") == 0
    assert io.load_tensors(target)[0]["w"].numel() == 16 * 2**20


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
