"""The pipeline under DVC, end to end, in a temporary git + DVC copy of the project with a tiny config."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_params, write_params

pytestmark = pytest.mark.slow
ALL = {"prepare", "pretrain", "extract", "train_head", "finetune", "evaluate", "convert"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, path / name)
    for folder in ("stages", "transfer"):
        shutil.copytree(ROOT / folder, path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(path, tiny_params())
    sh(path, "git", "init", "-q")
    dvc(path, "init", "-q")
    dvc(path, "config", "core.autostage", "true")
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-qm", "tiny project")
    return path


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '/usr/bin:/bin')}"  # `python` in dvc.yaml = this venv
    e.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
             GIT_COMMITTER_EMAIL="t@example.com", PYTHONPATH="")
    return e


def sh(cwd, *args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env())
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def dvc(cwd, *args, check=True) -> subprocess.CompletedProcess:
    return sh(cwd, sys.executable, "-m", "dvc", *args, check=check)


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w]+)'", output))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(repo: Path) -> dict:
    files = ["models/backbone/backbone.safetensors", "models/head/head.safetensors", "models/model/model.safetensors",
             "models/export/model_fp32.safetensors", "data/prepared/train.safetensors", "data/embeddings/test.safetensors",
             "metrics/evaluate.json", "metrics/train_head.json", "metrics/finetune.json", "metrics/pretrain.json",
             "metrics/predictions.csv", "metrics/convert.json"]
    return {f: digest(repo / f) for f in files}


def test_repro_then_experiments_rerun_only_what_changed(repo):
    r = dvc(repo, "repro")
    assert ran(r.stdout) == ALL, r.stdout
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    assert ev["test_images"] == 75 and 0.0 <= ev["accuracy"] <= 1.0
    assert (repo / "models/export/model_fp16.safetensors").is_file()
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")
    assert ran(dvc(repo, "repro").stdout) == set()  # nothing changed, nothing runs

    r = dvc(repo, "exp", "run", "-S", "strategy=finetune")
    assert ran(r.stdout) == {"finetune", "evaluate", "convert"}, r.stdout
    assert json.loads((repo / "metrics/finetune.json").read_text())["strategy"] == "finetune"

    r = dvc(repo, "exp", "run", "-S", "train_head.lr=0.02")
    assert ran(r.stdout) == {"train_head", "finetune", "evaluate", "convert"}, r.stdout

    diff = dvc(repo, "metrics", "diff", "--json").stdout
    assert "metrics/train_head.json" in json.loads(diff)
    names = dvc(repo, "exp", "list", "--name-only").stdout.split()
    assert len(names) == 2
    show = dvc(repo, "exp", "show", "--json").stdout
    assert all(f'"name": "{n}"' in show for n in names) and '"strategy": "finetune"' in show
    dvc(repo, "plots", "show", "-o", str(repo / "plots_out"))
    html = (repo / "plots_out" / "index.html").read_text()
    assert "predictions.csv" in html and "prediction_grid.png" in html
    assert "Training curves (finetune)" in html and "Training curves (head)" in html


def test_repro_twice_gives_identical_weights_and_metrics(repo):
    dvc(repo, "repro", "-f")
    first = fingerprint(repo)
    dvc(repo, "repro", "-f")
    assert fingerprint(repo) == first


@pytest.mark.parametrize("stage, delay", [("pretrain", 1.5), ("finetune", 0.8)])
def test_sigkill_mid_stage_then_repro_completes(repo, stage, delay):
    dvc(repo, "repro")
    before = fingerprint(repo)
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-f"], cwd=repo, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:
        if f"Running stage '{stage}'" in line:
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage process it started
            break
    proc.wait()
    status = dvc(repo, "status").stdout
    assert "changed" in status or "modified" in status or "deleted" in status, status
    r = dvc(repo, "repro")
    # Re-run, or restored from DVC's run cache (same deps and params, so the same outputs).
    assert stage in ran(r.stdout) or f"Stage '{stage}' is cached" in r.stdout, r.stdout
    assert fingerprint(repo) == before  # the interrupted run left nothing that changed the result
    assert "up to date" in dvc(repo, "status").stdout.lower() or dvc(repo, "status").stdout.strip() == ""
