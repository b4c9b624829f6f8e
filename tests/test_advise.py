"""python -m benchmarks.advise: the scenario study's grid on the data params.yaml points at (a 3-class
toy tree here), through the experiment runner; its decision rule on hand-made scores; the budgets
it derives checked against prepare itself; its user errors."""
import json
import re
import shutil
import statistics
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, make_tree, plain_spec, tiny_params, write_params

from benchmarks import advise
from transfer.cli import UserError
from transfer.params import validate


def sh(cwd, *args):
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True,
                       env={**__import__("os").environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e", "DVC_NO_ANALYTICS": "1"})
    assert r.returncode == 0, f"{args}: {r.stdout}\n{r.stderr}"
    return r.stdout


def toy_params(**data) -> dict:
    """3 classes of tiny PNGs, 16 px, a randomly initialised resnet18: the cheapest real pipeline."""
    return tiny_params(data={**dict(source="imagefolder", root="data/raw/toy", classes=None, train_per_class=4,
                                    eval_per_class=4), **data},
                       pretrained=dict(source="none"), train_head=dict(epochs=5))


@pytest.fixture
def project(tmp_path):
    """A git + DVC copy of the project whose params.yaml points at a 3-class toy tree (a: 10, b: 10, c: 7)."""
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    for folder in ("stages", "transfer", "benchmarks"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "results", "studies"))
    write_params(tmp_path, toy_params())
    make_tree(tmp_path / "data/raw/toy", classes=("a", "b"), per_class=10)
    make_tree(tmp_path / "data/raw/toy", classes=("c",), per_class=7, seed=1)
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, sys.executable, "-m", "dvc", "init", "-q")
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-qm", "toy")
    return tmp_path


# ---------------------------------------------------------------- the decision rule


def test_a_strategy_ahead_on_every_seed_is_clearly_ahead():
    v = advise.recommend({"feature_extract": {0: .60, 1: .70, 2: .65}, "finetune": {0: .80, 1: .90, 2: .84}})
    assert (v.best, v.within, v.behind, v.untold) == ("finetune", [], ["feature_extract"], [])
    # A consistent gap is clear however small: differences 0.01 on both seeds have no spread.
    v = advise.recommend({"finetune": {0: .80, 1: .90}, "partial k=1": {0: .79, 1: .89}})
    assert v.behind == ["partial k=1"]


def test_differences_inside_the_seed_spread_are_within_noise():
    scores = {"finetune": {0: .80, 1: .74, 2: .82}, "partial k=1": {0: .70, 1: .80, 2: .80},
              "scratch": {0: .40, 1: .45, 2: .42}}
    # finetune leads on average; partial k=1 wins seed 1. Paired differences 0.10, -0.06, 0.02: mean 0.02,
    # standard deviation 0.065, so inside the spread. Scratch trails by 0.36-0.40 on every seed.
    assert statistics.mean([.10, -.06, .02]) < statistics.pstdev([.10, -.06, .02])
    v = advise.recommend(scores)
    assert (v.best, v.within, v.behind) == ("finetune", ["partial k=1"], ["scratch"])
    a = dict(best="finetune", within=["partial k=1"], behind=["scratch"], untold=[], chosen_by="val_acc", lr=0.01,
             val={"finetune": [.7867, .0340, 3]}, test={"finetune": [.81, .04, 3]})
    assert advise.verdict_line(5, a, 3) == ("finetune (lr 0.01): test 81.0 ± 4.0 % (val 78.7 ± 3.4 %), within noise of "
                                            "partial k=1; clearly ahead of scratch")


def test_all_within_noise_is_said_plainly_and_ties_go_to_the_earlier_strategy():
    # Equal means (0.75 both): the earlier strategy is named; each wins one seed.
    v = advise.recommend({"feature_extract": {0: .70, 1: .80}, "finetune": {0: .80, 1: .70}})
    assert (v.best, v.within, v.behind) == ("feature_extract", ["finetune"], [])
    a = dict(best=v.best, within=v.within, behind=[], untold=[], chosen_by="val_acc", lr=0.003,
             val={"feature_extract": [.75, .05, 2]}, test={"feature_extract": [.7, 0.0, 2]})
    line = advise.verdict_line(20, a, 2)
    assert "all 2 strategies are within noise of each other: at 20/class this data cannot tell them apart" in line
    assert "feature_extract, among them, is the cheapest to train" in line


def test_one_seed_has_no_spread_to_judge_by():
    v = advise.recommend({"finetune": {0: .9}, "scratch": {0: .5}})
    assert (v.best, v.within, v.behind, v.untold) == ("finetune", [], [], ["scratch"])
    a = dict(best="finetune", within=[], behind=[], untold=["scratch"], chosen_by="val_acc", lr=0.01,
             val={"finetune": [.9, 0, 1]}, test={"finetune": [.8, 0, 1]})
    assert "no spread to tell it from the others (run --seeds 2 or more)" in advise.verdict_line(5, a, 1)


