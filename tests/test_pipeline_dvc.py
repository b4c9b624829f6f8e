"""The pipeline under DVC, end to end, in a temporary git + DVC copy of the project with a tiny config."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_params, write_params

pytestmark = pytest.mark.slow
ALL = {"prepare", "pretrain", "extract", "train_head", "finetune", "evaluate", "convert"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, path / name)
    for folder in ("stages", "transfer", "plots"):
        shutil.copytree(ROOT / folder, path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # A small backbone with random weights: training itself is covered in test_stages; here DVC's behaviour is.
    write_params(path, tiny_params(pretrained={"source": "none"}, backbone={"arch": "mobilenet_v3_small"}))
    sh(path, "git", "init", "-q")
    dvc(path, "init", "-q")
    shutil.copytree(ROOT / ".dvc" / "plots", path / ".dvc" / "plots")  # the project's plot templates (log_x)
    dvc(path, "config", "core.autostage", "true")
    dvc(path, "config", "plots.html_template", "../plots/offline.html")  # as the project's .dvc/config
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


def lock_outs(repo: Path) -> dict[str, str]:
    """Every output's hash as DVC records it in dvc.lock: what decides whether downstream stages re-run."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {f"{stage}:{out['path']}": out.get("md5") or out.get("hash") or str(out)
            for stage, spec in lock["stages"].items() for out in spec.get("outs", [])}


@pytest.fixture(scope="module")
def baseline(repo) -> dict[str, str]:
    r = dvc(repo, "repro")
    assert ran(r.stdout) == ALL, r.stdout
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")
    return lock_outs(repo)


def test_forced_extract_changes_no_output_hash_and_reruns_nothing(repo, baseline):
    """As DVC sees it: an identical re-run of extract leaves every output hash in dvc.lock as it was
    (timings used to live in data/embeddings and changed its hash), so nothing downstream re-runs."""
    assert len(baseline) == 23 and all(baseline.values())  # every out, metric and plot of 7 stages
    r = dvc(repo, "repro", "-f", "-s", "extract")
    assert ran(r.stdout) == {"extract"}, r.stdout
    assert lock_outs(repo) == baseline
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}
    assert sh(repo, "git", "status", "--porcelain").stdout == ""  # git sees no change either
    ev = json.loads((repo / "metrics/evaluate/metrics.json").read_text())
    assert ev["test_images"] == 75


def test_experiments_rerun_only_what_changed(repo, baseline):
    r = dvc(repo, "exp", "run", "-S", "train_head.lr=auto")
    assert ran(r.stdout) == {"train_head", "finetune", "evaluate", "convert"}, r.stdout
    # The range test's curve is a DVC plot with a logarithmic lr axis (the project's log_x template).
    assert json.loads((repo / "metrics/train_head.json").read_text())["lr_chosen"] > 0
    shown = json.loads(dvc(repo, "plots", "show", "--json", "metrics/train_head/lr_find.json").stdout)
    (plot,) = shown["data"]["metrics/train_head/lr_find.json"]
    assert plot["content"]["encoding"]["x"]["scale"] == {"type": "log"} and len(plot["content"]["data"]["values"]) > 20

    r = dvc(repo, "exp", "run", "-S", "strategy=finetune")
    assert ran(r.stdout) == {"finetune", "evaluate", "convert"}, r.stdout
    assert json.loads((repo / "metrics/finetune.json").read_text())["strategy"] == "finetune"

    diff = dvc(repo, "metrics", "diff", "--json").stdout
    assert "metrics/train_head.json" in json.loads(diff)
    names = dvc(repo, "exp", "list", "--name-only").stdout.split()
    assert len(names) == 2
    show = dvc(repo, "exp", "show", "--json").stdout
    assert all(f'"name": "{n}"' in show for n in names) and '"strategy": "finetune"' in show
    # Back to settings already run: every stage comes from DVC's run cache, none re-runs. (train_head
    # and finetune re-trained every time while their curves were an uncached output.)
    committed = yaml.safe_load(sh(repo, "git", "show", "HEAD:params.yaml").stdout)
    r = dvc(repo, "exp", "run", "-S", f"train_head.lr={committed['train_head']['lr']}",
            "-S", f"strategy={committed['strategy']}")
    assert ran(r.stdout) == set(), r.stdout
    assert all(f"Stage '{s}' is cached" in r.stdout for s in ("train_head", "finetune", "evaluate", "convert")), r.stdout
    dvc(repo, "plots", "show", "-o", str(repo / "plots_out"))
    html = (repo / "plots_out" / "index.html").read_text()
    assert "Confusion matrix (test split)" in html and "prediction_grid.png" in html
    assert "top_losses.png" in html and "Top losses (test split)" in html and "Most confused classes" in html
    assert "Reliability diagram (test split)" in html
    assert "Training curves (finetune)" in html and "Training curves (head)" in html
    # Back to the baseline for the tests that follow: git restores params, lock and uncached metrics.
    sh(repo, "git", "checkout", "--", ".")
    sh(repo, "git", "clean", "-fdq", "--", "metrics")  # curves only the finetune strategy writes
    dvc(repo, "checkout", "-f")
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}


