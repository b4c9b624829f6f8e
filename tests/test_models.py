"""The architecture adapter: every family on tiny inputs, freezing, partial and strict loading."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

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


# ---------------------------------------------------------------- timm behind the same interface

# (arch, image size, feature width, blocks): a CNN, a ConvNeXt, an EfficientNet and a small ViT,
# built without weights; blocks come from each model's own group_matcher, not from a table. PoolFormer
# has no group_matcher: its blocks are its top-level children (stem, the four stages, the head's norm).
TIMM_FAMILIES = [
    ("timm/resnet18", 32, 512, 5),
    ("timm/convnext_atto", 32, 320, 6),
    ("timm/tf_efficientnet_lite0", 32, 1280, 8),
    ("timm/vit_tiny_patch16_224", 32, 192, 13),
    ("timm/poolformer_s12", 32, 512, 6),
]


@pytest.mark.parametrize("arch, size, dim, n_blocks", TIMM_FAMILIES)
def test_timm_models_build_freeze_and_run(arch, size, dim, n_blocks):
    torch.manual_seed(0)
    backbone, width = models.build_backbone(arch, size)
    assert width == dim
    feats = backbone.eval()(torch.randn(2, 3, size, size))
    assert feats.shape == (2, dim)  # timm's num_classes=0: pooled features, no classifier
    assert len(models.blocks(backbone, arch)) == n_blocks
    model = models.Classifier(backbone, models.make_head("linear", width, 3))
    model.bn_frozen = True
    frozen = models.freeze_first_blocks(model, arch, 2)
    assert frozen and all(name.startswith("backbone.") for name in frozen)
    model.train()
    # frozen blocks keep their normalisation statistics: their modules stay in eval mode while the rest trains
    assert all(not model.get_submodule(n).training for n in frozen)
    assert model.head.training
    model(torch.randn(2, 3, size, size)).sum().backward()
    groups = models.block_parameter_groups(backbone, arch)
    assert sum(len(g) for g in groups) == len(list(backbone.parameters()))  # every parameter in one block
    assert all(q.grad is None and not q.requires_grad for g in groups[:2] for q in g)
    assert any(q.grad is not None for q in groups[-1])


def _one_timm_model_per_family() -> list[str]:
    """One model of each module timm registers models from (a family: metaformer, pit, convnext...),
    the shortest-named, which is mostly the smallest and quickest to build; and MobileNetV5's encoder,
    a second class of its module, without the group_matcher of the module's classifier models."""
    import timm

    return [min(names, key=lambda n: (len(n), n)) for module in timm.list_modules()
            if (names := timm.list_models(module=module))] + timm.list_models("mobilenetv5_*_enc")


class _NoRandomInitOnMeta(TorchDispatchMode):
    """Initialisers change no value on the meta device (there are none), but some run there through slow
    Python references (clamp_, which ends timm's trunc_normal_, ~8 ms a call): skipping them halves the
    time the all-families test takes to build its models."""

    SKIP = {torch.ops.aten.clamp_, torch.ops.aten.normal_, torch.ops.aten.uniform_, torch.ops.aten.erfinv_}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.SKIP:
            return args[0]  # what an in-place op returns
        return func(*args, **(kwargs or {}))


def test_every_timm_family_has_blocks_that_hold_each_parameter_once():
    """backbone.arch accepts any timm model, so blocks() must work for every family: a non-empty list of
    blocks, each parameter in exactly one block and named once, and freeze_first_blocks(k=1) freezing
    exactly the first. Built on the meta device (no weights), as count_blocks does."""
    names = _one_timm_model_per_family()
    assert len(names) > 80  # timm 1.0 has about 100 model modules
    failures = {}
    for name in names:
        arch = f"timm/{name}"
        try:
            with torch.device("meta"), _NoRandomInitOnMeta():
                backbone, width = models.build_backbone(arch, 224)
            blocks = models.blocks(backbone, arch)
            held = [[id(q) for member in block for q in models._block_member(backbone, member)[1]] for block in blocks]
            every = [id(q) for q in backbone.parameters()]
            if not blocks or not all(held):
                failures[name] = f"empty blocks: {blocks}"
            elif sorted(q for block in held for q in block) != sorted(every):
                failures[name] = f"{sum(map(len, held))} parameters named in blocks, the backbone has {len(every)}"
            fixed = {id(q) for q in backbone.parameters() if not q.requires_grad}  # EfficientViM has one
            model = models.Classifier(backbone, models.make_head("linear", width, 2))
            models.freeze_first_blocks(model, arch, 1)
            frozen = {id(q) for q in backbone.parameters() if not q.requires_grad}
            if frozen != fixed | set(held[0]):
                failures[name] = f"freeze_first_blocks(k=1) froze {len(frozen - fixed)} parameters, the first block has {len(held[0])}"
        except Exception as e:  # collected, so one run names every family that fails
            failures[name] = f"{type(e).__name__}: {e}"
    assert not failures, failures


