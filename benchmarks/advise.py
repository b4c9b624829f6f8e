"""Which strategy for YOUR data: the scenario study's grid, run on what params.yaml points at.

    python -m benchmarks.advise                          # every strategy, budgets up to what you have, 3 seeds
    python -m benchmarks.advise --budgets 5,20 --seeds 2 --strategies feature_extract,finetune,"partial k=1"
    python -m benchmarks.advise --report                 # only rebuild the advice from advice/advice.json
    make advise ARGS="--budgets 5,20"

One domain, yours: data.source, data.root, data.classes, backbone.arch and pretrained.* as HEAD's
params.yaml has them (the experiments run on HEAD, so uncommitted changes to params.yaml are refused).
The grid is the scenario study's (benchmarks/scenarios.py), run by its machinery:

- labelled budgets (data.train_per_class): 5, 20, 50, 200, 500, 2000, ... below what the smallest
  class has left for training once val and test are carved (prepare's own split rules, for every
  seed), that number itself, and your own data.train_per_class (null: that number);
- strategies feature_extract, finetune, partial k=1, partial k=3, scratch; each strategy's learning
  rate picked by validation accuracy from a grid (0.003, 0.01, 0.03, the study's; around your own
  finetune.lr, x1/3, x1, x3, when finetune.optimizer is not an SGD one) at your budget and the first
  seed; finetune.epochs as yours at every budget;
- seeds 0 .. N-1 (default 3): a seed sets `seed` and `data.split_seed`, so each seed is another
  labelled sample, val and test split, the same for every strategy: a paired comparison.

Every cell is a DVC experiment (`dvc exp show` lists them; names scn-advise-...), run through
transfer/experiments.py on --workers CPU clones or --gpus (default: one per visible GPU, else 2),
the project's DVC cache shared, so a stage any cell ran is restored for every other that needs it.
Results accumulate in advice/advice.json (git-ignored; a killed run resumes, for the same commit and
the same files under data.root); advice.md (the advice and tables) and advice.png (test accuracy
against budget) are written beside it.

The advice, per budget: RULE below. Validation accuracy chooses, so the test split stays an honest
estimate of the chosen strategy; test accuracy is reported beside it, never used to choose.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from benchmarks import scenarios
from transfer import cli, experiments, paths
from transfer.cli import UserError

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "advice"
DOMAIN = "advise"  # the study's one domain: experiment names scn-advise-b<budget>-<strategy>-lr<lr>-s<seed>
LADDER = (5, 20, 50, 200, 500, 2000, 5000, 20000, 50000)
SGD_FAMILY = ("sgd", "momentum", "nesterov")  # the optimizers the study's lr grid was made for
RULE = ("The recommendation is the strategy with the highest mean validation accuracy over the seeds (ties: the "
        "earlier in the strategy list). Another strategy is within noise of it when their paired difference (same "
        "seeds, so the same splits) has a mean no larger than its standard deviation over the seeds; otherwise it "
        "is clearly behind. With one seed there is no spread, and the rule says nothing. Test accuracy is "
        "reported, never used to choose. ± is the standard deviation over the seeds (population, as the "
        "scenario study's table).")


# ---------------------------------------------------------------- the study, from params.yaml


def head_params(project: Path) -> dict:
    """HEAD's params.yaml (what the experiments run on); refused when the workspace's differs."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)

    shown = git("show", f"HEAD:{paths.PARAMS.as_posix()}")
    if shown.returncode != 0:
        raise UserError(f"{project}: advise runs DVC experiments on a commit; run it in the git project with "
                        f"{paths.PARAMS} committed")
    if git("diff", "--quiet", "HEAD", "--", paths.PARAMS.as_posix()).returncode != 0:
        raise UserError(f"{paths.PARAMS} has uncommitted changes, and the experiments run on HEAD's: commit it "
                        f"(git commit {paths.PARAMS}) so the advice is about the data it points at")
    return yaml.safe_load(shown.stdout) or {}


@dataclass
class Capacity:
    """The fewest training images any class has (`train`: the largest budget every seed allows), which
    class and seed that is, and the classes chosen."""
    train: int
    cls: str
    seed: int
    classes: list[str]


