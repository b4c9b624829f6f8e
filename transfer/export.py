"""Models for deployment: the classifier with its preprocessing inside, as ONNX and TorchScript,
each checked against PyTorch; and the ONNX runner `predict --onnx` uses.

An exported model takes what any image library gives after the resize and crop: uint8 RGB
(B, 3, S, S) with any batch size B, and returns logits, already divided by the temperature that
evaluate fitted (model.json's "temperature"), so their softmax is calibrated; scaling to [0, 1], the
mean/std normalisation and the temperature are part of the graph, so a deployed user cannot get them
wrong. How to get from a
photo to (3, S, S) is written in model.json ("preprocess": the recipe and its resolved values, each
with where it came from), and `predict` applies exactly that.

torch is imported inside the functions that export: the ONNX runner must work where only
onnxruntime, Pillow and numpy are installed.
"""
from __future__ import annotations

import io as _io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transfer.cli import UserError
from transfer.io import write_bytes

if TYPE_CHECKING:
    import torch

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
OPSET = 18

# The one preprocessing recipe, named in model.json beside its values (transfer.preprocess.Spec):
# transfer.data.decode_file (any Pillow-readable file; EXIF orientation applied; 16-bit scaled, alpha
# over white, to RGB; JPEG drafted down to no less than resize_size; shorter side resized to
# resize_size with `interpolation`; centre crop to image_size x image_size). The name changed when the
# filter and crop stopped being fixed (bilinear, no margin): predict refuses a model.json of the old one.
PREPROCESS = {"recipe": "rgb-resize-shorter-center-crop",
              "steps": "RGB; shorter side resized to resize_size with interpolation; centre crop to image_size",
              "input": "uint8 RGB (batch, 3, image_size, image_size)",
              "normalisation": "inside the model: x / 255, then (x - mean) / std"}


def preprocess_entry(spec) -> dict:
    """model.json's "preprocess": the recipe and the resolved spec (a transfer.preprocess.Spec)."""
    return {**PREPROCESS, **spec.to_dict()}


class ExportError(UserError):
    """An export that does not reproduce the model, or a model that cannot be exported."""


# The stages whose outputs an exported model comes from, in pipeline order (convert reads their dvc.lock
# entries): evaluate's is the temperature fitted on val.
UPSTREAM = ("prepare", "pretrain", "extract", "train_head", "finetune", "evaluate")


RUN_WRITES = ("dvc.lock", "params.yaml", ".gitignore")


def provenance(*, lock_path: Path, project: Path, weights_sha256: str) -> dict:
    """Where an exported model came from: the git revision the project was at, and for every stage upstream
    of it the params it ran with and the hashes of what it wrote, as DVC recorded them in dvc.lock
    (`dvc repro` and `dvc exp run` write a stage's entry as soon as it finishes, so while convert runs they
    describe this run's inputs; convert's own entry is not there yet). Read, not declared: each of those
    entries changes only when its stage re-runs, and then models/model, which convert declares, is rewritten
    too. Run outside DVC (python -m stages.convert), the entries are whatever the last DVC run left, and
    `dvc_lock` says which file they came from."""
    import subprocess

    import yaml

    out: dict = {"weights_sha256": weights_sha256}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project,
                               capture_output=True, text=True, timeout=30)
        # What a run itself changes is not a difference from the revision: dvc.lock (DVC writes each stage's
        # entry as it ends), params.yaml (`dvc exp run -S`; the stages' params are recorded below), the
        # metrics DVC keeps in git and .gitignore (DVC lists its outputs there). Anything else (code, dvc.yaml) is listed: then the revision alone does
        # not rebuild the model.
        changed = [line[3:] for line in dirty.stdout.splitlines()]
        changed = [f for f in changed if f not in RUN_WRITES and not f.startswith("metrics/")]
        out["git"] = {"revision": head.stdout.strip(), "uncommitted_changes": changed} if head.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):  # no git: a copy of the project without its history
        out["git"] = None
    lock = yaml.safe_load(lock_path.read_text()) if lock_path.is_file() else None
    stages = (lock or {}).get("stages", {})
    out["dvc_lock"] = str(lock_path) if lock else None
    out["stages"] = {
        name: {"params": stages[name].get("params", {}).get("params.yaml", {}),
               "outs": {o["path"]: o.get("md5") for o in stages[name].get("outs", [])}}
        for name in UPSTREAM if name in stages}
    return out


