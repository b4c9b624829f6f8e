"""experiments: a grid or a queue of DVC experiments, several at once, every one in `dvc exp show`.

    python -m stages.experiments -S strategy=finetune,partial -S seed=0,1,2 --workers 2
    python -m stages.experiments -S train_head.lr=0.003,0.01,0.03 --target train_head -n head-lr --gpus 0,1
    python -m stages.experiments --queue queue.yaml -S seed=0,1

-S takes what `dvc exp run --queue -S` takes, parsed by DVC itself (Hydra's override syntax):
KEY=A,B,C is a sweep, several sweeps make a grid (their cartesian product), KEY=range(0,3) and
KEY=choice(a,b) work too. --queue FILE: a YAML list of experiments, each a mapping of params (nested
as in params.yaml, or dotted keys); each runs at every point of the -S grid. Names: NAME-1, NAME-2,
... with -n NAME, as DVC names a queued sweep; otherwise DVC's random names.

Every experiment is HEAD's params.yaml plus its overrides, checked against the params schema before
anything runs; uncommitted changes are not part of it. Workers: --workers N CPU slots (the cores
shared out, no GPU visible) or --gpus 0,1 (one per listed GPU, CUDA_VISIBLE_DEVICES set per worker;
list a GPU twice to run two experiments on it); by default one per visible GPU, else 2 CPU slots.
transfer/experiments.py says how the workers share the DVC cache, and why not `dvc queue start -j N`.

Not a DVC stage: it runs DVC. Exit code 0 when every experiment succeeded; 1 when any failed (each
is reported with the end of its output, and the others still ran); 2 for a user error, before
anything ran.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from transfer import cli
from transfer import experiments as exps
from transfer.cli import UserError
from transfer.params import validate

# (column, metrics file, key): what the summary shows of each experiment, where the run produced it.
SUMMARY_METRICS = [("head val", "metrics/train_head.json", "val_acc"), ("val acc", "metrics/finetune.json", "val_acc"),
                   ("test acc", "metrics/evaluate/metrics.json", "accuracy"),
                   ("macro F1", "metrics/evaluate/metrics.json", "macro_f1")]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other user error, not usage + message
        raise UserError(f"{message} (see --help)")


def summary(outcomes: list[exps.Outcome]) -> str:
    """One row per experiment: how it ended, where, how long, what ran, the params that vary, its metrics."""
    settings = [{k: v.strip("'") for k, v in (o.split("=", 1) for o in out.experiment.overrides)} for out in outcomes]
    keys = list(dict.fromkeys(k for s in settings for k in s))
    varying = [k for k in keys if len({s.get(k) for s in settings}) > 1] or keys
    metrics = [(col, f, k) for col, f, k in SUMMARY_METRICS if any(k in (o.metrics.get(f) or {}) for o in outcomes)]
    header = ["name", "result", "seconds", "on", "ran", *varying, *(col for col, _, _ in metrics)]
    rows = []
    for out, setting in zip(outcomes, settings):
        values = [((out.metrics.get(f) or {}).get(k)) for _, f, k in metrics]
        rows.append([out.experiment.name, "ok" if out.ok else f"FAILED ({out.returncode})", f"{out.seconds:.1f}",
                     out.slot, ",".join(out.ran) or "-", *(setting.get(k, "") for k in varying),
                     *("" if v is None else f"{v:.4f}" for v in values)])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def uncommitted(project: Path) -> list[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project, capture_output=True,
                         text=True).stdout
    return [line[3:] for line in out.splitlines()]


def run(planned: list[exps.Experiment], slots: list[exps.Slot], project: Path,
        workdir: Path | None) -> list[exps.Outcome]:
    """The experiments on the slots, a line per experiment as it ends; the outcomes in plan order."""
    changed = uncommitted(project)
    if changed:
        print(f"experiments: note: they run on HEAD; uncommitted changes ({', '.join(changed[:4])}"
              f"{', ...' if len(changed) > 4 else ''}) are not part of them", file=sys.stderr)

    def report(out: exps.Outcome) -> None:
        done.append(out)
        what = f"ok, ran {', '.join(out.ran) or 'nothing (all cached)'}" if out.ok else \
            f"FAILED (exit {out.returncode}): {out.reason}"
        print(f"[{len(done)}/{len(planned)}] {out.experiment.name} on {out.slot}, {out.seconds:.1f} s: {what}",
              flush=True)

    done: list[exps.Outcome] = []
    with exps.sigterm_as_interrupt(), exps.Pool(project, slots, workdir=workdir) as pool:
        print(f"experiments: {len(planned)} on {len(slots)} workers ({', '.join(s.describe() for s in slots)}), "
              f"clones of HEAD {pool.baseline[:7]}", flush=True)
        outcomes = pool.run(planned, report)
    order = {e.name: i for i, e in enumerate(planned)}
    return sorted(outcomes, key=lambda o: order[o.experiment.name])


def main(argv: list[str] | None = None) -> None:
    ap = _Parser(prog="python -m stages.experiments", description=__doc__.split("\n\n")[0])
    ap.add_argument("-S", "--set-param", dest="sets", action="append", default=[], metavar="KEY=A,B",
                    help="a param and its values (a sweep), as dvc exp run --queue -S; repeat for a grid")
    ap.add_argument("--queue", type=Path, metavar="FILE", help="YAML list of experiments (mappings of params)")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--workers", "-j", type=int, help="CPU slots: experiments at once, the cores shared out")
    where.add_argument("--gpus", help="GPU indices, one worker each (e.g. 0,1; 0,0,1,1 for two per GPU)")
    ap.add_argument("--target", help="the stage to stop at (default: the whole pipeline)")
    ap.add_argument("-n", "--name", "--name-prefix", dest="name", help="experiments are named NAME-1, NAME-2, ...")
    ap.add_argument("--workdir", type=Path, help="where the clones live meanwhile (default: the temp folder)")
    args = ap.parse_args(argv)
    project = Path.cwd()
    planned = exps.plan(project, sets=args.sets, queue_file=args.queue, prefix=args.name, target=args.target,
                        validate=validate)
    slots = exps.slots_for(gpus=args.gpus, workers=args.workers)
    start = time.perf_counter()
    outcomes = run(planned, slots, project, args.workdir)
    print(summary(outcomes))
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        print(f"\nexperiments: {o.experiment.name} failed (exit {o.returncode}) on {o.slot}; the end of its output:\n"
              + "\n".join("    " + line for line in o.tail().splitlines()), file=sys.stderr)
    minutes = (time.perf_counter() - start) / 60
    print(f"\nexperiments: {len(outcomes) - len(failed)} of {len(planned)} done in {minutes:.1f} min on {len(slots)} "
          "workers; `dvc exp show` lists them" + (f"; {len(failed)} failed" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    cli.run("experiments", main)
