"""One adapter over torchvision's classification families.

It knows where each family keeps its classifier (so the backbone is the network up to the
features that classifier reads), how wide those features are, and how the network divides
into blocks, in input-to-output order, for freezing the first k.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from transfer.io import load_state_dict, load_tensors, read_json

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# family -> dotted path of the final Linear layer that the tutorials replace
CLASSIFIER_PATH = {
    "resnet": "fc",
    "inception": "fc",
    "vgg": "classifier.6",
    "densenet": "classifier",
    "mobilenet_v2": "classifier.1",
    "mobilenet_v3": "classifier.3",
    "efficientnet": "classifier.1",
    "vit": "heads.head",
}


class ModelError(ValueError):
    """The architecture or its weights do not fit what was asked."""


def family(arch: str) -> str:
    for prefix in ("mobilenet_v2", "mobilenet_v3", "resnet", "vgg", "densenet", "efficientnet", "vit", "inception"):
        if arch.startswith(prefix):
            return prefix
    raise ModelError(f"backbone.arch: {arch!r} is not supported; choose a resnet, vgg, densenet, inception_v3, "
                     "mobilenet, efficientnet or vit model")


def _construct(arch: str, image_size: int) -> nn.Module:
    import torchvision  # here, not at the top: train_head needs heads only, and torchvision adds ~1.5 s per process

    kwargs = {}
    if arch == "inception_v3":
        # Aux logits only matter for training from scratch at 299 px; the normalisation that
        # transform_input would do is applied by our own preprocessing instead.
        kwargs = dict(aux_logits=False, transform_input=False, init_weights=True)
    elif arch.startswith("vit_"):
        kwargs = dict(image_size=image_size)
    return torchvision.models.get_model(arch, weights=None, **kwargs)


def adaptive_avg_pool2d_matmul(x: torch.Tensor, output_size) -> torch.Tensor:
    """F.adaptive_avg_pool2d written as two averaging matrices (same bins, same result). Its backward is
    a matmul, which CUDA can run deterministically; adaptive pooling's own CUDA backward cannot."""
    h, w = x.shape[-2:]
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    oh, ow = oh or h, ow or w

    def bins(n: int, m: int) -> torch.Tensor:
        mat = torch.zeros(m, n, dtype=x.dtype, device=x.device)
        for i in range(m):
            start, end = (i * n) // m, -(-((i + 1) * n) // m)
            mat[i, start:end] = 1.0 / (end - start)
        return mat

    return torch.einsum("oh,bchw,pw->bcop", bins(h, oh), x, bins(w, ow))


class DeterministicAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d that, under runtime.deterministic on CUDA, pools by matmul (see above), so
    VGG (whose 7x7 adaptive pool has no deterministic CUDA backward) trains instead of raising."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.output_size
        if x.is_cuda and torch.are_deterministic_algorithms_enabled() and size not in (1, (1, 1)):
            return adaptive_avg_pool2d_matmul(x, size)
        return super().forward(x)


def _deterministic_pools(net: nn.Module) -> None:
    for name, module in list(net.named_modules()):
        if type(module) is nn.AdaptiveAvgPool2d:
            parent_path, _, leaf = name.rpartition(".")
            parent = net.get_submodule(parent_path) if parent_path else net
            setattr(parent, leaf, DeterministicAdaptiveAvgPool2d(module.output_size))


def build_backbone(arch: str, image_size: int) -> tuple[nn.Module, int]:
    """The torchvision network with its classifier replaced by Identity, and the feature width."""
    net = _construct(arch, image_size)
    _deterministic_pools(net)
    path = CLASSIFIER_PATH[family(arch)]
    parent_path, _, leaf = path.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    last = parent.get_submodule(leaf)
    if not isinstance(last, nn.Linear):
        raise AssertionError(f"{arch}: expected a Linear at {path}, found {type(last).__name__}")
    setattr(parent, leaf, nn.Identity())
    return net, last.in_features


def make_head(kind: str, in_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.2) -> nn.Module:
    if kind == "linear":
        return nn.Sequential(OrderedDict(fc=nn.Linear(in_features, num_classes)))
    if kind == "mlp":
        return nn.Sequential(OrderedDict(fc1=nn.Linear(in_features, hidden), relu=nn.ReLU(inplace=True),
                                         drop=nn.Dropout(dropout), fc2=nn.Linear(hidden, num_classes)))
    raise ModelError(f"train_head.kind: {kind!r} is not valid; choose one of: linear, mlp")


