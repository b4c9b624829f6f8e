"""train_head: a classifier on the cached embeddings; the best validation epoch is kept.

Outputs: models/head/head.safetensors + head.json; metrics/train_head.json; curves in
metrics/curves/train_head.
"""
from __future__ import annotations

from pathlib import Path

from transfer import cli, models, paths, tracking, training
from transfer.io import load_tensors, save_tensors, write_json
from transfer.params import load_params


def fit_head(*, embeddings_dir: Path, out_dir: Path, metrics_path: Path, curves_dir: Path, kind: str, hidden: int,
             dropout: float, lr: float, epochs: int, weight_decay: float, batch_size: int, seed: int, device) -> dict:
    """Train the head on cached train embeddings, select on val; write weights, description, metrics."""
    train, meta = load_tensors(paths.split_file(embeddings_dir, "train"))
    val, _ = load_tensors(paths.split_file(embeddings_dir, "val"))
    classes = meta["classes"]
    dim = train["embeddings"].shape[1]
    head = models.make_head(kind, dim, len(classes), hidden, dropout)
    state, history, best_epoch = training.train_head(
        train_x=train["embeddings"], train_y=train["labels"], val_x=val["embeddings"], val_y=val["labels"], head=head,
        lr=lr, epochs=epochs, weight_decay=weight_decay, batch_size=batch_size, seed=seed, device=device)
    desc = dict(kind=kind, hidden=hidden, dropout=dropout, in_features=dim, num_classes=len(classes), classes=classes)
    save_tensors(out_dir / "head.safetensors", state, meta=desc)
    write_json(out_dir / "head.json", desc)
    best = history[best_epoch - 1]
    metrics = dict(best_epoch=best_epoch, val_acc=best["val_acc"], train_acc=best["train_acc"], val_loss=best["val_loss"])
    write_json(metrics_path, metrics)
    tracking.log_history(curves_dir, history)
    return metrics


def main() -> None:
    p = load_params()
    training.configure_runtime(threads=p.runtime.threads, deterministic=p.runtime.deterministic, seed=p.seed)
    h = p.train_head
    metrics = fit_head(embeddings_dir=paths.EMBEDDINGS, out_dir=paths.HEAD_DIR, metrics_path=paths.METRICS / "train_head.json",
                       curves_dir=paths.METRICS / "curves" / "train_head", kind=h.kind, hidden=h.hidden, dropout=h.dropout,
                       lr=h.lr, epochs=h.epochs, weight_decay=h.weight_decay, batch_size=h.batch_size, seed=p.seed,
                       device=training.pick_device(p.runtime.device))
    print(f"train_head: {metrics}")


if __name__ == "__main__":
    cli.run("train_head", main)
