"""The learning-rate range test behind finetune.lr: auto and train_head.lr: auto, by fastai's rules
(Learner.lr_find with its LRFinder callback, AvgSmoothLoss and the `valley` suggestion).

The base learning rate grows exponentially, step i of NUM_IT at START_LR * (END_LR / START_LR)^(i / NUM_IT),
one optimizer step per batch of the training split, cycling through it (a fresh draw per pass) when it has
fewer batches. Every parameter group keeps its ratio to the base (backbone_lr_factor, layer_decay), so the
base is what is chosen. Each step's training loss (before the step) is smoothed: an exponential moving average
with BETA, divided by 1 - BETA^(i + 1) so the first steps are not biased towards 0. The test stops once the
smoothed loss is above 4x its lowest so far. Of the curve, the first NUM_IT // 10 points and the last 5 are
left out, then `valley` picks a point in the longest stretch where the loss falls (suggest).

It runs on a copy of the model, under a forked random state: the training that follows starts from the same
weights and random numbers as one given the chosen lr by hand.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from transfer import cli, training
from transfer.augment import make_mixup, mix_batch
from transfer.feed import Feed

START_LR, END_LR, NUM_IT, BETA = 1e-7, 10.0, 100, 0.98  # fastai's lr_find defaults
DIVERGED = 4.0  # the test stops once the smoothed loss is above this many times its lowest


class LRFindError(cli.UserError):
    """The range test found no learning rate at which the training loss falls."""


def range_test(step: Callable[[], float], optimizer: torch.optim.Optimizer, *, start_lr: float = START_LR,
               end_lr: float = END_LR, num_it: int = NUM_IT, beta: float = BETA) -> list[dict]:
    """Run `step` (one training step at the optimizer's current learning rates; returns the step's loss)
    up to `num_it` times at exponentially growing learning rates; returns the curve, one {lr, loss} per
    step: the base lr and the smoothed loss. Each group's lr is its lr when called (a ratio to the base)
    times the base."""
    num_it = max(num_it, 6)  # fastai's minimum
    ratios = [g["lr"] for g in optimizer.param_groups]
    curve, average, lowest = [], 0.0, math.inf
    for i in range(num_it):
        lr = start_lr * (end_lr / start_lr) ** (i / num_it)
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        loss = step()
        average = loss + beta * (average - loss)  # torch.lerp(loss, average, beta), as AvgSmoothLoss
        smoothed = average / (1 - beta ** (i + 1))
        curve.append(dict(lr=lr, loss=smoothed))
        if math.isnan(smoothed) or smoothed == math.inf:
            break  # nothing after it counts (suggest); fastai would train on to num_it for nothing
        lowest = min(lowest, smoothed)
        if smoothed > DIVERGED * lowest:
            break
    return curve


def valley(losses: list[float]) -> tuple[int, int]:
    """fastai's `valley`: the longest strictly falling sequence of losses (not necessarily adjacent points;
    the first of the longest), and a point 1/3 + 1/6 into it counted from just before its start. Returns
    (that index, the sequence's length)."""
    falls: list[int] = []  # falls[i]: the longest strictly falling sequence that ends at point i
    for i, loss in enumerate(losses):
        falls.append(1 + max((falls[j] for j in range(i) if loss < losses[j]), default=0))
    if max(falls, default=0) < 2:
        return 0, max(falls, default=0)
    end = falls.index(max(falls))
    start = end - falls[end]  # one before the sequence's first point when it starts at point 0, as in fastai
    third = (end - start) / 3
    return start + int(third) + int(third / 2), falls[end]


def suggest(curve: list[dict], *, num_it: int = NUM_IT, key: str) -> float:
    """The learning rate `valley` picks on the curve, without its first num_it // 10 points and its last 5
    (after a NaN: the curve up to it, the last 5 of the full num_it still left out). A curve with no falling
    stretch is a LRFindError naming `key`, saying what was seen and what to do."""
    num_it = max(num_it, 6)
    losses = [row["loss"] for row in curve]
    end = min(len(curve) - 1, num_it - 5) if curve and math.isnan(losses[-1]) else len(curve) - 5
    kept = curve[num_it // 10:max(num_it // 10, end)]
    index, length = valley([row["loss"] for row in kept])
    if length >= 2:
        return float(kept[index]["lr"])
    last = curve[-1]
    if len(curve) < num_it:
        seen = (f"the smoothed training loss diverged (above {DIVERGED:g}x its lowest, or not finite) after "
                f"{len(curve)} of {num_it} steps, at lr {last['lr']:.2g}")
    else:
        seen = f"the smoothed training loss never fell between lr {curve[0]['lr']:.2g} and {last['lr']:.2g}"
    raise LRFindError(f"{key}: auto found no learning rate at which the training loss falls: {seen} (from "
                      f"{curve[0]['loss']:.4g} to {last['loss']:.4g}); set {key} to a number (the default is 0.01), "
                      "or check that the training labels match the images")


def as_json(curve: list[dict]) -> list[dict]:
    """The curve as a JSON file (a DVC plot) can hold it: a NaN or infinite loss as null."""
    return [dict(row, loss=row["loss"] if math.isfinite(row["loss"]) else None) for row in curve]


def _on_copy(model: nn.Module, clone: nn.Module, param_groups: list[dict]) -> list[dict]:
    """`param_groups` of `model` with each parameter replaced by the same-named one of `clone`."""
    names = {id(q): name for name, q in model.named_parameters()}
    theirs = dict(clone.named_parameters())
    return [dict(g, params=[theirs[names[id(q)]] for q in g["params"]]) for g in param_groups]


@contextlib.contextmanager
def _own_random_state(seed: int, device: torch.device) -> Iterator[None]:
    """The global generators (CPU and `device`'s) seeded for the block and restored after it."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def find_finetune_lr(model: nn.Module, *, param_groups: list[dict], train_images, train_labels: torch.Tensor,
                     batch_size: int, accumulate: int, optimizer: str, momentum: float, weight_decay: float,
                     augment_pad: int, augment_hflip: bool, label_smoothing: float, clip_grad: float | None,
                     class_weights: torch.Tensor | None, sampler: str, mean, std, device: torch.device, amp: bool,
                     seed: int, key: str = "finetune.lr", num_it: int = NUM_IT, start_lr: float = START_LR,
                     end_lr: float = END_LR, crop: str = "pad_crop", crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
                     auto_augment: str = "none", mixup: float = 0.0, cutmix: float = 0.0,
                     num_classes: int | None = None) -> tuple[float, list[dict]]:
    """The range test for training.fit with these settings: the same optimizer over `param_groups` (built
    on `model` at base lr 1, so each group's lr is its ratio to the base), batches of batch_size * accumulate
    drawn by `sampler` and augmented as fit draws them, the same loss (label smoothing, class weights) and
    clipping. Returns (the suggested base lr, the curve). Under torchrun every rank runs the same test on the
    whole batch, in micro-batches of one rank's share (its memory), and all take rank 0's suggestion."""
    _, world = training.rank_and_world()
    clone = copy.deepcopy(model)
    groups = _on_copy(model, clone, param_groups)
    fmt = training.training_memory_format(device)
    clone.to(device, memory_format=fmt).train()
    opt = training.make_optimizer(clone, groups, name=optimizer, momentum=momentum, weight_decay=weight_decay)
    trained = [q for g in opt.param_groups for q in g["params"]]
    weight = class_weights.to(device) if class_weights is not None else None
    labels = train_labels.to(device)
    mixer = make_mixup(mixup=mixup, cutmix=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)
    gen = torch.Generator().manual_seed(seed)  # draws the batches and their augmentation, as fit's does
    with _own_random_state(seed, device), contextlib.closing(
            _batches(train_images, train_labels, batch_size * accumulate, sampler, gen, device)) as batches:
        def step() -> float:
            batch, idx = next(batches)
            batch = training.augment(batch, pad=augment_pad, hflip=augment_hflip, crop=crop, scale=crop_scale,
                                     ratio=crop_ratio, auto_augment=auto_augment, generator=gen)
            y = labels[idx.to(device)]
            targets = None
            if mixer is not None:  # as fit: the whole step's batch, normalised, mixed with its mirror
                batch = training.to_input(batch, mean=mean, std=std, device=device, memory_format=fmt)
                targets = mix_batch(batch, y, mixer, generator=gen)
            norm = training.loss_norm(y, weight, targets)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for part in torch.tensor_split(torch.arange(len(idx), device=device), accumulate * world):
                if not len(part):
                    continue
                if targets is None:
                    x = training.to_input(batch[part], mean=mean, std=std, device=device, memory_format=fmt)
                else:
                    x = batch[part].contiguous(memory_format=fmt)
                with training.autocast(device, amp, training=True):
                    if targets is None:
                        loss = F.cross_entropy(clone(x).float(), y[part], weight=weight, label_smoothing=label_smoothing,
                                               reduction="sum") / norm
                    else:
                        loss = training.soft_target_loss(clone(x).float(), targets[part], weight) / norm
                loss.backward()
                total += float(loss.detach())
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(trained, clip_grad)
            opt.step()
            return total

        curve = range_test(step, opt, start_lr=start_lr, end_lr=end_lr, num_it=num_it)
    del clone, opt
    return _rank0(suggest(curve, num_it=num_it, key=key), world), curve


def _batches(images, labels: torch.Tensor, batch_size: int, sampler: str, generator: torch.Generator,
             device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images on `device`, their indices) for ever: pass after pass of epoch_batches."""
    while True:
        order = training.epoch_batches(labels, batch_size, generator, sampler)
        with contextlib.closing(iter(Feed(images, order, device=device))) as feed:
            yield from zip(feed, order)


def _rank0(value: float, world: int) -> float:
    """Rank 0's value on every rank (a GPU's arithmetic may differ in the last bits between ranks)."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def find_head_lr(head: nn.Module, *, train_x: torch.Tensor, train_y: torch.Tensor, weight_decay: float,
                 batch_size: int, class_weights: torch.Tensor | None, sampler: str, seed: int, device: torch.device,
                 key: str = "train_head.lr", num_it: int = NUM_IT, start_lr: float = START_LR,
                 end_lr: float = END_LR) -> tuple[float, list[dict]]:
    """The range test for training.train_head: AdamW with this weight decay over a copy of `head`, batches
    of the cached embeddings drawn by `sampler`, the class-weighted loss. Returns (the suggested lr, the curve)."""
    clone = copy.deepcopy(head).to(device).train()
    opt = torch.optim.AdamW(clone.parameters(), lr=1.0, weight_decay=weight_decay)
    x, y = train_x.to(device).float(), train_y.to(device)
    weight = class_weights.to(device) if class_weights is not None else None
    with _own_random_state(seed, device):
        gen = torch.Generator().manual_seed(seed)
        order: list[torch.Tensor] = []

        def step() -> float:
            if not order:
                order.extend(training.epoch_batches(train_y, batch_size, gen, sampler))
            idx = order.pop(0).to(device)
            loss = F.cross_entropy(clone(x[idx]), y[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())

        curve = range_test(step, opt, start_lr=start_lr, end_lr=end_lr, num_it=num_it)
    return suggest(curve, num_it=num_it, key=key), curve
