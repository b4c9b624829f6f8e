"""The preprocessing spec follows the backbone's weights (timm's pretrained_cfg, torchvision's
transforms()), params override it, and a bad override is a one-line error."""
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_params, write_params
from test_stages import stage_error
from transfer import preprocess
from transfer.params import ParamsError, defaults, validate

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def resolve(arch, source="file", weights="DEFAULT", image_size=128, **overrides):
    return preprocess.resolve_spec(arch=arch, pretrained_source=source, weights=weights, image_size=image_size, **overrides)


def test_the_default_backbone_gets_timms_bicubic_crop_and_half_normalisation():
    p = defaults()
    spec = resolve(p["backbone"]["arch"], p["pretrained"]["source"], p["pretrained"]["weights"], p["data"]["image_size"])
    assert (spec.interpolation, spec.crop_pct, spec.mean, spec.std) == ("bicubic", 0.875, (0.5,) * 3, (0.5,) * 3)
    assert (spec.image_size, spec.resize_size) == (128, 146)  # 128 / 0.875 = 146.3
    for key in ("interpolation", "crop_pct", "mean", "std"):
        assert spec.origin[key].startswith("weights: timm pretrained_cfg of tf_efficientnet_lite0.in1k"), spec.origin
    assert spec.origin["image_size"] == "params: data.image_size"


@pytest.mark.parametrize("source", ["torchvision", "file", "none", "train"])
def test_a_torchvision_arch_gets_its_weights_transforms(source):
    spec = resolve("resnet18", source, "IMAGENET1K_V1" if source == "torchvision" else "DEFAULT", image_size=224)
    assert (spec.interpolation, spec.crop_pct, spec.resize_size) == ("bilinear", 0.875, 256)  # Resize(256), CenterCrop(224)
    assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert spec.origin["crop_pct"].startswith("weights: torchvision ResNet18_Weights.IMAGENET1K_V1.transforms()")
    assert ("has no recipe" in spec.origin["crop_pct"]) == (source != "torchvision")


def test_each_torchvision_family_follows_its_own_weights():
    b3 = resolve("efficientnet_b3", "torchvision", image_size=300)
    assert (b3.interpolation, b3.resize_size) == ("bicubic", 320)  # its weights: Resize(320, bicubic), CenterCrop(300)
    # inception's own weights expect transform_input's [-1, 1] inputs; weights from elsewhere get ImageNet's.
    assert resolve("inception_v3", "torchvision", image_size=299).mean == (0.5, 0.5, 0.5)
    inception = resolve("inception_v3", "file", image_size=299)
    assert inception.mean == IMAGENET_MEAN and inception.resize_size == 342  # 299 / (299 / 342), not 341


def test_a_timm_weights_tag_gets_that_tags_config():
    assert resolve("timm/vit_small_patch16_224", "timm", "augreg_in21k_ft_in1k", image_size=224).crop_pct == 0.9
    assert resolve("timm/vit_small_patch16_224", "timm", "dino", image_size=224).mean == IMAGENET_MEAN
    with pytest.raises(ParamsError, match="pretrained.weights: 'nope'.*timm.list_pretrained"):
        resolve("timm/convnext_atto", "timm", "nope")


def test_overrides_win_and_say_so():
    spec = resolve("timm/tf_efficientnet_lite0", interpolation="lanczos", crop_pct=0.5, mean=[0.1, 0.2, 0.3],
                   std=[0.4, 0.5, 0.6])
    assert (spec.interpolation, spec.crop_pct, spec.resize_size) == ("lanczos", 0.5, 256)
    assert (spec.mean, spec.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert spec.origin == {"image_size": "params: data.image_size", "resize_size": "round(image_size / crop_pct)",
                           "interpolation": "params: data.interpolation", "crop_pct": "params: data.crop_pct",
                           "mean": "params: pretrained.mean", "std": "params: pretrained.std"}
    partial = resolve("resnet18", crop_pct=1.0)
    assert (partial.interpolation, partial.resize_size, partial.mean) == ("bilinear", 128, IMAGENET_MEAN)
    assert partial.origin["interpolation"].startswith("weights: ") and partial.origin["crop_pct"] == "params: data.crop_pct"


def test_the_record_round_trips_and_refuses_what_it_cannot_apply():
    spec = resolve("resnet18", interpolation="box")
    assert preprocess.Spec.from_dict(spec.to_dict(), "model.json") == spec
    with pytest.raises(preprocess.UserError, match="model.json: the preprocessing record lacks resize_size, crop_pct"):
        preprocess.Spec.from_dict({"image_size": 16, "interpolation": "bilinear", "mean": [0] * 3, "std": [1] * 3}, "model.json")
    with pytest.raises(preprocess.UserError, match="resize_size 99 is not round"):
        preprocess.Spec.from_dict({**spec.to_dict(), "resize_size": 99}, "model.json")


@pytest.mark.parametrize("section, key, value, message", [
    ("data", "interpolation", "cubic", "data.interpolation: 'cubic' is not valid; choose one of: bilinear, bicubic, nearest, "
                                       "lanczos, box, hamming"),
    ("data", "crop_pct", 0, "data.crop_pct: 0.0 is not above the minimum 0.0"),
    ("data", "crop_pct", 1.2, "data.crop_pct: 1.2 is above the maximum 1.0"),
    ("pretrained", "mean", [0.5, 0.5], "pretrained.mean: [0.5, 0.5] is not valid; give null or 3 numbers in [0, 1], one per RGB channel"),
    ("pretrained", "std", [0.2, 0, 0.2], "pretrained.std: [0.2, 0, 0.2] is not valid; give null or 3 numbers in (0, 1]"),
    ("pretrained", "std", "0.5", "pretrained.std: '0.5' is not valid"),
])
def test_a_bad_override_is_a_one_line_error_naming_key_value_and_choices(section, key, value, message):
    p = defaults()
    p[section][key] = value
    with pytest.raises(ParamsError) as e:
        validate(p)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_stage_stops_on_a_bad_override_with_one_line(in_tmp):
    write_params(in_tmp, tiny_params(data={"interpolation": "bicubc"}))
    assert stage_error("prepare").startswith("prepare: data.interpolation: 'bicubc' is not valid; choose one of: bilinear")


def test_resolving_a_torchvision_spec_never_imports_timm():
    code = ("import sys\nfrom transfer.preprocess import resolve_spec\n"
            "resolve_spec(arch='resnet18', pretrained_source='file', weights='DEFAULT', image_size=32)\n"
            "assert 'timm' not in sys.modules, 'timm imported'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
