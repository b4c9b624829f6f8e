"""Metrics, training curves and the confusion matrix, logged through DVCLive.

DVCLive writes the files `dvc metrics`, `dvc plots` and `dvc exp show` read (metrics.json,
plots/metrics/<name>.tsv, plots/sklearn/confusion_matrix.json). Stages use it with
save_dvc_exp=False (DVC itself records experiments under `dvc exp run`; dvclive #670) and dvcyaml=None
(our dvc.yaml declares every metric and plot, so DVCLive never rewrites it), each in its own folder,
since Live() empties its folder on start.

DVCLive writes its files in place; a killed stage must leave no half-written output. So Live writes
into a scratch folder, and only a completed log replaces the stage's folder, file by file, each file
atomically (transfer.io).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from transfer.io import write_bytes


@contextlib.contextmanager
def live(folder: Path) -> Iterator["object"]:
    """A dvclive.Live whose files land in `folder` when the block completes."""
    from dvclive import Live

    folder = Path(folder)
    scratch = folder.parent / f".{folder.name}.live.tmp"  # *.tmp: ignored by git and DVC
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        with Live(dir=str(scratch), save_dvc_exp=False, dvcyaml=None, report=None, monitor_system=False) as logger:
            yield logger
        _publish(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _publish(scratch: Path, folder: Path) -> None:
    new = {p.relative_to(scratch) for p in scratch.rglob("*") if p.is_file()}
    for rel in sorted(new):
        write_bytes(folder / rel, (scratch / rel).read_bytes())
    if folder.is_dir():
        for p in sorted(folder.rglob("*"), reverse=True):  # files first, then the folders they leave empty
            if p.is_file() and p.relative_to(folder) not in new:
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                os.rmdir(p)


def metric_name(key: str) -> str:
    """A history key as a DVCLive metric: train_loss -> train/loss (plots/metrics/train/loss.tsv)."""
    return key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key


def log_history(folder: Path, history: list[dict]) -> None:
    """Per-epoch curves: step 0 is epoch 1; NaN values (no validation split) are left out."""
    with live(folder) as logger:
        for row in history:
            for key, value in row.items():
                if key != "epoch" and value == value:
                    logger.log_metric(metric_name(key), value)
            logger.next_step()


def class_key(name: str) -> str:
    """A class name as one level of a metric name: DVCLive nests on '/', so 'T-shirt/top' would split."""
    return name.replace("/", "_")


def log_evaluation(folder: Path, metrics: dict, actual: list[str], predicted: list[str]) -> None:
    """Test metrics (per-class ones nested under per_class/<class>/) and the confusion matrix."""
    with live(folder) as logger:
        for key, value in metrics.items():
            if key == "per_class":
                for cls, stats in value.items():
                    for stat, v in stats.items():
                        logger.log_metric(f"per_class/{class_key(cls)}/{stat}", v, plot=False)
            else:
                logger.log_metric(key, value, plot=False)
        logger.log_sklearn_plot("confusion_matrix", actual, predicted, name="confusion_matrix.json")