def cell(strategy, budget, seed, lr, val, test):
    return {"domain": advise.DOMAIN, "strategy": strategy, "budget": budget, "seed": seed, "lr": lr, "val_acc": val,
            "test_acc": test}


def hand_results() -> dict:
    """Two budgets, two strategies, two seeds, as advice.json holds them, plus cells that must not count."""
    return {"study": {"budgets": [5, 50], "seeds": [0, 1], "strategies": ["finetune", "scratch"], "tune_budget": 5,
                      "epochs": {"5": 3, "50": 3}, "domains": {"advise": {"backbone.arch": "resnet18"}}},
            "chosen_lr": {"advise/finetune": 0.01, "advise/scratch": 0.03}, "current_budget": 5,
            "fingerprint": {"commit": "0123456789abcdef", "data_files": "..."},
            "data": {"source": "imagefolder", "root": "data/raw/toy", "classes": ["a", "b", "c"], "arch": "resnet18",
                     "pretrained": "none", "cap": 60, "cap_class": "c", "cap_seed": 1},
            "cells": {"f0": cell("finetune", 5, 0, 0.01, .90, .60), "f1": cell("finetune", 5, 1, 0.01, .80, .62),
                      "s0": cell("scratch", 5, 0, 0.03, .50, .90), "s1": cell("scratch", 5, 1, 0.03, .52, .92),
                      "F0": cell("finetune", 50, 0, 0.01, .90, .91), "F1": cell("finetune", 50, 1, 0.01, .80, .83),
                      "S0": cell("scratch", 50, 0, 0.03, .85, .88), "S1": cell("scratch", 50, 1, 0.03, .83, .86),
                      # not counted: another lr, a seed outside the study
                      "x": cell("scratch", 5, 0, 0.01, .99, .99), "y": cell("scratch", 5, 7, 0.03, .99, .99)}}


def test_validation_accuracy_chooses_and_only_the_chosen_lr_and_seeds_count():
    results = hand_results()
    a = advise.advise(results)[5]
    # scratch tests better, but validation chooses: finetune (val 0.85 against 0.51, on both seeds).
    assert (a["best"], a["behind"], a["chosen_by"], a["lr"]) == ("finetune", ["scratch"], "val_acc", 0.01)
    assert a["test"]["finetune"] == [pytest.approx(.61), pytest.approx(.01), 2]
    assert a["val"]["scratch"] == [pytest.approx(.51), pytest.approx(.01), 2]
    # At 50/class finetune leads by 0.05 then trails by 0.03: mean 0.01, std 0.04, within noise.
    a50 = advise.advise(results)[50]
    assert (a50["best"], a50["within"], a50["behind"]) == ("finetune", ["scratch"], [])
    # No validation split (val accuracy NaN): test chooses, and the line says so.
    for c in results["cells"].values():
        c["val_acc"] = float("nan")
    a = advise.advise(results)[5]
    assert (a["best"], a["chosen_by"]) == ("scratch", "test_acc")
    assert "no validation split: chosen by test" in advise.verdict_line(5, a, 2)


def test_the_report_leads_with_your_budget_and_marks_the_tables():
    results = hand_results()
    results["advice"] = {str(b): a for b, a in advise.advise(results).items()}
    md = advise.report(results)
    lines = md.splitlines()
    assert lines[2].startswith("imagefolder `data/raw/toy`, 3 classes (a, b, c); resnet18, pretrained.source none; "
                               "commit 0123456. The smallest class has 60 training images")
    assert lines[4] == ("**At your budget (5/class): finetune (lr 0.01): test 61.0 ± 1.0 % (val 85.0 ± 5.0 %), clearly "
                        "ahead of every other strategy.**")
    assert lines[6].startswith("- 50/class: finetune (lr 0.01): test 87.0 ± 4.0 % (val 85.0 ± 5.0 %); all 2 strategies "
                               "are within noise of each other")
    # Validation then test: the recommendation bold, within noise marked ≈, in both.
    assert "| finetune | 0.01 | **85.0 ± 5.0** | **85.0 ± 5.0** |" in md
    assert "| scratch | 0.03 | 51.0 ± 1.0 | 84.0 ± 1.0 ≈ |" in md
    assert "| scratch | 0.03 | 91.0 ± 1.0 | 87.0 ± 1.0 ≈ |" in md
    assert md.rstrip().endswith(advise.RULE)


# ---------------------------------------------------------------- budgets


