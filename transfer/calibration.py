"""Probabilities you can trust: temperature scaling and how far probabilities are from the truth.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017) divides the logits
by one number T > 0 fitted on the val split: softmax(logits / T). It changes how sure the model is,
never what it predicts (the argmax of logits / T is the argmax of logits). evaluate fits T and writes
it to models/calibration.json; convert bakes the division into the exports and writes T into
models/export/model.json, which predict reads.

Expected calibration error: the test images are put in BINS equal-width bins by their top
probability (bin b holds confidences in ((b-1)/BINS, b/BINS]); ECE = sum over bins of
(images in the bin / all images) * |accuracy in the bin - mean confidence in the bin|.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from transfer.cli import UserError
from transfer.io import load_tensors, read_json, save_tensors, sha256_file

BINS = 15  # the usual count since Guo et al.
# On a val split the model gets entirely right, the NLL keeps falling as T shrinks towards 0 (and
# rises for ever as T grows on one it gets entirely wrong): T is kept within these bounds.
T_MIN, T_MAX = 0.01, 100.0
VAL_LOGITS = "val_logits.safetensors"  # beside model.safetensors in the model folder


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities of (N, C) logits divided by `temperature`, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T minimising the mean negative log-likelihood of softmax(logits / T) on these labels: L-BFGS
    on log T (so T stays positive and the problem is smooth in it), in float64, from T = 1."""
    if len(labels) == 0:
        raise ValueError("no images to fit a temperature on")
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)  # a plain tensor, also from inference mode
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    t = float(log_t.detach().exp())
    return float(np.clip(t, T_MIN, T_MAX)) if np.isfinite(t) else 1.0


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels (a probability of 0 counts as 1e-300, not inf)."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.log(np.maximum(p, 1e-300)).mean()) if len(labels) else 0.0


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict]:
    """The reliability diagram: per non-empty bin of top probability, its number (1..bins), mean
    confidence, accuracy and image count."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence, correct = probs.max(1), probs.argmax(1) == np.asarray(labels)
    # Bin b (1-based) holds ((b-1)/bins, b/bins]; a confidence of exactly 0 cannot occur (the top of C >= 1 probabilities).
    which = np.clip(np.ceil(confidence * bins).astype(np.int64), 1, bins)
    rows = []
    for b in range(1, bins + 1):
        inside = which == b
        if inside.any():
            rows.append(dict(bin=b, confidence=float(confidence[inside].mean()), accuracy=float(correct[inside].mean()),
                             count=int(inside.sum())))
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    n = len(labels)
    return float(sum(r["count"] / n * abs(r["accuracy"] - r["confidence"]) for r in reliability(probs, labels, bins))) if n else 0.0


def read_temperature(path: Path, model_file: Path) -> dict:
    """models/calibration.json, checked to be the one fitted for the model in model_file (by its sha256):
    a temperature fitted for other weights would scale these logits by a meaningless number."""
    if not Path(path).is_file():
        raise UserError(f"{path}: not found; run `dvc repro evaluate` (it fits the temperature on the val split)")
    record = read_json(path)
    if record.get("model_sha256") != sha256_file(model_file):
        raise UserError(f"{path} was fitted for another model than {model_file}; re-run evaluate (dvc repro convert)")
    t = record.get("temperature")
    if not isinstance(t, (int, float)) or not T_MIN <= t <= T_MAX:
        raise UserError(f"{path}: temperature {t!r} is not a number in [{T_MIN:g}, {T_MAX:g}]; re-run evaluate")
    return record


def write_val_logits(model_dir: Path, logits: torch.Tensor | None, labels: torch.Tensor) -> None:
    """Keep the logits the trained weights gave on the val split (finetune computes them when it
    validates) beside the weights, tied to them by the weights' sha256; with no logits (an empty
    split), remove a stale file."""
    path = Path(model_dir) / VAL_LOGITS
    if logits is None or len(logits) != len(labels):
        path.unlink(missing_ok=True)
        return
    save_tensors(path, {"logits": logits.float(), "labels": labels},
                 meta={"model_sha256": sha256_file(Path(model_dir) / "model.safetensors")})


def read_val_logits(model_dir: Path, labels: torch.Tensor) -> np.ndarray | None:
    """The val logits write_val_logits kept, if they belong to the model folder's weights and to these
    val labels; None otherwise (then the caller runs the model over val)."""
    path = Path(model_dir) / VAL_LOGITS
    if not path.is_file():
        return None
    tensors, meta = load_tensors(path)
    if (meta.get("model_sha256") != sha256_file(Path(model_dir) / "model.safetensors")
            or not torch.equal(tensors["labels"], labels)):
        return None
    return tensors["logits"].numpy()