class Classifier(nn.Module):
    """backbone -> head. Modules named in `frozen` stay in eval mode while the rest trains, so a
    frozen block's BatchNorm statistics are frozen too, not just its weights."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.frozen: list[str] = []
        # Pretrained BatchNorm statistics stay fixed while fine-tuning on small batches of a new
        # dataset; a handful of batches per epoch would otherwise drag them far off.
        self.bn_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen:
            self.get_submodule(name).eval()
        if mode and self.bn_frozen:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def build_classifier(meta: dict) -> Classifier:
    """Rebuild exactly the network described by a model.json (construction arguments)."""
    backbone, dim = build_backbone(meta["arch"], meta["image_size"])
    head = make_head(meta["head"]["kind"], dim, meta["num_classes"], meta["head"].get("hidden", 256), meta["head"].get("dropout", 0.0))
    return Classifier(backbone, head)


def blocks(backbone: nn.Module, arch: str) -> list[list[str]]:
    """Names (of submodules or parameters of the backbone) per block, input to output."""
    fam = family(arch)
    names = [n for n, _ in backbone.named_children()]
    if fam == "resnet":
        return [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    if fam == "vgg":
        out, current = [], []
        for i, m in enumerate(backbone.features):
            current.append(f"features.{i}")
            if isinstance(m, nn.MaxPool2d):
                out.append(current)
                current = []
        return out + [["classifier"]]
    if fam == "densenet":
        out, current = [], []
        for name, _ in backbone.features.named_children():
            current.append(f"features.{name}")
            if name.startswith("pool0") or name.startswith("transition"):
                out.append(current)
                current = []
        return out + [current]
    if fam in ("mobilenet_v2", "mobilenet_v3", "efficientnet"):
        out = [[f"features.{n}"] for n, _ in backbone.features.named_children()]
        if fam == "mobilenet_v3":
            out.append(["classifier"])
        return out
    if fam == "inception":
        children = dict(backbone.named_children())
        return [[n] for n in names if n not in ("fc", "AuxLogits") and any(True for _ in children[n].parameters())]
    if fam == "vit":
        layers = [[f"encoder.layers.{n}"] for n, _ in backbone.encoder.layers.named_children()]
        return [["conv_proj", "class_token", "encoder.pos_embedding"]] + layers + [["encoder.ln"]]
    raise AssertionError(fam)


def freeze_first_blocks(model: Classifier, arch: str, k: int) -> list[str]:
    """Freeze the first k backbone blocks (weights and BatchNorm statistics); return their names."""
    all_blocks = blocks(model.backbone, arch)
    if k > len(all_blocks):
        raise ModelError(f"finetune.freeze_blocks: {k} is more than the {len(all_blocks)} blocks of {arch}; "
                         f"choose 0-{len(all_blocks)}")
    frozen = []
    for block in all_blocks[:k]:
        for name in block:
            try:
                module = model.backbone.get_submodule(name)
                params = list(module.parameters())
                frozen.append(f"backbone.{name}")
            except AttributeError:
                params = [model.backbone.get_parameter(name)]
            for p in params:
                p.requires_grad_(False)
    model.frozen = frozen
    model.train(model.training)
    return frozen


def count_blocks(arch: str, image_size: int = 224) -> int:
    """Block count without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        backbone, _ = build_backbone(arch, image_size)
    return len(blocks(backbone, arch))


def _strip_common_prefix(state: dict[str, torch.Tensor], own: dict) -> tuple[dict, str]:
    """Keys under one leading name that the backbone lacks (`backbone.` in this pipeline's own exports,
    `model.`, `encoder.`...) are matched without it when that makes more of them fit."""
    best, best_hits = "", sum(k in own for k in state)
    for prefix in sorted({k.split(".", 1)[0] + "." for k in state if "." in k}):
        hits = sum(k[len(prefix):] in own for k in state if k.startswith(prefix))
        if hits > best_hits:
            best, best_hits = prefix, hits
    if not best:
        return state, ""
    return {k[len(best):] if k.startswith(best) else k: v for k, v in state.items()}, best


