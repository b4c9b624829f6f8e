"""Each stage's main() on tiny digits data in tmp_path, in pipeline order, and the failure paths."""
import contextlib
import importlib
import io as _io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT, tiny_params, write_params
from transfer import cli, io, models
from transfer.io import load_tensors, read_json

STAGES = ("prepare", "pretrain", "extract", "train_head", "finetune", "evaluate", "convert")


def run_stage(name: str, cwd: Path = None):
    """A stage's main(), in this process (cwd is the project root: the in_tmp fixture)."""
    importlib.import_module(f"stages.{name}").main()


def stage_error(name: str) -> str:
    """Run a stage that must fail with a user error, as `python -m stages.<name>` does; return its one line."""
    err = _io.StringIO()
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(err):
        cli.run(name, importlib.import_module(f"stages.{name}").main)
    assert e.value.code == cli.EXIT_USER_ERROR, err.getvalue()
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{name}: "), lines
    return lines[0]


def run_pipeline(cwd: Path, stages=STAGES):
    for name in stages:
        run_stage(name, cwd)


OUTPUTS = ("data/prepared", "data/embeddings", "models", "metrics")


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for top in OUTPUTS for p in sorted((root / top).rglob("*"))
            if p.is_file()}


def test_whole_chain_with_source_task_pretraining(in_tmp):
    # Digits fill their 8 px frame: resnet18's own 0.875 centre crop would cut strokes off (test
    # accuracy 0.37 with it, against the 0.4 held below).
    write_params(in_tmp, tiny_params(strategy="finetune", data={"crop_pct": 1.0}))
    run_pipeline(in_tmp)
    first = snapshot(in_tmp)
    info = read_json(in_tmp / "models/backbone/backbone.json")
    assert info["source"] == "train" and info["feature_dim"] == 512 and info["num_blocks"] == 5
    assert info["sha256"] == io.sha256_file(in_tmp / "models/backbone/backbone.safetensors")
    pre = read_json(in_tmp / "metrics/pretrain.json")
    assert pre["source_classes"] == ["0", "1", "2", "3", "4"]
    # The source task was learnt: chance is 0.2 on its 50 val images, give or take 0.06 (one standard
    # error) for a model that learnt nothing. Measured 0.64 here, 0.64 to 0.82 over seeds 0-4: 0.5 is
    # five standard errors above chance and seven images below the lowest seed.
    assert pre["source_val_accuracy"] >= 0.5
    emb, meta = load_tensors(in_tmp / "data/embeddings/val.safetensors")
    assert emb["embeddings"].shape == (73, 512) and emb["embeddings"].dtype == torch.float16  # val: 73 digits
    # Logged through DVCLive: its metrics.json and its confusion-matrix rows (one per test image).
    ev = read_json(in_tmp / "metrics/evaluate/metrics.json")
    rows = read_json(in_tmp / "metrics/evaluate/plots/sklearn/confusion_matrix.json")
    assert len(rows) == 75 and set(rows[0]) == {"actual", "predicted"}
    pairs = [(r["actual"], r["predicted"]) for r in rows]
    # The metrics are those of the predictions written beside them, and the model learnt the task: chance
    # is 0.2 for five classes; this tiny run (16 px, 10 images per class, 3 epochs) measured 0.51.
    assert ev["accuracy"] == pytest.approx(sum(a == b for a, b in pairs) / 75) and ev["accuracy"] >= 0.4
    assert ev["test_images"] == 75 and {k: v["support"] for k, v in ev["per_class"].items()} == {c: 15 for c in "56789"}
    from PIL import Image
    with Image.open(in_tmp / "metrics/prediction_grid.png") as grid:
        assert grid.size == (6 * 96, 4 * (96 + 26))
    conv = read_json(in_tmp / "metrics/convert.json")
    assert conv["fp32_agreement"] == 1.0 and conv["fp32_max_abs_logit_diff"] == 0.0 and conv["fp16_agreement"] > 0.9
    assert not (in_tmp / "models/checkpoints").exists()  # finetune.resume is off: no resume state written
    assert not list((in_tmp / "data/embeddings").glob("*.json"))  # nothing that varies run to run in an output
    curves = in_tmp / "metrics/curves/finetune/plots/metrics/val/acc.tsv"
    assert curves.read_text().splitlines()[0] == "step\tacc" and len(curves.read_text().splitlines()) == 4
    export = in_tmp / "models/export/model_fp16.safetensors"
    state, meta = load_tensors(export)
    assert state["head.fc.weight"].dtype == torch.float16 and meta["classes"] == ["5", "6", "7", "8", "9"]
    # Exact reproducibility on CPU: a second run gives every file of every output byte for byte.
    for top in OUTPUTS:
        shutil.rmtree(in_tmp / top)
    run_pipeline(in_tmp)
    second = snapshot(in_tmp)
    assert len(first) > 20 and sorted(first) == sorted(second)
    # Except the TorchScript archive: PyTorch writes a random serialization id into every one it saves
    # (and numbers traced classes per process). Its behaviour is checked instead: test_user_loop.
    assert [name for name in first if first[name] != second[name]] == ["models/export/model.torchscript.pt"]


