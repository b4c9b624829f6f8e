"""The scenario study: which strategy for which data, measured.

    python -m benchmarks.scenarios            # the full study (35 minutes on 2 cores, 2 workers)
    python -m benchmarks.scenarios --report   # only rebuild the table and figure from the results

The tutorials' advice for four cases (small or large target data x similar or dissimilar to the
pretraining data): small + similar -> feature extraction; small + dissimilar -> freeze the first k
layers; large + dissimilar -> train from scratch; large + similar -> fine-tune everything. Here:

- similar: resnet18 pretrained on the source task (Fashion-MNIST 0-4) -> Fashion-MNIST 5-9;
- dissimilar: genuine ImageNet EfficientNet-Lite0 -> Fashion-MNIST 5-9 (grey product photos);
- labelled budgets of 5, 50 and 500 images per class; val and test 100 per class; 32 px;
- feature_extract, finetune, partial (k = 1 and 3 frozen blocks), scratch; each strategy's learning
  rate picked per domain from a stated grid by validation accuracy (at 50 per class, seed 0), then
  run with seeds 0, 1, 2 at every budget. A seed sets both `seed` (initialisation, shuffling,
  augmentation) and `data.split_seed` (which files are the labelled budget, val and test), so each
  seed is another labelled sample and test set, the same for every strategy: a paired comparison.

Every cell is a DVC experiment (`dvc exp run -n NAME -S ... evaluate`), listed by `dvc exp show` in
this project and reproducible with `dvc exp apply NAME && dvc repro`. The cells run through
transfer/experiments.py (what `python -m stages.experiments` runs): `--workers` clones of this project
at HEAD (default 2, each pinned to its share of the cores, each stage with one thread), which share
this project's DVC cache, so a stage any worker ran is restored from the run cache for every other
cell that needs it; each experiment is fetched into this project as it ends, and the clones are
removed at the end. This workspace itself is never touched. A failed cell stops the study at the
end of its phase (tuning, then the cells), after the phase's other cells have run and been
recorded, so a re-run resumes after them. Learning-rate tuning cells stop at the stage
that reports validation accuracy (train_head or finetune); the chosen one is then evaluated like
every other cell. Results accumulate in benchmarks/studies/scenarios.json (a killed study resumes
where it stopped); the table (scenarios.md) and figure (scenarios.png) are written from it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from transfer import experiments

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "studies"

# (name, strategy, freeze_blocks)
STRATEGIES = [("feature_extract", "feature_extract", 0), ("finetune", "finetune", 0), ("partial k=1", "partial", 1),
              ("partial k=3", "partial", 3), ("scratch", "scratch", 0)]


@dataclass
class Study:
    domains: dict[str, dict]
    common: dict
    budgets: list[int]
    epochs: dict[int, int]  # fine-tune epochs per budget (fewer images, more epochs)
    lrs: list[float]  # finetune.lr grid (SGD); train_head.lr grid for feature_extract
    head_lrs: list[float]
    seeds: list[int]
    tune_budget: int
    strategies: list[tuple[str, str, int]] = field(default_factory=lambda: list(STRATEGIES))
    threads: int = 1  # runtime.threads of every cell; 0 = as many as the worker's share of the cores


def full_study() -> Study:
    lite0 = "data/raw/pretrained/efficientnet-lite0-57934424.pth"
    return Study(
        domains={
            "similar": {"backbone.arch": "resnet18", "pretrained.source": "train", "pretrained.match": "name"},
            "dissimilar": {"backbone.arch": "timm/tf_efficientnet_lite0", "pretrained.source": "file",
                           "pretrained.match": "order"},
        },
        common={"data.source": "fashion-mnist", "data.root": "data/raw/fashion-mnist", "data.classes": [5, 6, 7, 8, 9],
                "data.image_size": 32, "data.eval_per_class": 100, "pretrained.path": lite0,
                "pretrained.train.classes": [0, 1, 2, 3, 4], "pretrained.train.per_class": 1000,
                "pretrained.train.epochs": 5, "finetune.batch_size": 32, "finetune.scheduler": "cosine",
                "finetune.resume": False, "train_head.epochs": 100},
        budgets=[5, 50, 500], epochs={5: 30, 50: 12, 500: 4}, lrs=[0.003, 0.01, 0.03], head_lrs=[0.003, 0.01, 0.03],
        seeds=[0, 1, 2], tune_budget=50)


def cell_params(study: Study, domain: str, budget: int, strategy: str, freeze: int, lr: float, seed: int) -> dict:
    """Every key a cell sets, the same keys for every cell: an experiment is HEAD's params.yaml plus
    these (whatever ran before it in its clone), and a recorded cell counts as done only with these."""
    p = {**study.common, **study.domains[domain], "seed": seed, "data.split_seed": seed, "data.train_per_class": budget,
         "strategy": strategy, "finetune.epochs": study.epochs[budget], "finetune.freeze_blocks": max(freeze, 1),
         "runtime.threads": study.threads}
    if strategy == "feature_extract":
        p.update({"train_head.lr": lr, "finetune.lr": study.lrs[0]})
    else:
        p.update({"train_head.lr": study.head_lrs[len(study.head_lrs) // 2], "finetune.lr": lr})
    return p


def cell_name(domain: str, budget: int, label: str, lr: float, seed: int) -> str:
    return f"scn-{domain}-b{budget}-{label.replace(' ', '').replace('=', '')}-lr{str(lr).replace('.', 'p')}-s{seed}"


def cell_result(job: "Job", outcome: experiments.Outcome) -> dict:
    """What the study records of one finished experiment (convert is no part of a study). Up to
    evaluate it has a test accuracy; a tuning cell stops where its validation accuracy is known."""
    if job.target == "pretrain":  # a backbone made ahead for later cells: no accuracy on the target task yet
        val = None
    elif job.params["strategy"] == "feature_extract":
        val = outcome.metrics["metrics/train_head.json"]["val_acc"]
    else:
        val = outcome.metrics["metrics/finetune.json"]["val_acc"]
    out = dict(name=job.name, seconds=outcome.seconds, val_acc=val, params=job.params, target=job.target,
               ran=outcome.ran)
    if job.target == "evaluate":
        ev = outcome.metrics["metrics/evaluate/metrics.json"]
        out.update(test_acc=ev["accuracy"], macro_f1=ev["macro_f1"])
    return out


@dataclass
class Job:
    name: str
    params: dict
    target: str
    meta: dict  # domain, budget, strategy label, lr, seed, kind


def tuning_jobs(study: Study) -> list[Job]:
    """Phase 1: every (domain, strategy, lr) at the tuning budget and the first seed, stopped at the stage
    that reports validation accuracy; plus the source-task backbone for every other seed, so that two
    workers never train the same backbone at once in phase 2."""
    per_domain: dict[str, list[Job]] = {}
    for domain in study.domains:
        jobs = per_domain.setdefault(domain, [])
        for label, strategy, freeze in study.strategies:
            grid = study.head_lrs if strategy == "feature_extract" else study.lrs
            for lr in grid:
                jobs.append(Job(cell_name(domain, study.tune_budget, label, lr, study.seeds[0]) + "-tune",
                                cell_params(study, domain, study.tune_budget, strategy, freeze, lr, study.seeds[0]),
                                "train_head" if strategy == "feature_extract" else "finetune",
                                dict(domain=domain, budget=study.tune_budget, strategy=label, lr=lr, seed=study.seeds[0],
                                     kind="tune")))
        if study.domains[domain].get("pretrained.source") == "train":
            label, strategy, freeze = study.strategies[0]
            for seed in study.seeds[1:]:
                lr = (study.head_lrs if strategy == "feature_extract" else study.lrs)[0]
                jobs.append(Job(f"scn-{domain}-pretrain-s{seed}", cell_params(study, domain, study.tune_budget, strategy,
                                                                               freeze, lr, seed), "pretrain",
                                dict(domain=domain, seed=seed, kind="pretrain")))
    return _interleave(per_domain)


def _interleave(per_domain: dict[str, list[Job]]) -> list[Job]:
    """Jobs taken from each domain in turn: two workers that start together then build different
    backbones and embeddings instead of both training the same one (the first full run lost 100 s
    to exactly that: both workers began with the similar domain's first cell)."""
    out, lists = [], [list(jobs) for jobs in per_domain.values()]
    while any(lists):
        for jobs in lists:
            if jobs:
                out.append(jobs.pop(0))
    return out


def study_jobs(study: Study, chosen: dict) -> list[Job]:
    """Phase 2: every domain x strategy x budget x seed at the chosen lr, largest budgets first (the
    longest cells start early, so the workers finish together)."""
    per_domain: dict[str, list[Job]] = {domain: [] for domain in study.domains}
    for budget in sorted(study.budgets, reverse=True):
        for seed in study.seeds:
            for domain, jobs in per_domain.items():
                for label, strategy, freeze in study.strategies:
                    lr = chosen[f"{domain}/{label}"]
                    jobs.append(Job(cell_name(domain, budget, label, lr, seed),
                                    cell_params(study, domain, budget, strategy, freeze, lr, seed), "evaluate",
                                    dict(domain=domain, budget=budget, strategy=label, lr=lr, seed=seed, kind="cell")))
    return _interleave(per_domain)


def run_jobs(pool: experiments.Pool, jobs: list[Job], done: dict, record) -> None:
    """Each job not in `done` with the same params, as an experiment on the first free worker;
    record(job, result) as each ends. A failure is raised once the others have ended."""
    # Done means done with these params: a cell recorded before a key was added to cell_params
    # (data.split_seed) runs again rather than mixing results of two set-ups in one table.
    todo = {job.name: job for job in jobs if done.get(job.name, {}).get("params") != job.params}
    failed: list[experiments.Outcome] = []

    def finished(outcome: experiments.Outcome) -> None:
        job = todo[outcome.experiment.name]
        if outcome.ok:
            record(job, cell_result(job, outcome))
        else:
            failed.append(outcome)

    pool.run([experiments.Experiment(job.name, [experiments.override(k, v) for k, v in job.params.items()], job.target)
              for job in todo.values()], finished)
    if failed:
        others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise RuntimeError(f"scenarios: experiment {failed[0].experiment.name} failed{others}:\n{failed[0].tail(40)}")


def run_study(study: Study, project: Path, results_file: Path, workers: int = 2, log=print,
              slots: list[experiments.Slot] | None = None) -> dict:
    """Tune each strategy's lr per domain (at tune_budget, first seed), then every budget x seed at it.
    The cells run on `slots` (default: `workers` CPU slots)."""
    results = json.loads(results_file.read_text()) if results_file.exists() else {"cells": {}}
    results.setdefault("cells", {})
    results.setdefault("tuning", {})

    def record(job: Job, result: dict) -> None:
        (results["tuning"] if job.meta["kind"] != "cell" else results["cells"])[job.name] = {**job.meta, **result}
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1, sort_keys=True))
        accs = [f"{k[:-4]} {result[k]:.3f}" for k in ("test_acc", "val_acc") if result.get(k) is not None]
        log(f"{job.name}: {', '.join(accs) or 'done'} ({result['seconds']} s; ran {', '.join(result['ran']) or 'nothing'})")

    start = time.perf_counter()
    slots = slots or experiments.cpu_slots(workers)
    with experiments.Pool(project, slots) as pool:
        tuning = tuning_jobs(study)
        run_jobs(pool, tuning, results["tuning"], record)
        # Only this grid's tuning runs: the results file may hold others (an earlier lr grid or tuning budget).
        current = {job.name for job in tuning}
        chosen = {}
        for domain in study.domains:
            for label, _, _ in study.strategies:
                tried = [c for c in results["tuning"].values() if c["name"] in current
                         and c["kind"] == "tune" and c["domain"] == domain and c["strategy"] == label]
                best = max(tried, key=lambda c: (c["val_acc"], -c["lr"]))  # ties: the smaller lr
                chosen[f"{domain}/{label}"] = best["lr"]
        results["chosen_lr"] = chosen
        run_jobs(pool, study_jobs(study, chosen), results["cells"], record)
        results["experiments_fetched"] = len(pool.collect())
    results["study"] = dict(budgets=study.budgets, seeds=study.seeds, lrs=study.lrs, head_lrs=study.head_lrs,
                            epochs={str(k): v for k, v in study.epochs.items()}, tune_budget=study.tune_budget,
                            domains=study.domains, common=study.common, workers=len(slots),
                            strategies=[label for label, _, _ in study.strategies])
    results["seconds_this_run"] = round(time.perf_counter() - start, 1)
    everything = list(results["cells"].values()) + list(results["tuning"].values())
    results["seconds_all_experiments"] = round(sum(c["seconds"] for c in everything), 1)
    results_file.write_text(json.dumps(results, indent=1, sort_keys=True))
    return results


