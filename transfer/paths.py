"""Every path the pipeline reads or writes, built in one place (relative to the project root).

Stages run from the project root (DVC runs them there), so paths stay relative; that keeps
dvc.yaml, these names and the files on disk in agreement.
"""
from pathlib import Path

PROJECT = Path(".")
PARAMS = Path("params.yaml")
DVC_LOCK = Path("dvc.lock")  # read by convert for the provenance it records, never written by a stage

PREPARED = Path("data/prepared")  # {split}.images.npy + {split}.safetensors (transfer.storage), classes.json, manifest.csv, report.json
EMBEDDINGS = Path("data/embeddings")  # {split}.safetensors

BACKBONE_DIR = Path("models/backbone")  # backbone.safetensors, backbone.json, load_report.json
HEAD_DIR = Path("models/head")  # head.safetensors, head.json
MODEL_DIR = Path("models/model")  # model.safetensors, model.json, val_logits.safetensors
CALIBRATION = Path("models/calibration.json")  # the temperature evaluate fits on val, for convert's exports
CHECKPOINTS = Path("models/checkpoints")  # finetune.pt: resumable training state (not a DVC-cached output)
EXPORT_DIR = Path("models/export")  # model_fp32.safetensors, model_fp16.safetensors, model.json

METRICS = Path("metrics")
LOGS = Path("logs")  # run logs (timings) that vary between identical runs: never DVC outputs, not in git
SPLITS = ("train", "val", "test")


def split_file(folder: Path, split: str) -> Path:
    return folder / f"{split}.safetensors"