def test_strategies_train_what_they_should(in_tmp):
    write_params(in_tmp, tiny_params(pretrained={"source": "none"}))
    run_pipeline(in_tmp, STAGES[:4])
    backbone, _ = load_tensors(in_tmp / "models/backbone/backbone.safetensors")
    head, _ = load_tensors(in_tmp / "models/head/head.safetensors")
    results = {}
    for strategy in ("feature_extract", "finetune", "partial", "scratch"):
        # StepLR as in the tutorials for one of them; cosine (the default) for the others.
        scheduler = "step" if strategy == "partial" else "cosine"
        write_params(in_tmp, tiny_params(pretrained={"source": "none"}, strategy=strategy,
                                         finetune={"freeze_blocks": 2, "scheduler": scheduler, "step_size": 1, "gamma": 0.5}))
        run_stage("finetune", in_tmp)
        model, _ = load_tensors(in_tmp / "models/model/model.safetensors")
        results[strategy] = (model, read_json(in_tmp / "metrics/finetune.json"))
    same = lambda m, key: torch.equal(m[f"backbone.{key}"], backbone[key])
    fe, ft, pa, sc = (results[s][0] for s in ("feature_extract", "finetune", "partial", "scratch"))
    assert all(same(fe, k) for k in backbone) and torch.equal(fe["head.fc.weight"], head["fc.weight"])
    assert not same(ft, "conv1.weight") and not same(ft, "layer4.1.conv2.weight")
    assert same(pa, "conv1.weight") and same(pa, "layer1.0.conv1.weight") and not same(pa, "layer3.0.conv1.weight")
    assert same(pa, "layer1.0.bn1.running_mean")  # frozen blocks keep their BatchNorm statistics
    assert not same(sc, "conv1.weight") and not same(sc, "bn1.running_mean")
    assert results["feature_extract"][1]["trainable_params"] == 0
    lrs = (in_tmp / "metrics/curves/finetune/plots/metrics/lr.tsv").read_text().split()  # the last run: scratch, cosine
    assert float(lrs[-1]) < float(lrs[3]) == pytest.approx(0.003)
    assert results["partial"][1]["trainable_params"] < results["finetune"][1]["trainable_params"]


def test_validation_every_k_epochs_on_a_subset_then_the_kept_weights_on_all(in_tmp):
    """finetune.eval_every / finetune.val_images: validation only after epochs 2, 4 and the last (5), on a
    class-balanced 20 of the 73 val images; the reported val_acc is the kept weights' on all of them."""
    write_params(in_tmp, tiny_params(pretrained={"source": "none"}, strategy="finetune",
                                     finetune={"epochs": 5, "eval_every": 2, "val_images": 20}))
    run_pipeline(in_tmp, STAGES[:5])
    m = read_json(in_tmp / "metrics/finetune.json")
    steps = lambda name: (in_tmp / f"metrics/curves/finetune/plots/metrics/{name}.tsv").read_text().splitlines()[1:]
    assert [int(r.split()[0]) for r in steps("val/acc")] == [1, 3, 4]  # DVCLive steps: epoch - 1
    assert len(steps("train/loss")) == 5 and m["best_epoch"] in (2, 4, 5)
    subset_acc = {int(r.split()[0]) + 1: float(r.split()[1]) for r in steps("val/acc")}[m["best_epoch"]]
    assert m["val_acc_subset"] == pytest.approx(subset_acc)
    assert m["val_acc_subset"] * 20 == pytest.approx(round(m["val_acc_subset"] * 20))  # a fraction of 20 images
    # val_acc is the saved model's accuracy on the whole val split
    from transfer import storage, training
    model = models.load_model(in_tmp / "models/model/model.safetensors", read_json(in_tmp / "models/model/model.json"))
    val, _ = storage.read_split(in_tmp / "data/prepared", "val")
    info = read_json(in_tmp / "models/model/model.json")
    logits = training.predict(model, val["images"], mean=info["mean"], std=info["std"], batch_size=64,
                              device=torch.device("cpu"))
    assert m["val_acc"] == pytest.approx(training.accuracy(logits, val["labels"]))


