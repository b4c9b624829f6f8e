"""convert's float16 copy is gated like the ONNX and TorchScript exports: held to convert.fp16_tolerance,
a copy that is off fails the stage with the numbers and is deleted. The temperature evaluate fitted is
built into the graphs, and only the one fitted for these weights."""
import numpy as np
import pytest
import torch

from conftest import plain_spec, tiny_params, write_params
from test_stages import run_stage, stage_error
from transfer import models, paths, storage, training
from transfer.io import read_json, save_tensors, sha256_file, write_json


def _trained_model(root, n=20, size=16, temperature=1.0):
    """A model where finetune leaves it (random resnet18 weights: the fp16 rounding is what is tested), a
    prepared test split, and the temperature evaluate would have fitted."""
    spec = plain_spec(size)
    meta = dict(arch="resnet18", image_size=size, num_classes=3, classes=["a", "b", "c"], strategy="finetune",
                mean=list(spec.mean), std=list(spec.std), preprocess=spec.to_dict(),
                head=dict(kind="linear", hidden=256, dropout=0.0))
    torch.manual_seed(0)
    save_tensors(root / paths.MODEL_DIR / "model.safetensors", models.build_classifier(meta).state_dict(), meta=meta)
    write_json(root / paths.MODEL_DIR / "model.json", meta)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    storage.write_split(root / paths.PREPARED, "test", images.numpy(), count=n, image_size=size,
                        labels=torch.arange(n) % 3, meta={"classes": meta["classes"]})
    write_json(root / paths.PREPARED / "preprocess.json", spec.pixels())
    write_json(root / paths.CALIBRATION, dict(temperature=temperature, fitted_on="val",
                                              model_sha256=sha256_file(root / paths.MODEL_DIR / "model.safetensors")))
    return meta, images


def test_fp16_copy_beyond_its_tolerance_fails_convert_and_is_deleted(in_tmp):
    _trained_model(in_tmp)
    params = tiny_params(convert={"onnx": False, "torchscript": False, "fp16_tolerance": 1e-7})
    write_params(in_tmp, params)
    msg = stage_error("convert")
    m = read_json(in_tmp / "metrics/convert.json")  # the numbers are kept for the user to see
    assert 0 < m["fp16_max_abs_logit_diff"] and m["fp32_max_abs_logit_diff"] == 0.0
    assert ("the fp16 export does not reproduce the model on 20 test images: top-1 agreement "
            f"{m['fp16_agreement']:.4f}, max |logit difference| {m['fp16_max_abs_logit_diff']:.3g} > "
            f"convert.fp16_tolerance 1e-07 x the largest |logit| {m['max_abs_logit']:.3g}") in msg
    assert not (in_tmp / "models/export/model_fp16.safetensors").exists()  # never left for a user to deploy
    assert not (in_tmp / "models/export/model.json").exists()

    write_params(in_tmp, tiny_params(convert={"onnx": False, "torchscript": False}))  # the default, 0.02 of the logits
    run_stage("convert")
    m = read_json(in_tmp / "metrics/convert.json")
    assert m["fp16_max_abs_logit_diff"] <= 0.02 * m["max_abs_logit"] and m["fp16_real_disagreements"] == 0
    assert (in_tmp / "models/export/model_fp16.safetensors").is_file()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_divides_the_logits_by_the_temperature(in_tmp):
    """The graph gives logits / T (softmax: the calibrated probabilities), checked against exactly that; the
    weights files stay the model as trained, and model.json says T."""
    meta, images = _trained_model(in_tmp, temperature=2.5)
    write_params(in_tmp, tiny_params(convert={"onnx": False, "torchscript": True}))
    run_stage("convert")
    m = read_json(in_tmp / "metrics/convert.json")
    assert m["torchscript_agreement"] == 1.0 and m["torchscript_max_abs_logit_diff"] < 1e-5 and m["fp32_max_abs_logit_diff"] == 0.0
    exported = read_json(in_tmp / "models/export/model.json")
    assert exported["temperature"] == 2.5 and exported["calibration"] == {"temperature": 2.5, "fitted_on": "val"}
    model = models.load_model(in_tmp / "models/model/model.safetensors", meta)
    logits = training.predict(model, images, mean=meta["mean"], std=meta["std"], batch_size=64,
                              device=torch.device("cpu"), amp=False)
    scripted = torch.jit.load(str(in_tmp / "models/export/model.torchscript.pt"), map_location="cpu")
    with torch.inference_mode():
        got = scripted(images).numpy()
    np.testing.assert_allclose(got, logits.numpy() / 2.5, atol=1e-5)
    assert not np.allclose(got, logits.numpy(), atol=1e-2)


def test_convert_uses_only_the_temperature_fitted_for_these_weights(in_tmp):
    _trained_model(in_tmp, temperature=2.5)
    write_params(in_tmp, tiny_params(convert={"onnx": False, "torchscript": False}))
    write_json(in_tmp / paths.CALIBRATION, dict(temperature=2.5, fitted_on="val", model_sha256="0" * 64))
    assert stage_error("convert") == ("convert: models/calibration.json was fitted for another model than "
                                      "models/model/model.safetensors; re-run evaluate (dvc repro convert)")
    (in_tmp / paths.CALIBRATION).unlink()
    assert stage_error("convert") == ("convert: models/calibration.json: not found; run `dvc repro evaluate` (it fits "
                                      "the temperature on the val split)")
    assert not (in_tmp / "models/export/model.json").exists()
