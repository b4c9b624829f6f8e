"""The parallel experiment runner (python -m stages.experiments): a grid on two CPU workers in a tiny
git + DVC project, every experiment in `dvc exp show`, the workspace untouched, the clones gone; a
failure reported without losing the rest; Ctrl-C cleaning up; bad input refused in one line."""
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, tiny_params, write_params
from test_pipeline_dvc import dvc, env, sh
from transfer import cli
from transfer import experiments as exps


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The tiny project with train_head and everything before it run and committed, so experiments on
    train_head alone find the rest in the (shared) run cache."""
    path = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, path / name)
    for folder in ("stages", "transfer"):
        shutil.copytree(ROOT / folder, path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(path, tiny_params(pretrained={"source": "none"}, backbone={"arch": "mobilenet_v3_small"}))
    sh(path, "git", "init", "-q")
    dvc(path, "init", "-q")
    dvc(path, "config", "core.autostage", "true")
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-qm", "tiny project")  # dvclive wants a commit
    dvc(path, "repro", "train_head")
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-qm", "run up to train_head")
    return path


def workspace(project: Path) -> dict[str, str]:
    """Every file of the workspace (git's and DVC's internals aside) and a hash of its bytes."""
    out = {}
    for p in sorted(project.rglob("*")):
        rel = p.relative_to(project).as_posix()
        if p.is_file() and not rel.startswith((".git/", ".dvc/cache/", ".dvc/tmp/")) and "__pycache__" not in rel:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def runner(project: Path, *args: str, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stages.experiments", *args]
    if kw.get("background"):
        return subprocess.Popen(cmd, cwd=project, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=project, env=env(), capture_output=True, text=True, timeout=600)


def shown(project: Path) -> dict[str, dict]:
    """Experiment name -> its params.yaml and metrics files as `dvc exp show --json` of the project has them."""
    out, todo = {}, json.loads(dvc(project, "exp", "show", "--json").stdout)
    while todo:
        state = todo.pop()
        if state.get("name") and state.get("rev") != "workspace" and state.get("data"):
            data = state["data"]
            out[state["name"]] = dict(params=data["params"]["params.yaml"]["data"],
                                      metrics={f: m.get("data") for f, m in (data.get("metrics") or {}).items()})
        for exp_range in state.get("experiments") or []:
            todo.extend(exp_range["revs"])
    return out


@pytest.mark.slow
def test_a_grid_on_two_cpu_workers_lands_in_dvc_exp_show_and_leaves_the_workspace_alone(project, tmp_path):
    before = workspace(project)
    r = runner(project, "-S", "train_head.lr=0.02,0.05", "--workers", "2", "--target", "train_head", "-n", "lr",
               "--workdir", str(tmp_path / "clones"))
    assert r.returncode == 0, r.stdout + r.stderr
    # Both workers took one; each ran train_head only, the rest restored from the project's run cache.
    finished = [line for line in r.stdout.splitlines() if line.startswith("[")]
    assert len(finished) == 2 and all("ok, ran train_head" in line for line in finished), r.stdout
    assert {"on cpu0" in r.stdout, "on cpu1" in r.stdout} == {True}, r.stdout
    exps_shown = shown(project)
    assert {n: exps_shown[n]["params"]["train_head"]["lr"] for n in ("lr-1", "lr-2")} == {"lr-1": 0.02, "lr-2": 0.05}
    head = {n: exps_shown[n]["metrics"]["metrics/train_head.json"]["val_acc"] for n in ("lr-1", "lr-2")}
    assert all(0.0 <= v <= 1.0 for v in head.values())
    # The summary table shows what DVC recorded.
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("lr-")}
    assert all(f"{head[n]:.4f}" in rows[n] for n in head), r.stdout
    assert workspace(project) == before  # params.yaml, dvc.lock, metrics, every output: byte for byte
    assert list((tmp_path / "clones").iterdir()) == []
    # A second run under the same names is refused before anything runs.
    again = runner(project, "-S", "train_head.lr=0.02,0.05", "--target", "train_head", "-n", "lr")
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "experiment lr-1 exists at this commit" in again.stderr


@pytest.mark.slow
def test_a_failed_experiment_is_reported_and_the_other_still_lands(project, tmp_path):
    (tmp_path / "queue.yaml").write_text("- {train_head: {lr: 0.03}}\n- runtime: {device: cuda}\n")
    before = workspace(project)
    r = runner(project, "--queue", str(tmp_path / "queue.yaml"), "--workers", "2", "--target", "train_head",
               "-n", "q", "--workdir", str(tmp_path / "clones"))
    assert r.returncode == 1, r.stdout + r.stderr
    # Named, with the end of its output: the stage's own one-line reason (a CPU worker sees no GPU).
    assert "experiments: q-2 failed (exit" in r.stderr
    assert "runtime.device: cuda was asked for but torch sees no CUDA device" in r.stderr.split("q-2 failed")[1]
    assert "1 of 2 done" in r.stdout and "1 failed" in r.stdout
    progress = [line for line in r.stdout.splitlines() if line.startswith("[") and " q-2 " in line]
    assert progress and "FAILED (exit" in progress[0] and progress[0].endswith("use auto or cpu"), r.stdout
    names = shown(project)
    assert "q-1" in names and "q-2" not in names
    assert names["q-1"]["params"]["train_head"]["lr"] == 0.03
    assert workspace(project) == before
    assert list((tmp_path / "clones").iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_stops_the_experiments_and_removes_the_clones(project, tmp_path):
    before = workspace(project)
    clones = tmp_path / "clones"
    proc = runner(project, "-S", "seed=11,12", "--workers", "2", "--workdir", str(clones), background=True)
    deadline = time.monotonic() + 120
    while not any(clones.glob("*/w1/.dvc/config.local")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # both `dvc exp run` under way
    workers = [p for p in psutil.process_iter(["cwd"]) if str(clones) in (p.info["cwd"] or "")]
    assert workers, "no experiment was running"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.rstrip().endswith("experiments: interrupted"), out + err
    assert list(clones.iterdir()) == []
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, alive
    assert workspace(project) == before


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [
    (["-S", "strategy=finetune,"], "-S: "),
    (["-S", "train_head.lrr=0.1,0.2"], "params.yaml has no key train_head.lrr (did you mean train_head.lr?)"),
    (["-S", "strategy=finetune,fine_tune"], "strategy: 'fine_tune' is not valid; choose one of"),
    (["-S", "seed=1", "--target", "train_heads"], "--target train_heads: no such stage (did you mean train_head?)"),
    (["--workers", "2"], "nothing to run"),
    (["-S", "seed=1", "--workers", "0"], "--workers 0: give at least 1"),
    (["-S", "seed=1", "--gpus", "0,x"], "--gpus '0,x': give GPU indices"),
    (["-S", "seed=1", "-n", "a b"], "not a valid experiment name"),
    (["-S", "seed=1", "--workers", "1", "--gpus", "0"], "not allowed with argument"),
])
def test_bad_input_is_one_line_and_runs_nothing(project, monkeypatch, capsys, argv, message):
    from stages.experiments import main

    monkeypatch.chdir(project)
    with pytest.raises(SystemExit) as e:
        cli.run("experiments", lambda: main(argv))
    err = capsys.readouterr().err
    assert e.value.code == cli.EXIT_USER_ERROR and err.count("\n") == 1 and err.startswith("experiments: "), err
    assert message in err, err


def test_grid_is_dvc_sweep_syntax_and_names_follow_dvc():
    points = exps.grid(["strategy=finetune,partial", "seed=range(0,3)", "data.classes=[5,6]"])
    assert len(points) == 6 and points[0] == ["strategy=finetune", "seed=0", "data.classes=[5,6]"]
    assert points[-1] == ["strategy=partial", "seed=2", "data.classes=[5,6]"]
    assert exps.names("sweep", 3, set()) == ["sweep-1", "sweep-2", "sweep-3"]  # as dvc exp run --queue -n sweep
    assert len(set(exps.names(None, 5, set()))) == 5
    queued = [[exps.override("strategy", "finetune")], [exps.override("finetune.lr", 0.003)]]
    assert exps.combine(queued, [["seed=0"], ["seed=1"]]) == [
        ["strategy='finetune'", "seed=0"], ["strategy='finetune'", "seed=1"], ["finetune.lr=0.003", "seed=0"],
        ["finetune.lr=0.003", "seed=1"]]
    base = {"strategy": "feature_extract", "data": {"classes": [1], "crop_pct": None}, "backbone": {"arch": "x"}}
    got = exps.resolve(base, ["data.classes=[5,6]", exps.override("backbone.arch", "timm/it's"), "data.crop_pct=0.9"])
    assert got == {"strategy": "feature_extract", "data": {"classes": [5, 6], "crop_pct": 0.9},
                   "backbone": {"arch": "timm/it's"}}


def test_slots_share_the_cores_and_map_gpus_through_the_visible_ones(monkeypatch):
    assert [s.cpus for s in exps.cpu_slots(2, [0, 1, 2, 3, 4])] == [(0, 1, 2), (3, 4)]
    assert [s.cpus for s in exps.cpu_slots(3, [0, 1])] == [(0,), (1,), (0,)]
    assert exps.cpu_slots(1, [0])[0].env({})["CUDA_VISIBLE_DEVICES"] == ""  # a CPU slot sees no GPU
    slots = exps.gpu_slots("1,0,0", visible=["4", "6"], cores=list(range(6)))
    assert [(s.label, s.env({})["CUDA_VISIBLE_DEVICES"], s.cpus) for s in slots] == [
        ("gpu1", "6", (0, 1)), ("gpu0.0", "4", (2, 3)), ("gpu0.1", "4", (4, 5))]
    with pytest.raises(cli.UserError, match="no GPU 2; 2 visible"):
        exps.gpu_slots("2", visible=["4", "6"])