def test_balanced_subset_takes_classes_in_turn_and_nests():
    from transfer.training import balanced_subset
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 10)
    assert balanced_subset(labels, None) is None and balanced_subset(labels, 22) is None
    six = balanced_subset(labels, 6).tolist()
    assert [labels[i].item() for i in six] == [0, 0, 1, 1, 2, 2]
    ten = balanced_subset(labels, 10).tolist()  # the small class gives its 2, the others 4 each
    assert sorted(labels[ten].tolist()) == [0] * 4 + [1] * 2 + [2] * 4 and set(six) <= set(ten)
    assert balanced_subset(labels, 7).tolist() == sorted(six + [2])  # one more: class 0's third image


def test_feature_extract_is_scored_and_calibrated_without_running_the_backbone(in_tmp, monkeypatch):
    write_params(in_tmp, tiny_params(pretrained={"source": "none"}))
    run_pipeline(in_tmp, STAGES[:4])
    from transfer import training

    def no_backbone(*a, **k):
        raise AssertionError("feature_extract ran a model over images")
    monkeypatch.setattr(training, "predict", no_backbone)
    monkeypatch.setattr(training, "predict_batches", no_backbone)
    run_stage("finetune", in_tmp)
    assert read_json(in_tmp / "metrics/finetune.json")["val_acc"] == read_json(in_tmp / "metrics/train_head.json")["val_acc"]
    # evaluate neither: the test logits come from extract's test embeddings (float32), the temperature's val
    # logits from those finetune kept (tests/test_evaluate.py checks both against the model run on images).
    run_stage("evaluate", in_tmp)
    assert read_json(in_tmp / "models/calibration.json")["fitted_on"] == "val"
    assert sorted(p.name for p in (in_tmp / "data/embeddings").iterdir()) == ["test.safetensors", "train.safetensors",
                                                                              "val.safetensors"]


def _resnet_file(path: Path, prefix="") -> dict:
    torch.manual_seed(1)
    net = __import__("torchvision").models.resnet18(num_classes=1000)
    state = {prefix + k: v for k, v in net.state_dict().items()}
    torch.save(state, path)
    return state


