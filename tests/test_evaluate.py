"""evaluate's mistakes and probabilities: top losses and the most-confused pairs against hand
computations, flip TTA, and temperature scaling (on an over-confident toy, then the stage end to end
on tiny digits)."""
import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_params, write_params
from stages.evaluate import Outputs, most_confused, prediction_grid, top_loss_indices
from test_stages import STAGES, run_pipeline, run_stage
from transfer import calibration, data, models, paths, preprocess, storage, training
from transfer.io import load_tensors, read_json, save_tensors, sha256_file


def softmax(z):  # by hand, apart from the module under test
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_top_losses_are_the_errors_with_the_most_probable_wrong_class():
    probs = np.array([[0.90, 0.05, 0.05],   # 0: true 0, right
                      [0.10, 0.85, 0.05],   # 1: true 0, wrong at 0.85
                      [0.60, 0.30, 0.10],   # 2: true 1, wrong at 0.60
                      [0.05, 0.05, 0.90],   # 3: true 1, wrong at 0.90: the most confident error
                      [0.40, 0.35, 0.25],   # 4: true 2, wrong at 0.40, though p(true) 0.25 is the lowest loss ...
                      [0.85, 0.10, 0.05],   # 5: true 2, wrong at 0.85: ties with 1, after it (higher index)
                      [0.02, 0.97, 0.01]])  # 6: true 2 with p(true) 0.01: the largest loss, but only 0.97 -> second
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    assert top_loss_indices(probs, y_true, 16).tolist() == [6, 3, 1, 5, 2, 4]
    assert top_loss_indices(probs, y_true, 3).tolist() == [6, 3, 1]
    assert top_loss_indices(probs, y_true, 0).tolist() == []
    assert top_loss_indices(probs[:1], y_true[:1], 5).tolist() == []  # no error at all


