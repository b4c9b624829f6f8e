"""pretrain: produce backbone weights for backbone.arch from pretrained.source.

Outputs (models/backbone/): backbone.safetensors, backbone.json (arch, source, sha256, feature
dimension, normalisation, input size, blocks, the preprocessing spec with where each value came
from), load_report.json (loaded / skipped / missing keys); metrics/pretrain.json.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from transfer import cli, data, models, paths, preprocess, storage, training
from transfer.data import DataError
from transfer.io import WeightsError, download, load_state_dict, load_tensors, load_weights, save_tensors, sha256_file, torchvision_hash_prefix, write_json
from transfer.models import ModelError
from transfer.params import Params, ParamsError, load_params

# Where a company mirror of download.pytorch.org can be named; the file name stays torchvision's.
MIRROR_ENV = "TRANSFER_WEIGHTS_MIRROR"


def fetch_torchvision(*, arch: str, weights: str, cache_dir: Path) -> tuple[Path, dict]:
    """Download (or reuse from the cache) the official weights, verifying the checksum torchvision's
    file name carries. Returns (file, details)."""
    w = preprocess.torchvision_weights(arch, weights)
    url = w.url
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        url = mirror.rstrip("/") + "/" + w.url.rsplit("/", 1)[-1]
    dest = cache_dir / w.url.rsplit("/", 1)[-1]
    path = download(url, dest, sha256_prefix=torchvision_hash_prefix(w.url))
    return path, dict(weights=w.name if hasattr(w, "name") else weights, url=url)


# The order files of a source class are decoded in: a second keyed hash, independent of the split key.
# Decoding in split-key order would bias the val rule (split_key < 0.1): the first 1,500 of a
# Fashion-MNIST class's 7,000 files are the keys below about 0.21, and 44-48% of them went to val
# (classes 0-4, split_seed 0), against 9-11% with this order.
SOURCE_ORDER_SALT = "source-task order\0"


@contextlib.contextmanager
def source_task(*, source: str, root: str, classes: list, spec: preprocess.Spec, per_class: int, split_seed: int,
                max_rejected_fraction: float, scratch: Path, workers: int = 1,
                csv_spec: data.CsvSpec | None = None) -> Iterator[dict]:
    """The source task: `per_class` readable images of each of `classes`, split into train and val, as
    prepared splits in `scratch` (read a batch at a time, like prepare's; removed on exit), decoded
    with the same spec as prepare's, so the backbone learns on the pixels the target task will give it.

    Like prepare's splits, which files are used and where they go depend on the files and
    data.split_seed alone, never on the training seed: files are decoded in the order of a keyed hash
    until each class has `per_class` readable images (so per_class 500 uses the first 500 of
    per_class 1500's files, and an unreadable file is replaced, not silently missing); val is those
    with split_key < 0.1, at least one per class. Rejections count against the same
    data.max_rejected_fraction as in prepare, and a class with too few readable images is an error.
    `csv_spec` says where a csv source's labels are; as with split folders, the source task draws from
    every usable row of its classes, whatever their split."""
    collected = data.collect(source, root, csv_spec)
    names = data.resolve_classes(classes, collected.classes, "pretrained.train.classes")
    pools = [[i for i in collected.items if i.label == name] for name in names]
    rows, labels, keys, rejected, tried = [], [], [], [], 0
    image_size = spec.image_size
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        # Every candidate has its own row in the (sparse) spool, so decoding ahead of what a class needs
        # never overwrites a row another class keeps.
        with storage.Spool(scratch / "decoded.rows.tmp", (3, image_size, image_size), sum(map(len, pools))) as spool:
            base = 0
            bar = cli.progress(None, desc="decode source task", total=per_class * len(names), unit="img")
            for label, (name, pool) in enumerate(zip(names, pools)):
                order = data.split_keys(pool, split_seed, salt=SOURCE_ORDER_SALT)
                candidates = [pool[k] for k in data.in_key_order(np.arange(len(pool)), order)]
                got = 0
                with contextlib.closing(data.decode_stream(candidates, spec, workers, spool, first_row=base)) as stream:
                    for k, (item, (_, reason)) in enumerate(zip(candidates, stream)):
                        if got == per_class:
                            break
                        tried += 1
                        if reason is None:
                            rows.append(base + k)
                            labels.append(label)
                            keys.append(data.split_key(item.key, split_seed))
                            got += 1
                            bar.update(1)
                        else:
                            rejected.append(dict(path=item.ref, reason=reason))
                base += len(pool)
                data.check_rejected_fraction(rejected=rejected, inputs=tried, max_fraction=max_rejected_fraction,
                                             what="source-task files tried so far")
                if got < per_class:
                    fix = f"lower it to at most {got}" if got >= 2 else "add images or choose other pretrained.train.classes"
                    raise DataError(f"pretrained.train.per_class: {per_class} is more than the {got} readable images of "
                                    f"source class '{name}'; {fix}")
            bar.close()
            labels, rows = np.array(labels, dtype=np.int64), np.array(rows, dtype=np.int64)
            split_of, _ = data.hash_split(np.array(keys), labels, cuts=[data.Cut("val", 0.1, "0.1")], rest="train",
                                          class_names=names, fix="raise pretrained.train.per_class to at least 2")
            for split in ("train", "val"):
                idx = np.flatnonzero(split_of == split)
                storage.write_split(scratch, split, storage.gather_rows(spool.rows(), rows[idx]), count=len(idx),
                                    image_size=image_size, labels=torch.from_numpy(labels[idx]), meta={"classes": names})
        out = {"classes": names, "rejected": rejected, "tried": tried}
        for split in ("train", "val"):
            tensors, _ = storage.read_split(scratch, split)
            out[split] = (tensors["images"], tensors["labels"])
        yield out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def train_on_source_task(*, arch: str, image_size: int, task: dict, epochs: int, lr: float, batch_size: int,
                         mean, std, device: torch.device, amp: bool, seed: int) -> tuple[dict, dict]:
    """Train arch + linear head on the source task with the same fit() as finetune; keep the backbone."""
    backbone, dim = models.build_backbone(arch, image_size)
    model = models.Classifier(backbone, models.make_head("linear", dim, len(task["classes"])))
    best, history, best_epoch = training.fit(
        model, train_images=task["train"][0], train_labels=task["train"][1], val_images=task["val"][0],
        val_labels=task["val"][1], param_groups=[{"params": model.parameters(), "lr": lr}], epochs=epochs,
        batch_size=batch_size, momentum=0.9, weight_decay=5e-4, scheduler="cosine", step_size=1, gamma=1.0,
        augment_pad=2, augment_hflip=True, mean=mean, std=std, device=device, amp=amp, seed=seed,
        recalibrate_bn=True)  # a short source task leaves slow-momentum BatchNorm statistics near their init
    state = {k[len("backbone."):]: v for k, v in best.items() if k.startswith("backbone.")}
    return state, dict(source_classes=task["classes"], source_val_accuracy=history[best_epoch - 1]["val_acc"],
                       best_epoch=best_epoch, epochs=epochs, train_images=len(task["train"][1]))


def pretrain(*, p: Params, out_dir: Path, metrics_path: Path, rank: int = 0, workers: int = 1) -> dict:
    """Produce the backbone weights named by p.pretrained; write them and their description."""
    spec = preprocess.resolve_spec(arch=p.backbone.arch, pretrained_source=p.pretrained.source, weights=p.pretrained.weights,
                                   image_size=p.data.image_size, mean=p.pretrained.mean, std=p.pretrained.std,
                                   interpolation=p.data.interpolation, crop_pct=p.data.crop_pct)
    if p.pretrained.source != "train":
        return _pretrain(p=p, spec=spec, out_dir=out_dir, metrics_path=metrics_path, rank=rank, task=None)
    # Decoded before any model is built: the decode workers fork from a process that has run no torch op.
    with source_task(source=p.data.source, root=p.data.root, classes=p.pretrained.train.classes,
                     spec=spec, per_class=p.pretrained.train.per_class, split_seed=p.data.split_seed,
                     max_rejected_fraction=p.data.max_rejected_fraction, workers=workers,
                     csv_spec=data.CsvSpec.from_params(p.data),
                     scratch=paths.PREPARED.parent / f".source_task.rank{rank}.tmp") as task:
        return _pretrain(p=p, spec=spec, out_dir=out_dir, metrics_path=metrics_path, rank=rank, task=task)


def _pretrain(*, p: Params, spec: preprocess.Spec, out_dir: Path, metrics_path: Path, rank: int, task: dict | None) -> dict:
    arch, image_size, src = p.backbone.arch, p.data.image_size, p.pretrained.source
    device = training.pick_device(p.runtime.device)
    backbone, dim = models.build_backbone(arch, image_size)
    mean, std = spec.mean, spec.std
    details, report, metrics = {}, {"loaded": [], "skipped": {}, "missing": []}, {}
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"  # where torchvision itself caches weights
    if src == "torchvision":
        path, details = fetch_torchvision(arch=arch, weights=p.pretrained.weights, cache_dir=cache_dir)
        state = load_state_dict(path)
        if arch == "inception_v3":  # built without the auxiliary classifier
            state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
        report = models.load_backbone_weights(backbone, _drop_classifier(state, arch, backbone), partial=False)
    elif src == "timm":
        state, details = fetch_timm(arch=arch, weights=p.pretrained.weights, image_size=image_size)
        backbone.pretrained_cfg = details.pop("pretrained_cfg")
        report = models.load_backbone_weights(backbone, state, partial=False)
    elif src in ("url", "file"):
        if src == "url":
            name = p.pretrained.url.rsplit("/", 1)[-1] or "weights.pt"
            path = download(p.pretrained.url, cache_dir / name, sha256=p.pretrained.sha256)
            details = dict(url=p.pretrained.url)
        else:
            path = Path(p.pretrained.path)
            if not path.is_file():
                raise WeightsError(f"pretrained.path: {path} is not a file; point it at a .safetensors/.pt/.pth weights file")
            _check_exported_arch(path, arch)
            details = dict(path=str(path), file_sha256=sha256_file(path))
        report = load_foreign(backbone, path=path, arch=arch, entry=p.pretrained.entry, strip_prefix=p.pretrained.strip_prefix,
                              rename=p.pretrained.rename, match=p.pretrained.match,
                              min_fraction=p.pretrained.min_loaded_fraction, report_path=out_dir / "load_report.json")
    elif src == "train":
        state, metrics = train_on_source_task(arch=arch, image_size=image_size, task=task, epochs=p.pretrained.train.epochs,
                                              lr=p.pretrained.train.lr, batch_size=p.pretrained.train.batch_size,
                                              mean=mean, std=std, device=device, amp=p.runtime.amp, seed=p.seed)
        report = models.load_backbone_weights(backbone, state, partial=False)
        details = dict(dataset=p.data.source, classes=task["classes"])
        metrics.update(source_files_tried=task["tried"], source_rejected=len(task["rejected"]))
        if rank == 0:
            write_json(out_dir / "source_task_report.json", dict(rejected=task["rejected"], tried=task["tried"]))
    # src == "none": the random initialisation of build_backbone (seeded by configure_runtime)
    if rank != 0:  # under torchrun every rank holds the same weights; rank 0 writes them
        return {}
    weights_file = out_dir / "backbone.safetensors"
    save_tensors(weights_file, backbone.state_dict(), meta={"arch": arch, "image_size": image_size})
    info = dict(arch=arch, source=src, feature_dim=dim, image_size=image_size, mean=list(mean), std=list(std),
                num_blocks=len(models.blocks(backbone, arch)), sha256=sha256_file(weights_file),
                native_size=models.native_size(arch, backbone), preprocess=spec.to_dict(), **details)
    write_json(out_dir / "backbone.json", info)
    write_json(out_dir / "load_report.json", with_counts(report))
    metrics = {**metrics, "loaded_keys": len(report["loaded"]), "skipped_keys": len(report["skipped"]), "missing_keys": len(report["missing"])}
    write_json(metrics_path, metrics)
    return info


def with_counts(report: dict) -> dict:
    return {**report, "counts": {k: len(report[k]) for k in ("loaded", "skipped", "missing")}}


def load_foreign(backbone, *, path: Path, arch: str, entry: str, strip_prefix: list[str], rename: list[list[str]],
                 match: str, min_fraction: float, report_path: Path) -> dict:
    """A checkpoint from another codebase into the backbone: unwrap the nested entry, map the keys
    (strip_prefix, then rename), match by name or order. Every step is in the report, which is written
    even when the load is refused, so the user can see what did not fit."""
    if match == "order" and path.suffix == ".safetensors":
        raise WeightsError(f"pretrained.match: order needs the tensors in the order the model was written, and "
                           f"{path} is a .safetensors file, which stores them sorted by name; set pretrained.match: name "
                           "(this pipeline's own exports load by name)")
    state, unwrapped = load_weights(path, entry=entry)
    state, mapping = models.map_keys(state, strip_prefix=strip_prefix, rename=rename)
    try:
        report = models.load_backbone_weights(backbone, state, partial=True, match=match, min_fraction=min_fraction)
    except ModelError:
        write_json(report_path, dict(checkpoint=unwrapped, key_mapping=mapping, refused=True))
        raise
    return {**report, "checkpoint": unwrapped, "key_mapping": mapping}


def fetch_timm(*, arch: str, weights: str, image_size: int) -> tuple[dict, dict]:
    """timm's own pretrained weights, through its Hugging Face hub download (and cache) by weights tag."""
    import timm

    name = models.timm_name(arch) + ("" if weights == "DEFAULT" else f".{weights}")
    kwargs = models.timm_size_kwargs(arch, image_size)
    try:
        net = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except RuntimeError as e:
        if "Unknown" in str(e) or "Invalid pretrained tag" in str(e) or "No pretrained weights" in str(e):
            raise ParamsError(f"pretrained.weights: {weights!r}: {e}; timm.list_pretrained('{models.timm_name(arch)}*') "
                              "lists the tags") from None
        raise WeightsError(f"could not load timm weights {name}: {e}") from None
    except (OSError, ValueError) as e:  # huggingface_hub's offline and not-found errors are OSErrors
        raise WeightsError(
            f"could not download timm weights {name} from the Hugging Face hub ({type(e).__name__}). Offline? On a "
            f"machine with network run python -c \"import timm; timm.create_model('{name}', pretrained=True)\" and copy "
            "the hub cache (~/.cache/huggingface) here, or save the weights to a file and set pretrained.source: file "
            "with pretrained.path") from None
    cfg = dict(net.pretrained_cfg)
    return net.state_dict(), dict(weights=cfg.get("tag") or weights, hf_hub_id=cfg.get("hf_hub_id"), pretrained_cfg=cfg)


def _check_exported_arch(path: Path, arch: str) -> None:
    """A model exported by this pipeline names its architecture: say so plainly when it is another one."""
    if path.suffix != ".safetensors":
        return
    _, meta = load_tensors(path)
    if meta.get("arch") and meta["arch"] != arch:
        raise WeightsError(f"pretrained.path: {path} holds a {meta['arch']} model, but backbone.arch is {arch}; "
                           f"set backbone.arch: {meta['arch']} to start from it")


def _drop_classifier(state: dict, arch: str, backbone) -> dict:
    """Official checkpoints carry the 1000-class classifier that our backbone does without."""
    if models.is_timm(arch):
        names = backbone.pretrained_cfg.get("classifier") or ()
        prefixes = tuple(n + "." for n in ([names] if isinstance(names, str) else names))
    else:
        prefixes = (models.CLASSIFIER_PATH[models.family(arch)] + ".",)
    return {k: v for k, v in state.items() if not k.startswith(prefixes)} if prefixes else state


def main() -> None:
    p = load_params()
    training.launch(p.runtime.nproc, "stages.pretrain")
    training.configure_runtime(threads=p.runtime.threads, deterministic=p.runtime.deterministic, seed=p.seed)
    rank, _ = training.init_distributed()
    try:
        info = pretrain(p=p, out_dir=paths.BACKBONE_DIR, metrics_path=paths.METRICS / "pretrain.json", rank=rank,
                        workers=data.worker_count(p.runtime.workers))
    finally:
        training.finish_distributed()
    if rank == 0:
        print(f"pretrain: {info['arch']} from {info['source']}, feature dim {info['feature_dim']}")


if __name__ == "__main__":
    cli.run("pretrain", main)
