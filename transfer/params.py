"""One validated view of params.yaml.

Every key the pipeline reads is declared once in SCHEMA with its type, default and what it
means. Loading rejects unknown keys, wrong types and bad values with a message that names the
key, the value and the valid choices, before any stage does any work.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from transfer.cli import UserError
from transfer.paths import PARAMS


class ParamsError(UserError):
    """params.yaml is invalid; the message says which key and how to fix it."""


@dataclass(frozen=True)
class Field:
    kind: str  # int | float | bool | str | list | rgb (3 floats, one per channel, each within min..max)
    #           | range ([low, high], floats within min..max, low <= high)
    default: Any
    doc: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    nullable: bool = False
    item: str | None = None  # element kind for lists: int | str | int_or_str | float | pair (of str)
    allow_empty: bool = False  # lists: [] is a valid value
    min_exclusive: bool = False  # min itself is not allowed (a crop of 0% of the image)
    words: tuple = ()  # strings allowed besides a value of `kind` (finetune.lr: auto)


ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "densenet121", "densenet161", "densenet169", "densenet201",
    "inception_v3",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "vit_b_16", "vit_b_32",
)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")  # PIL's resampling filters
TIMM_PREFIX = "timm/"  # backbone.arch names a timm model under this prefix (transfer.models uses the same)
STRATEGIES = ("feature_extract", "finetune", "partial", "scratch")
# finetune.optimizer: sgd is the pipeline's own (torch SGD, decay on every parameter: training.make_optimizer);
# the others are timm.optim names, built by its create_optimizer_v2 with no weight decay on norm and bias.
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adamw", "lamb", "lion")
CLASS_WEIGHTS = ("none", "balanced")
# finetune.augment and finetune.auto_augment (transfer/augment.py).
AUGMENTS = ("pad_crop", "resized_crop", "none")
AUTO_AUGMENTS = ("none", "trivial", "randaugment")
# How each epoch's training images are drawn (training.epoch_batches): shuffle = each once; balanced = as
# many draws with replacement, every class equally likely.
SAMPLERS = ("shuffle", "balanced")

# Per stage, the params it reads that change how fast it runs, never what it writes: dvc.yaml does not
# declare them, so changing one re-runs nothing. runtime.workers: tests/test_data.py compares prepare's
# outputs byte for byte at 1 and 2 decode workers, and pretrain decodes through the same code.
# runtime.nproc in extract: tests/test_distributed.py compares the embeddings of 1 and 2 processes byte
# for byte (each image's embedding is computed alone; the processes only share the rows out). In
# pretrain and finetune it is declared: data-parallel training sums gradients in another order.
SPEED_ONLY = {"prepare": frozenset({"runtime.workers"}), "pretrain": frozenset({"runtime.workers"}),
              "extract": frozenset({"runtime.nproc"})}

SCHEMA: dict[str, Any] = {
    "seed": Field("int", 0, "seed for initialisation, shuffling and augmentation (not for splits: data.split_seed)", min=0),
    "strategy": Field("str", "feature_extract", "how the finetune stage adapts the backbone", choices=STRATEGIES),
    "data": {
        "source": Field("str", "fashion-mnist", "dataset", choices=("digits", "fashion-mnist", "imagefolder", "csv")),
        "root": Field("str", "data/raw/fashion-mnist", "folder the dataset is read from (IDX files, class folders, or the "
                      "folder data.csv and its paths are relative to)"),
        # Read only by source: csv.
        "csv": Field("str", "labels.csv", "csv: the file of image paths and labels, relative to data.root (inside it, so "
                     "prepare's dependency on data.root covers it)"),
        "path_column": Field("str", "path", "csv: the column of image paths (relative to data.root, or absolute inside it)"),
        "label_column": Field("str", "label", "csv: the column of class names"),
        "split_column": Field("str", None, "csv: a column of train/val/test (training, valid, validation, testing; any "
                              "case) for pre-split data; null = split by val_fraction and test_fraction", nullable=True),
        "delimiter": Field("str", "auto", "csv: auto (tab for .tsv, else the one of , ; tab | that splits the header into "
                           "the named columns), tab, or one character"),
        "classes": Field("list", None, "subset of classes to use (names or indices); null = all", nullable=True, item="int_or_str"),
        "image_size": Field("int", 128, "square side the network sees: the shorter side is resized to image_size / crop_pct, then centre-cropped", min=8, max=1024),
        "interpolation": Field("str", None, "resampling filter of the resize; null = the backbone weights' own", nullable=True,
                               choices=INTERPOLATIONS),
        "crop_pct": Field("float", None, "image_size / resized shorter side (the centre crop keeps this share); null = the backbone weights' own",
                          nullable=True, min=0.0, max=1.0, min_exclusive=True),
        "val_fraction": Field("float", 0.1, "validation fraction: files with split_key in [test_fraction, test_fraction + val_fraction) (one tree, or carved from train/ when there is no val folder)", min=0.0, max=0.9),
        "test_fraction": Field("float", 0.2, "test fraction: files with split_key < test_fraction (single-tree sources); evaluate needs a test split", min=0.01, max=0.9),
        "split_seed": Field("int", 0, "which files go to which split; separate from seed, which drives training", min=0),
        "train_per_class": Field("int", 5, "labelled training images kept per class (the small-data budget); null = all", nullable=True, min=1),
        "eval_per_class": Field("int", 300, "cap on val and test images per class, to keep evaluation quick; null = all", nullable=True, min=1),
        "max_rejected_fraction": Field("float", 0.05, "prepare stops when more than this fraction of input files is unreadable", min=0.0, max=1.0),
    },
    "backbone": {
        "arch": Field("str", "timm/tf_efficientnet_lite0", "a torchvision architecture (resnet18) or timm/<any timm model name> (timm/convnext_tiny)"),
    },
    "pretrained": {
        "source": Field("str", "file", "where backbone weights come from", choices=("torchvision", "timm", "url", "file", "train", "none")),
        "weights": Field("str", "DEFAULT", "torchvision weights enum member (IMAGENET1K_V1), or a timm weights tag (a1_in1k); DEFAULT = the library's default"),
        "mean": Field("rgb", None, "per-channel mean the inputs are normalised with (pixels in 0-1); null = the weights' own", nullable=True, min=0.0, max=1.0),
        "std": Field("rgb", None, "per-channel std the inputs are normalised with; null = the weights' own", nullable=True, min=0.0, max=1.0,
                     min_exclusive=True),
        "url": Field("str", "", "weights URL, file:// included (source: url)"),
        "sha256": Field("str", "", "expected sha256 of the file at url (source: url); required for url"),
        "path": Field("str", "data/raw/pretrained/efficientnet-lite0-57934424.pth", "weights file trained elsewhere (source: file)"),
        "entry": Field("str", "", "file/url: where the state dict sits in a nested checkpoint (state_dict, ema.module...); empty = found automatically"),
        "strip_prefix": Field("list", [], "file/url: leading key prefixes to remove (model., encoder_q....)", item="str", allow_empty=True),
        "rename": Field("list", [], "file/url: [regex, replacement] pairs applied to every key, in order", item="pair", allow_empty=True),
        "match": Field("str", "order", "file/url: pair tensors by name, or by order (same architecture, other key names; each shape verified)", choices=("name", "order")),
        "min_loaded_fraction": Field("float", 0.5, "file/url: a load filling less than this fraction of the backbone's tensors is an error", min=0.0, max=1.0),
        "train": {
            "classes": Field("list", [0, 1, 2, 3, 4], "source-task classes of data.source (must not overlap data.classes)", item="int_or_str"),
            "per_class": Field("int", 1500, "source-task images per class (those with split_key < 0.1, about 10% and at least one, validate)", min=2),
            "epochs": Field("int", 6, "source-task epochs", min=1),
            "lr": Field("float", 0.05, "source-task SGD learning rate", min=0.0),
            "batch_size": Field("int", 128, "source-task batch size", min=1),
        },
    },
    "extract": {
        "batch_size": Field("int", 512, "inference batch size for embeddings", min=1),
    },
    "train_head": {
        "kind": Field("str", "linear", "classifier on the embeddings; logreg: a linear head fitted by L-BFGS with its L2 strength "
                      "chosen on val (CLIP's linear probe; reads no lr, epochs, weight_decay, batch_size)", choices=("linear", "mlp", "logreg")),
        "hidden": Field("int", 256, "hidden width of the mlp head", min=1),
        "dropout": Field("float", 0.2, "dropout before the last layer of the mlp head", min=0.0, max=0.95),
        "lr": Field("float", 0.01, "AdamW learning rate; auto = fastai's lr_find range test on the train embeddings picks it",
                    min=0.0, min_exclusive=True, words=("auto",)),
        "epochs": Field("int", 200, "epochs over the cached embeddings", min=1),
        "weight_decay": Field("float", 0.0001, "AdamW weight decay", min=0.0),
        "batch_size": Field("int", 1024, "batch size over embeddings (full batch when larger than the split)", min=1),
        "class_weights": Field("str", "none", "loss weight per class: balanced = n / (classes * count), from the training labels",
                               choices=CLASS_WEIGHTS),
        "sampler": Field("str", "shuffle", "how each epoch draws the training embeddings: shuffle = each once; balanced = as "
                         "many draws with replacement, every class equally likely (linear, mlp)", choices=SAMPLERS),
    },
    "finetune": {
        "epochs": Field("int", 15, "epochs for finetune / partial / scratch", min=1),
        "lr": Field("float", 0.01, "learning rate of the head (and of everything, for scratch); auto = fastai's lr_find "
                    "range test on the training split picks it", min=0.0, min_exclusive=True, words=("auto",)),
        "backbone_lr_factor": Field("float", 0.1, "backbone lr = lr * this (finetune, partial), unless layer_decay is set", min=0.0, max=1.0),
        "layer_decay": Field("float", None, "layer-wise lr decay: block lr = lr * layer_decay^(depth from the head); null = off", nullable=True, min=0.01, max=1.0),
        "optimizer": Field("str", "sgd", "sgd: torch SGD, weight decay on every parameter; the others: timm's, no weight decay "
                           "on norm and bias (momentum: classical, nesterov: Nesterov's)", choices=OPTIMIZERS),
        "momentum": Field("float", 0.9, "momentum of sgd, momentum and nesterov", min=0.0, max=1.0),
        "weight_decay": Field("float", 0.0005, "weight decay (decoupled for adamw, lamb, lion)", min=0.0),
        "scheduler": Field("str", "cosine", "learning-rate schedule (after the warmup, over the remaining epochs)",
                           choices=("step", "cosine", "none")),
        "warmup_epochs": Field("int", 0, "epochs of linear warmup before the schedule (epoch e of w at lr * e / (w + 1))", min=0),
        "label_smoothing": Field("float", 0.0, "label smoothing of the training loss (F.cross_entropy's)", min=0.0, max=1.0),
        "clip_grad": Field("float", None, "clip the gradient's norm to this before each step; null = off", nullable=True,
                           min=0.0, min_exclusive=True),
        "accumulate": Field("int", 1, "batches of batch_size per optimizer step (gradient accumulation; effective batch = "
                            "batch_size * accumulate)", min=1),
        "ema": Field("bool", False, "keep an exponential moving average of the weights (timm ModelEmaV3); validation, the "
                     "best epoch and the saved weights are the average's"),
        "ema_decay": Field("float", 0.999, "the average's decay, reached after timm's warmup (1 - (1 + step)^-2/3)",
                           min=0.0, max=1.0),
        "class_weights": Field("str", "none", "loss weight per class: balanced = n / (classes * count), from the training labels",
                               choices=CLASS_WEIGHTS),
        "sampler": Field("str", "shuffle", "how each epoch draws the training images: shuffle = each once; balanced = as many "
                         "draws with replacement, every class equally likely", choices=SAMPLERS),
        "step_size": Field("int", 7, "StepLR step size in epochs", min=1),
        "gamma": Field("float", 0.1, "StepLR decay", min=0.0, max=1.0),
        "freeze_blocks": Field("int", 2, "partial: number of leading backbone blocks kept frozen", min=0),
        "batch_size": Field("int", 32, "training batch size", min=1),
        "bn_frozen": Field("bool", True, "finetune/partial: keep the pretrained BatchNorm statistics fixed (scratch always trains them)"),
        "augment_hflip": Field("bool", True, "random horizontal flips during training"),
        "augment_pad": Field("int", 2, "augment pad_crop: random crops of the image's size after zero padding by this many "
                             "pixels (0 = off)", min=0),
        "augment": Field("str", "pad_crop", "per-image crop: pad_crop (augment_pad), resized_crop (RandomResizedCrop: "
                         "crop_scale, crop_ratio, resized back to the image size) or none", choices=AUGMENTS),
        "crop_scale": Field("range", [0.08, 1.0], "augment resized_crop: range of the box's area as a fraction of the image's",
                            min=0.0, max=1.0, min_exclusive=True),
        "crop_ratio": Field("range", [0.75, 1.3333], "augment resized_crop: range of the box's aspect ratio (width / height), "
                            "drawn log-uniformly", min=0.0, min_exclusive=True),
        "auto_augment": Field("str", "none", "after the crop and flip, per image: torchvision's TrivialAugmentWide (trivial), "
                              "RandAugment (randaugment) or none", choices=AUTO_AUGMENTS),
        "mixup": Field("float", 0.0, "mixup's Beta alpha (timm Mixup, one draw per batch; the loss takes soft targets); 0 = off",
                       min=0.0),
        "cutmix": Field("float", 0.0, "cutmix's Beta alpha (timm Mixup); with mixup also on, each batch takes one of the two; "
                        "0 = off", min=0.0),
        "resume": Field("bool", False, "resume from models/checkpoints/finetune.pt when its settings match"),
        "eval_every": Field("int", 1, "validate after every this many epochs (and after the last)", min=1),
        "val_images": Field("int", None, "per-epoch validation on this many val images, the same class-balanced subset every "
                            "time; the kept weights are then scored on the whole val split; null = all", nullable=True, min=1),
    },
    "evaluate": {
        "grid_images": Field("int", 24, "test images in the prediction grid", min=1, max=256),
        "batch_size": Field("int", 512, "inference batch size", min=1),
        "top_losses": Field("int", 16, "test images the model got most confidently wrong, shown in metrics/top_losses.png "
                            "and listed in metrics/top_losses.csv; 0 = off", min=0, max=256),
        "confused_pairs": Field("int", 10, "the most frequent (true, predicted) class pairs among the errors in "
                                "metrics/confused_pairs.json", min=1),
        "tta": Field("str", "none", "test-time augmentation reported beside the plain numbers (tta_*): flip = the mean "
                     "of the probabilities of each image and its mirror image", choices=("none", "flip")),
        "calibrate": Field("bool", True, "fit a temperature on the val split's logits (models/calibration.json); convert "
                           "builds it into the exports, so their probabilities are calibrated. Never changes a prediction"),
    },
    "convert": {
        "fp16": Field("bool", True, "also write a float16 copy of the weights"),
        "onnx": Field("bool", True, "also export ONNX (uint8 images in, logits out, any batch size), checked with onnxruntime"),
        "torchscript": Field("bool", True, "also export TorchScript (same interface), checked with torch.jit"),
        "tolerance": Field("float", 1e-3, "largest logit difference an export may have from PyTorch on the test split", min=0.0),
        # float16 weights round each value by up to 2^-11 of itself, which moves logits far more than ONNX's
        # float32 arithmetic does. Measured max |logit difference| (convert compares on the CPU): 0.106 for
        # the default (Lite0, 128 px, metrics/convert.json), 0.047 for Lite0 fine-tuned at 224 px (the H200
        # check), 0.064 / 0.037 / 0.014 for resnet18 (finetune / feature_extract) and mobilenet_v3_small on
        # the test suite's digits. 0.25 leaves over twice the largest; a broken copy (a tensor flushed to
        # zero or gone to inf) moves logits by whole units, or to NaN.
        # Since then, relative to the largest |logit| (stages/convert.py): a head at train_head.lr 0.02 moved
        # by 0.253 with logits up to 41.3 (0.6%) and failed the absolute 0.25. 0.02 leaves 3x that.
        "fp16_tolerance": Field("float", 0.02, "largest logit difference the float16 copy may have on the test sample, "
                                "as a fraction of the model's largest |logit| there", min=0.0),
    },
    "runtime": {
        "device": Field("str", "auto", "compute device", choices=("auto", "cpu", "cuda")),
        "threads": Field("int", 0, "CPU threads for torch; 0 = torch's default", min=0),
        "nproc": Field("int", 1, "data-parallel processes (torchrun) for pretrain, extract and finetune; one GPU each on GPUs", min=1),
        "workers": Field("int", 0, "processes that decode images in prepare; 0 = all cores (outputs are identical for any count)", min=0),
        "deterministic": Field("bool", False, "deterministic algorithms (slower on GPU; CPU runs are deterministic anyway)"),
        "amp": Field("bool", True, "bfloat16 autocast on CUDA; on CPUs with native bf16 (AVX512-BF16/AMX) for inference only"),
        # Off unless asked: compiling Lite0 costs tens of seconds per process, more than a 5-shot fine-tune
        # trains, and what it buys on a GPU has not been measured here yet (no device was lent).
        "compile": Field("bool", False, "torch.compile the model in extract and finetune; null = on CUDA only (CPU runs stay in eager mode)",
                         nullable=True),
    },
}


# Keys read since record_reads() started, as dotted paths: the test that holds dvc.yaml's `params`
# to exactly what each stage reads uses it. None when nobody is recording.
_reads: set[str] | None = None


@contextlib.contextmanager
def record_reads() -> Iterator[set[str]]:
    """Collect the dotted keys that stage code reads from Params objects while the block runs."""
    global _reads
    previous, _reads = _reads, set()
    try:
        yield _reads
    finally:
        _reads = previous


class Params(dict):
    """A validated section of params.yaml; keys read as attributes (p.finetune.lr)."""

    def __init__(self, *args, prefix: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self._prefix = prefix

    def _note(self, name) -> None:
        if _reads is not None:
            value = dict.__getitem__(self, name)
            if isinstance(value, Params):
                value._note_all()
            else:
                _reads.add(self._prefix + name)

    def _note_all(self) -> None:
        for name in dict.keys(self):
            self._note(name)

    def __getitem__(self, name):
        value = dict.__getitem__(self, name)
        if not isinstance(value, Params):
            self._note(name)
        return value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def get(self, name, default=None):
        return self[name] if name in self else default

    def items(self):
        self._note_all()
        return dict.items(self)

    def values(self):
        self._note_all()
        return dict.values(self)

    def to_dict(self) -> dict:
        self._note_all()
        return {k: v.to_dict() if isinstance(v, Params) else v for k, v in dict.items(self)}


def _type_ok(kind: str, value: Any) -> bool:
    # bool is an int subclass in Python; `epochs: true` must not pass as 1.
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "int_or_str":
        return _type_ok("int", value) or isinstance(value, str)
    if kind == "list":
        return isinstance(value, list)
    if kind == "pair":
        return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)
    raise AssertionError(kind)


def _check(key: str, field: Field, value: Any) -> Any:
    if value is None:
        if field.nullable:
            return None
        raise ParamsError(f"{key}: null is not allowed; expected {field.kind} ({field.doc})")
    if field.kind == "rgb":
        return _check_rgb(key, field, value)
    if field.kind == "range":
        return _check_range(key, field, value)
    if field.words and isinstance(value, str):
        if value in field.words:
            return value
        # YAML 1.1 reads 1e-3 (no dot) as a string.
        hint = f" (YAML reads {value} as text: write it with a dot, as 1.0e-3)" if _is_number(value) else ""
        raise ParamsError(f"{key}: {value!r} is not valid; give a number or {' or '.join(field.words)}{hint}")
    if not _type_ok(field.kind, value):
        expected = " or ".join([field.kind, *map(repr, field.words)])
        raise ParamsError(f"{key}: expected {expected}, got {type(value).__name__} {value!r} ({field.doc})")
    if field.kind == "float":
        value = float(value)
    if field.choices is not None and value not in field.choices:
        raise ParamsError(f"{key}: {value!r} is not valid; choose one of: {', '.join(map(str, field.choices))}")
    if field.kind == "list":
        for item in value:
            if not _type_ok(field.item, item):
                what = "a [regex, replacement] pair of strings" if field.item == "pair" else field.item.replace("_", " ")
                raise ParamsError(f"{key}: item {item!r} should be {what}")
        if field.item != "pair" and len(set(map(str, value))) != len(value):
            raise ParamsError(f"{key}: {value!r} lists an entry twice")
        if not value and not field.allow_empty:
            raise ParamsError(f"{key}: empty list; give at least one entry or null for all")
        if field.item == "pair":
            for pattern, _ in value:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ParamsError(f"{key}: {pattern!r} is not a valid regular expression ({e})") from None
    if field.min is not None and field.kind in ("int", "float") and (value <= field.min if field.min_exclusive else value < field.min):
        raise ParamsError(f"{key}: {value!r} is {'not above' if field.min_exclusive else 'below'} the minimum {field.min} ({field.doc})")
    if field.max is not None and field.kind in ("int", "float") and value > field.max:
        raise ParamsError(f"{key}: {value!r} is above the maximum {field.max} ({field.doc})")
    return value


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _check_rgb(key: str, field: Field, value: Any) -> list[float]:
    low = (lambda v: v > field.min) if field.min_exclusive else (lambda v: v >= field.min)
    if not (isinstance(value, list) and len(value) == 3 and all(_type_ok("float", v) and low(v) and v <= field.max for v in value)):
        bounds = f"{'(' if field.min_exclusive else '['}{field.min:g}, {field.max:g}]"
        raise ParamsError(f"{key}: {value!r} is not valid; give null or 3 numbers in {bounds}, one per "
                          f"RGB channel ({field.doc})")
    return [float(v) for v in value]


def _check_range(key: str, field: Field, value: Any) -> list[float]:
    low = (lambda v: v > field.min) if field.min_exclusive else (lambda v: v >= field.min)
    within = lambda v: _type_ok("float", v) and low(v) and (field.max is None or v <= field.max)
    if not (isinstance(value, list) and len(value) == 2 and all(within(v) for v in value) and value[0] <= value[1]):
        if field.max is None:
            bounds = f"{'above' if field.min_exclusive else 'at least'} {field.min:g}"
        else:
            bounds = f"in {'(' if field.min_exclusive else '['}{field.min:g}, {field.max:g}]"
        raise ParamsError(f"{key}: {value!r} is not valid; give [low, high] with low <= high, both {bounds} ({field.doc})")
    return [float(v) for v in value]


def _validate(schema: dict, raw: Any, prefix: str) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix or 'params.yaml'}: expected a mapping of keys, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(schema), n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ParamsError(f"{prefix}{key}: unknown key{hint}; valid keys here: {', '.join(schema)}")
    out = Params(prefix=prefix)
    for name, spec in schema.items():
        key = f"{prefix}{name}"
        if isinstance(spec, dict):
            out[name] = _validate(spec, raw.get(name), key + ".")
        else:
            out[name] = _check(key, spec, raw[name] if name in raw else spec.default)
    return out


def _cross_checks(p: Params) -> None:
    if p.data.val_fraction + p.data.test_fraction >= 1.0:
        raise ParamsError(
            f"data.val_fraction + data.test_fraction = {p.data.val_fraction + p.data.test_fraction:g}; "
            "they must leave some images for training (sum below 1)")
    if p.pretrained.source == "train" and p.data.classes is not None:
        _check_source_target_disjoint(p)
    if p.pretrained.source == "train" and p.data.classes is None:
        raise ParamsError("data.classes: null means every class, which overlaps pretrained.train.classes; "
                          "list the target classes (disjoint from the source task)")
    if p.pretrained.source == "url" and not (p.pretrained.url and p.pretrained.sha256):
        raise ParamsError("pretrained.url and pretrained.sha256: both are required when pretrained.source is url "
                          "(the checksum is what makes a download from a stranger safe to use)")
    if p.pretrained.sha256 and (len(p.pretrained.sha256) != 64
                                or any(c not in "0123456789abcdef" for c in p.pretrained.sha256.lower())):
        raise ParamsError(f"pretrained.sha256: {p.pretrained.sha256!r} is not a 64-character hex digest")
    if p.finetune.warmup_epochs >= p.finetune.epochs:
        raise ParamsError(f"finetune.warmup_epochs: {p.finetune.warmup_epochs} leaves none of the {p.finetune.epochs} "
                          "finetune.epochs to the schedule; make it smaller than finetune.epochs")
    _check_csv(p.data)
    _check_arch(p.backbone.arch)
    timm_arch = p.backbone.arch.startswith(TIMM_PREFIX)
    if p.pretrained.source == "torchvision" and timm_arch:
        raise ParamsError(f"pretrained.source: torchvision has no weights for {p.backbone.arch}; use pretrained.source: timm")
    if p.pretrained.source == "timm" and not timm_arch:
        raise ParamsError(f"pretrained.source: timm needs a timm backbone.arch (timm/<name>), not {p.backbone.arch!r}; "
                          "use pretrained.source: torchvision")
    if p.backbone.arch == "inception_v3" and p.data.image_size < 75:
        raise ParamsError(f"data.image_size: {p.data.image_size} is too small for inception_v3 (needs at least 75)")
    if p.backbone.arch.startswith("vit_") and p.data.image_size % int(p.backbone.arch[-2:]) != 0:
        raise ParamsError(f"data.image_size: {p.data.image_size} must be a multiple of the patch size of {p.backbone.arch}")


def _check_csv(d: Params) -> None:
    """The csv keys, whatever data.source is: a bad value stays bad when the source changes."""
    if d.delimiter not in ("auto", "tab") and (len(d.delimiter) != 1 or d.delimiter in '"\r\n' or d.delimiter.isalnum()):
        raise ParamsError(f"data.delimiter: {d.delimiter!r} is not valid; give auto, tab, or one character such as , ; |")
    base = os.path.abspath(d.root)
    inside = os.path.relpath(os.path.normpath(os.path.join(base, d.csv)), base)
    if not d.csv or inside == "." or inside.startswith(".." + os.sep) or inside == "..":
        raise ParamsError(f"data.csv: {d.csv!r} is not a file inside data.root ({d.root}); give its path relative to "
                          "data.root, so that prepare's dependency on data.root covers it")
    columns = {"data.path_column": d.path_column, "data.label_column": d.label_column, "data.split_column": d.split_column}
    for key, name in columns.items():
        if name is not None and not name.strip():
            raise ParamsError(f"{key}: empty; give the column's name as the CSV's header spells it")
    named = [(key, name) for key, name in columns.items() if name is not None]
    for i, (key, name) in enumerate(named):
        for other, same in named[i + 1:]:
            if name == same:
                raise ParamsError(f"{key} and {other} both name the column {name!r}; each must be another column")


def _check_arch(arch: str) -> None:
    """A torchvision architecture from ARCHS, or timm/<a model timm knows>; otherwise close matches."""
    if arch.startswith(TIMM_PREFIX):
        import timm  # only for timm archs (its import takes seconds)

        name = arch[len(TIMM_PREFIX):]
        if timm.is_model(name):
            return
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm/' + c for c in close)}?" if close else "; timm.list_models() lists them"
        raise ParamsError(f"backbone.arch: {name!r} is not a timm model{hint}")
    if arch in ARCHS:
        return
    raise ParamsError(f"backbone.arch: {arch!r} is not valid; choose one of: {', '.join(ARCHS)}, "
                      "or timm/<model name> for any timm model")


def _check_source_target_disjoint(p: Params) -> None:
    """The source task and the target task must not share a class, compared as resolved classes
    (index 0 and "T-shirt/top" are the same Fashion-MNIST class), not as spellings."""
    from transfer import data  # here: only this check needs the dataset's class list

    try:
        available = data.class_names(p.data.source, p.data.root, data.CsvSpec.from_params(p.data))
    except data.DataError:
        return  # data.root is unusable; prepare says so with the reason
    try:
        source = data.resolve_classes(p.pretrained.train.classes, available, "pretrained.train.classes")
        target = data.resolve_classes(p.data.classes, available, "data.classes")
    except data.DataError as e:
        raise ParamsError(str(e)) from None
    overlap = [c for c in target if c in source]
    if overlap:
        raise ParamsError(
            f"pretrained.train.classes and data.classes overlap on {overlap}; the source task must be disjoint "
            "from the target task, or the 'pretrained' backbone has already seen the test classes")


def validate(raw: Any) -> Params:
    """Validate a params mapping (as read from YAML); return it with defaults filled in."""
    global _reads
    recording, _reads = _reads, None  # validation reads every key; only what stages use counts as a read
    try:
        params = _validate(SCHEMA, raw, "")
        _cross_checks(params)
    finally:
        _reads = recording
    return params


def load_params(path: str | Path = PARAMS) -> Params:
    """Read and validate params.yaml; raise ParamsError naming the bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the project root or pass the params file") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    return validate(raw)


def defaults() -> dict:
    """The full default params mapping (what params.yaml holds when nothing is changed)."""
    return validate({"data": {"classes": [5, 6, 7, 8, 9]}}).to_dict()