def smallest_class(project: Path, d, seeds: list[int]) -> Capacity:
    """The fewest training images any class has once val and test are carved, over the seeds, by
    prepare's own rules (stages.prepare.plan_splits, without a budget). Files are not decoded: an
    unreadable one can leave a class one short, which prepare then says."""
    from stages import prepare
    from transfer import data

    collected = data.collect(d.source, project / d.root, data.CsvSpec.from_params(d))
    selected = data.resolve_classes(d.classes, collected.classes, "data.classes")
    # The files prepare splits (as in stages.prepare.prepare): not excluded by their folder, of a chosen class.
    kept = [i for i in collected.items if not (i.presplit or "").startswith("excluded:") and i.label in selected]
    labels = np.array([selected.index(i.label) for i in kept], dtype=np.int64)
    fewest = None
    for seed in seeds:
        _, _, final, _ = prepare.plan_splits(kept, labels, data.split_keys(kept, seed), val_fraction=d.val_fraction,
                                             test_fraction=d.test_fraction, train_per_class=None,
                                             eval_per_class=d.eval_per_class, selected=selected, layout=collected.layout)
        count, label = min((n, c) for c, n in Counter(labels[final["train"]].tolist()).items())
        if fewest is None or count < fewest.train:
            fewest = Capacity(count, selected[label], seed, selected)
    return fewest


def ladder(cap: int, current: int) -> list[int]:
    """The budgets: the ladder's rungs below the cap, the cap (all the smallest class has) and yours."""
    return sorted({b for b in LADDER if b < cap} | {cap, current})


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} {text}: give whole numbers separated by commas, e.g. {option} 5,20,50") from None
    if not values or min(values) < 1:
        raise UserError(f"{option} {text}: give numbers of at least 1, e.g. {option} 5,20,50")
    return sorted(set(values))


def parse_floats(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} {text}: give numbers separated by commas, e.g. {option} 0.003,0.01") from None
    if not values or min(values) <= 0:
        raise UserError(f"{option} {text}: give learning rates above 0, e.g. {option} 0.003,0.01")
    return sorted(set(values))


def parse_strategies(text: str, freeze_blocks: int) -> list[tuple[str, str, int]]:
    """Study labels (feature_extract, finetune, partial k=N, scratch; spaces optional); plain partial
    is partial with your finetune.freeze_blocks."""
    known = {label.replace(" ", ""): (label, strategy, k) for label, strategy, k in scenarios.STRATEGIES}
    out = []
    for name in (n.strip() for n in text.split(",")):
        key = name.replace(" ", "")
        k = re.fullmatch(r"partialk=(\d+)", key)
        if key in known:
            out.append(known[key])
        elif key == "partial" or (k and int(k[1]) >= 1):
            n = freeze_blocks if key == "partial" else int(k[1])
            out.append((f"partial k={n}", "partial", n))
        else:
            raise UserError(f"--strategies: {name!r} is not a strategy; choose from feature_extract, finetune, "
                            "partial k=N (N leading blocks frozen, e.g. partial k=1), scratch")
    return list(dict.fromkeys(out))


def lr_grids(p, lrs: list[float] | None) -> tuple[list[float], list[float]]:
    """(finetune.lr grid, train_head.lr grid). The study's grid is for SGD; for another optimizer it is
    your finetune.lr x1/3, x1, x3. A logreg head has no learning rate: its grid is one value."""
    study = scenarios.full_study()
    if lrs is not None:
        finetune, head = lrs, lrs
    elif p.finetune.optimizer in SGD_FAMILY:
        finetune, head = study.lrs, study.head_lrs
    else:
        finetune = [float(f"{p.finetune.lr * f:.2g}") for f in (1 / 3, 1, 3)]
        head = study.head_lrs
    if p.train_head.kind == "logreg":
        head = [p.train_head.lr]
    return list(finetune), list(head)


def user_study(p, *, budgets: list[int], current: int, seeds: list[int], strategies, lrs: list[float] | None,
               epochs: int) -> scenarios.Study:
    finetune_lrs, head_lrs = lr_grids(p, lrs)
    d = p.data
    domain = {"data.source": d.source, "data.root": d.root, "data.classes": d.classes, "backbone.arch": p.backbone.arch,
              "pretrained.source": p.pretrained.source}
    return scenarios.Study(domains={DOMAIN: domain}, common={}, budgets=budgets,
                           epochs={b: epochs for b in {*budgets, current}}, lrs=finetune_lrs, head_lrs=head_lrs,
                           seeds=seeds, tune_budget=current, strategies=strategies, threads=0)


def check_cells(study: scenarios.Study, base: dict) -> None:
    """Every strategy's cell at the largest budget is a valid params.yaml, before anything runs."""
    from transfer.params import validate

    for label, strategy, k in study.strategies:
        lr = (study.head_lrs if strategy == "feature_extract" else study.lrs)[0]
        cell = scenarios.cell_params(study, DOMAIN, max(study.budgets), strategy, k, lr, study.seeds[-1])
        try:
            validate(experiments.resolve(base, [experiments.override(key, v) for key, v in cell.items()]))
        except UserError as e:
            raise UserError(f"{label} at {max(study.budgets)}/class: {e}") from None


