"""One backbone interface over torchvision's classification families and timm's models.

For either library it knows where the classifier is (so the backbone is the network up to the
features that classifier reads), how wide those features are, the native input size of the weights
(their preprocessing is transfer.preprocess's), and how the network divides into blocks, in
input-to-output order, for freezing the first k and for layer-wise learning rates. torchvision
families are described by a small table; timm models describe themselves (num_features,
pretrained_cfg, group_matcher), so any of timm's models works without a table. An arch is
`resnet18` (torchvision) or `timm/convnext_tiny` (timm).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from transfer.cli import UserError
from transfer.io import load_state_dict, load_tensors, read_json
from transfer.params import TIMM_PREFIX

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


class ModelError(UserError):
    """The architecture or its weights do not fit what was asked."""


def is_timm(arch: str) -> bool:
    return arch.startswith(TIMM_PREFIX)


def timm_name(arch: str) -> str:
    return arch[len(TIMM_PREFIX):]


def family(arch: str) -> str:
    if is_timm(arch):
        return "timm"
    for prefix in ("mobilenet_v2", "mobilenet_v3", "resnet", "vgg", "densenet", "efficientnet", "vit", "inception"):
        if arch.startswith(prefix):
            return prefix
    raise ModelError(f"backbone.arch: {arch!r} is not supported; choose a resnet, vgg, densenet, inception_v3, "
                     "mobilenet, efficientnet or vit model")


def timm_size_kwargs(arch: str, image_size: int) -> dict:
    """Models with a fixed input size (ViTs) are built for data.image_size, their position embeddings
    resampled when weights are loaded; CNNs take any size as they are."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name(arch))
    return {"img_size": image_size} if cfg is not None and cfg.fixed_input_size else {}


def _construct_timm(arch: str, image_size: int) -> nn.Module:
    import timm  # only for timm archs: its import costs ~2 s more than torchvision's

    return timm.create_model(timm_name(arch), pretrained=False, num_classes=0, **timm_size_kwargs(arch, image_size))


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
    """The network with its classifier removed (torchvision: replaced by Identity; timm: num_classes=0,
    timm's own way), and the width of the features it outputs."""
    if is_timm(arch):
        net = _construct_timm(arch, image_size)
        _deterministic_pools(net)
        return net, int(getattr(net, "head_hidden_size", None) or net.num_features)
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


def _timm_blocks(backbone: nn.Module) -> list[list[str]]:
    """timm's own coarse layer groups (group_matcher) where the model has usable ones, else one block
    per top-level child that holds parameters (_children_blocks)."""
    from timm.models import group_parameters

    try:
        # Some timm models have no group_matcher (MetaFormer, PiT, CSATv2, MobileNetV5's encoder) and
        # some raise from it (RDNet asserts coarse=True is not implemented): any of these means "no
        # groups", not a crash of the stage that froze blocks.
        groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
        by_name = dict(backbone.named_parameters())
        groups = [[by_name[name] for name in groups[gid]] for gid in sorted(groups)]
    except Exception:
        groups = []
    if not groups:
        return _children_blocks(backbone)
    return _exact_names(backbone, groups)


def _exact_names(backbone: nn.Module, groups: list[list[nn.Parameter]]) -> list[list[str]]:
    """Each group of parameters as the fewest names that hold exactly those parameters: a module whose
    parameters all lie in the group (its parent's do not), otherwise a parameter name. Naming the module
    that owns each parameter is not exact: Qwen3-ViT's encoder owns pos_embed, so the first group held
    the whole encoder and freeze_blocks: 1 froze every transformer block. A module shared under two
    names (CoaT's position encodings) is named once, where module order meets it first."""
    group_of = {id(q): i for i, params in enumerate(groups) for q in params}
    out: list[list[str]] = [[] for _ in groups]
    named: set[int] = set()

    def visit(path: str, module: nn.Module) -> None:
        params = list(module.parameters())
        if all(id(q) in named for q in params):
            return
        held = {group_of[id(q)] for q in params}
        if path and len(held) == 1 and not any(id(q) in named for q in params):
            out[held.pop()].append(path)
            named.update(id(q) for q in params)
            return
        for name, q in module.named_parameters(recurse=False):
            if id(q) not in named:
                out[group_of[id(q)]].append(f"{path}.{name}" if path else name)
                named.add(id(q))
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", backbone)
    return out