def _resample_position_embeddings(backbone: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """A ViT trained at another resolution: its position embeddings are resampled (bicubic) to this
    backbone's patch grid, as torchvision and timm do, instead of failing on the shape."""
    from torchvision.models import VisionTransformer
    from torchvision.models.vision_transformer import interpolate_embeddings

    key = "encoder.pos_embedding"
    if not isinstance(backbone, VisionTransformer) or key not in state:
        return {}
    got, want = tuple(state[key].shape), tuple(backbone.encoder.pos_embedding.shape)
    if got == want or len(got) != 3 or got[2] != want[2]:
        return {}
    try:
        new = interpolate_embeddings(backbone.image_size, backbone.patch_size, {key: state[key]})[key]
    except ValueError as e:  # not a square grid: leave it to the shape check, which reports it
        return {key: f"not resampled: {e}"}
    state[key] = new
    return {key: f"resampled from {got} to {tuple(new.shape)} for {backbone.image_size} px"}


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], *, partial: bool) -> dict:
    """Load weights into the backbone; return a report of loaded / skipped / missing keys.

    Full loads (our own or official weights) must match exactly. Partial loads (a network
    trained elsewhere) take only keys present with the same shape, and the report lists every
    key skipped and why; nothing is skipped silently.
    """
    own = backbone.state_dict()
    state, prefix = _strip_common_prefix(dict(state), own) if partial else (dict(state), "")
    resampled = _resample_position_embeddings(backbone, state)
    loaded, skipped = {}, {}
    for key, value in state.items():
        if key not in own:
            skipped[key] = "not in this backbone"
        elif tuple(value.shape) != tuple(own[key].shape):
            skipped[key] = f"shape {tuple(value.shape)} != backbone's {tuple(own[key].shape)}"
        else:
            loaded[key] = value
    missing = sorted(set(own) - set(loaded))
    report = {"loaded": sorted(loaded), "skipped": skipped, "missing": missing}
    if prefix:
        report["stripped_prefix"] = prefix
    if resampled:
        report["resampled"] = resampled
    if not partial and (skipped or missing):
        shape_issues = {k: v for k, v in skipped.items() if v.startswith("shape")}
        first = next(iter(shape_issues.items()), None) or next(iter(skipped.items()), None)
        detail = f"first mismatch: {first[0]}: {first[1]}" if first else f"missing: {missing[:5]}"
        raise ModelError(f"weights do not fit this {type(backbone).__name__} backbone ({len(skipped)} unusable, "
                         f"{len(missing)} missing keys; {detail}). For a network trained elsewhere use "
                         "pretrained.source: file, which loads what matches and reports the rest")
    if not loaded:
        raise ModelError(f"no key of the weights file matches this {type(backbone).__name__} backbone in name and "
                         f"shape, even under a common prefix (its keys: {list(state)[:3]}...); it holds another "
                         "architecture, or a layout whose keys need renaming")
    backbone.load_state_dict(loaded, strict=False)
    return report


def load_backbone(folder) -> tuple[nn.Module, dict]:
    """The backbone written by pretrain, loaded strictly, with its description (backbone.json)."""
    folder = Path(folder)
    info = read_json(folder / "backbone.json")
    backbone, _ = build_backbone(info["arch"], info["image_size"])
    state, _ = load_tensors(folder / "backbone.safetensors")
    backbone.load_state_dict(state)
    return backbone, info


def load_model(weights_file, meta: dict) -> Classifier:
    """A Classifier rebuilt from its construction arguments, with weights from any supported file
    (safetensors or a torch checkpoint saved on any device, wrapper prefixes stripped)."""
    model = build_classifier(meta)
    state = load_state_dict(weights_file)
    own = model.state_dict()
    wrong = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape}
    if wrong:
        key, (got, want) = next(iter(wrong.items()))
        raise ModelError(f"{weights_file}: {key} has shape {got} but this {meta['arch']} with {meta['num_classes']} "
                         f"classes needs {want}; the weights were trained for a different head or architecture")
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelError(f"{weights_file}: does not match {meta['arch']}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model
