"""The architecture adapter: every family on tiny inputs, freezing, partial and strict loading."""
import pytest
import torch
from torch import nn

from transfer import models
from transfer.models import ModelError

# (arch, image size, feature width, blocks)
FAMILIES = [
    ("resnet18", 32, 512, 5),
    ("vgg11", 32, 4096, 6),
    ("densenet121", 32, 1024, 5),
    ("inception_v3", 75, 2048, 16),
    ("mobilenet_v2", 32, 1280, 19),
    ("mobilenet_v3_small", 32, 1024, 14),
    ("efficientnet_b0", 32, 1280, 9),
    ("vit_b_32", 32, 768, 14),
]


@pytest.mark.parametrize("arch, size, dim, n_blocks", FAMILIES)
def test_each_family_builds_freezes_and_runs(arch, size, dim, n_blocks):
    torch.manual_seed(0)
    backbone, width = models.build_backbone(arch, size)
    assert width == dim
    model = models.Classifier(backbone, models.make_head("mlp", width, 3, hidden=8))
    assert len(models.blocks(backbone, arch)) == n_blocks == models.count_blocks(arch, size)
    frozen = models.freeze_first_blocks(model, arch, 2)
    assert frozen and all(name.startswith("backbone.") for name in frozen)
    model.train()
    assert all(not model.get_submodule(n).training for n in frozen)  # frozen BatchNorm stays in eval
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 3)
    out.sum().backward()
    first = [p for n in models.blocks(backbone, arch)[0] for p in _params(backbone, n)]
    last = [p for n in models.blocks(backbone, arch)[-1] for p in _params(backbone, n)]
    assert all(p.grad is None for p in first) and any(p.grad is not None for p in last)


def _params(backbone, name):
    try:
        return list(backbone.get_submodule(name).parameters())
    except AttributeError:
        return [backbone.get_parameter(name)]


def test_freeze_blocks_beyond_backbone():
    model = models.Classifier(models.build_backbone("resnet18", 32)[0], models.make_head("linear", 512, 2))
    with pytest.raises(ModelError, match="finetune.freeze_blocks: 6 is more than the 5 blocks of resnet18; choose 0-5"):
        models.freeze_first_blocks(model, "resnet18", 6)


def test_bn_frozen_keeps_running_statistics():
    model = models.Classifier(models.build_backbone("resnet18", 32)[0], models.make_head("linear", 512, 2))
    model.bn_frozen = True
    model.train()
    before = model.backbone.bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(before, model.backbone.bn1.running_mean)
    assert model.head.training


def test_partial_loading_reports_every_skipped_key():
    src = models.build_backbone("resnet18", 32)[0].state_dict()
    src["fc.weight"] = torch.zeros(1000, 512)  # model A's 1000-class head
    src["layer4.1.conv2.weight"] = torch.zeros(3, 3, 3, 3)  # a different shape
    target, _ = models.build_backbone("resnet18", 32)
    report = models.load_backbone_weights(target, src, partial=True)
    assert report["skipped"] == {"fc.weight": "not in this backbone",
                                 "layer4.1.conv2.weight": "shape (3, 3, 3, 3) != backbone's (512, 512, 3, 3)"}
    assert report["missing"] == ["layer4.1.conv2.weight"]
    assert torch.equal(target.state_dict()["conv1.weight"], src["conv1.weight"])
    with pytest.raises(ModelError, match="layer4.1.conv2.weight: shape"):
        models.load_backbone_weights(target, src, partial=False)
    with pytest.raises(ModelError, match="no key of the weights file matches"):
        models.load_backbone_weights(target, {"features.0.weight": torch.zeros(1)}, partial=True)


def test_thousand_class_head_into_five_class_model(tmp_path):
    from transfer.io import save_tensors

    meta = dict(arch="resnet18", image_size=32, num_classes=5, head=dict(kind="linear"))
    big = models.build_classifier({**meta, "num_classes": 1000})
    save_tensors(tmp_path / "m.safetensors", big.state_dict())
    with pytest.raises(ModelError, match=r"head\.fc\.\w+ has shape \(1000,.*\) but this resnet18 with 5 classes needs \(5,"):
        models.load_model(tmp_path / "m.safetensors", meta)


@pytest.mark.parametrize("in_hw, out", [((7, 7), 7), ((1, 1), 7), ((5, 9), (3, 4)), ((13, 10), (7, None))])
def test_matmul_adaptive_pool_equals_torchs_in_value_and_gradient(in_hw, out):
    """The deterministic replacement for VGG's adaptive pool (used on CUDA under runtime.deterministic)
    computes exactly what F.adaptive_avg_pool2d does, forward and backward."""
    x = torch.randn(2, 3, *in_hw, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.adaptive_avg_pool2d(x, out)
    got = models.adaptive_avg_pool2d_matmul(x, out)
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-12)
    weights = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), x)
    (g_got,) = torch.autograd.grad((got * weights).sum(), x)
    assert torch.allclose(g_got, g_ref, atol=1e-12)


def test_vgg_pools_through_the_deterministic_module():
    backbone, _ = models.build_backbone("vgg11", 32)
    assert isinstance(backbone.avgpool, models.DeterministicAdaptiveAvgPool2d)
    x = torch.randn(1, 3, 32, 32)
    backbone.eval()
    assert backbone(x).shape == (1, 4096)  # CPU path: torch's own pooling, unchanged
