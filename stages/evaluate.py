"""evaluate: the final classifier on the test split, its mistakes, and how far to trust its probabilities.

Outputs, logged through DVCLive (transfer.tracking): metrics/evaluate/metrics.json (accuracy,
balanced accuracy, macro-F1, per-class precision/recall/support; then NLL and expected calibration
error before and after temperature scaling, the temperature, and with evaluate.tta the same headline
numbers under test-time augmentation) and metrics/evaluate/plots/sklearn/confusion_matrix.json (one
actual/predicted row per test image: the DVC confusion-matrix plot). Beside them:
- metrics/prediction_grid.png: test images with true and predicted labels;
- metrics/top_losses.png and .csv: the test images the model got most confidently wrong (highest
  probability of the predicted class among the errors), with the file each came from;
- metrics/confused_pairs.json: the most frequent (true, predicted) pairs among the errors;
- metrics/reliability/{uncalibrated,calibrated}.json: the reliability diagram (accuracy against
  confidence per bin), before and after temperature scaling;
- models/calibration.json: the temperature, fitted on the val split's logits (evaluate.calibrate),
  for convert to build into the exports.
The probabilities reported for single images (top losses) are the calibrated ones: what the exported
model and `predict` give for the same image.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from transfer import calibration, cli, models, paths, storage, tracking, training
from transfer.io import load_tensors, read_json, sha256_file, write_bytes, write_json, write_text
from transfer.params import load_params

TOP_LOSSES_FIELDS = ["rank", "index", "ref", "true", "predicted", "p_pred", "p_true"]


@dataclass(frozen=True)
class Outputs:
    """Where evaluate writes; dvc.yaml declares each."""
    live: Path  # DVCLive's folder: metrics.json and the confusion matrix
    grid: Path
    top_losses_png: Path
    top_losses_csv: Path
    confused_pairs: Path
    reliability: Path  # a folder: uncalibrated.json, calibrated.json
    calibration: Path

    @classmethod
    def default(cls) -> "Outputs":
        m = paths.METRICS
        return cls(live=m / "evaluate", grid=m / "prediction_grid.png", top_losses_png=m / "top_losses.png",
                   top_losses_csv=m / "top_losses.csv", confused_pairs=m / "confused_pairs.json",
                   reliability=m / "reliability", calibration=paths.CALIBRATION)


class Mirrored(nn.Module):
    """The model applied to the horizontal mirror image of its input (flipping the normalised input is
    flipping the image: normalisation is per channel)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.flip(x, dims=(3,)))