def test_the_budgets_stop_at_what_prepare_leaves_the_smallest_class(project, tmp_path_factory):
    from stages import prepare

    p = validate(yaml.safe_load((project / "params.yaml").read_text()))
    has = advise.smallest_class(project, p.data, [0, 1, 2])
    assert has.classes == ["a", "b", "c"] and has.cls == "c" and has.train <= 7 - 2  # c keeps >= 1 val, >= 1 test

    def run_prepare(budget, seed):
        out = tmp_path_factory.mktemp("prepared")
        return prepare.prepare(source="imagefolder", root=str(project / "data/raw/toy"), classes=None, spec=plain_spec(16),
                               val_fraction=p.data.val_fraction, test_fraction=p.data.test_fraction,
                               train_per_class=budget, eval_per_class=4, max_rejected_fraction=0.05, split_seed=seed,
                               out_dir=out, metrics_path=out / "m.json")

    for seed in (0, 1, 2):  # prepare itself accepts the cap for every seed...
        assert run_prepare(has.train, seed)["train_images"] == 3 * has.train
    with pytest.raises(UserError, match="more than the training images"):  # ... and not one more for the worst
        run_prepare(has.train + 1, has.seed)
    assert advise.ladder(has.train, 4) == sorted({4, has.train})
    assert advise.ladder(4900, 5) == [5, 20, 50, 200, 500, 2000, 4900]
    assert advise.ladder(60, 60) == [5, 20, 50, 60]


# ---------------------------------------------------------------- the command


@pytest.mark.slow
def test_advise_runs_the_grid_as_experiments_and_prints_a_recommendation_with_its_spread(project):
    # No --budgets: the ladder below what class c keeps for training (4 of its 7 files, with seed 0), which is
    # also params.yaml's train_per_class.
    r = subprocess.run([sys.executable, "-m", "benchmarks.advise", "--seeds", "2", "--strategies",
                        "feature_extract,finetune", "--lrs", "0.01", "--epochs", "1", "--workers", "2"],
                       cwd=project, capture_output=True, text=True, env={**__import__("os").environ, "DVC_NO_ANALYTICS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    out = project / "advice"
    results = json.loads((out / "advice.json").read_text())
    assert results["study"]["budgets"] == [4] and results["data"]["cap"] == 4
    assert len(results["tuning"]) == 2 and len(results["cells"]) == 4  # 1 budget x 2 strategies x 2 seeds
    assert {c["params"]["data.train_per_class"] for c in results["cells"].values()} == {4}
    assert all(c["params"]["data.root"] == "data/raw/toy" and c["params"]["runtime.threads"] == 0
               for c in results["cells"].values())
    # Every run is a DVC experiment of this project.
    assert len(sh(project, "git", "for-each-ref", "refs/exps").splitlines()) == 6

    # The headline: your budget (params.yaml's train_per_class 4), a strategy of the grid, its test accuracy
    # mean ± std over the two seeds and its validation accuracy, each equal to the json's cells by hand.
    m = re.search(r"\*\*At your budget \(4/class\): (feature_extract|finetune) \(lr 0\.01\): test ([\d.]+) ± ([\d.]+) % "
                  r"\(val ([\d.]+) ± ([\d.]+) %\)(.*)\.\*\*", r.stdout)
    assert m, r.stdout
    best = m[1]

    def by_seed(strategy, metric):
        return {c["seed"]: c[metric] for c in results["cells"].values() if c["strategy"] == strategy and c["budget"] == 4}

    for metric, mean, std in (("test_acc", m[2], m[3]), ("val_acc", m[4], m[5])):
        xs = list(by_seed(best, metric).values())
        assert len(xs) == 2 and (mean, std) == (f"{100 * statistics.mean(xs):.1f}", f"{100 * statistics.pstdev(xs):.1f}")
    other = "finetune" if best == "feature_extract" else "feature_extract"
    val = {s: statistics.mean(by_seed(s, "val_acc").values()) for s in (best, other)}
    assert val[best] > val[other] or (val[best] == val[other] and best == "feature_extract")
    diff = [by_seed(best, "val_acc")[s] - by_seed(other, "val_acc")[s] for s in (0, 1)]
    noise = statistics.mean(diff) <= statistics.pstdev(diff) + 1e-12
    assert ("within noise of each other" in m[6]) == noise and ("clearly ahead" in m[6]) == (not noise)
    assert advise.RULE in r.stdout

    md = (out / "advice.md").read_text()
    assert md in r.stdout and "| finetune | 0.01 |" in md and "| strategy | lr | 4/class |" in md
    assert (out / "advice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sh(project, "git", "status", "--porcelain", "--", "params.yaml", "dvc.lock") == ""
    # --report rebuilds the same advice from the json alone.
    assert advise.main(["--report"], project=project)["advice"] == results["advice"]


def test_user_errors_are_one_line_before_anything_runs(project):
    with pytest.raises(UserError, match=r"--budgets 2,9: 9 is more than class 'c' has for training"):
        advise.main(["--budgets", "2,9"], project=project)
    with pytest.raises(UserError, match="'partial-k1' is not a strategy; choose from feature_extract, finetune, partial k=N"):
        advise.main(["--strategies", "finetune,partial-k1"], project=project)
    assert advise.parse_strategies("partial k=1, partialk=3,partial", 2) == [("partial k=1", "partial", 1),
                                                                              ("partial k=3", "partial", 3),
                                                                              ("partial k=2", "partial", 2)]
    write_params(project, toy_params(train_per_class=3))
    with pytest.raises(UserError, match="params.yaml has uncommitted changes"):
        advise.main([], project=project)
    assert not (project / "advice").exists()
