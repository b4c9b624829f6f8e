"""After `dvc repro`: exports a deployment can use (ONNX, TorchScript) checked against PyTorch, with
the temperature evaluate fitted built in, `predict` on new files (with torch, and with onnxruntime
alone; with and without flip TTA), and DVCLive's logs."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, tiny_params, write_params
from stages.predict import decoded
from test_stages import run_pipeline, stage_error
from transfer import data, export, models, preprocess, storage, training
from transfer.io import read_json


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The tiny pipeline run once (resnet18 from random weights: exports, not accuracy, are tested here)."""
    root = tmp_path_factory.mktemp("loop")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        write_params(root, tiny_params(pretrained={"source": "none"}))
        run_pipeline(root)
    finally:
        os.chdir(cwd)
    return root


def test_convert_exports_onnx_and_torchscript_that_match_pytorch(project):
    m = read_json(project / "metrics/convert.json")
    assert m["images_compared"] == 75
    for name in ("onnx", "torchscript"):
        assert m[f"{name}_agreement"] == 1.0 and m[f"{name}_real_disagreements"] == 0, m
        assert m[f"{name}_max_abs_logit_diff"] < 1e-4, m  # measured ~1e-6: same float32 arithmetic
    meta = read_json(project / "models/export/model.json")
    # The full resolved spec: resnet18's weights' transforms() (Resize(256) + CenterCrop(224), bilinear) at 16 px.
    spec = preprocess.resolve_spec(arch="resnet18", pretrained_source="none", weights="DEFAULT", image_size=16)
    assert meta["preprocess"] == {**export.PREPROCESS, **spec.to_dict()}
    assert {k: meta["preprocess"][k] for k in ("image_size", "resize_size", "crop_pct", "interpolation")} == dict(
        image_size=16, resize_size=18, crop_pct=0.875, interpolation="bilinear")
    assert meta["preprocess"]["mean"] == meta["mean"] == [0.485, 0.456, 0.406]
    assert meta["preprocess"]["origin"]["interpolation"].startswith("weights: torchvision ResNet18_Weights.IMAGENET1K_V1")
    # Any batch size, uint8 in, and the model's logits on the prepared test images divided by the temperature
    # evaluate fitted (the head trained on 10 images a class is under-confident: T well below 1), so that
    # their softmax is the calibrated probabilities.
    t = read_json(project / "models/calibration.json")["temperature"]
    assert meta["temperature"] == t and meta["calibration"]["fitted_on"] == "val" and not 0.9 < t < 1.1
    test, _ = storage.read_split(project / "data/prepared", "test")
    model = models.load_model(project / "models/model/model.safetensors", meta)
    want = training.predict(model, test["images"][:7], mean=meta["mean"], std=meta["std"], batch_size=7,
                            device=torch.device("cpu"), amp=False).numpy() / np.float32(t)
    session = export.onnx_session(project / "models/export/model.onnx", device="cpu")
    for n in (1, 7):
        got = export.onnx_logits(session, test["images"][:n].numpy())
        np.testing.assert_allclose(got, want[:n], atol=1e-4)
    scripted = torch.jit.load(str(project / "models/export/model.torchscript.pt"), map_location="cpu")
    with torch.inference_mode():
        np.testing.assert_allclose(scripted(test["images"][:3]).numpy(), want[:3], atol=1e-4)
    probs = torch.softmax(torch.from_numpy(export.onnx_logits(session, test["images"][:7].numpy())).double(), 1)
    np.testing.assert_allclose(probs.numpy(), torch.softmax(torch.from_numpy(want).double(), 1).numpy(), atol=1e-5)


def test_an_export_that_disagrees_fails_convert_with_the_numbers(project, monkeypatch):
    monkeypatch.chdir(project)
    real = export.onnx_logits
    monkeypatch.setattr(export, "onnx_logits", lambda s, x: np.roll(real(s, x), 1, axis=1))  # a broken export
    msg = stage_error("convert")
    assert "the onnx export does not reproduce the model on 75 test images: top-1 agreement" in msg
    assert "> convert.tolerance 0.001" in msg
    assert not (project / "models/export/model.onnx").exists()  # never left for a user to deploy
    monkeypatch.setattr(export, "onnx_logits", real)
    from test_stages import run_stage
    run_stage("convert")  # and the real export passes again
    assert (project / "models/export/model.onnx").is_file()