def summarise(results: dict) -> dict:
    """(domain, strategy, budget) -> (mean, std, n) of test accuracy at the chosen lr."""
    out = {}
    for key, lr in results["chosen_lr"].items():
        domain, label = key.split("/", 1)
        for budget in results["study"]["budgets"]:
            accs = [c["test_acc"] for c in results["cells"].values()
                    if c["domain"] == domain and c["strategy"] == label and c["budget"] == budget and c["lr"] == lr
                    and c["seed"] in results["study"]["seeds"]]
            if accs:
                out[(domain, label, budget)] = (statistics.mean(accs), statistics.pstdev(accs) if len(accs) > 1 else 0.0, len(accs))
    return out


def table(results: dict) -> str:
    s = summarise(results)
    budgets = results["study"]["budgets"]
    lines = []
    for domain in results["study"]["domains"]:
        lines += [f"**{domain}** ({results['study']['domains'][domain]['backbone.arch']}, "
                  f"{results['study']['domains'][domain]['pretrained.source']} weights)", "",
                  "| strategy | lr | " + " | ".join(f"{b}/class" for b in budgets) + " |",
                  "|---|---|" + "---|" * len(budgets)]
        for label in results["study"]["strategies"]:
            cells = []
            for b in budgets:
                mean, std, n = s.get((domain, label, b), (float("nan"), 0, 0))
                best = max((s[(domain, lab, b)][0] for lab in results["study"]["strategies"] if (domain, lab, b) in s), default=None)
                text = f"{100 * mean:.1f} ± {100 * std:.1f}"
                cells.append(f"**{text}**" if best is not None and mean == best else text)
            lines.append(f"| {label} | {results['chosen_lr'][f'{domain}/{label}']:g} | " + " | ".join(cells) + " |")
        lines.append("")
    n = max((v[2] for v in s.values()), default=0)
    lines.append(f"Test accuracy (%), mean ± standard deviation over {n} seeds; best per column in bold.")
    return "\n".join(lines) + "\n"


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarise(results)
    budgets = results["study"]["budgets"]
    domains = list(results["study"]["domains"])
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4.2), sharey=True, squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for label in results["study"]["strategies"]:
            pts = [(b, *s[(domain, label, b)][:2]) for b in budgets if (domain, label, b) in s]
            if pts:
                xs, ms, sd = zip(*pts)
                ax.errorbar(xs, [100 * m for m in ms], yerr=[100 * d for d in sd], marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # budgets within a decade: no "3x10^0"
        ax.set_title(f"{domain}: {results['study']['domains'][domain]['backbone.arch']}")
        ax.set_xlabel("labelled images per class")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, study: Study | None = None, project: Path = ROOT, out: Path = OUT) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="store_true", help="only rebuild the table and figure from the results file")
    ap.add_argument("--workers", type=int, default=2, help="experiments run at once, each in its own clone (default 2)")
    args = ap.parse_args(argv)
    results_file = out / "scenarios.json"
    if not args.report:
        with experiments.sigterm_as_interrupt():  # `kill` cleans up like Ctrl-C: the clones go
            results = run_study(study or full_study(), project, results_file, workers=max(1, args.workers))
    results = json.loads(results_file.read_text())
    (out / "scenarios.md").write_text(table(results))
    figure(results, out / "scenarios.png")
    print(table(results))
    print(f"cells: {len(results['cells'])} (+{len(results.get('tuning', {}))} tuning), "
          f"{results.get('seconds_this_run', 0) / 60:.1f} min wall with {results['study'].get('workers', 1)} workers; "
          f"written {out / 'scenarios.md'} and {out / 'scenarios.png'}")
    return results


if __name__ == "__main__":
    main()
