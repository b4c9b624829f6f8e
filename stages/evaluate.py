"""evaluate: the final classifier on the test split.

Outputs, logged through DVCLive (transfer.tracking): metrics/evaluate/metrics.json (accuracy,
balanced accuracy, macro-F1, per-class precision/recall/support) and metrics/evaluate/plots/sklearn/confusion_matrix.json
(one actual/predicted row per test image: the DVC confusion-matrix plot); and
metrics/prediction_grid.png (test images with true and predicted labels).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from transfer import cli, models, paths, storage, tracking, training
from transfer.io import read_json, write_bytes
from transfer.params import load_params


def evaluate(*, model_dir: Path, prepared_dir: Path, metrics_dir: Path, grid_path: Path, grid_images: int,
             batch_size: int, device, amp: bool) -> dict:
    meta = read_json(model_dir / "model.json")
    test, data_meta = storage.read_split(prepared_dir, "test")
    storage.check_classes(folder=prepared_dir, data_meta=data_meta, model_classes=meta["classes"],
                          model_file=model_dir / "model.json",
                          fix="re-run extract, train_head and finetune on this data (dvc repro evaluate)")
    model = models.load_model(model_dir / "model.safetensors", meta)
    logits = training.predict(model, test["images"], mean=meta["mean"], std=meta["std"], batch_size=batch_size,
                              device=device, amp=amp, desc="evaluate")
    y_true, y_pred = test["labels"].numpy(), logits.argmax(1).numpy()
    classes = meta["classes"]
    metrics = classification_metrics(y_true, y_pred, classes)
    tracking.log_evaluation(metrics_dir, metrics, [classes[t] for t in y_true], [classes[q] for q in y_pred])
    shown = grid_indices(y_true, grid_images)
    write_bytes(grid_path, prediction_grid(test["images"][torch.from_numpy(shown)], y_true[shown], y_pred[shown], classes))
    return metrics


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1 and per-class precision/recall/support from the confusion matrix;
    a class never predicted has precision 0 (and F1 0). Balanced accuracy is the mean recall over the classes
    the test split holds, as scikit-learn's balanced_accuracy_score (tests/test_recipe.py compares them).
    Plain numpy: scikit-learn's metrics cost 1.3 s of import per run."""
    k = len(classes)
    confusion = np.bincount(np.asarray(y_true) * k + np.asarray(y_pred), minlength=k * k).reshape(k, k)  # rows: true
    hits, predicted, support = np.diag(confusion), confusion.sum(0), confusion.sum(1)
    precision = np.divide(hits, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    return dict(
        accuracy=float(hits.sum() / max(len(y_true), 1)),
        balanced_accuracy=float(recall[support > 0].mean()) if support.any() else 0.0,
        macro_f1=float(f1.mean()),
        test_images=int(len(y_true)),
        per_class={c: dict(precision=float(precision[i]), recall=float(recall[i]), support=int(support[i]))
                   for i, c in enumerate(classes)},
    )


def grid_indices(labels: np.ndarray, n: int) -> np.ndarray:
    """Test images for the grid, taken class by class in turn (the first of each class, then the second...):
    the split is stored in class order, so its first n images would show a single class."""
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    order = np.lexsort((labels, rank))  # by rank within class, then by class
    return order[:n]


def prediction_grid(images: torch.Tensor, y_true, y_pred, classes: list[str], tile: int = 96, columns: int = 6) -> bytes:
    """PNG of test images captioned true/predicted, green when right and red when wrong
    (the tutorials' visualize_model, without matplotlib)."""
    rows = max(1, -(-len(images) // columns))
    caption = 26
    sheet = Image.new("RGB", (columns * tile, rows * (tile + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        x, y = (i % columns) * tile, (i // columns) * (tile + caption)
        pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((tile, tile), Image.Resampling.NEAREST)
        sheet.paste(pil, (x, y))
        ok = y_true[i] == y_pred[i]
        draw.text((x + 2, y + tile + 1), f"T: {classes[y_true[i]][:14]}", fill="black")
        draw.text((x + 2, y + tile + 13), f"P: {classes[y_pred[i]][:14]}", fill=(0, 128, 0) if ok else (200, 0, 0))
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()


def main() -> None:
    p = load_params()
    training.configure_runtime(threads=p.runtime.threads, deterministic=p.runtime.deterministic)
    metrics = evaluate(model_dir=paths.MODEL_DIR, prepared_dir=paths.PREPARED, metrics_dir=paths.METRICS / "evaluate",
                       grid_path=paths.METRICS / "prediction_grid.png",
                       grid_images=p.evaluate.grid_images, batch_size=p.evaluate.batch_size,
                       device=training.pick_device(p.runtime.device), amp=p.runtime.amp)
    print(f"evaluate: accuracy {metrics['accuracy']:.4f}, balanced accuracy {metrics['balanced_accuracy']:.4f}, "
          f"macro-F1 {metrics['macro_f1']:.4f} on {metrics['test_images']} test images")


if __name__ == "__main__":
    cli.run("evaluate", main)
