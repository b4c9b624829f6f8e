"""train_head: a classifier on the cached embeddings.

- linear, mlp: AdamW over epochs, the best validation epoch kept; each epoch's embeddings drawn by
  train_head.sampler; with train_head.lr: auto, fastai's range test (transfer.lr_find) chooses the lr first;
- logreg: CLIP's linear probe, a linear head fitted by full-batch L-BFGS for each L2 strength of a log
  grid (training.LOGREG_L2), the one with the best val accuracy kept. It is a linear head like any other:
  finetune, evaluate, convert and predict read it unchanged.

Outputs: models/head/head.safetensors + head.json; metrics/train_head.json (logreg: the chosen L2 and
the val accuracy at each; lr: auto: lr_chosen); curves in metrics/curves/train_head (per epoch, or per L2
for logreg); the range test's curve (lr, smoothed loss) in metrics/train_head/lr_find.json, an empty list
unless lr is auto (logreg needs none).
"""
from __future__ import annotations

from pathlib import Path

from transfer import cli, lr_find, models, paths, tracking, training
from transfer.io import load_tensors, save_tensors, write_json
from transfer.params import load_params


def fit_head(*, embeddings_dir: Path, out_dir: Path, metrics_path: Path, curves_dir: Path, kind: str, hidden: int,
             dropout: float, lr: float | str, epochs: int, weight_decay: float, batch_size: int, seed: int, device,
             class_weights: str = "none", sampler: str = "shuffle", lr_find_path: Path | None = None) -> dict:
    """Train the head on cached train embeddings, select on val; write weights, description, metrics.
    lr "auto": the range test chooses it, and its curve goes to `lr_find_path` (else an empty list)."""
    train, meta = load_tensors(paths.split_file(embeddings_dir, "train"))
    val, _ = load_tensors(paths.split_file(embeddings_dir, "val"))
    classes = meta["classes"]
    dim = train["embeddings"].shape[1]
    layers = "linear" if kind == "logreg" else kind  # logreg fits the weights of a linear head
    head = models.make_head(layers, dim, len(classes), hidden, dropout)
    weights = training.balanced_class_weights(train["labels"], len(classes)) if class_weights == "balanced" else None
    data = dict(train_x=train["embeddings"], train_y=train["labels"], val_x=val["embeddings"], val_y=val["labels"],
                head=head, device=device, class_weights=weights)
    lr_curve = []  # logreg needs no lr
    if kind == "logreg":
        state, history, chosen = training.train_logreg(**data)
        best = history[chosen - 1]
        metrics = dict(l2=best["l2"], val_acc=best["val_acc"], train_acc=best["train_acc"], val_loss=best["val_loss"],
                       val_acc_by_l2={f"{row['l2']:.0e}": row["val_acc"] for row in history})
    else:
        if lr == "auto":
            lr, lr_curve = lr_find.find_head_lr(head, train_x=train["embeddings"], train_y=train["labels"],
                                                weight_decay=weight_decay, batch_size=batch_size, class_weights=weights,
                                                sampler=sampler, seed=seed, device=device)
            print(f"train_head: lr auto -> {lr:.3g} (range test: {len(lr_curve)} steps)")
        state, history, best_epoch = training.train_head(**data, lr=lr, epochs=epochs, weight_decay=weight_decay,
                                                         batch_size=batch_size, seed=seed, sampler=sampler)
        best = history[best_epoch - 1]
        metrics = dict(best_epoch=best_epoch, val_acc=best["val_acc"], train_acc=best["train_acc"], val_loss=best["val_loss"])
        if lr_curve:
            metrics.update(lr_chosen=lr)
    desc = dict(kind=layers, hidden=hidden, dropout=dropout, in_features=dim, num_classes=len(classes), classes=classes)
    save_tensors(out_dir / "head.safetensors", state, meta=desc)
    write_json(out_dir / "head.json", desc)
    write_json(metrics_path, metrics)
    tracking.log_history(curves_dir, history)
    if lr_find_path is not None:  # always written: dvc.yaml declares it
        write_json(lr_find_path, lr_find.as_json(lr_curve))
    return metrics


def main() -> None:
    p = load_params()
    training.configure_runtime(threads=p.runtime.threads, deterministic=p.runtime.deterministic, seed=p.seed)
    h = p.train_head
    metrics = fit_head(embeddings_dir=paths.EMBEDDINGS, out_dir=paths.HEAD_DIR, metrics_path=paths.METRICS / "train_head.json",
                       curves_dir=paths.METRICS / "curves" / "train_head", kind=h.kind, hidden=h.hidden, dropout=h.dropout,
                       lr=h.lr, epochs=h.epochs, weight_decay=h.weight_decay, batch_size=h.batch_size, seed=p.seed,
                       device=training.pick_device(p.runtime.device), class_weights=h.class_weights, sampler=h.sampler,
                       lr_find_path=paths.METRICS / "train_head" / "lr_find.json")
    print(f"train_head: {metrics}")


if __name__ == "__main__":
    cli.run("train_head", main)
