"""convert's float16 copy is gated like the ONNX and TorchScript exports: held to convert.fp16_tolerance,
a copy that is off fails the stage with the numbers and is deleted."""
import torch

from conftest import plain_spec, tiny_params, write_params
from test_stages import run_stage, stage_error
from transfer import models, paths, storage
from transfer.io import read_json, save_tensors, write_json


def _trained_model(root, n=20, size=16):
    """A model where finetune leaves it (random resnet18 weights: the fp16 rounding is what is tested) and a
    prepared test split."""
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
