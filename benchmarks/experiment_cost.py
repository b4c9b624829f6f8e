"""The fixed cost of an experiment: where the wall time of `dvc repro` and of the README's experiments goes.

    python -m benchmarks.experiment_cost            # about 6 minutes on 2 cores
    python -m benchmarks.experiment_cost --only repro,head_lr
    python -m benchmarks.experiment_cost --rev cb083b7   # an older commit, with today's profiling hook

A fresh clone of this project at HEAD (its own DVC cache and run cache, so nothing is restored from
earlier runs) runs `dvc repro`, then each experiment from the committed params (the workspace is
restored between them, as a user does with `git checkout`). Every stage process appends a profile
line (transfer/cli.py, TRANSFER_PROFILE): wall time split into start-up + top-level imports and the
work, CPU seconds, bytes read and written, peak memory. DVC's own share is the experiment's wall
time less its stages'. Import costs come from `python -X importtime` per stage module. Results:
benchmarks/results/experiment_cost-<time>.json and a printed table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transfer.experiments import dvc_env, stages_ran

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STAGES = ("prepare", "pretrain", "extract", "train_head", "finetune", "evaluate", "convert")

# name -> dvc arguments; each experiment starts from the committed params and outputs
EXPERIMENTS = {
    "repro": ["repro"],
    "head_lr": ["exp", "run", "-S", "train_head.lr=0.02"],
    "finetune": ["exp", "run", "-S", "strategy=finetune"],
    "finetune_val_subset": ["exp", "run", "-S", "strategy=finetune", "-S", "finetune.val_images=250"],
    "workers": ["exp", "run", "-S", "runtime.workers=1"],
}


def clone(into: Path, rev: str | None = None) -> Path:
    repo = into / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    if rev:
        # The old code with this commit's profiling hook (transfer/cli.py's TRANSFER_PROFILE) and nothing else.
        subprocess.run(["git", "checkout", "-q", rev], cwd=repo, check=True)
        shutil.copy(ROOT / "transfer" / "cli.py", repo / "transfer" / "cli.py")
        subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qam",
                        "profiling hook", "--allow-empty"], cwd=repo, check=True)
    for name in ("fashion-mnist", "pretrained"):
        src = ROOT / "data" / "raw" / name
        if src.exists():
            shutil.copytree(src, repo / "data" / "raw" / name)
    return repo


def run_dvc(repo: Path, args: list[str], profile: Path) -> dict:
    profile.unlink(missing_ok=True)
    env = dict(dvc_env(), TRANSFER_PROFILE=str(profile), TRANSFER_PROGRESS="0")
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in profile.read_text().splitlines()] if profile.exists() else []
    stages = [row for row in rows if row["rank"] == 0]
    in_stages = sum(row["wall_s"] for row in stages)
    return dict(args=args, wall_s=round(wall, 2), ran=stages_ran(r.stdout), stages=stages,
                dvc_and_python_s=round(wall - in_stages, 2))


def restore(repo: Path) -> None:
    """Back to the committed params, lock and outputs, as a user does between experiments."""
    subprocess.run(["git", "checkout", "--", "."], cwd=repo, check=True)
    subprocess.run(["git", "clean", "-fdq", "--", "metrics"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "-f", "-q"], cwd=repo, env=dvc_env(), check=True)


def import_costs(repo: Path) -> dict:
    """Per stage module: seconds of top-level imports, and the cumulative share of torch, torchvision, timm."""
    out = {}
    for stage in STAGES:
        r = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import stages.{stage}"], cwd=repo,
                           capture_output=True, text=True, env=dvc_env())
        cumulative = {}
        for line in r.stderr.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
            if m and m.group(4) in ("torch", "torchvision", "timm", "numpy", "sklearn", "dvclive", "safetensors", f"stages.{stage}"):
                if len(m.group(3)) <= 3 or m.group(4) not in cumulative:  # a package's top-level import line
                    cumulative[m.group(4)] = round(int(m.group(2)) / 1e6, 2)
        out[stage] = cumulative
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(EXPERIMENTS), help="comma-separated experiments (repro always runs first)")
    ap.add_argument("--rev", help="measure this commit instead of HEAD (its params must know every experiment's keys)")
    args = ap.parse_args()
    wanted = [name for name in args.only.split(",") if name]
    unknown = set(wanted) - set(EXPERIMENTS)
    if unknown:
        raise SystemExit(f"experiment_cost: unknown experiments {sorted(unknown)}; choose from {sorted(EXPERIMENTS)}")
    tmp = Path(tempfile.mkdtemp(prefix="experiment-cost-"))
    results = {}
    try:
        repo = clone(tmp, args.rev)
        results["imports"] = import_costs(repo)
        for name in ["repro"] + [n for n in wanted if n != "repro"]:
            if name != "repro":
                restore(repo)
            results[name] = run_dvc(repo, EXPERIMENTS[name], tmp / "profile.jsonl")
            if name == "repro":  # the baseline every experiment starts from, committed as a user would
                subprocess.run(["git", "add", "-A", "dvc.lock", "metrics"], cwd=repo, check=True)
                subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm",
                                "dvc repro"], cwd=repo, check=True)
            r = results[name]
            print(f"{name}: {r['wall_s']} s, ran {r['ran']}, DVC + interpreter outside the stages {r['dvc_and_python_s']} s",
                  flush=True)
            for row in r["stages"]:
                print(f"  {row['stage']:10s} wall {row['wall_s']:6.2f}  start-up+imports {row['startup_imports_s']:5.2f}  "
                      f"work {row['work_s']:6.2f}  cpu {row['cpu_s']:6.2f}  read {row['read_mb']:7.1f} MB  "
                      f"written {row['written_mb']:6.1f} MB  peak {row['peak_rss_mb']} MB", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", args.rev or "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    report = dict(commit=commit, cpus=len(os.sched_getaffinity(0)), when=time.strftime("%Y-%m-%dT%H:%M:%S"), **results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"experiment_cost-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print("imports (s, cumulative):", json.dumps(results["imports"]))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