def _photos(folder, project, n=6):
    """The source images (8x8 digits) of n test-split entries saved as PNG files, as a user would have
    them, plus files predict must reject. Returns the PNGs' paths."""
    with open(project / "data/prepared/manifest.csv", newline="") as f:
        refs = [row["ref"] for row in csv.DictReader(f) if row["split"] == "test"][:n]
    arrays = {item.ref: item.array for item in data.collect_digits().items}
    folder.mkdir(parents=True, exist_ok=True)
    for i, ref in enumerate(refs):
        Image.fromarray(arrays[ref]).save(folder / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("not an image, skipped in folders")
    return [folder / f"img{i}.png" for i in range(n)]


def _predict(cwd, *args, block_torch=False):
    code = ("import runpy, sys\n"
            + ("sys.modules['torch'] = None\n" if block_torch else "")
            + f"sys.argv = ['predict', *{list(args)!r}]\n"
            "runpy.run_module('stages.predict', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_classifies_files_and_folders_like_the_model(project, tmp_path):
    files = _photos(tmp_path / "new", project)
    meta = read_json(project / "models/export/model.json")
    # predict decodes a file, as model.json says, into exactly the pixels prepare stored for its source.
    pixels = [img for img, _ in decoded(files, preprocess.Spec.from_dict(meta["preprocess"], "model.json"), workers=1)]
    test, _ = storage.read_split(project / "data/prepared", "test")
    prepared = {bytes(img) for img in test["images"][:].numpy()}
    assert all(img.shape == (3, 16, 16) and bytes(img) in prepared for img in pixels)
    images = torch.from_numpy(np.stack(pixels))
    model = models.load_model(project / "models/model/model.safetensors", meta)
    logits = training.predict(model, images, mean=meta["mean"], std=meta["std"], batch_size=8,
                              device=torch.device("cpu"), amp=False)
    want = torch.softmax(logits.double() / meta["temperature"], 1)  # the calibrated probabilities
    r = _predict(project, str(tmp_path / "new"), str(tmp_path / "missing.png"), "--top-k", "2",
                 "--out", str(tmp_path / "p.csv"), "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    rows = _read(tmp_path / "p.csv")
    assert [row["path"].rsplit("/", 1)[-1] for row in rows] == ["broken.jpg", *[f"img{i}.png" for i in range(6)], "missing.png"]
    assert rows[0]["status"] == "unreadable" and "not an image" in rows[0]["reason"]
    assert rows[-1]["status"] == "unreadable" and rows[-1]["reason"] == "no such file"
    for i, row in enumerate(rows[1:7]):
        top = torch.argsort(want[i], descending=True)[:2]
        assert [row["label_1"], row["label_2"]] == [meta["classes"][int(c)] for c in top]
        assert float(row["prob_1"]) == pytest.approx(float(want[i, top[0]]), abs=1e-5)
    assert "UNREADABLE: no such file" in r.stdout and "path" in r.stdout.splitlines()[0]
    assert "6 images classified, 2 unreadable" in r.stderr


def test_predict_runs_on_onnx_without_torch(project, tmp_path):
    _photos(tmp_path / "new", project)
    with_torch = _predict(project, str(tmp_path / "new"), "--out", str(tmp_path / "t.csv"))
    onnx = _predict(project, str(tmp_path / "new"), "--onnx", "--out", str(tmp_path / "o.csv"), block_torch=True)
    assert with_torch.returncode == 0 and onnx.returncode == 0, onnx.stderr
    a, b = _read(tmp_path / "t.csv"), _read(tmp_path / "o.csv")
    assert [r["label_1"] for r in a] == [r["label_1"] for r in b]
    assert all(abs(float(x["prob_1"] or 0) - float(y["prob_1"] or 0)) < 1e-4 for x, y in zip(a, b))
    assert "CPUExecutionProvider" in onnx.stderr


def test_predict_tta_averages_image_and_mirror_in_both_runners(project, tmp_path):
    """predict --tta: each image's probabilities are the mean of its own and its mirror image's, calibrated,
    with torch and with onnxruntime alone; the model is flip-sensitive, so the averaging shows."""
    files = _photos(tmp_path / "new", project)
    meta = read_json(project / "models/export/model.json")
    spec = preprocess.Spec.from_dict(meta["preprocess"], "model.json")
    images = torch.from_numpy(np.stack([img for img, _ in decoded(files, spec, workers=1)]))
    model = models.load_model(project / "models/model/model.safetensors", meta)
    kw = dict(mean=meta["mean"], std=meta["std"], batch_size=8, device=torch.device("cpu"), amp=False)
    probs = [torch.softmax(training.predict(model, x, **kw).double() / meta["temperature"], 1)
             for x in (images, torch.flip(images, dims=(3,)))]
    assert (probs[0] - probs[1]).abs().max() > 0.01
    want = (probs[0] + probs[1]) / 2
    for runner in ([], ["--onnx"]):
        r = _predict(project, str(tmp_path / "new"), "--tta", "--top-k", "5", "--out", str(tmp_path / "p.csv"), *runner,
                     block_torch=bool(runner))
        assert r.returncode == 0 and "with flip TTA" in r.stderr, r.stderr
        rows = [row for row in _read(tmp_path / "p.csv") if row["status"] == "ok"]
        assert len(rows) == 6
        for i, row in enumerate(rows):
            got = {row[f"label_{k}"]: float(row[f"prob_{k}"]) for k in range(1, 6)}
            assert got == pytest.approx({c: float(want[i, j]) for j, c in enumerate(meta["classes"])}, abs=2e-5), runner


def test_predict_exits_2_only_when_nothing_could_be_read(project, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"")
    r = _predict(project, str(tmp_path / "bad"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("predict: none of the 1 files could be read")
    r = _predict(tmp_path, str(tmp_path / "bad"))  # no model here
    assert r.returncode == 2 and "models/export/model.json: not found" in r.stderr


def test_dvclive_logs_curves_and_test_metrics(project):
    curves = project / "metrics/curves/train_head"
    acc = (curves / "plots/metrics/val/acc.tsv").read_text().splitlines()
    assert acc[0] == "step\tacc" and len(acc) == 1 + tiny_params()["train_head"]["epochs"]
    assert read_json(curves / "metrics.json")["step"] == len(acc) - 2  # DVCLive's summary: the last step
    ev = read_json(project / "metrics/evaluate/metrics.json")
    rows = read_json(project / "metrics/evaluate/plots/sklearn/confusion_matrix.json")
    assert ev["accuracy"] == pytest.approx(np.mean([r["actual"] == r["predicted"] for r in rows]))
    assert set(ev["per_class"]) == set("56789") and ev["per_class"]["5"]["support"] == 15
    assert not list(project.glob("metrics/.*.tmp"))  # the scratch folders are gone


def test_installed_command_predicts_from_outside_the_repo_with_only_the_export_folder(project, tmp_path):
    """`pip install .` puts transfer-predict on PATH (make setup installs the project so); with a copy of
    models/export and nothing else of the project, it classifies as `python -m stages.predict` does."""
    command = Path(sys.executable).parent / "transfer-predict"
    assert command.is_file(), "the [project.scripts] entry point is not installed: run make setup"
    files = _photos(tmp_path / "new", project)
    shipped = shutil.copytree(project / "models/export", tmp_path / "elsewhere" / "model")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    outside = tmp_path / "elsewhere"
    for extra in ([], ["--onnx"]):
        r = subprocess.run([str(command), str(tmp_path / "new"), "--model", str(shipped), "--out", "p.csv", *extra],
                           cwd=outside, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        rows = {Path(row["path"]).name: row for row in _read(outside / "p.csv")}
        assert {f.name for f in files} <= set(rows)
        assert rows["broken.jpg"]["status"] != "ok"
        ref = _predict(ROOT, str(tmp_path / "new"), "--model", str(project / "models/export"), "--out", str(tmp_path / "ref.csv"))
        assert ref.returncode == 0, ref.stderr
        want = {Path(row["path"]).name: row for row in _read(tmp_path / "ref.csv")}
        for f in files:
            assert rows[f.name]["label_1"] == want[f.name]["label_1"], (extra, f.name)
    r = subprocess.run([str(command), "--help"], cwd=outside, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.startswith("usage: transfer-predict")