def test_pretrained_from_torchvision_through_a_mirror(in_tmp, monkeypatch):
    import torchvision

    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    mirror = in_tmp / "mirror"
    mirror.mkdir()
    name = weights.url.rsplit("/", 1)[-1]
    state = _resnet_file(mirror / name)
    monkeypatch.setenv("TORCH_HOME", str(in_tmp / "torch"))
    monkeypatch.setenv("TRANSFER_WEIGHTS_MIRROR", mirror.as_uri())
    write_params(in_tmp, tiny_params(pretrained={"source": "torchvision", "weights": "IMAGENET1K_V1"}))
    run_stage("prepare")
    # Our stand-in file's sha256 does not start with the prefix torchvision publishes in the name.
    msg = stage_error("pretrain")
    assert "does not match the expected" in msg and "deleted, not cached" in msg
    assert not list((in_tmp / "torch").rglob("*.pth"))
    # Published under a name that carries its own checksum prefix, it verifies, loads and is cached.
    prefixed = name.rsplit("-", 1)[0] + f"-{io.sha256_file(mirror / name)[:8]}.pth"
    (mirror / name).rename(mirror / prefixed)
    monkeypatch.setattr(weights.value, "url", f"https://download.pytorch.org/models/{prefixed}")
    run_stage("pretrain")
    info = read_json(in_tmp / "models/backbone/backbone.json")
    assert info["source"] == "torchvision" and info["mean"] == [0.485, 0.456, 0.406]
    got, _ = load_tensors(in_tmp / "models/backbone/backbone.safetensors")
    assert torch.equal(got["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])
    assert read_json(in_tmp / "models/backbone/load_report.json")["counts"] == {"loaded": 120, "skipped": 0, "missing": 0}
    assert (in_tmp / "torch/hub/checkpoints" / prefixed).is_file()


def test_offline_torchvision_source_says_what_to_do(in_tmp, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(in_tmp / "torch"))
    monkeypatch.setenv("TRANSFER_WEIGHTS_MIRROR", (in_tmp / "nowhere").as_uri())
    write_params(in_tmp, tiny_params(pretrained={"source": "torchvision", "weights": "IMAGENET1K_V1"}))
    msg = stage_error("pretrain")
    assert "could not download" in msg and "pretrained.source: file" in msg
    write_params(in_tmp, tiny_params(pretrained={"source": "torchvision", "weights": "IMAGENET9K"}))
    assert ("pretrained.weights: 'IMAGENET9K' is not a weights name of resnet18; choose one of: DEFAULT, IMAGENET1K_V1"
            in stage_error("pretrain"))


def test_pretrained_from_url_and_from_file(in_tmp, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(in_tmp / "torch"))
    state = _resnet_file(in_tmp / "a.pth", prefix="module.")
    digest = io.sha256_file(in_tmp / "a.pth")
    write_params(in_tmp, tiny_params(pretrained={"source": "url", "url": (in_tmp / "a.pth").as_uri(), "sha256": "1" * 64}))
    assert "does not match" in stage_error("pretrain")
    write_params(in_tmp, tiny_params(pretrained={"source": "url", "url": (in_tmp / "a.pth").as_uri(), "sha256": digest}))
    run_stage("pretrain", in_tmp)
    report = read_json(in_tmp / "models/backbone/load_report.json")
    assert report["counts"] == {"loaded": 120, "skipped": 2, "missing": 0}  # DataParallel prefix stripped
    assert report["checkpoint"]["wrapper_prefixes"] == ["module."] and set(report["skipped"]) == {"fc.weight", "fc.bias"}
    # file: model A (a network with another head) into model B
    write_params(in_tmp, tiny_params(pretrained={"source": "file", "path": "a.pth"}))
    run_stage("pretrain", in_tmp)
    report = read_json(in_tmp / "models/backbone/load_report.json")
    assert report["skipped"] == {"fc.weight": "not in this backbone", "fc.bias": "not in this backbone"}
    got, _ = load_tensors(in_tmp / "models/backbone/backbone.safetensors")
    assert torch.equal(got["conv1.weight"], state["module.conv1.weight"])
    torch.save(nn.Linear(2, 2), in_tmp / "a.pth")  # a stranger's pickled module
    assert "refused" in stage_error("pretrain")


def test_finetune_resumes_after_sigkill_and_matches_uninterrupted(in_tmp):
    params = tiny_params(strategy="finetune", pretrained={"source": "none"}, finetune={"epochs": 4, "resume": True})
    write_params(in_tmp, params)
    run_pipeline(in_tmp, STAGES[:4])
    run_stage("finetune", in_tmp)
    reference = (in_tmp / "models/model/model.safetensors").read_bytes()
    ckpt = in_tmp / "models/checkpoints/finetune.pt"
    ckpt.unlink()
    with subprocess.Popen([sys.executable, "-m", "stages.finetune"], cwd=in_tmp, stdout=subprocess.PIPE, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}) as proc:
        for line in proc.stdout:  # kill as soon as epoch 2 is reported, mid-run
            if line.startswith("epoch 2/"):
                proc.send_signal(signal.SIGKILL)
                break
    assert 1 <= io.load_checkpoint(ckpt)["epoch"] < 4

    def finetune_output() -> str:
        out = _io.StringIO()
        with contextlib.redirect_stdout(out):
            run_stage("finetune")
        return out.getvalue()

    out = finetune_output()
    assert "resuming from" in out and "epoch 1/" not in out, out
    assert (in_tmp / "models/model/model.safetensors").read_bytes() == reference
    # A checkpoint from other settings, or from other data under the same settings, is not resumed.
    state = ckpt.read_bytes()
    write_params(in_tmp, {**params, "finetune": {**params["finetune"], "lr": 0.02}})
    assert "other settings; starting from epoch 1" in finetune_output()
    ckpt.write_bytes(state)
    write_params(in_tmp, params)
    train, meta = load_tensors(in_tmp / "data/prepared/train.safetensors")
    io.save_tensors(in_tmp / "data/prepared/train.safetensors", {**train, "labels": train["labels"].flip(0)}, meta=meta)
    assert "other settings; starting from epoch 1" in finetune_output()


def test_partial_with_too_many_blocks_stops_before_training(in_tmp):
    write_params(in_tmp, tiny_params(pretrained={"source": "none"}))
    run_pipeline(in_tmp, STAGES[:4])
    write_params(in_tmp, tiny_params(pretrained={"source": "none"}, strategy="partial", finetune={"freeze_blocks": 9}))
    assert "freeze_blocks: 9 is more than the 5 blocks of resnet18" in stage_error("finetune")
    assert not (in_tmp / "models/model").exists()


def test_convert_loads_gpu_style_checkpoints_on_cpu(tmp_path):
    meta = dict(arch="resnet18", image_size=16, num_classes=3, head=dict(kind="linear"))
    model = models.build_classifier(meta)
    # What DataParallel + torch.compile training saves: prefixed keys inside a training checkpoint.
    io.save_checkpoint(tmp_path / "ckpt.pt", {"model": {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()},
                                              "epoch": 4})
    again = models.load_model(tmp_path / "ckpt.pt", meta)
    x = torch.randn(2, 3, 16, 16)
    model.eval(), again.eval()
    assert torch.equal(model(x), again(x))


def test_mlp_head_keeps_its_best_validation_epoch(in_tmp):
    write_params(in_tmp, tiny_params(pretrained={"source": "none"}, train_head={"kind": "mlp", "hidden": 32, "epochs": 40}))
    run_pipeline(in_tmp, STAGES[:4])
    head, meta = load_tensors(in_tmp / "models/head/head.safetensors")
    assert head["fc1.weight"].shape == (32, 512) and head["fc2.weight"].shape == (5, 32)
    metrics = read_json(in_tmp / "metrics/train_head.json")
    curve = [float(v) for v in (in_tmp / "metrics/curves/train_head/plots/metrics/val/acc.tsv").read_text().split()[3::2]]
    assert len(curve) == 40 and metrics["val_acc"] == pytest.approx(max(curve))
    assert curve.index(max(curve)) + 1 == metrics["best_epoch"]
    run_stage("finetune")  # feature_extract with the mlp head
    run_stage("evaluate")
    assert read_json(in_tmp / "metrics/evaluate/metrics.json")["test_images"] == 75


def test_exported_model_loads_back_as_a_pretrained_file(in_tmp):
    """The pipeline's own export (keys under backbone. and head.) starts a new run as pretrained.source: file."""
    write_params(in_tmp, tiny_params(pretrained={"source": "none"}, strategy="finetune", finetune={"epochs": 1}))
    run_pipeline(in_tmp)
    exported, _ = load_tensors(in_tmp / "models/export/model_fp32.safetensors")
    write_params(in_tmp, tiny_params(pretrained={"source": "file", "path": "models/export/model_fp32.safetensors"}))
    run_stage("pretrain")
    report = read_json(in_tmp / "models/backbone/load_report.json")
    assert report["stripped_prefix"] == "backbone." and report["counts"]["loaded"] == 120 and not report["missing"]
    assert report["skipped"] == {"head.fc.weight": "not in this backbone", "head.fc.bias": "not in this backbone"}
    got, _ = load_tensors(in_tmp / "models/backbone/backbone.safetensors")
    assert all(torch.equal(got[k], exported[f"backbone.{k}"]) for k in got)
    write_params(in_tmp, tiny_params(backbone={"arch": "resnet34"},
                                     pretrained={"source": "file", "path": "models/export/model_fp32.safetensors"}))
    assert "holds a resnet18 model, but backbone.arch is resnet34; set backbone.arch: resnet18" in stage_error("pretrain")


def test_vit_weights_at_another_resolution_are_resampled():
    """ImageNet ViT weights (7x7 patches at 224 px) into a 64 px vit_b_32 (2x2): position embeddings resampled."""
    torch.manual_seed(0)
    backbone, _ = models.build_backbone("vit_b_32", 64)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    grid = torch.arange(49.0).view(1, 1, 7, 7).expand(1, 768, 7, 7)
    state["encoder.pos_embedding"] = torch.cat([torch.full((1, 1, 768), -1.0), grid.flatten(2).transpose(1, 2)], 1)
    report = models.load_backbone_weights(backbone, state, partial=False)
    assert report["resampled"] == {"encoder.pos_embedding": "resampled from (1, 50, 768) to (1, 5, 768) for 64 px"}
    pos = backbone.encoder.pos_embedding[0, :, 0]
    assert pos[0] == -1.0  # the class token's embedding is kept, not interpolated
    assert pos[1:].tolist() == pytest.approx([0.0, 6.0, 42.0, 48.0])  # the grid's corners (align_corners)


def test_metrics_match_a_hand_computed_confusion_matrix():
    from stages.evaluate import classification_metrics

    # rows true, columns predicted:  a  b  c
    #                            a [ 2  1  0 ]
    #                            b [ 0  2  0 ]
    #                            c [ 1  0  0 ]
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 0, 1, 1, 0])
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6) and m["test_images"] == 6
    assert m["per_class"]["a"] == pytest.approx(dict(precision=2 / 3, recall=2 / 3, support=3))
    assert m["per_class"]["b"] == pytest.approx(dict(precision=2 / 3, recall=1.0, support=2))
    assert m["per_class"]["c"] == pytest.approx(dict(precision=0.0, recall=0.0, support=1))  # never predicted
    f1 = [2 / 3, 2 * (2 / 3) / (2 / 3 + 1), 0.0]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_prediction_grid_samples_every_class():
    from stages.evaluate import grid_indices

    labels = np.repeat([0, 1, 2, 3], 10)  # stored in class order, as prepare writes the test split
    idx = grid_indices(labels, 6)
    assert labels[idx].tolist() == [0, 1, 2, 3, 0, 1] and idx.tolist() == [0, 10, 20, 30, 1, 11]
    assert len(grid_indices(np.array([2, 2, 0]), 24)) == 3