def test_timm_native_size_comes_from_pretrained_cfg():
    backbone, _ = models.build_backbone("timm/tf_efficientnet_lite0", 64)
    assert models.native_size("timm/tf_efficientnet_lite0", backbone) == 224
    vit, _ = models.build_backbone("timm/vit_tiny_patch16_224", 64)
    assert tuple(vit.patch_embed.grid_size) == (4, 4)  # built for data.image_size, not 224


@pytest.mark.parametrize("arch", ["resnet18", "timm/convnext_atto"])
def test_layer_decay_gives_each_block_lr_times_decay_to_its_depth(arch):
    from stages.finetune import param_groups

    backbone, dim = models.build_backbone(arch, 32)
    model = models.Classifier(backbone, models.make_head("linear", dim, 3))
    n = len(models.blocks(backbone, arch))
    groups = param_groups(model, strategy="finetune", lr=0.1, backbone_lr_factor=0.1, layer_decay=0.5, arch=arch)
    assert [g["name"] for g in groups] == [f"block{i}" for i in range(n)] + ["head"]
    assert [g["lr"] for g in groups] == pytest.approx([0.1 * 0.5 ** (n - i) for i in range(n)] + [0.1])
    models.freeze_first_blocks(model, arch, 2)  # frozen blocks join no group (timm #2691's trap)
    partial = param_groups(model, strategy="partial", lr=0.1, backbone_lr_factor=0.1, layer_decay=0.5, arch=arch)
    assert [g["name"] for g in partial] == [f"block{i}" for i in range(2, n)] + ["head"]
    assert all(q.requires_grad for g in partial for q in g["params"])
    two = param_groups(model, strategy="finetune", lr=0.1, backbone_lr_factor=0.1, arch=arch)  # the simple case
    assert [(g["name"], g["lr"]) for g in two] == [("backbone", pytest.approx(0.01)), ("head", 0.1)]


def _brightness_task(n_per_class=64, size=32, seed=0):
    """Three classes told apart by brightness, with pixel noise: easy for any network whose
    BatchNorm statistics match its weights, impossible to get right with statistics that do not."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    base = torch.tensor([40.0, 128.0, 215.0])[labels].view(-1, 1, 1, 1)
    images = (base + 25 * torch.randn(len(labels), 3, size, size, generator=g)).clamp(0, 255).to(torch.uint8)
    perm = torch.randperm(len(labels), generator=g)
    return images[perm], labels[perm]


@pytest.mark.parametrize("recalibrate", [False, True])
def test_batchnorm_recalibration_after_a_short_source_task(recalibrate):
    """mobilenet_v3_small's BatchNorm momentum is 0.01: after a few steps its running statistics are
    still near 0 and 1, and in eval mode it scored chance on the backbone study's source task. With
    recalibration the first BatchNorm holds exactly its input's mean over the training images, and
    validation works; without it (the control) it does not."""
    from transfer import training

    torch.manual_seed(0)
    images, labels = _brightness_task()
    backbone, dim = models.build_backbone("mobilenet_v3_small", 32)
    model = models.Classifier(backbone, models.make_head("linear", dim, 3))
    _, history, _ = training.fit(
        model, train_images=images[:144], train_labels=labels[:144], val_images=images[144:], val_labels=labels[144:],
        param_groups=[{"params": model.parameters(), "lr": 0.05}], epochs=2, batch_size=48, momentum=0.9,
        weight_decay=0.0, scheduler="none", step_size=1, gamma=1.0, augment_pad=0, augment_hflip=False,
        mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, device=torch.device("cpu"), amp=False, seed=0,
        eval_batch_size=48, recalibrate_bn=recalibrate, log=lambda _: None)
    # What the first BatchNorm sees (its conv's output), averaged over the training images per channel.
    first_bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    seen = []
    hook = first_bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].mean(dim=(0, 2, 3))))
    model.eval()
    with torch.no_grad():
        model(training.to_input(images[:144], mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD,
                                device=torch.device("cpu"), memory_format=torch.contiguous_format))
    hook.remove()
    gap = (first_bn.running_mean - seen[0]).abs().max().item()
    scale = seen[0].abs().max().item()
    best_val = max(h["val_acc"] for h in history)
    if recalibrate:
        assert gap <= 1e-4 * max(scale, 1.0)
        assert best_val >= 0.9, history
        assert first_bn.momentum == 0.01 and model.training is False  # settings given back
    else:
        assert gap > 0.3 * scale  # the slow momentum left the statistics far from the data
        assert best_val < 0.6, history
