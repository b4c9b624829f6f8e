"""The preprocessing a backbone's weights expect, resolved in one place.

A photo becomes network input the way timm's and torchvision's eval transforms do it: the shorter
side resized to resize_size = round(image_size / crop_pct) with the weights' filter, the centre
image_size x image_size square cropped, then (x / 255 - mean) / std. Each value comes from the
weights' own recipe (timm's pretrained_cfg through timm.data.resolve_data_config; a torchvision
weights enum's transforms()) unless params.yaml overrides it, and `origin` says which. Weights from
a file, a URL, the source task or none carry no recipe: the architecture's default weights' recipe
is the convention then.

prepare and the source task decode with the spec (transfer.data), pretrain records it in
backbone.json, convert in model.json, and predict applies what model.json says. No torch at import:
predict --onnx reads a Spec where torch is not installed; timm or torchvision are imported only to
resolve a spec for an arch of theirs (timm's import takes seconds).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transfer.cli import UserError
from transfer.params import INTERPOLATIONS, TIMM_PREFIX, ParamsError

PIXEL_KEYS = ("image_size", "resize_size", "crop_pct", "interpolation")  # what decoding depends on


@dataclass(frozen=True)
class Spec:
    image_size: int  # the square side the network sees
    crop_pct: float  # image_size / resize_size: the share of the resized shorter side kept by the centre crop
    interpolation: str  # one of INTERPOLATIONS
    mean: tuple[float, ...]
    std: tuple[float, ...]
    origin: dict = field(default_factory=dict, compare=False)  # key -> "weights: ..." or "params: ..."

    @property
    def resize_size(self) -> int:
        # round, where timm floors: crop_pct taken from torchvision's sizes (299 / 342) does not invert
        # exactly in floating point, and floor would make 341.99999 a 341 px resize.
        return round(self.image_size / self.crop_pct)

    def to_dict(self) -> dict:
        return dict(image_size=self.image_size, resize_size=self.resize_size, crop_pct=self.crop_pct,
                    interpolation=self.interpolation, mean=list(self.mean), std=list(self.std), origin=dict(self.origin))

    def pixels(self) -> dict:
        """The part of the spec that decoding depends on (prepare's record), with its origins."""
        return {**{k: getattr(self, k) for k in PIXEL_KEYS},
                "origin": {k: v for k, v in self.origin.items() if k in PIXEL_KEYS}}

    @classmethod
    def from_dict(cls, d: dict | None, where: str) -> "Spec":
        """The spec a model.json or backbone.json records; anything missing or inconsistent is an error
        naming the file, so a model is never run with preprocessing other than its own."""
        keys = ("image_size", "resize_size", "crop_pct", "interpolation", "mean", "std")
        missing = [k for k in keys if k not in (d or {})]
        if missing:
            raise UserError(f"{where}: the preprocessing record lacks {', '.join(missing)}; it was written by an older "
                            "version: re-run `dvc repro`")
        if d["interpolation"] not in INTERPOLATIONS:
            raise UserError(f"{where}: interpolation {d['interpolation']!r} is not one of {', '.join(INTERPOLATIONS)}")
        spec = cls(image_size=int(d["image_size"]), crop_pct=float(d["crop_pct"]), interpolation=d["interpolation"],
                   mean=tuple(map(float, d["mean"])), std=tuple(map(float, d["std"])), origin=dict(d.get("origin", {})))
        if spec.resize_size != d["resize_size"]:
            raise UserError(f"{where}: resize_size {d['resize_size']} is not round(image_size / crop_pct) = "
                            f"{spec.resize_size}; the file was edited by hand?")
        return spec


def resolve_spec(*, arch: str, pretrained_source: str, weights: str, image_size: int, mean: list | None = None,
                 std: list | None = None, interpolation: str | None = None, crop_pct: float | None = None) -> Spec:
    """The spec for backbone.arch with weights from pretrained_source (pretrained.weights names them for
    torchvision and timm), at image_size; an override that is not None wins over the weights' value.
    Nothing is downloaded or built: the recipes are the libraries' metadata."""
    own = pretrained_source == ("timm" if arch.startswith(TIMM_PREFIX) else "torchvision")
    name = weights if own else "DEFAULT"
    if arch.startswith(TIMM_PREFIX):
        base, recipe = _timm_recipe(arch[len(TIMM_PREFIX):], name)
    else:
        base, recipe = _torchvision_recipe(arch, name, own=own)
    if not own:
        note = f" (the arch's default weights: pretrained.source {pretrained_source} has no recipe)"
        recipe = {k: v + note for k, v in recipe.items()}
    values, origin = {}, {"image_size": "params: data.image_size", "resize_size": "round(image_size / crop_pct)"}
    for key, override, param in (("interpolation", interpolation, "data.interpolation"), ("crop_pct", crop_pct, "data.crop_pct"),
                                 ("mean", mean, "pretrained.mean"), ("std", std, "pretrained.std")):
        values[key] = base[key] if override is None else override
        origin[key] = f"weights: {recipe[key]}" if override is None else f"params: {param}"
    if values["interpolation"] not in INTERPOLATIONS:
        raise UserError(f"{arch}: its weights' interpolation {values['interpolation']!r} has no PIL filter here; set "
                        f"data.interpolation to one of {', '.join(INTERPOLATIONS)}")
    return Spec(image_size=image_size, crop_pct=float(values["crop_pct"]), interpolation=values["interpolation"],
                mean=tuple(map(float, values["mean"])), std=tuple(map(float, values["std"])), origin=origin)


def _timm_recipe(name: str, tag: str) -> tuple[dict, dict]:
    """timm's eval data config for the model (with a weights tag, that tag's pretrained_cfg), and
    where each value came from."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    full = name if tag == "DEFAULT" else f"{name}.{tag}"
    try:
        cfg = get_pretrained_cfg(full)
    except RuntimeError as e:  # an unknown tag
        raise ParamsError(f"pretrained.weights: {tag!r}: {e}; timm.list_pretrained('{name}*') lists the tags") from None
    if cfg is None:  # a model without registered weights: timm's own defaults
        config, recipe = resolve_data_config(args={"in_chans": 3}), f"timm's defaults ({name} has no pretrained_cfg)"
    else:
        config, recipe = resolve_data_config(pretrained_cfg=cfg.to_dict()), f"timm pretrained_cfg of {name}.{cfg.tag}"
    return config, dict.fromkeys(("interpolation", "crop_pct", "mean", "std"), recipe)


def torchvision_weights(arch: str, name: str):
    """The torchvision weights enum member named by pretrained.weights (DEFAULT included)."""
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum[name]
    except KeyError:
        valid = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise ParamsError(f"pretrained.weights: {name!r} is not a weights name of {arch}; choose one of: {valid}") from None


def _torchvision_recipe(arch: str, name: str, own: bool) -> tuple[dict, dict]:
    """The weights' own eval transform, transforms() (resize_size, crop_size, interpolation, mean, std),
    and where each value came from."""
    w = torchvision_weights(arch, name)
    tf = w.transforms()
    base = dict(interpolation=tf.interpolation.value, crop_pct=tf.crop_size[0] / tf.resize_size[0],
                mean=tuple(tf.mean), std=tuple(tf.std))
    recipe = dict.fromkeys(base, f"torchvision {type(w).__name__}.{w.name}.transforms()")
    if arch == "inception_v3" and own:
        # torchvision's inception weights expect transform_input, i.e. inputs scaled to [-1, 1]; our
        # backbone is built without it, so the normalisation does that scaling.
        base.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        recipe.update(mean=f"torchvision {type(w).__name__}.{w.name} (transform_input: inputs in [-1, 1])",
                      std=f"torchvision {type(w).__name__}.{w.name} (transform_input: inputs in [-1, 1])")
    return base, recipe
