"""Training-time augmentation of uint8 (B, C, H, W) batches: per image, on the batch's device, seeded.

Every random number comes from the caller's torch.Generator (fit's epoch generator, which every rank shares
and the resumable checkpoint holds). torchvision's auto-augment draws from torch's global generator and timm's
Mixup from numpy's: each runs under a seed drawn from the caller's generator, inside a saved-and-restored
global state, so the global generators are left as they were and a run is reproduced exactly.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from transfer.params import AUGMENTS, AUTO_AUGMENTS

RESIZED_CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params tries this many boxes before its fallback


def augment(batch: torch.Tensor, *, generator: torch.Generator, pad: int = 0, hflip: bool = False,
            crop: str = "pad_crop", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), auto_augment: str = "none") -> torch.Tensor:
    """The training augmentation of a uint8 batch, each image its own draw, on the batch's device:

    - `crop`: pad_crop, a random H x W window of the image zero-padded by `pad` (nothing when pad is 0);
      resized_crop, torchvision's RandomResizedCrop (area fraction in `scale`, aspect ratio in `ratio`)
      resized back to H x W; none;
    - `hflip`: a horizontal flip with probability 1/2;
    - `auto_augment`: torchvision's TrivialAugmentWide (trivial) or RandAugment (randaugment), or none.
    """
    if crop == "pad_crop":
        if pad:
            batch = pad_crop(batch, pad, generator)
    elif crop == "resized_crop":
        batch = resized_crop(batch, crop_boxes(len(batch), *batch.shape[-2:], scale=scale, ratio=ratio,
                                               generator=generator))
    elif crop != "none":
        raise ValueError(f"finetune.augment: {crop!r} is not valid; choose one of: {', '.join(AUGMENTS)}")
    if hflip:
        flip = (torch.rand(len(batch), generator=generator) < 0.5).to(batch.device)
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    if auto_augment != "none":
        batch = auto_augment_batch(batch, auto_augment, generator)
    return batch


def pad_crop(batch: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Per image, a random H x W window of the image zero-padded by `pad` on every side."""
    b, c, h, w = batch.shape
    padded = F.pad(batch, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(batch.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(batch.device)
    rows = (oy[:, None] + torch.arange(h, device=batch.device))[:, None, :, None]  # (B,1,H,1)
    cols = (ox[:, None] + torch.arange(w, device=batch.device))[:, None, None, :]  # (B,1,1,W)
    bidx = torch.arange(b, device=batch.device)[:, None, None, None]
    cidx = torch.arange(c, device=batch.device)[None, :, None, None]
    return padded[bidx, cidx, rows, cols]


def crop_boxes(n: int, height: int, width: int, *, scale, ratio, generator: torch.Generator) -> torch.Tensor:
    """(n, 4) int64 boxes (top, left, h, w), one per image, by torchvision's RandomResizedCrop.get_params rule:
    up to 10 tries of an area fraction uniform in `scale` and an aspect ratio (w / h) log-uniform in `ratio`,
    rounded to whole pixels; the first try that fits the image is placed uniformly at random in it, and when
    none fits, the centred crop of the whole image clamped to `ratio`. All tries of all images are drawn at
    once, so how many numbers a batch takes from `generator` never depends on what was drawn."""
    u = torch.rand(n, RESIZED_CROP_TRIES, 2, generator=generator, dtype=torch.float64)
    target = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])
    w = torch.sqrt(target * aspect).round().long()  # half to even, as Python's round in torchvision
    h = torch.sqrt(target / aspect).round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # argmax returns the first of equal maxima
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    # torchvision's fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
    if width / height < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    at = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.where(found, (at[:, 0] * (height - h + 1)).floor().long(), (height - fallback_h) // 2)
    left = torch.where(found, (at[:, 1] * (width - w + 1)).floor().long(), (width - fallback_w) // 2)
    return torch.stack([top, left, h, w], 1)


def resized_crop(batch: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box (top, left, h, w) cut out and resized (bilinear) to the image's own size, as uint8.

    Per image through torchvision's resized_crop (torch's native uint8 resize on the CPU), not one batched
    torchvision.ops.roi_align over all boxes (on the batch as float, rounded back). Measured on a 32 x 3 x 224 x
    224 uint8 batch on a 2-core EPYC shared with other jobs, 50 batches each, interleaved, fastest / median:
    1 thread, 13 / 22 ms per image against 48 / 97 ms batched; 2 threads (under a load of 5), 47 / 168 ms
    against 101 / 152 ms. roi_align's bilinear taps also reach outside the box at its edges (11 grey levels off
    torchvision's crop there). The boxes never exceed the image, so every resize enlarges and antialiasing
    changes nothing."""
    from torchvision.transforms.v2.functional import resized_crop as tv_resized_crop

    size = list(batch.shape[-2:])
    return torch.stack([tv_resized_crop(image, top, left, h, w, size, antialias=True)
                        for image, (top, left, h, w) in zip(batch, boxes.tolist())])


def auto_augment_batch(batch: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """torchvision's TrivialAugmentWide (kind trivial: one op of random strength) or RandAugment (kind
    randaugment: two ops at magnitude 9 of 31), each image its own ops, on uint8 images, on their device."""
    from torchvision.transforms import v2

    if kind == "trivial":
        transform = v2.TrivialAugmentWide()
    elif kind == "randaugment":
        transform = v2.RandAugment()
    else:
        raise ValueError(f"finetune.auto_augment: {kind!r} is not valid; choose one of: {', '.join(AUTO_AUGMENTS)}")
    with torch_seeded(draw_seed(generator)):
        return torch.stack([transform(image) for image in batch])


def make_mixup(*, mixup: float, cutmix: float, label_smoothing: float, num_classes: int):
    """timm's Mixup in its batch mode (one draw per batch; each image mixed with its mirror in the batch,
    image i with image B-1-i), mixup with Beta(`mixup`, `mixup`), cutmix with Beta(`cutmix`, `cutmix`) and a
    box whose clipped area sets the weight; with both alphas above 0, each batch takes one of the two at
    random. The targets carry `label_smoothing`. None when both alphas are 0."""
    if not (mixup or cutmix):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=0.5, mode="batch", correct_lam=True,
                 label_smoothing=label_smoothing, num_classes=num_classes)


def mix_batch(x: torch.Tensor, labels: torch.Tensor, mixer, *, generator: torch.Generator) -> torch.Tensor:
    """Mix the float batch `x` in place with `mixer` (make_mixup) and return the soft targets (B, classes),
    whose rows sum to 1. Mixing is linear, so mixing normalised images is mixing their pixels.

    This is Mixup.__call__ in batch mode without its even-batch assertion, which only its pair and elem
    modes need: fit's batches may be odd, and then the middle image mixes with itself, i.e. stays as it is,
    with its own label."""
    from timm.data.mixup import mixup_target

    with numpy_seeded(draw_seed(generator)):
        lam = mixer._mix_batch(x)
    return mixup_target(labels, mixer.num_classes, lam, mixer.label_smoothing)


def draw_seed(generator: torch.Generator) -> int:
    """A seed for numpy's or torch's global generator, drawn from ours."""
    return int(torch.randint(0, 2 ** 32, (1,), generator=generator))


@contextlib.contextmanager
def torch_seeded(seed: int) -> Iterator[None]:
    """torch's global CPU generator seeded with `seed` inside the block and restored after it. Only the CPU's:
    torch.manual_seed would reseed every GPU's generator too, which fork_rng(devices=[]) does not restore."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


@contextlib.contextmanager
def numpy_seeded(seed: int) -> Iterator[None]:
    """numpy's global generator seeded with `seed` inside the block and restored after it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)