def data_reachable(project: Path, root: str) -> None:
    """The cells run in clones of HEAD, which see data/raw (linked), git's files and absolute paths."""
    rel = Path(root)
    if rel.is_absolute() or rel.parts[:2] == ("data", "raw"):
        return
    tracked = subprocess.run(["git", "ls-files", "--", root], cwd=project, capture_output=True, text=True).stdout
    if not tracked.strip() and not (project / f"{root.rstrip('/')}.dvc").exists():
        raise UserError(f"data.root: {root} is neither under data/raw (which the experiments' clones link to) nor "
                        "tracked by git or DVC, so the experiments would not find it; move it under data/raw or "
                        "give an absolute path")


def fingerprint(project: Path, d) -> dict:
    """What the recorded cells are valid for: this commit and these files under data.root (path, size,
    modification time). Anything else starts the results afresh."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    h = hashlib.sha256()
    root = project / d.root
    if d.source != "digits" and root.exists():
        for folder, dirs, files in os.walk(root, followlinks=True):
            dirs.sort()
            for name in sorted(files):
                st = os.stat(Path(folder) / name)
                h.update(f"{Path(folder, name).relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"commit": commit, "data_files": h.hexdigest()}


# ---------------------------------------------------------------- the decision


@dataclass
class Verdict:
    best: str
    within: list[str]  # within noise of the best
    behind: list[str]  # clearly behind it
    untold: list[str]  # fewer than two seeds in common with the best: no spread to judge by


def recommend(scores: dict[str, dict[int, float]]) -> Verdict:
    """RULE, on {strategy: {seed: score}} (validation accuracy), strategies in the study's order."""
    order = [s for s, v in scores.items() if v]
    means = {s: statistics.mean(scores[s].values()) for s in order}
    best = max(order, key=lambda s: (means[s], -order.index(s)))
    out = Verdict(best, [], [], [])
    for s in order:
        if s == best:
            continue
        common = sorted(set(scores[best]) & set(scores[s]))
        if len(common) < 2:
            out.untold.append(s)
            continue
        diff = [scores[best][seed] - scores[s][seed] for seed in common]
        # A hair of slack: equal floats computed two ways (mean 0.1, std 0.1) must not flip the verdict.
        (out.within if statistics.mean(diff) <= statistics.pstdev(diff) + 1e-12 else out.behind).append(s)
    return out


def per_seed(results: dict, budget: int, metric: str) -> dict[str, dict[int, float]]:
    """{strategy: {seed: metric}} at `budget`, each strategy at its chosen lr, the study's seeds only."""
    study = results["study"]
    out: dict[str, dict[int, float]] = {}
    for label in study["strategies"]:
        lr = results["chosen_lr"].get(f"{DOMAIN}/{label}")
        out[label] = {c["seed"]: c[metric] for c in results["cells"].values()
                      if c["domain"] == DOMAIN and c["strategy"] == label and c["budget"] == budget and c["lr"] == lr
                      and c["seed"] in study["seeds"] and c.get(metric) is not None}
    return out


def _usable(scores: dict[str, dict[int, float]]) -> bool:
    values = [v for s in scores.values() for v in s.values()]
    return bool(values) and not any(math.isnan(v) for v in values)


def advise(results: dict) -> dict[int, dict]:
    """Per budget: the verdict on validation accuracy (test accuracy where there is no validation
    split), with every strategy's mean, std and n of both."""
    out = {}
    for budget in results["study"]["budgets"]:
        val, test = per_seed(results, budget, "val_acc"), per_seed(results, budget, "test_acc")
        metric, chose = ("val_acc", val) if _usable(val) else ("test_acc", test)
        if not _usable(chose):
            continue
        v = recommend(chose)
        stats = {name: {s: _stats(scores[s]) for s in scores if scores[s]} for name, scores in (("val", val), ("test", test))}
        out[budget] = dict(best=v.best, within=v.within, behind=v.behind, untold=v.untold, chosen_by=metric,
                           lr=results["chosen_lr"][f"{DOMAIN}/{v.best}"], **stats)
    return out


def _stats(values: dict[int, float]) -> list:
    """[mean, std, n]; NaN for both where a value is NaN (accuracy on an empty validation split)."""
    xs = list(values.values())
    if any(math.isnan(x) for x in xs):
        return [math.nan, math.nan, len(xs)]
    return [statistics.mean(xs), statistics.pstdev(xs), len(xs)]