@pytest.mark.parametrize("stage, out", [("pretrain", "models/backbone/backbone.safetensors"),
                                        ("finetune", "models/model/model.safetensors")])
def test_sigkill_inside_an_output_write_then_repro_completes(repo, baseline, stage, out):
    """The stage is killed (SIGKILL) while it writes its weights, through the writer's fault-injection
    point, so the kill lands inside the write every time."""
    e = env()
    e["TRANSFER_FAULT"] = f"kill-mid-write:{Path(out).name}"
    r = subprocess.run([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], cwd=repo, env=e,
                       capture_output=True, text=True)
    assert r.returncode != 0 and f"Running stage '{stage}'" in r.stdout, r.stdout + r.stderr
    target = repo / out
    # Never half a file: the old weights or none (DVC removes a stage's outputs before it runs it).
    if target.exists():
        from transfer.io import load_tensors
        load_tensors(target)
    assert list(target.parent.glob(f".{target.name}.*.tmp"))  # the kill did land inside the write
    status = dvc(repo, "status", "--json").stdout
    assert stage in json.loads(status), status
    r = dvc(repo, "repro")
    # Re-run, or restored from DVC's run cache (same deps and params, so the same outputs).
    assert stage in ran(r.stdout) or f"Stage '{stage}' is cached" in r.stdout, r.stdout
    assert lock_outs(repo) == baseline  # the interrupted run left nothing that changed the result
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_project_renders_its_plots_with_the_offline_template():
    config = (ROOT / ".dvc" / "config").read_text()
    assert re.search(r"\[plots\]\s+html_template = \.\./plots/offline\.html", config), config
    page = (ROOT / "plots" / "offline.html").read_text()
    assert "{plot_divs}" in page and "<script src" not in page and "cdn." not in page
    for lib in ("vega@5.20.2", "vega-lite@5.2.0", "vega-embed@6.18.2"):
        assert f"<script>/* {lib} */" in page


@pytest.mark.skipif(not CHROMIUM, reason="needs Debian's chromium (make setup installs it where apt-get can)")
def test_plots_render_offline_in_a_real_browser(repo, baseline, tmp_path):
    """dvc plots show with the project's template, opened by headless Chromium with no network: every
    Vega plot (confusion matrix, both training curves, the reliability diagram, the top losses'
    probabilities, the most-confused pairs) must have drawn its canvas."""
    out = tmp_path / "plots"
    dvc(repo, "plots", "show", "-o", str(out))
    html = (out / "index.html").read_text()
    assert "cdn.jsdelivr" not in html and "<script src=" not in html
    # The range tests' curves are empty lists with a fixed lr (as here): DVC gives them an empty spec, which
    # draws nothing (a 0 x 0 canvas).
    empty = re.findall(r"var spec = \{\};\s*vegaEmbed\('#([^']+)'", html)
    assert sorted(empty) == ["metrics_finetune_lr_find_json", "metrics_train_head_lr_find_json"], empty
    every = re.findall(r"vegaEmbed\('#([^']+)'", html)
    ids = [i for i in every if i not in empty]
    assert len(ids) == 6 and any("confusion_matrix" in i for i in ids), ids
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--no-proxy-server", "--proxy-server=127.0.0.1:9",  # nothing from the network, for sure
                          "--virtual-time-budget=15000", "--dump-dom", (out / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=180).stdout
    starts = sorted((dom.index(f'id="{i}"'), i) for i in every)
    for (start, plot_id), (end, _) in zip(starts, starts[1:] + [(len(dom), None)]):
        if plot_id in empty:
            continue
        drawn = re.findall(r'<canvas width="(\d+)" height="(\d+)" class="marks"', dom[start:end])
        assert drawn and all(int(w) > 100 and int(h) > 100 for w, h in drawn), (plot_id, dom[start:start + 500])


def test_exported_model_records_where_it_came_from(repo, baseline):
    """models/export/model.json names the revision, and the params and output hashes every upstream stage
    ran with, as dvc.lock holds them after the run."""
    meta = json.loads((repo / "models" / "export" / "model.json").read_text())
    prov = meta["provenance"]
    # a commit of this project's history (the baseline fixture commits the run's results on top of it)
    assert len(prov["git"]["revision"]) == 40
    sh(repo, "git", "merge-base", "--is-ancestor", prov["git"]["revision"], "HEAD")
    assert prov["git"]["uncommitted_changes"] == []  # the run's own writes (dvc.lock, metrics) are not changes
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(prov["stages"]) == {"prepare", "pretrain", "extract", "train_head", "finetune", "evaluate"}
    for stage, recorded in prov["stages"].items():
        assert recorded["params"] == lock[stage]["params"]["params.yaml"]
        assert recorded["outs"] == {o["path"]: o["md5"] for o in lock[stage]["outs"]}
    assert prov["stages"]["prepare"]["outs"]["data/prepared"].endswith(".dir")
    from transfer.io import sha256_file
    assert prov["weights_sha256"] == sha256_file(repo / "models" / "export" / "model_fp32.safetensors")