def test_most_confused_pairs_are_the_largest_off_diagonal_counts():
    # rows true, columns predicted:  a  b  c
    #                            a [ 1  3  1 ]
    #                            b [ 2  4  0 ]
    #                            c [ 0  2  5 ]
    y_true = np.array([0] * 5 + [1] * 6 + [2] * 7)
    y_pred = np.array([0, 1, 1, 1, 2, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    rows = most_confused(y_true, y_pred, ["a", "b", "c"], 10)
    assert [(r["actual"], r["predicted"], r["count"]) for r in rows] == [("a", "b", 3), ("b", "a", 2), ("c", "b", 2), ("a", "c", 1)]
    assert rows[0]["pair"] == "a → b" and rows[0]["share_of_actual"] == pytest.approx(3 / 5)
    assert len(most_confused(y_true, y_pred, ["a", "b", "c"], 2)) == 2
    assert most_confused(y_true, y_true, ["a", "b", "c"], 10) == []


def test_reliability_bins_and_ece_by_hand():
    # Top probabilities 0.95, 0.95, 0.55, 0.40 (bins 15, 15, 9, 6 of 15; bin b holds ((b-1)/15, b/15]).
    probs = np.array([[0.95, 0.05], [0.05, 0.95], [0.55, 0.45], [0.40, 0.60]])
    y = np.array([0, 0, 1, 1])  # right, wrong, wrong, right
    rows = calibration.reliability(probs, y)
    assert [(r["bin"], r["count"]) for r in rows] == [(9, 2), (15, 2)]  # 0.55 and 0.60 share bin 9: (0.533, 0.6]
    assert rows[0] == pytest.approx(dict(bin=9, confidence=0.575, accuracy=0.5, count=2))
    assert rows[1] == pytest.approx(dict(bin=15, confidence=0.95, accuracy=0.5, count=2))
    assert calibration.expected_calibration_error(probs, y) == pytest.approx(0.5 * 0.075 + 0.5 * 0.45)
    assert calibration.nll(probs, y) == pytest.approx(-np.mean(np.log([0.95, 0.05, 0.45, 0.60])))


def _gaussian_classes(n, rng, k=4, radius=1.5):
    """A k-class problem in 2-D with the exact posterior as logits: x ~ N(mu_y, I), logit_c = x.mu_c - |mu_c|^2/2
    (equal priors), so softmax(logits) is perfectly calibrated."""
    angles = 2 * np.pi * np.arange(k) / k
    mu = radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    y = rng.integers(0, k, n)
    x = mu[y] + rng.standard_normal((n, 2))
    return x @ mu.T - (mu ** 2).sum(1) / 2, y


def test_temperature_scaling_on_an_over_confident_toy():
    """A decent classifier's logits times 5 (over-confident): the temperature fitted on val is about 5,
    and on test ECE and NLL drop while every prediction (so accuracy) stays the same."""
    rng = np.random.default_rng(0)
    val_logits, val_y = _gaussian_classes(3000, rng)
    test_logits, test_y = _gaussian_classes(3000, rng)
    t = calibration.fit_temperature(torch.from_numpy(5 * val_logits).float(), torch.from_numpy(val_y))
    assert 4.5 < t < 5.5
    before, after = calibration.softmax(5 * test_logits), calibration.softmax(5 * test_logits, t)
    assert np.array_equal(before.argmax(1), after.argmax(1))
    acc = (before.argmax(1) == test_y).mean()
    assert 0.6 < acc < 0.9  # a decent classifier, not a perfect one
    ece = calibration.expected_calibration_error(before, test_y), calibration.expected_calibration_error(after, test_y)
    nll = calibration.nll(before, test_y), calibration.nll(after, test_y)
    # Measured: T 5.025; accuracy 0.74; ECE 0.200 -> 0.020 and NLL 1.631 -> 0.657, where the exact posterior
    # (the toy's logits before the factor 5) has ECE 0.017 (3,000 draws are not 0) and NLL 0.657.
    assert ece[0] > 0.15 and ece[1] < 0.03, ece
    assert nll[1] < nll[0] - 0.8, nll
    assert nll[1] == pytest.approx(calibration.nll(softmax(test_logits), test_y), abs=0.005)


def test_temperature_stays_in_bounds_where_val_is_all_right():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
    t = calibration.fit_temperature(logits, torch.tensor([0, 1]))  # NLL falls for ever as T shrinks
    assert calibration.T_MIN <= t < 1.0  # sharper, and a number: L-BFGS stops where the gradient vanishes
    assert np.isfinite(calibration.softmax(logits.numpy(), t)).all()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The tiny pipeline up to finetune (resnet18 from random weights and a linear head on digits 5-9),
    then evaluate with flip TTA, as `python -m stages.evaluate` runs it."""
    root = tmp_path_factory.mktemp("evaluate")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        write_params(root, tiny_params(pretrained={"source": "none"}, evaluate={"tta": "flip", "top_losses": 7}))
        run_pipeline(root, STAGES[:6])
    finally:
        os.chdir(cwd)
    return root


def _by_hand(root):
    """The test split, the model's logits on it as evaluate computes them, and on the mirror images."""
    meta = read_json(root / "models/model/model.json")
    test, _ = storage.read_split(root / "data/prepared", "test")
    model = models.load_model(root / "models/model/model.safetensors", meta)
    kw = dict(mean=meta["mean"], std=meta["std"], batch_size=512, device=torch.device("cpu"), amp=True)
    images = test["images"][:]
    logits = training.predict(model, images, **kw).double().numpy()
    mirrored = training.predict(model, torch.flip(images, dims=(3,)), **kw).double().numpy()
    return images, test["labels"].numpy(), logits, mirrored, meta["classes"]


def test_manifest_index_is_each_files_row_in_its_split(digits):
    """prepare's manifest names the row of every used file, so the file behind a test image is known."""
    spec = preprocess.resolve_spec(arch="resnet18", pretrained_source="none", weights="DEFAULT", image_size=16)
    with open(digits / "data/prepared/manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "used"]
    arrays = {item.ref: item.array for item in data.collect_digits().items}
    for split in paths.SPLITS:
        part, meta = storage.read_split(digits / "data/prepared", split)
        mine = sorted((int(r["index"]), r) for r in rows if r["split"] == split)
        assert [i for i, _ in mine] == list(range(len(part["labels"])))
        for i, r in mine:
            assert meta["classes"][int(part["labels"][i])] == r["label"]
            assert np.array_equal(data.decode_array(arrays[r["ref"]], spec), part["images"][i].numpy())


def test_top_losses_grid_and_csv_hold_exactly_the_most_confident_errors(digits):
    images, y, logits, _, classes = _by_hand(digits)
    t = read_json(digits / "models/calibration.json")["temperature"]
    probs = softmax(logits / t)
    pred = probs.argmax(1)
    wrong = [i for i in range(len(y)) if pred[i] != y[i]]
    hand = sorted(wrong, key=lambda i: (-probs[i, pred[i]], i))[:7]
    assert len(hand) == 7  # the untrained backbone makes enough mistakes for a full list
    with open(digits / "metrics/top_losses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == hand and [int(r["rank"]) for r in rows] == list(range(1, 8))
    for r, i in zip(rows, hand):
        assert (r["true"], r["predicted"]) == (classes[y[i]], classes[pred[i]])
        assert float(r["p_pred"]) == pytest.approx(probs[i, pred[i]], abs=1e-6)
        assert float(r["p_true"]) == pytest.approx(probs[i, y[i]], abs=1e-6)
        assert r["ref"].startswith("sklearn-digits#")
    assert [float(r["p_pred"]) for r in rows] == sorted((float(r["p_pred"]) for r in rows), reverse=True)
    # The grid: those images, in that order, each tile the image itself (6 per row, captions of 38 px).
    with Image.open(digits / "metrics/top_losses.png") as grid:
        sheet = np.asarray(grid.convert("RGB"))
    assert sheet.shape == (2 * (96 + 38), 6 * 96, 3)
    for k, i in enumerate(hand):
        x, top = (k % 6) * 96, (k // 6) * (96 + 38)
        tile = Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((96, 96), Image.Resampling.NEAREST)
        assert np.array_equal(sheet[top:top + 96, x:x + 96], np.asarray(tile)), k
    assert (digits / "metrics/top_losses.png").read_bytes() == prediction_grid(
        images[hand], y[hand], pred[hand], classes, p_pred=probs[hand, pred[hand]], p_true=probs[hand, y[hand]])


def test_flip_tta_is_the_mean_of_the_image_and_mirror_probabilities(digits):
    images, y, logits, mirrored, _ = _by_hand(digits)
    assert np.abs(logits - mirrored).max() > 0.1  # the model is flip-sensitive: TTA is tested, not a no-op
    m = read_json(digits / "metrics/evaluate/metrics.json")
    t = m["temperature"]
    averaged = (softmax(logits / t) + softmax(mirrored / t)) / 2
    assert m["tta_accuracy"] == pytest.approx((averaged.argmax(1) == y).mean())
    assert m["tta_nll"] == pytest.approx(-np.log(averaged[np.arange(len(y)), y]).mean(), rel=1e-6)
    # The plain numbers are first and unchanged by TTA.
    assert list(m)[:4] == ["accuracy", "balanced_accuracy", "macro_f1", "test_images"]
    assert m["accuracy"] == pytest.approx((logits.argmax(1) == y).mean())


def test_calibration_is_fitted_on_val_and_reported_before_and_after(digits):
    fitted = read_json(digits / "models/calibration.json")
    assert fitted["fitted_on"] == "val" and fitted["val_images"] == 73
    assert fitted["model_sha256"] == sha256_file(digits / "models/model/model.safetensors")
    meta = read_json(digits / "models/model/model.json")
    val, _ = storage.read_split(digits / "data/prepared", "val")
    model = models.load_model(digits / "models/model/model.safetensors", meta)
    full = training.predict(model, val["images"], mean=meta["mean"], std=meta["std"], batch_size=512,
                            device=torch.device("cpu"), amp=True).double()
    # A feature_extract model's val logits are its head on the cached (float16) val embeddings, the ones
    # train_head selected on and finetune kept: the model's own up to the embeddings' rounding.
    assert meta["strategy"] == "feature_extract"
    cached, _ = load_tensors(digits / "data/embeddings/val.safetensors")
    with torch.inference_mode():
        val_logits = model.head.eval()(cached["embeddings"].float()).double()
    kept, _ = load_tensors(digits / "models/model/val_logits.safetensors")
    assert torch.equal(kept["logits"].double(), val_logits) and torch.equal(kept["labels"], val["labels"])
    torch.testing.assert_close(val_logits, full, rtol=0, atol=2e-3 * float(full.abs().max()))
    nll = lambda t: float(torch.nn.functional.cross_entropy(val_logits / t, val["labels"]))
    t = fitted["temperature"]
    assert fitted["val_nll_after"] == pytest.approx(nll(t)) and fitted["val_nll_before"] == pytest.approx(nll(1.0))
    assert nll(t) <= min(nll(t * 0.97), nll(t * 1.03))  # the minimum of the val NLL
    _, y, logits, _, _ = _by_hand(digits)
    m = read_json(digits / "metrics/evaluate/metrics.json")
    assert m["temperature"] == t
    assert m["nll"] == pytest.approx(-np.log(softmax(logits)[np.arange(len(y)), y]).mean(), rel=1e-6)
    assert m["nll_calibrated"] == pytest.approx(-np.log(softmax(logits / t)[np.arange(len(y)), y]).mean(), rel=1e-6)
    # The head trained on 10 images a class is under-confident here (T < 1); scaling fixes much of it on test too.
    assert m["ece_calibrated"] < m["ece"] and m["nll_calibrated"] < m["nll"]
    for name, temperature in (("uncalibrated", 1.0), ("calibrated", t)):
        rows = read_json(digits / f"metrics/reliability/{name}.json")
        p = softmax(logits / temperature)
        assert sum(r["count"] for r in rows) == len(y)
        assert sum(r["count"] / len(y) * abs(r["accuracy"] - r["confidence"]) for r in rows) == pytest.approx(
            m["ece" if name == "uncalibrated" else "ece_calibrated"])
        assert rows[-1]["confidence"] <= p.max() + 1e-12
    pairs = read_json(digits / "metrics/confused_pairs.json")
    pred = logits.argmax(1)
    assert sum(r["count"] for r in pairs) <= int((pred != y).sum()) and pairs == sorted(pairs, key=lambda r: -r["count"])


def test_calibrate_off_and_top_losses_off_change_no_prediction(digits, tmp_path):
    """evaluate.calibrate: false writes T = 1 (convert then builds no division in); top_losses: 0 writes
    an empty list and a sheet that says so. The predictions, so accuracy, are the calibrated run's."""
    from stages.evaluate import evaluate

    out = Outputs(live=tmp_path / "live", grid=tmp_path / "grid.png", top_losses_png=tmp_path / "top.png",
                  top_losses_csv=tmp_path / "top.csv", confused_pairs=tmp_path / "pairs.json",
                  reliability=tmp_path / "reliability", calibration=tmp_path / "calibration.json")
    m = evaluate(model_dir=digits / "models/model", prepared_dir=digits / "data/prepared", out=out, grid_images=24,
                 top_losses=0, confused_pairs=10, tta="none", calibrate=False, batch_size=512,
                 device=torch.device("cpu"), amp=True)
    calibrated = read_json(digits / "metrics/evaluate/metrics.json")
    assert {k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "nll", "ece")} == pytest.approx(
        {k: calibrated[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "nll", "ece")})
    assert m["temperature"] == 1.0 and m["ece_calibrated"] == m["ece"] and "tta_accuracy" not in m
    assert read_json(out.calibration)["temperature"] == 1.0 and read_json(out.calibration)["fitted_on"] is None
    assert out.top_losses_csv.read_text() == "rank,index,ref,true,predicted,p_pred,p_true\n"
    with Image.open(out.top_losses_png) as sheet:
        assert sheet.size == (6 * 96, 96 + 38)
    assert read_json(out.reliability / "calibrated.json") == read_json(out.reliability / "uncalibrated.json")


def test_bad_tta_names_the_choices(digits, tmp_path, monkeypatch):
    from test_stages import stage_error

    monkeypatch.chdir(digits)
    write_params(digits, tiny_params(pretrained={"source": "none"}, evaluate={"tta": "rotate"}))
    try:
        assert stage_error("evaluate") == "evaluate: evaluate.tta: 'rotate' is not valid; choose one of: none, flip"
    finally:
        write_params(digits, tiny_params(pretrained={"source": "none"}, evaluate={"tta": "flip", "top_losses": 7}))


def test_a_frozen_backbone_model_is_scored_from_the_cached_test_embeddings(digits, tmp_path):
    """extract keeps the test split's embeddings in float32, and evaluate scores a feature_extract model
    from them: the model's own logits (run here over the images) to float32's last bits. Embeddings of
    another backbone, or a model that trained its backbone, are not used."""
    from stages.evaluate import head_logits

    meta = read_json(digits / "models/model/model.json")
    test, _ = storage.read_split(digits / "data/prepared", "test")
    model = models.load_model(digits / "models/model/model.safetensors", meta)
    full = training.predict(model, test["images"], mean=meta["mean"], std=meta["std"], batch_size=512,
                            device=torch.device("cpu"), amp=False).numpy()
    cached = head_logits(model, meta, digits / "data/embeddings", test["labels"])
    assert cached is not None and cached.dtype == np.float32
    np.testing.assert_allclose(cached, full, rtol=0, atol=1e-5)
    assert head_logits(model, {**meta, "strategy": "finetune"}, digits / "data/embeddings", test["labels"]) is None
    assert head_logits(model, {**meta, "backbone_sha256": "0" * 64}, digits / "data/embeddings", test["labels"]) is None
    assert head_logits(model, meta, tmp_path, test["labels"]) is None  # no embeddings there
    # float16 embeddings (as train and val are kept) would be an approximation: not used for test.
    emb, info = load_tensors(digits / "data/embeddings/test.safetensors")
    save_tensors(tmp_path / "test.safetensors", {"labels": emb["labels"], "embeddings": emb["embeddings"].half()}, meta=info)
    assert head_logits(model, meta, tmp_path, test["labels"]) is None


def test_a_trained_model_is_calibrated_on_the_val_logits_finetune_kept(digits, tmp_path, monkeypatch):
    """strategy finetune: finetune keeps its chosen weights' val logits beside them, they are the saved
    weights' own, and evaluate fits the temperature on them (and not on a stale file for other weights)."""
    import shutil

    root = tmp_path / "p"
    shutil.copytree(digits, root)
    monkeypatch.chdir(root)
    write_params(root, tiny_params(pretrained={"source": "none"}, strategy="finetune", finetune={"epochs": 2}))
    run_pipeline(root, ("finetune", "evaluate"))
    meta = read_json(root / "models/model/model.json")
    val, _ = storage.read_split(root / "data/prepared", "val")
    model = models.load_model(root / "models/model/model.safetensors", meta)
    own = training.predict(model, val["images"], mean=meta["mean"], std=meta["std"], batch_size=512,
                           device=torch.device("cpu"), amp=True)
    kept, kept_meta = load_tensors(root / "models/model/val_logits.safetensors")
    assert torch.equal(kept["logits"], own)
    assert kept_meta["model_sha256"] == sha256_file(root / "models/model/model.safetensors")
    fitted = read_json(root / "models/calibration.json")
    nll = float(torch.nn.functional.cross_entropy(own.double(), val["labels"]))
    assert fitted["val_nll_before"] == pytest.approx(nll, rel=1e-9)
    # Logits of other weights are not used: evaluate runs the model over val instead.
    from transfer import calibration
    assert calibration.read_val_logits(digits / "models/model", val["labels"]) is not None
    shutil.copy(digits / "models/model/val_logits.safetensors", root / "models/model/val_logits.safetensors")
    assert calibration.read_val_logits(root / "models/model", val["labels"]) is None
