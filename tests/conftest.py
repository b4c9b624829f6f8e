"""Shared fixtures: RNG state restored around every test, the gpu marker, tiny image trees."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# cuBLAS reads this when its handle is created, i.e. before any GPU test enables deterministic algorithms.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_rng_and_threads():
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(), torch.get_num_threads())
    yield
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
    torch.set_num_threads(state[3])


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run with tmp_path as the project root (stages use root-relative paths)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_image(path: Path, seed: int, size=(12, 10), mode="RGB", fmt=None) -> Path:
    """A small distinct image; class-dependent colour keeps tiny classification tasks learnable."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path, format=fmt)
    return path


def make_tree(root: Path, classes=("ants", "bees"), per_class=6, ext=".png", seed=0) -> Path:
    for ci, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"img{i}{ext}", seed=seed * 1000 + ci * 100 + i)
    return root


def plain_spec(image_size: int, interpolation: str = "bilinear", crop_pct: float = 1.0):
    """A preprocessing spec given outright (no backbone resolved): by default a plain resize to the size."""
    from transfer.preprocess import Spec

    return Spec(image_size=image_size, crop_pct=crop_pct, interpolation=interpolation, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def tiny_params(**sections) -> dict:
    """Full params on scikit-learn's digits, small enough for seconds-long stage tests."""
    from transfer.params import defaults

    p = defaults()
    p["data"].update(source="digits", root="data/raw", classes=[5, 6, 7, 8, 9], image_size=16, train_per_class=10,
                     eval_per_class=15)
    # The source-task setup (resnet18 pretrained on digits 0-4 here), not the ImageNet default.
    p["backbone"]["arch"] = "resnet18"
    p["pretrained"].update(source="train", path="data/raw/pretrained", match="name")
    p["pretrained"]["train"].update(per_class=100, epochs=4, batch_size=32, lr=0.05)
    p["train_head"].update(epochs=30)
    p["finetune"].update(epochs=3, batch_size=16, lr=0.003)
    p["extract"]["batch_size"] = 64
    p["runtime"]["threads"] = 1
    for name, values in sections.items():
        if isinstance(values, dict):
            for key, value in values.items():  # one level deeper too: pretrained={"train": {...}}
                if isinstance(value, dict) and isinstance(p[name].get(key), dict):
                    p[name][key].update(value)
                else:
                    p[name][key] = value
        else:
            p[name] = values
    return p


def write_params(folder: Path, params: dict) -> Path:
    import yaml

    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    (folder / "data" / "raw" / "pretrained").mkdir(parents=True, exist_ok=True)
    return path