def deployable(model: "torch.nn.Module", mean, std, temperature: float = 1.0) -> "torch.nn.Module":
    """model wrapped so that it takes uint8 images and normalises them itself, exactly as training did
    (transfer.training.to_input: x / 255, then (x - mean) / std, in float32), and divides its logits
    by `temperature` (transfer.calibration), so that their softmax is the calibrated probabilities.
    At 1.0 there is no division in the graph at all."""
    import torch
    from torch import nn

    class Deployable(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
            self.calibrated = float(temperature) != 1.0
            if self.calibrated:
                self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images.float() / 255.0
            logits = self.model((x - self.mean) / self.std)
            return logits / self.temperature if self.calibrated else logits

    return Deployable().eval()


def export_onnx(net: "torch.nn.Module", path: Path, image_size: int) -> None:
    """ONNX with a dynamic batch dimension (H and W stay fixed: timm's tf_* models bake their SAME
    padding in at export size). Written atomically.

    torch.export's exporter (dynamo=True), although the legacy TorchScript one exported the default
    Lite0 at 128 px 4.7x faster (8.1 s against 37.9 s on a loaded 2-core machine): the graphs are not
    the same. The legacy one has 601 nodes (SAME padding recomputed from the input shape, BatchNorm
    kept) and onnxruntime ran 64 images through it in 2.48 s; torch.export's has 98 (padding
    constant, BatchNorm folded) and ran them in 1.43 s. Every deployment pays the runtime, convert pays
    the export once per model (DVC's run cache restores it for a model already exported)."""
    import torch

    example = torch.zeros((2, 3, image_size, image_size), dtype=torch.uint8)
    try:
        program = torch.onnx.export(net, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=65536)}},
                                    opset_version=OPSET, external_data=False, verbose=False, report=False)
    except Exception as e:  # torch.export raises many types; say which model and where to turn it off
        raise ExportError(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "set convert.onnx: false to skip it") from None
    write_bytes(path, program.model_proto.SerializeToString())


def export_torchscript(net: "torch.nn.Module", path: Path, image_size: int) -> None:
    """TorchScript by tracing (the model has no data-dependent control flow), written atomically."""
    import torch

    example = torch.zeros((2, 3, image_size, image_size), dtype=torch.uint8)
    # torch.jit is deprecated upstream in favour of torch.export, but TorchScript is still what C++
    # (libtorch) and older serving stacks load; the warning is PyTorch's to give, not every stage run's.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            with torch.inference_mode(False), torch.no_grad():
                traced = torch.jit.trace(net, (example,), check_trace=False)
        except Exception as e:
            raise ExportError(f"TorchScript export failed ({type(e).__name__}: {e}); set convert.torchscript: false "
                              "to skip it") from None
        buf = _io.BytesIO()
        torch.jit.save(traced, buf)
    write_bytes(path, buf.getvalue())


def onnx_session(path: Path, device: str = "auto"):
    """An onnxruntime session for an exported model (CUDA when asked for or available, else CPU)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed; pip install onnxruntime (or onnxruntime-gpu)") from None
    if not Path(path).is_file():
        raise UserError(f"{path}: no ONNX model; run `dvc repro convert` with convert.onnx: true")
    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if device != "cpu" and "CUDAExecutionProvider" in available:
        providers.insert(0, "CUDAExecutionProvider")
    elif device == "cuda":
        raise UserError("--device cuda: onnxruntime has no CUDA provider here; install onnxruntime-gpu or use cpu")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # warnings about unused initialisers are noise to a user
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def onnx_logits(session, images: np.ndarray) -> np.ndarray:
    return session.run(["logits"], {"images": np.ascontiguousarray(images, dtype=np.uint8)})[0]


def parity(reference: np.ndarray, other: np.ndarray, tolerance: float) -> dict:
    """How far an export's logits are from PyTorch's: top-1 agreement and the largest logit difference.
    A top-1 disagreement only passes where PyTorch's own top two are within the tolerance (a tie)."""
    if len(reference) == 0:
        return dict(agreement=1.0, max_abs_logit_diff=0.0, real_disagreements=0)
    agree = reference.argmax(1) == other.argmax(1)
    top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(reference), 2))
    tie = (top2[:, 1] - top2[:, 0]) <= 2 * tolerance
    return dict(agreement=float(agree.mean()), max_abs_logit_diff=float(np.abs(reference - other).max()),
                real_disagreements=int((~agree & ~tie).sum()))