def evaluate(*, model_dir: Path, prepared_dir: Path, out: Outputs, grid_images: int, top_losses: int,
             confused_pairs: int, tta: str, calibrate: bool, batch_size: int, device, amp: bool,
             embeddings_dir: Path | None = None) -> dict:
    """Score the model on the test split and write everything `out` names; return the metrics. tta:
    none or flip (params.yaml's evaluate.tta). A feature_extract model is scored from extract's
    test-split embeddings in `embeddings_dir` when they come from its backbone (see head_logits), and
    the temperature is fitted on the val logits finetune kept (calibration.read_val_logits): then
    only flip TTA runs the backbone."""
    meta = read_json(model_dir / "model.json")
    test, data_meta = storage.read_split(prepared_dir, "test")
    storage.check_classes(folder=prepared_dir, data_meta=data_meta, model_classes=meta["classes"],
                          model_file=model_dir / "model.json",
                          fix="re-run extract, train_head and finetune on this data (dvc repro evaluate)")
    weights = model_dir / "model.safetensors"
    model = models.load_model(weights, meta)

    def logits_of(net: nn.Module, images, desc: str) -> np.ndarray:
        return training.predict(net, images, mean=meta["mean"], std=meta["std"], batch_size=batch_size, device=device,
                                amp=amp, desc=desc).numpy()

    logits = head_logits(model, meta, embeddings_dir, test["labels"]) if embeddings_dir is not None else None
    if logits is None:
        logits = logits_of(model, test["images"], "evaluate")
    y_true, y_pred = test["labels"].numpy(), logits.argmax(1)
    classes = meta["classes"]
    metrics = classification_metrics(y_true, y_pred, classes)

    fitted = fit_on_val(model, model_dir, prepared_dir, logits_of) if calibrate else dict(temperature=1.0, fitted_on=None,
                                                                                 why="evaluate.calibrate is false")
    t = fitted["temperature"]
    plain, calibrated = calibration.softmax(logits), calibration.softmax(logits, t)
    metrics.update(nll=calibration.nll(plain, y_true), ece=calibration.expected_calibration_error(plain, y_true),
                   temperature=t, nll_calibrated=calibration.nll(calibrated, y_true),
                   ece_calibrated=calibration.expected_calibration_error(calibrated, y_true))
    if tta == "flip":
        # As predict --tta: the mean of the (calibrated) probabilities of the image and its mirror image.
        averaged = (calibrated + calibration.softmax(logits_of(Mirrored(model), test["images"], "evaluate (flip)"), t)) / 2
        scores = classification_metrics(y_true, averaged.argmax(1), classes)
        metrics.update({f"tta_{k}": scores[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")},
                       tta_nll=calibration.nll(averaged, y_true),
                       tta_ece=calibration.expected_calibration_error(averaged, y_true))
    tracking.log_evaluation(out.live, metrics, [classes[c] for c in y_true], [classes[c] for c in y_pred])

    shown = grid_indices(y_true, grid_images)
    write_bytes(out.grid, prediction_grid(test["images"][torch.from_numpy(shown)], y_true[shown], y_pred[shown], classes))
    worst = top_loss_indices(calibrated, y_true, top_losses)
    rows = top_loss_rows(worst, calibrated, y_true, classes, split_refs(prepared_dir, "test"))
    write_text(out.top_losses_csv, to_csv(rows, TOP_LOSSES_FIELDS))
    empty = "top_losses: 0 (off)" if top_losses == 0 else "no test image was misclassified"
    write_bytes(out.top_losses_png, prediction_grid(
        test["images"][torch.from_numpy(worst)] if len(worst) else [], y_true[worst], calibrated[worst].argmax(1),
        classes, p_pred=calibrated[worst].max(1), p_true=calibrated[worst, y_true[worst]], empty=empty))
    write_json(out.confused_pairs, most_confused(y_true, y_pred, classes, confused_pairs))
    write_json(out.reliability / "uncalibrated.json", calibration.reliability(plain, y_true))
    write_json(out.reliability / "calibrated.json", calibration.reliability(calibrated, y_true))
    write_json(out.calibration, {**fitted, "model_sha256": sha256_file(weights)})
    return metrics


def head_logits(model: models.Classifier, meta: dict, embeddings_dir: Path, labels: torch.Tensor) -> np.ndarray | None:
    """A feature_extract model's test logits from extract's cached test embeddings: its backbone is
    the frozen one extract ran, so the head on those embeddings (float32) is the model's output (on
    the default: the same logits to the last bit, 34 s of Lite0 on 2 cores saved per experiment).
    None where that does not hold (another strategy, embeddings of another backbone or split, or
    none): then the model runs over the images."""
    path = paths.split_file(embeddings_dir, "test")
    if meta.get("strategy") != "feature_extract" or not meta.get("backbone_sha256") or not path.is_file():
        return None
    cached, info = load_tensors(path)
    emb = cached["embeddings"]
    if (info.get("backbone_sha256") != meta["backbone_sha256"] or emb.dtype != torch.float32
            or not torch.equal(cached["labels"], labels)):
        return None
    with torch.inference_mode():
        return model.head.eval()(emb).numpy()


def fit_on_val(model: nn.Module, model_dir: Path, prepared_dir: Path, logits_of) -> dict:
    """The temperature fitted on the val split's logits (T = 1 when the split is empty), with the val
    NLL before and after. The logits are those finetune kept for these weights where it did
    (validation computed them; for feature_extract, the head on the cached val embeddings, as
    train_head selected on them), else the model's over the val images."""
    val, _ = storage.read_split(prepared_dir, "val")
    if len(val["labels"]) == 0:
        return dict(temperature=1.0, fitted_on=None, why="the val split is empty (data.val_fraction)")
    logits, labels = calibration.read_val_logits(model_dir, val["labels"]), val["labels"].numpy()
    if logits is None:
        logits = logits_of(model, val["images"], "calibrate (val)")
    t = calibration.fit_temperature(logits, labels)
    return dict(temperature=t, fitted_on="val", val_images=int(len(labels)),
                val_nll_before=calibration.nll(calibration.softmax(logits), labels),
                val_nll_after=calibration.nll(calibration.softmax(logits, t), labels))


def top_loss_indices(probs: np.ndarray, y_true: np.ndarray, n: int) -> np.ndarray:
    """The n test images the model got most confidently wrong: among those whose top class is not the
    true one, the highest probability of the predicted class first (ties: the lower index first).
    (Ranking by the loss, -log p(true), would favour images whose true class is merely unlikely.)"""
    y_pred = probs.argmax(1)
    wrong = np.flatnonzero(y_pred != y_true)
    order = np.lexsort((wrong, -probs[wrong, y_pred[wrong]]))
    return wrong[order][:n]


def top_loss_rows(idx: np.ndarray, probs: np.ndarray, y_true: np.ndarray, classes: list[str], refs: dict[int, str]) -> list[dict]:
    y_pred = probs.argmax(1)
    return [dict(rank=rank, index=int(i), ref=refs.get(int(i), ""), true=classes[y_true[i]], predicted=classes[y_pred[i]],
                 p_pred=round(float(probs[i, y_pred[i]]), 6), p_true=round(float(probs[i, y_true[i]]), 6))
            for rank, i in enumerate(idx, 1)]


def split_refs(prepared_dir: Path, split: str) -> dict[int, str]:
    """Row of `split` -> the file (or array entry) it was decoded from, from prepare's manifest; empty
    for a manifest written before it recorded the row."""
    path = prepared_dir / "manifest.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {int(r["index"]): r["ref"] for r in csv.DictReader(f) if r.get("split") == split and r.get("index")}


def most_confused(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], n: int) -> list[dict]:
    """The n largest off-diagonal cells of the confusion matrix, largest first (ties in class order):
    which class is taken for which, how often, and what share of the true class's test images that is."""
    k = len(classes)
    confusion = np.bincount(np.asarray(y_true) * k + np.asarray(y_pred), minlength=k * k).reshape(k, k)
    support = confusion.sum(1)
    cells = [(-int(confusion[t, p]), t, p) for t in range(k) for p in range(k) if t != p and confusion[t, p]]
    return [dict(actual=classes[t], predicted=classes[p], pair=f"{classes[t]} → {classes[p]}", count=-c,
                 share_of_actual=round(-c / int(support[t]), 6)) for c, t, p in sorted(cells)[:n]]


def to_csv(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


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


def prediction_grid(images, y_true, y_pred, classes: list[str], tile: int = 96, columns: int = 6, *,
                    p_pred=None, p_true=None, empty: str = "") -> bytes:
    """PNG of test images captioned true/predicted, green when right and red when wrong
    (the tutorials' visualize_model, without matplotlib); with p_pred and p_true, a third line gives
    the probabilities of the predicted (P) and the true (T) class. No images: a sheet saying `empty`."""
    rows = max(1, -(-len(images) // columns))
    caption = 26 if p_pred is None else 38
    sheet = Image.new("RGB", (columns * tile, rows * (tile + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    if not len(images):
        draw.text((4, 4), empty, fill="black")
    for i, img in enumerate(images):
        x, y = (i % columns) * tile, (i // columns) * (tile + caption)
        pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((tile, tile), Image.Resampling.NEAREST)
        sheet.paste(pil, (x, y))
        ok = y_true[i] == y_pred[i]
        draw.text((x + 2, y + tile + 1), f"T: {classes[y_true[i]][:14]}", fill="black")
        draw.text((x + 2, y + tile + 13), f"P: {classes[y_pred[i]][:14]}", fill=(0, 128, 0) if ok else (200, 0, 0))
        if p_pred is not None:
            draw.text((x + 2, y + tile + 25), f"P {p_pred[i]:.2f}  T {p_true[i]:.2f}", fill="black")
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()


def main() -> None:
    p = load_params()
    training.configure_runtime(threads=p.runtime.threads, deterministic=p.runtime.deterministic)
    e = p.evaluate
    metrics = evaluate(model_dir=paths.MODEL_DIR, prepared_dir=paths.PREPARED, out=Outputs.default(),
                       grid_images=e.grid_images, top_losses=e.top_losses, confused_pairs=e.confused_pairs, tta=e.tta,
                       calibrate=e.calibrate, batch_size=e.batch_size, device=training.pick_device(p.runtime.device),
                       amp=p.runtime.amp, embeddings_dir=paths.EMBEDDINGS)
    tta = f"; with flip TTA {metrics['tta_accuracy']:.4f}" if "tta_accuracy" in metrics else ""
    print(f"evaluate: accuracy {metrics['accuracy']:.4f}, balanced accuracy {metrics['balanced_accuracy']:.4f}, "
          f"macro-F1 {metrics['macro_f1']:.4f} on {metrics['test_images']} test images{tta}; temperature "
          f"{metrics['temperature']:.3f}: ECE {metrics['ece']:.4f} -> {metrics['ece_calibrated']:.4f}, "
          f"NLL {metrics['nll']:.4f} -> {metrics['nll_calibrated']:.4f}")


if __name__ == "__main__":
    cli.run("evaluate", main)