def _children_blocks(backbone: nn.Module) -> list[list[str]]:
    """One block per top-level child that holds parameters, in module order, with a top-level sequence of
    stages or blocks split into its members, as timm's coarse groups split them. Parameters of the model
    itself (PiT's cls_token and pos_embed) belong to the input end: the first block."""
    out = []
    for name, child in backbone.named_children():
        members = [(f"{name}.{n}", m) for n, m in child.named_children()] if _is_sequence_of_stages(child) else [(name, child)]
        out += [[path] for path, m in members if _holds_parameters(m)]
    own = [name for name, _ in backbone.named_parameters(recurse=False)]
    if own:
        out = [own + out[0]] + out[1:] if out else [own]
    return out


def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_sequence_of_stages(module: nn.Module) -> bool:
    """A Sequential or ModuleList whose members (those with parameters) are composite modules: stages or
    blocks, to be split; not a stem's conv and norm, which stay one block."""
    if not isinstance(module, (nn.Sequential, nn.ModuleList)):
        return False
    members = [m for m in module.children() if _holds_parameters(m)]
    return bool(members) and all(next(m.children(), None) is not None for m in members)


def native_size(arch: str, backbone: nn.Module) -> int:
    """The resolution the weights were trained at, recorded beside them. (How images are resized and
    normalised for them is transfer.preprocess's.)"""
    if is_timm(arch):
        return int(backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    return 299 if arch == "inception_v3" else 224


def blocks(backbone: nn.Module, arch: str) -> list[list[str]]:
    """Names (of submodules or parameters of the backbone) per block, input to output."""
    fam = family(arch)
    if fam == "timm":
        return _timm_blocks(backbone)
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


def _block_member(backbone: nn.Module, name: str) -> tuple[nn.Module | None, list[nn.Parameter]]:
    """A name in a block is a submodule (returned with its parameters) or a bare parameter."""
    try:
        module = backbone.get_submodule(name)
        return module, list(module.parameters())
    except AttributeError:
        return None, [backbone.get_parameter(name)]


def block_parameter_groups(backbone: nn.Module, arch: str) -> list[list[nn.Parameter]]:
    """The backbone's parameters per block, input to output; any parameter outside every block
    joins the last one (nearest the head)."""
    groups, seen = [], set()
    for block in blocks(backbone, arch):
        params = []
        for name in block:
            _, found = _block_member(backbone, name)
            params += [q for q in found if id(q) not in seen]
            seen |= {id(q) for q in found}
        groups.append(params)
    groups[-1] += [q for q in backbone.parameters() if id(q) not in seen]
    return groups


def freeze_first_blocks(model: Classifier, arch: str, k: int) -> list[str]:
    """Freeze the first k backbone blocks (weights and BatchNorm statistics); return their names."""
    all_blocks = blocks(model.backbone, arch)
    if k > len(all_blocks):
        raise ModelError(f"finetune.freeze_blocks: {k} is more than the {len(all_blocks)} blocks of {arch}; "
                         f"choose 0-{len(all_blocks)}")
    frozen = []
    for block in all_blocks[:k]:
        for name in block:
            module, params = _block_member(model.backbone, name)
            if module is not None:
                frozen.append(f"backbone.{name}")
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


def map_keys(state: dict[str, torch.Tensor], *, strip_prefix: list[str], rename: list[list[str]]) -> tuple[dict, dict]:
    """Checkpoint keys as another codebase wrote them, mapped to ours: each prefix in strip_prefix removed
    where it leads a key, then each [regex, replacement] of rename applied in order. Returns the state
    and what changed (counts per rule, and a sample of renamed keys)."""
    import re

    rules = {}
    out = {}
    samples = {}
    for key, value in state.items():
        new = key
        for prefix in strip_prefix:
            if new.startswith(prefix):
                new = new[len(prefix):]
                rules[f"strip {prefix}"] = rules.get(f"strip {prefix}", 0) + 1
        for pattern, replacement in rename:
            changed = re.sub(pattern, replacement, new)
            if changed != new:
                rules[f"rename {pattern} -> {replacement}"] = rules.get(f"rename {pattern} -> {replacement}", 0) + 1
                new = changed
        if new in out:
            raise ModelError(f"pretrained.strip_prefix/rename map two checkpoint keys to {new!r}; make the rules more specific")
        if new != key and len(samples) < 5:
            samples[key] = new
        out[new] = value
    unused = [f"strip {p}" for p in strip_prefix if f"strip {p}" not in rules] + \
             [f"rename {a} -> {b}" for a, b in rename if f"rename {a} -> {b}" not in rules]
    return out, {"applied": rules, "unused_rules": unused, "examples": samples}


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
    if "pos_embed" in state and hasattr(backbone, "pos_embed") and hasattr(backbone, "patch_embed"):
        return _resample_timm_pos_embed(backbone, state)
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


def _match_by_order(state: dict[str, torch.Tensor], own: dict) -> tuple[dict, dict, list]:
    """Tensor i of the checkpoint goes to tensor i of the backbone (the Keras way: same architecture,
    other names), each verified by shape; the first mismatch stops with both names and shapes.
    Checkpoint tensors beyond the backbone's (a classifier) are skipped and reported."""
    names = list(state)
    loaded, skipped = {}, {}
    for i, (key, target) in enumerate(own.items()):
        if i >= len(names):
            break
        src = state[names[i]]
        if tuple(src.shape) != tuple(target.shape) or src.is_floating_point() != target.is_floating_point():
            raise ModelError(f"pretrained.match: order: tensor {i} of the checkpoint, {names[i]} {tuple(src.shape)} {src.dtype}, "
                             f"does not fit the backbone's tensor {i}, {key} {tuple(target.shape)} {target.dtype}; the checkpoint is another "
                             "architecture or orders its tensors differently (try pretrained.match: name with "
                             "pretrained.rename)")
        loaded[key] = src
    for name in names[len(own):]:
        skipped[name] = "beyond the backbone's tensors (matched by order)"
    missing = list(own)[len(names):]
    return loaded, skipped, missing


def _resample_timm_pos_embed(backbone: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, str]:
    from timm.layers import resample_abs_pos_embed

    got, want = tuple(state["pos_embed"].shape), tuple(backbone.pos_embed.shape)
    if got == want or len(got) != 3 or got[2] != want[2]:
        return {}
    prefix = 0 if getattr(backbone, "no_embed_class", False) else getattr(backbone, "num_prefix_tokens", 1)
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(backbone.patch_embed.grid_size),
                                                num_prefix_tokens=prefix)
    return {"pos_embed": f"resampled from {got} to {tuple(state['pos_embed'].shape)}"}


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], *, partial: bool, match: str = "name",
                          min_fraction: float = 0.0) -> dict:
    """Load weights into the backbone; return a report of loaded / skipped / missing keys.

    Full loads (our own or official weights) must match exactly. Partial loads (a network
    trained elsewhere) take only keys present with the same shape, and the report lists every
    key skipped and why; nothing is skipped silently. match="order" pairs tensors by position
    instead of by name. A load that fills less than `min_fraction` of the backbone's tensors is an
    error: a checkpoint that mostly does not fit is not a pretrained backbone.
    """
    own = backbone.state_dict()
    prefix = ""
    if match == "order":
        loaded, skipped, missing = _match_by_order(state, own)
        resampled = {}
    else:
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
    report = {"loaded": sorted(loaded), "skipped": skipped, "missing": missing, "match": match}
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
                         "architecture, or a layout whose keys need pretrained.strip_prefix / pretrained.rename")
    fraction = len(loaded) / max(len(own), 1)
    report["loaded_fraction"] = round(fraction, 4)
    if fraction < min_fraction:
        raise ModelError(f"only {len(loaded)} of the backbone's {len(own)} tensors ({fraction:.0%}) were loaded, below "
                         f"pretrained.min_loaded_fraction={min_fraction}; first missing: {missing[:3]}. Map the "
                         "checkpoint's keys with pretrained.strip_prefix / pretrained.rename, or use pretrained.match: "
                         "order for the same architecture under other names (details in load_report.json)")
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