def _pct(stat: list) -> str:
    return f"{100 * stat[0]:.1f} ± {100 * stat[1]:.1f} %"


def verdict_line(budget: int, a: dict, seeds: int) -> str:
    """`partial k=1 (lr 0.01): test 81.0 ± 4.0 % (val 83.1 ± 3.2 %), within noise of finetune, ...`"""
    best = a["best"]
    val = f"val {_pct(a['val'][best])}" if a["chosen_by"] == "val_acc" else "no validation split: chosen by test"
    line = f"{best} (lr {a['lr']:g}): test {_pct(a['test'][best])} ({val})"
    others = len(a["within"]) + len(a["behind"]) + len(a["untold"])
    if not others:
        return line + " (the only strategy run)"
    if a["untold"] and not (a["within"] or a["behind"]):
        return line + f"; with {seeds} seed there is no spread to tell it from the others (run --seeds 2 or more)"
    if a["within"] and not (a["behind"] or a["untold"]):
        cheap = "; feature_extract, among them, is the cheapest to train" if "feature_extract" in [best, *a["within"]] else ""
        return line + f"; all {others + 1} strategies are within noise of each other: at {budget}/class this data " \
                      f"cannot tell them apart{cheap}"
    parts = [f"within noise of {', '.join(a['within'])}"] if a["within"] else []
    if a["behind"]:
        alone = not (a["within"] or a["untold"])
        parts.append("clearly ahead of every other strategy" if alone else f"clearly ahead of {', '.join(a['behind'])}")
    if a["untold"]:
        parts.append(f"not judged against {', '.join(a['untold'])} (one seed in common)")
    return line + ", " + "; ".join(parts)


# ---------------------------------------------------------------- the report


def metric_table(results: dict, advice: dict, metric: str) -> list[str]:
    budgets = results["study"]["budgets"]
    stats = {b: per_seed(results, b, metric) for b in budgets}
    lines = ["| strategy | lr | " + " | ".join(f"{b}/class" for b in budgets) + " |", "|---|---|" + "---|" * len(budgets)]
    for label in results["study"]["strategies"]:
        cells = []
        for b in budgets:
            if not stats[b].get(label):
                cells.append("")
                continue
            text = _pct(_stats(stats[b][label]))[:-2]
            a = advice.get(b, {})
            cells.append(f"**{text}**" if a.get("best") == label else f"{text} ≈" if label in a.get("within", []) else text)
        lines.append(f"| {label} | {results['chosen_lr'][f'{DOMAIN}/{label}']:g} | " + " | ".join(cells) + " |")
    return lines