def test_stages_stop_when_the_prepared_classes_are_not_the_models(in_tmp):
    """data.classes changed and prepare re-ran, but the head and model are the old ones (a stage run by
    hand, or dvc repro of one stage): finetune, evaluate and convert each stop with one line naming
    both class lists, before reading weights or writing anything; the same classes in another order
    stop too (labels and outputs would be paired under the wrong names)."""
    write_params(in_tmp, tiny_params(pretrained={"source": "none"}))
    run_pipeline(in_tmp, STAGES[:5])
    model_before = (in_tmp / "models/model/model.safetensors").read_bytes()
    old = "['5', '6', '7', '8', '9']"
    for classes in ([5, 6, 7], [6, 5, 7, 8, 9]):
        write_params(in_tmp, tiny_params(pretrained={"source": "none"}, data={"classes": classes}))
        run_stage("prepare")
        new = str([str(c) for c in classes])
        for stage, model_file, fix in (("finetune", "models/head/head.json", "(dvc repro finetune)"),
                                       ("evaluate", "models/model/model.json", "(dvc repro evaluate)"),
                                       ("convert", "models/model/model.json", "(dvc repro convert)")):
            msg = stage_error(stage)
            assert msg.startswith(f"{stage}: data/prepared holds classes {new}, but {model_file} was trained on {old}; "
                                  "re-run "), msg
            assert msg.endswith(f"on this data {fix}"), msg
    assert (in_tmp / "models/model/model.safetensors").read_bytes() == model_before
    assert not (in_tmp / "metrics/evaluate").exists() and not (in_tmp / "models/export").exists()


def test_compile_changes_how_the_model_runs_not_what_it_saves(in_tmp, monkeypatch):
    """runtime.compile: extract and finetune run their model through torch.compile and save exactly
    what eager mode saves (no "_orig_mod." key, no other byte). Here with torch.compile's eager
    backend, which captures the graphs without generating code, so no number may move; inductor's
    own kernels are compared on a GPU (test_gpu.py)."""
    params = tiny_params(strategy="finetune", data={"crop_pct": 1.0}, pretrained={"source": "none"})
    write_params(in_tmp, params)
    run_pipeline(in_tmp, STAGES[:5])
    eager = snapshot(in_tmp)
    compiled, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or compile(model, backend="eager"))
    write_params(in_tmp, tiny_params(strategy="finetune", data={"crop_pct": 1.0}, pretrained={"source": "none"},
                                     runtime={"compile": True}))
    for stage in ("extract", "finetune"):
        run_stage(stage, in_tmp)
    assert len(compiled) == 3  # extract's backbone; finetune's training step and its validation
    assert snapshot(in_tmp) == eager
    write_params(in_tmp, params)  # false, the default: eager
    compiled.clear()
    run_stage("finetune", in_tmp)
    assert compiled == []
