"""finetune: adapt the backbone by `strategy`; write the final classifier.

- feature_extract: frozen backbone + the trained head, no further training;
- finetune: backbone + trained head, all layers trained, backbone lr = lr * backbone_lr_factor, or
  per block lr * layer_decay^(depth from the head) when finetune.layer_decay is set;
- partial: as finetune with the first finetune.freeze_blocks backbone blocks frozen;
- scratch: same architecture, random weights, everything trained at lr.

The recipe (training.fit): finetune.optimizer, warmup_epochs, label_smoothing, clip_grad, accumulate,
class_weights, sampler, and with finetune.ema the weights' moving average is what is validated and saved.
Augmentation (transfer/augment.py): finetune.augment (pad_crop by augment_pad, or resized_crop in crop_scale
and crop_ratio), augment_hflip, auto_augment, and timm's mixup / cutmix.
With finetune.lr: auto, fastai's range test (transfer.lr_find) chooses lr first, on a copy of the model.

Outputs: models/model/model.safetensors + model.json (construction arguments, classes,
normalisation, the backbone's preprocessing spec, the sha256 of the backbone it started from) and
val_logits.safetensors (the kept weights' logits over the val split, as validation computed them:
evaluate fits the temperature on them without another pass of the model over val);
metrics/finetune.json (with lr: auto, lr_chosen);
curves in metrics/curves/finetune; the range test's curve (lr, smoothed loss) in
metrics/finetune/lr_find.json, an empty list unless lr is auto. A resumable training state is kept in
models/checkpoints/finetune.pt.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from transfer import calibration, cli, lr_find, models, paths, storage, tracking, training
from transfer.io import load_tensors, read_json, save_tensors, sha256_file, write_json
from transfer.params import Params, load_params


def build_model(*, strategy: str, backbone_dir: Path, head_dir: Path, freeze_blocks: int, seed: int, bn_frozen: bool = True):
    """The starting classifier for a strategy, and its description (model.json)."""
    head_desc = read_json(head_dir / "head.json")
    info = read_json(backbone_dir / "backbone.json")
    if strategy == "scratch":
        torch.manual_seed(seed)
        backbone, _ = models.build_backbone(info["arch"], info["image_size"])
    else:
        backbone, info = models.load_backbone(backbone_dir)
    head = models.make_head(head_desc["kind"], head_desc["in_features"], head_desc["num_classes"],
                            head_desc["hidden"], head_desc["dropout"])
    if strategy != "scratch":
        state, _ = load_tensors(head_dir / "head.safetensors")
        head.load_state_dict(state)
    model = models.Classifier(backbone, head)
    model.bn_frozen = bn_frozen and strategy != "scratch"
    if strategy == "partial":
        models.freeze_first_blocks(model, info["arch"], freeze_blocks)
    if strategy == "feature_extract":
        models.freeze_first_blocks(model, info["arch"], info["num_blocks"])
    meta = dict(arch=info["arch"], image_size=info["image_size"], num_classes=head_desc["num_classes"],
                classes=head_desc["classes"], mean=info["mean"], std=info["std"], preprocess=info["preprocess"],
                strategy=strategy, backbone_sha256=None if strategy == "scratch" else info["sha256"],
                head=dict(kind=head_desc["kind"], hidden=head_desc["hidden"], dropout=head_desc["dropout"]))
    return model, meta


def param_groups(model: models.Classifier, *, strategy: str, lr: float, backbone_lr_factor: float,
                 layer_decay: float | None = None, arch: str = "") -> list[dict]:
    """Per-group learning rates: the pretrained backbone moves slower than the new head. With
    layer_decay, each backbone block gets lr * layer_decay^(its depth from the head), the BEiT/timm
    rule (the last block decay^1, the first decay^n). Frozen parameters join no group, and the lr is
    set on each group itself, so any torch scheduler scales it (timm's lr_scale needs timm's own)."""
    head = {"params": list(model.head.parameters()), "lr": lr, "name": "head"}
    if strategy == "scratch" or layer_decay is None:
        backbone_lr = lr if strategy == "scratch" else lr * backbone_lr_factor
        groups = [{"params": [q for q in model.backbone.parameters() if q.requires_grad], "lr": backbone_lr,
                   "name": "backbone"}, head]
    else:
        blocks = models.block_parameter_groups(model.backbone, arch)
        groups = [{"params": [q for q in params if q.requires_grad], "lr": lr * layer_decay ** (len(blocks) - i),
                   "name": f"block{i}"} for i, params in enumerate(blocks)] + [head]
    return [g for g in groups if g["params"]]


def run_finetune(*, p: Params, prepared_dir: Path, embeddings_dir: Path, backbone_dir: Path, head_dir: Path, out_dir: Path,
                 checkpoint: Path, metrics_path: Path, curves_dir: Path, rank: int = 0,
                 timing_path: Path | None = None, lr_find_path: Path | None = None) -> dict:
    """Build the model for p.strategy, train it if the strategy trains, keep the best-val weights.
    With finetune.lr: auto, the range test's curve goes to `lr_find_path` (else an empty list).
    Training time per epoch goes to `timing_path` (a log: it varies between identical runs)."""
    f = p.finetune
    device = training.pick_device(p.runtime.device)
    val, data_meta = storage.read_split(prepared_dir, "val")
    model, meta = build_model(strategy=p.strategy, backbone_dir=backbone_dir, head_dir=head_dir,
                              freeze_blocks=f.freeze_blocks, seed=p.seed, bn_frozen=f.bn_frozen)
    storage.check_classes(folder=prepared_dir, data_meta=data_meta, model_classes=meta["classes"],
                          model_file=head_dir / "head.json",
                          fix="re-run extract and train_head on this data (dvc repro finetune)")
    mean, std = meta["mean"], meta["std"]
    val_all, lr_chosen, lr_curve, val_logits = None, None, [], None
    if p.strategy == "feature_extract":
        # The backbone is frozen, so its val outputs are the embeddings train_head selected on: running it
        # over val again gave the same number (but for the embeddings' float16 rounding, which
        # train_head's val accuracy has too) at the cost of a backbone pass over 1,500 images.
        cached, _ = load_tensors(paths.split_file(embeddings_dir, "val"))
        with torch.inference_mode():
            val_logits = model.head.eval()(cached["embeddings"].float())
        history = [dict(epoch=0, val_acc=training.accuracy(val_logits, cached["labels"]))]
        best_state, best_epoch = model.state_dict(), 1
    else:
        # The checkpoint is the resume state: without resume it would be ~1 GB of writes per run for nothing.
        _, world = training.rank_and_world()
        fingerprint = _fingerprint(p, prepared_dir, backbone_dir, head_dir, device, world=world) if f.resume else ""
        train, _ = storage.read_split(prepared_dir, "train")
        compiled = training.compile_enabled(p.runtime.compile, device)
        weights = training.balanced_class_weights(train["labels"], meta["num_classes"]) if f.class_weights == "balanced" else None

        def groups(lr: float) -> list[dict]:
            return param_groups(model, strategy=p.strategy, lr=lr, backbone_lr_factor=f.backbone_lr_factor,
                                layer_decay=f.layer_decay, arch=meta["arch"])

        lr, find_seconds = f.lr, None
        if lr == "auto":
            start = time.perf_counter()
            lr, lr_curve = lr_find.find_finetune_lr(
                model, param_groups=groups(1.0), train_images=train["images"], train_labels=train["labels"],
                batch_size=f.batch_size, accumulate=f.accumulate, optimizer=f.optimizer, momentum=f.momentum,
                weight_decay=f.weight_decay, augment_pad=f.augment_pad, augment_hflip=f.augment_hflip,
                label_smoothing=f.label_smoothing, clip_grad=f.clip_grad, class_weights=weights, sampler=f.sampler,
                mean=mean, std=std, device=device, amp=p.runtime.amp, seed=p.seed, crop=f.augment,
                crop_scale=f.crop_scale, crop_ratio=f.crop_ratio, auto_augment=f.auto_augment, mixup=f.mixup,
                cutmix=f.cutmix, num_classes=meta["num_classes"])
            lr_chosen, find_seconds = lr, time.perf_counter() - start
            if rank == 0:
                print(f"finetune: lr auto -> {lr:.3g} (range test: {len(lr_curve)} steps, {find_seconds:.1f} s)")
        start = time.perf_counter()
        fitted = {}
        best_state, history, best_epoch = training.fit(
            model, train_images=train["images"], train_labels=train["labels"], val_images=val["images"],
            val_labels=val["labels"], param_groups=groups(lr), epochs=f.epochs, batch_size=f.batch_size,
            momentum=f.momentum, weight_decay=f.weight_decay,
            scheduler=f.scheduler, step_size=f.step_size, gamma=f.gamma, augment_pad=f.augment_pad,
            augment_hflip=f.augment_hflip, mean=mean, std=std, device=device, amp=p.runtime.amp, seed=p.seed,
            eval_batch_size=p.evaluate.batch_size, checkpoint=checkpoint if f.resume else None, resume=f.resume,
            fingerprint=fingerprint, eval_every=f.eval_every, val_subset=f.val_images, compile=compiled,
            optimizer=f.optimizer, warmup_epochs=f.warmup_epochs, label_smoothing=f.label_smoothing, clip_grad=f.clip_grad,
            accumulate=f.accumulate, ema_decay=f.ema_decay if f.ema else None, class_weights=weights,
            crop=f.augment, crop_scale=f.crop_scale, crop_ratio=f.crop_ratio, auto_augment=f.auto_augment,
            mixup=f.mixup, cutmix=f.cutmix, num_classes=meta["num_classes"],
            sampler=f.sampler, outputs=fitted)
        seconds = time.perf_counter() - start
        val_logits = fitted["val_logits"]
        if f.val_images is not None and f.val_images < len(val["labels"]):
            # A subset chose the epoch; the number reported is the whole split's, for the weights kept.
            model.load_state_dict(best_state)
            val_logits = training.predict(model, val["images"], mean=mean, std=std, batch_size=p.evaluate.batch_size,
                                          device=device, amp=p.runtime.amp)
            val_all = training.accuracy(val_logits, val["labels"])
        if timing_path is not None and rank == 0:
            timing = dict(epochs=f.epochs, train_images=len(train["labels"]), seconds=round(seconds, 3),
                          seconds_per_epoch=round(seconds / max(1, f.epochs), 3), device=str(device), compiled=compiled)
            if find_seconds is not None:
                timing["lr_find_seconds"] = round(find_seconds, 3)
            write_json(timing_path, timing)
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad) if p.strategy != "feature_extract" else 0
    metrics = dict(strategy=p.strategy, best_epoch=best_epoch, val_acc=history[best_epoch - 1]["val_acc"],
                   trainable_params=trainable, total_params=sum(q.numel() for q in model.parameters()))
    if val_all is not None:
        metrics.update(val_acc=val_all, val_acc_subset=history[best_epoch - 1]["val_acc"])
    if lr_chosen is not None:
        metrics.update(lr_chosen=lr_chosen)
    if rank == 0:  # under torchrun every rank holds the same weights; one writes them
        save_tensors(out_dir / "model.safetensors", best_state, meta=meta)
        write_json(out_dir / "model.json", meta)
        calibration.write_val_logits(out_dir, val_logits, val["labels"])
        write_json(metrics_path, metrics)
        tracking.log_history(curves_dir, history)
        if lr_find_path is not None:  # always written: dvc.yaml declares it
            write_json(lr_find_path, lr_find.as_json(lr_curve))
    return metrics


def _fingerprint(p: Params, prepared_dir: Path, backbone_dir: Path, head_dir: Path, device: torch.device, *,
                 world: int) -> str:
    """What a resumable checkpoint must match: every setting and input that shapes the training, so a
    resume never continues a run on other data, weights, settings, device or number of processes
    (`world`, runtime.nproc or torchrun's: the checkpoint holds one RNG state per rank, and the ranks'
    slices of every batch depend on it). The device by type: under torchrun rank r trains on cuda:r,
    and every rank must reach the same verdict on the one checkpoint."""
    parts = dict(strategy=p.strategy, finetune={k: v for k, v in p.finetune.items() if k != "resume"}, seed=p.seed,
                 amp=p.runtime.amp, deterministic=p.runtime.deterministic, device=device.type, world=world,
                 compile=training.compile_enabled(p.runtime.compile, device),
                 eval_batch_size=p.evaluate.batch_size,
                 data={str(f): sha256_file(f) for split in ("train", "val")
                       for f in (storage.images_file(prepared_dir, split), storage.labels_file(prepared_dir, split))},
                 backbone=sha256_file(backbone_dir / "backbone.safetensors"), head=sha256_file(head_dir / "head.safetensors"))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def main() -> None:
    p = load_params()
    training.launch(p.runtime.nproc, "stages.finetune")
    training.configure_runtime(threads=p.runtime.threads, deterministic=p.runtime.deterministic, seed=p.seed)
    rank, _ = training.init_distributed()
    try:
        metrics = run_finetune(p=p, prepared_dir=paths.PREPARED, embeddings_dir=paths.EMBEDDINGS, backbone_dir=paths.BACKBONE_DIR, head_dir=paths.HEAD_DIR,
                               out_dir=paths.MODEL_DIR, checkpoint=paths.CHECKPOINTS / "finetune.pt",
                               metrics_path=paths.METRICS / "finetune.json", curves_dir=paths.METRICS / "curves" / "finetune",
                               rank=rank, timing_path=paths.LOGS / "finetune_timing.json",
                               lr_find_path=paths.METRICS / "finetune" / "lr_find.json")
    finally:
        training.finish_distributed()
    if rank == 0:
        print(f"finetune: {metrics}")


if __name__ == "__main__":
    cli.run("finetune", main)
