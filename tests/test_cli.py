"""What a user sees when something is wrong: one line naming the stage and what to do, exit code 2,
no traceback, for each kind of user error; and progress bars that stay short in logs."""
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, tiny_params, write_params
from transfer import cli


def stage(cwd, name, **env):
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def assert_one_line(r, name: str, *fragments: str) -> str:
    assert r.returncode == cli.EXIT_USER_ERROR, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{name}: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_params_error_is_one_line(tmp_path):
    raw = tiny_params()
    raw["finetune"]["lrr"] = 0.1  # a typo
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert_one_line(stage(tmp_path, "prepare"), "prepare", "finetune.lrr")
    (tmp_path / "params.yaml").write_text("data: [unclosed\n")
    assert_one_line(stage(tmp_path, "finetune"), "finetune", "params.yaml: not valid YAML")


def test_data_error_is_one_line(tmp_path):
    write_params(tmp_path, tiny_params(data={"source": "imagefolder", "root": "photos", "classes": None},
                                       pretrained={"source": "none"}))
    assert_one_line(stage(tmp_path, "prepare"), "prepare", "photos")


def test_weights_error_is_one_line(tmp_path):
    write_params(tmp_path, tiny_params(pretrained={"source": "file", "path": "data/raw/pretrained/w.pt"}))
    (tmp_path / "data/raw/pretrained/w.pt").write_bytes(b"\x00garbage")
    assert_one_line(stage(tmp_path, "pretrain"), "pretrain", "w.pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_error_is_one_line(tmp_path):
    write_params(tmp_path, tiny_params(pretrained={"source": "none"}, runtime={"device": "cuda"}))
    assert_one_line(stage(tmp_path, "pretrain"), "pretrain", "runtime.device: cuda", "use auto or cpu")


def test_missing_input_is_one_line_naming_the_file_and_the_command(tmp_path):
    write_params(tmp_path, tiny_params())
    assert_one_line(stage(tmp_path, "evaluate"), "evaluate", "not found", "dvc repro evaluate")


def test_a_user_error_under_torchrun_is_still_one_line(tmp_path):
    """With runtime.nproc: 2 the error happens in both ranks; torchrun's failure report is dropped."""
    write_params(tmp_path, tiny_params(runtime={"nproc": 2}))
    assert_one_line(stage(tmp_path, "extract"), "extract", "not found")


def test_a_full_disk_is_one_line_naming_the_output_and_the_space(tmp_path):
    """The disk fills while prepare writes the train split (its writer's fault point raises ENOSPC, as a
    full disk does): one line with the output, the space it needed and the space free; no temporary files."""
    write_params(tmp_path, tiny_params())
    r = stage(tmp_path, "prepare", TRANSFER_FAULT="enospc-mid-write:train.images.npy", TRANSFER_PROGRESS="0")
    line = assert_one_line(r, "prepare", "could not write data/prepared/train.images.npy: no space left on device")
    assert re.search(r"\(needed ~[\d.]+ kB, [\d.]+ [kMG]B free on /[^)]*\); free some space there and re-run$", line), line
    assert not [p.name for p in (tmp_path / "data/prepared").iterdir() if p.name.endswith(".tmp")]


def run_snippet(code: str, cwd) -> subprocess.CompletedProcess:
    """A few lines of Python in a fresh process that imports this checkout's code."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_full_disk_met_by_another_writer_is_one_line_too(tmp_path):
    """A library writing its own file (DVCLive, matplotlib) gets the same treatment, without the sizes."""
    code = ("import errno, os\nfrom transfer import cli\n"
            "def main():\n    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), 'metrics/curves/acc.tsv')\n"
            "cli.run('finetune', main)\n")
    r = run_snippet(code, tmp_path)
    assert_one_line(r, "finetune", "could not write metrics/curves/acc.tsv: no space left on device; free some space")


def test_a_bug_keeps_its_traceback(tmp_path):
    """Only user errors are shortened: anything else is a bug and must show where it happened."""
    code = ("from transfer import cli\n"
            "def main():\n    raise ZeroDivisionError('a bug')\n"
            "cli.run('prepare', main)\n")
    r = run_snippet(code, tmp_path)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ZeroDivisionError: a bug" in r.stderr


def test_progress_is_compact_when_not_a_terminal(tmp_path):
    """prepare's decode bar in a pipe (as under CI or DVC): a final 100% line, not one line per update."""
    from conftest import make_tree

    make_tree(tmp_path / "photos", classes=("a", "b"), per_class=150, ext=".jpg")
    write_params(tmp_path, tiny_params(data={"source": "imagefolder", "root": "photos", "classes": None,
                                             "train_per_class": None, "eval_per_class": None},
                                       pretrained={"source": "none"}))
    r = stage(tmp_path, "prepare")
    assert r.returncode == 0, r.stderr
    bars = [part for part in r.stderr.replace("\r", "\n").splitlines() if part.startswith("decode")]
    assert bars and "100%" in bars[-1] and "300/300" in bars[-1], r.stderr
    assert len(bars) <= 3, r.stderr
    r = stage(tmp_path, "prepare", TRANSFER_PROGRESS="0")
    assert r.returncode == 0 and "decode" not in r.stderr, r.stderr