def report(results: dict) -> str:
    advice = {int(b): a for b, a in results["advice"].items()}
    study, info = results["study"], results["data"]
    seeds = len(study["seeds"])
    current = results["current_budget"]
    lines = ["# Which strategy for this data", "",
             f"{info['source']} `{info['root']}`, {len(info['classes'])} classes ({', '.join(map(str, info['classes'][:8]))}"
             f"{', ...' if len(info['classes']) > 8 else ''}); {info['arch']}, pretrained.source {info['pretrained']}; "
             f"commit {results['fingerprint']['commit'][:7]}. The smallest class has {info['cap']} training images "
             f"after val and test are carved ({info['cap_class']}, seed {info['cap_seed']}).", ""]
    if current in advice:
        lines += [f"**At your budget ({current}/class): {verdict_line(current, advice[current], seeds)}.**", ""]
    lines += [f"- {b}/class: {verdict_line(b, a, seeds)}" for b, a in sorted(advice.items()) if b != current]
    lines += ["", "Validation accuracy (%), what chooses: the recommendation in bold, ≈ within noise of it.", ""]
    lines += metric_table(results, advice, "val_acc")
    lines += ["", "Test accuracy (%), reported only.", ""]
    lines += metric_table(results, advice, "test_acc")
    lines += ["", f"Mean ± standard deviation over {seeds} seeds ({', '.join(map(str, study['seeds']))}); each seed is "
              "another labelled sample, val/test split and initialisation, the same for every strategy. Each "
              f"strategy's lr was chosen by validation accuracy at {study['tune_budget']}/class, seed "
              f"{study['seeds'][0]}; finetune.epochs {max(study['epochs'].values())} at every budget.", "", RULE]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out: Path) -> None:
    results["advice"] = {str(b): a for b, a in advise(results).items()}
    results["rule"] = RULE
    (out / "advice.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    (out / "advice.md").write_text(report(results))
    scenarios.figure(results, out / "advice.png")


# ---------------------------------------------------------------- the command


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other user error
        raise UserError(f"{message} (see --help)")


def main(argv: list[str] | None = None, project: Path = ROOT, out: Path | None = None) -> dict:
    ap = _Parser(prog="python -m benchmarks.advise", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", help="labelled images per class, e.g. 5,20,50 (default: the ladder up to what you have)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    ap.add_argument("--strategies", help="comma-separated, e.g. feature_extract,finetune,'partial k=1' (default: all five)")
    ap.add_argument("--lrs", help="the learning-rate grid of every strategy, e.g. 0.003,0.01")
    ap.add_argument("--epochs", type=int, help="finetune.epochs at every budget (default: params.yaml's)")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--workers", "-j", type=int, help="CPU workers: experiments at once, the cores shared out")
    where.add_argument("--gpus", help="GPU indices, one worker each (e.g. 0,1)")
    ap.add_argument("--out", type=Path, help="where advice.json/.md/.png go (default: advice/ in the project)")
    ap.add_argument("--report", action="store_true", help="only rebuild the advice, table and figure from advice.json")
    args = ap.parse_args(argv)
    project = Path(project).resolve()
    out = Path(args.out or out or project / "advice")
    results_file = out / "advice.json"
    if args.report:
        if not results_file.exists():
            raise UserError(f"--report: {results_file} not found; run python -m benchmarks.advise first")
        results = json.loads(results_file.read_text())
    else:
        results = run(args, project, results_file)
    write_outputs(results, out)
    print(report(results))
    print(f"written {out / 'advice.md'}, {out / 'advice.png'} and {results_file}")
    return results


def run(args, project: Path, results_file: Path) -> dict:
    from transfer.params import validate

    base = head_params(project)
    p = validate(base)
    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: give at least 1 (3 or more to see the spread)")
    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs {args.epochs}: give at least 1")
    seeds = list(range(args.seeds))
    if p.data.source != "digits":  # digits come with scikit-learn
        data_reachable(project, p.data.root)
    has = smallest_class(project, p.data, seeds)
    cap, cap_class, cap_seed = has.train, has.cls, has.seed
    current = p.data.train_per_class or cap
    if current > cap:
        print(f"advise: note: data.train_per_class {current} is more than class {cap_class!r} has for seed {cap_seed} "
              f"({cap}); your budget is taken as {cap}", file=sys.stderr)
        current = cap
    budgets = parse_ints(args.budgets, "--budgets") if args.budgets else ladder(cap, current)
    if max(budgets) > cap:
        raise UserError(f"--budgets {args.budgets}: {max(budgets)} is more than class {cap_class!r} has for training "
                        f"with seed {cap_seed} ({cap}, after val and test are carved); give budgets up to {cap}")
    strategies = parse_strategies(args.strategies, p.finetune.freeze_blocks) if args.strategies else list(scenarios.STRATEGIES)
    study = user_study(p, budgets=budgets, current=current, seeds=seeds, strategies=strategies,
                       lrs=parse_floats(args.lrs, "--lrs") if args.lrs else None,
                       epochs=args.epochs or p.finetune.epochs)
    check_cells(study, base)
    slots = experiments.slots_for(gpus=args.gpus, workers=args.workers)

    stamp = fingerprint(project, p.data)
    if results_file.exists() and json.loads(results_file.read_text()).get("fingerprint") != stamp:
        results_file.replace(results_file.with_suffix(".json.old"))
        print(f"advise: {results_file} was made at another commit or on other data files; starting afresh "
              f"(the old one is {results_file.with_suffix('.json.old')})", file=sys.stderr)
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results.update(fingerprint=stamp, current_budget=current,
                   data=dict(source=p.data.source, root=p.data.root, arch=p.backbone.arch, pretrained=p.pretrained.source,
                             classes=has.classes, cap=cap, cap_class=cap_class, cap_seed=cap_seed))
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=1, sort_keys=True))  # run_study resumes from it

    grid = sum(len(study.head_lrs if s == "feature_extract" else study.lrs) for _, s, _ in strategies)
    print(f"advise: budgets {', '.join(map(str, budgets))}/class (yours: {current}), {len(strategies)} strategies, "
          f"{len(seeds)} seeds: {grid} tuning runs at {current}/class and {len(budgets) * len(strategies) * len(seeds)} "
          f"cells, as DVC experiments on {len(slots)} workers ({', '.join(s.describe() for s in slots)})", flush=True)
    with experiments.sigterm_as_interrupt():  # `kill` cleans up like Ctrl-C: the clones go
        return scenarios.run_study(study, project, results_file, slots=slots)


if __name__ == "__main__":
    cli.run("advise", main)
