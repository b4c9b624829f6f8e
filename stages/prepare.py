"""prepare: read the dataset once, split it, and store uint8 tensors per split.

Images are resized and cropped as the backbone's weights expect (transfer.preprocess), so a change of
backbone.arch re-runs prepare.

Outputs (data/prepared/): {train,val,test}.images.npy (uint8 (N,3,S,S), read by batch through
transfer.storage) and {train,val,test}.safetensors (labels int64, classes),
classes.json, manifest.csv (one row per input: split, split key, the split folder it came from,
status, reason, its row in the split's files), report.json (how each split was formed, rejections,
leaks, notes), preprocess.json (the resize and crop every image went through, and where each value
came from); metrics/prepare.json.

A file's split depends on the file (its key) and data.split_seed alone: see transfer.data.hash_split.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from transfer import cli, data, paths, preprocess, storage
from transfer.data import DataError
from transfer.io import write_json
from transfer.params import load_params


def prepare(*, source: str, root: str, classes: list | None, spec: preprocess.Spec, val_fraction: float,
            test_fraction: float, train_per_class: int | None, eval_per_class: int | None,
            max_rejected_fraction: float, split_seed: int, out_dir: Path, metrics_path: Path, workers: int = 1,
            timing_path: Path | None = None, csv_spec: data.CsvSpec | None = None) -> dict:
    """Decode (resized and cropped as `spec` says), split and store the dataset; return the counts
    written to metrics. `csv_spec` says where a csv source's labels are. The decode rate goes to
    `timing_path` (a log: it varies between identical runs, so it is no output)."""
    collected = data.collect(source, root, csv_spec)
    selected = data.resolve_classes(classes, collected.classes, "data.classes")
    label_of = {name: i for i, name in enumerate(selected)}
    rows = list(collected.skipped)
    kept = []

    def row(item: data.Item, **fields) -> dict:
        return dict(ref=item.ref, label=item.label, split_key=f"{data.split_key(item.key, split_seed):.6f}",
                    origin=item.origin, **fields)

    for item in collected.items:
        if item.presplit and item.presplit.startswith("excluded:"):
            rows.append(row(item, status="excluded", reason=item.presplit[9:]))
        elif item.label not in selected:
            rows.append(row(item, status="excluded", reason="class not in data.classes"))
        else:
            kept.append(item)

    plan = dict(val_fraction=val_fraction, test_fraction=test_fraction, train_per_class=train_per_class,
                eval_per_class=eval_per_class, selected=selected, layout=collected.layout)
    # Split sizes are checked on the files found, before any decode, and again on what decoded.
    keys = data.split_keys(kept, split_seed)
    kept_labels = np.array([label_of[i.label] for i in kept], dtype=np.int64)
    plan_splits(kept, kept_labels, keys, **plan)

    out_dir.mkdir(parents=True, exist_ok=True)
    # Decoded pixels go to a scratch file, not a list: memory stays flat however many images there are.
    # Item k of `kept` goes to row k; only the rows of decoded items are ever written (the file is sparse).
    image_size = spec.image_size
    with storage.Spool(out_dir / ".decoded.rows.tmp", (3, image_size, image_size), capacity=len(kept)) as spool:
        digest_of, rejected_at = decode_needed(kept, keys, kept_labels, plan=plan, spec=spec, workers=workers,
                                               spool=spool, timing_path=timing_path)
        for k in sorted(rejected_at):
            rows.append(row(kept[k], status="rejected", reason=rejected_at[k]))
        rows_of_good = [k for k in range(len(kept)) if k not in rejected_at]
        good = [kept[k] for k in rows_of_good]
        digests = [digest_of.get(k) for k in rows_of_good]
        rejected_all = [dict(path=r["ref"], reason=r["reason"]) for r in rows if r["status"] == "rejected"]
        n_rejected = len(rejected_all)
        # The fraction is of the files that were candidates for use (excluded classes and hidden files are not).
        n_inputs = len(good) + n_rejected
        notes = list(collected.notes)
        unread = len(kept) - len(digest_of) - len(rejected_at)
        if unread:
            notes.append(f"{unread} of {len(kept)} files of the selected classes were not decoded: no split takes "
                         "them at these budgets and caps (data.train_per_class, data.eval_per_class), so whether they "
                         "are readable was not checked")
        report = dict(rejected=rejected_all, notes=notes, classes=selected)
        try:
            data.check_rejected_fraction(rejected=rejected_all, inputs=n_inputs, max_fraction=max_rejected_fraction,
                                         what="input files", report_path=out_dir / "report.json")
        except DataError:
            write_json(out_dir / "report.json", report)
            raise

        labels = kept_labels[rows_of_good]
        missing = [name for i, name in enumerate(selected) if i not in set(labels.tolist())]
        if missing:
            raise DataError(f"classes {missing} have no readable images; remove them from data.classes or add images")
        split_of, why, final, how = plan_splits(good, labels, keys[rows_of_good], **plan)
        report["splits"] = how
        report["split_key"] = SPLIT_KEY_RULE.format(split_seed=split_seed)

        index = {int(i): row_in_split for idx in final.values() for row_in_split, i in enumerate(idx)}
        for k, (item, split, reason) in enumerate(zip(good, split_of, why)):
            status = "unused" if split == "unused" else "used"
            rows.append(row(item, split="" if status == "unused" else split, status=status, reason=reason,
                            index=index.get(k, "")))

        used = np.flatnonzero(split_of != "unused")
        report["leaks"] = data.find_leaks([digests[i] for i in used], [split_of[i] for i in used], [good[i].ref for i in used])
        pixels, rows_of_good = spool.rows(), np.asarray(rows_of_good, dtype=np.int64)
        for split, idx in final.items():
            storage.write_split(out_dir, split, storage.gather_rows(pixels, rows_of_good[idx]), count=len(idx), image_size=image_size,
                                labels=torch.from_numpy(labels[idx]), meta={"classes": selected, "split": split})
    write_json(out_dir / "classes.json", selected)
    # Only what the pixels depend on: convert checks the model's spec against it.
    write_json(out_dir / "preprocess.json", spec.pixels())
    data.write_manifest(out_dir / "manifest.csv", sorted(rows, key=lambda r: r["ref"]))
    write_json(out_dir / "report.json", report)
    counts = {
        "inputs": len(rows),
        "rejected": n_rejected,
        "leaked_groups": len(report["leaks"]),
        "classes": len(selected),
        **{f"{split}_images": int(len(idx)) for split, idx in final.items()},
    }
    write_json(metrics_path, counts)
    return counts


SPLIT_KEY_RULE = ("each file's split_key, a number in [0, 1): the first 8 bytes of sha256('{split_seed}\\0<key>') "
                  "/ 2**64 (data.split_seed {split_seed}; key: the path relative to data.root, or '<array file>#<index>')")


def decode_needed(kept: list[data.Item], keys: np.ndarray, labels: np.ndarray, *, plan: dict, spec: preprocess.Spec,
                  workers: int, spool: storage.Spool, timing_path: Path | None) -> tuple[dict[int, str], dict[int, str]]:
    """Decode the files the splits take, and only those: ({item: digest of its pixels}, {item: why it
    was rejected}), items by their index in `kept`, pixels in the spool's row of that index.

    The splits are planned on the files not known to be unreadable; the ones they take that are not
    decoded yet are decoded; a file that fails to decode leaves the plan, whose next file of that class
    and split then takes its place (decoded in the next round). So the splits are those a decode of
    every file would give: a split takes the lowest split keys of each class among the readable files,
    and an unreadable file the splits would not take changes no rank below the caps. On the default
    (Fashion-MNIST 5-9, 5 training images per class, 300 val and test) this decodes 3,025 of 35,000
    images: prepare took 21.2 s (19.5 s of work) when it decoded all of them."""
    decoded: dict[int, str] = {}
    rejected: dict[int, str] = {}
    images = seconds = 0
    while True:
        candidates = np.array([k for k in range(len(kept)) if k not in rejected], dtype=np.int64)
        try:
            split_of, _, _, _ = plan_splits([kept[k] for k in candidates], labels[candidates], keys[candidates], **plan)
        except DataError:
            # Unreadable files left a split short: the caller's checks say so, in the order a full decode
            # would (too many unreadable files, a class without readable images, then this plan's problem).
            break
        todo = [int(k) for k in candidates[split_of != "unused"] if k not in decoded]
        if not todo:
            break
        start = time.perf_counter()
        stream = cli.progress(data.decode_stream([kept[k] for k in todo], spec, workers, spool, rows=todo), desc="decode",
                              total=len(todo), unit="img")
        for (digest, reason), k in zip(stream, todo):  # the bar first: it closes when its iterator ends
            if reason is None:
                decoded[k] = digest
            else:
                rejected[k] = reason
        seconds += time.perf_counter() - start
        images += len(todo)
    if timing_path is not None:
        write_json(timing_path, dict(images=images, of=len(kept), workers=workers, decode_seconds=round(seconds, 3),
                                     images_per_second=round(images / seconds, 1) if seconds > 0 else None))
    return decoded, rejected


def plan_splits(items: list[data.Item], labels: np.ndarray, keys: np.ndarray, *, val_fraction: float, test_fraction: float,
                train_per_class: int | None, eval_per_class: int | None, selected: list[str],
                layout: dict[str, str]) -> tuple[np.ndarray, list[str], dict[str, np.ndarray], dict[str, str]]:
    """Split name per item ("unused" beyond the budget or cap) and why, the kept indices per split, and
    how each split was formed. `keys` are the items' split keys. The budget and the caps keep the
    lowest split keys of each class, so a smaller one is a subset of a larger one. Every size problem
    is a DataError naming the key to change."""
    split_of, why, how = _assign_splits(items, labels, keys, val_fraction, test_fraction, selected, layout)
    in_train = set(labels[split_of == "train"].tolist())
    lacking = [name for i, name in enumerate(selected) if i not in in_train]
    if lacking and len(items):
        raise DataError(f"classes {lacking} have no readable training images ({how['train']}); add training images of "
                        "them or leave them out of data.classes")
    final: dict[str, np.ndarray] = {}
    for split in paths.SPLITS:
        idx = np.flatnonzero(split_of == split)
        if split != "val" and len(idx) == 0:
            raise DataError(f"the {split} split is empty ({how[split]}); add {split} images of the classes in data.classes")
        cap, key = (train_per_class, "data.train_per_class") if split == "train" else (eval_per_class, "data.eval_per_class")
        if split == "train" and cap is not None:
            have = Counter(labels[idx].tolist())
            short = {selected[c]: n for c, n in sorted(have.items()) if n < cap}
            if short:
                raise DataError(f"data.train_per_class: {cap} is more than the training images of {short}; "
                                f"lower it to at most {min(have.values())}, or add images")
        if cap is None:
            final[split] = idx
            continue
        rank, of = data.rank_in_class(idx, labels, keys)
        for i, r, n in zip(idx, rank, of):
            why[i] += f"; rank {r} of {n} by split_key among its class's {split} files, {'within' if r <= cap else 'over'} {key} {cap}"
        split_of[idx[rank > cap]] = "unused"
        final[split] = idx[rank <= cap]
        how[split] += f"; the {cap} lowest split_keys of each class ({key})"
    return split_of, why, final, how


def _assign_splits(items, labels, keys, val_fraction, test_fraction, selected, layout) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """Pre-split trees keep their folders (test files only ever go to test); what a tree lacks is carved
    by split key: val from train/ (or val/ halved into val and test when there is no test/), and one
    tree is cut by the fractions."""
    test_cut = data.Cut("test", test_fraction, f"data.test_fraction {test_fraction:g}")
    val_cut = data.Cut("val", val_fraction, f"data.val_fraction {val_fraction:g}")
    at_least_one = ", at least one per class"
    if not layout:
        fix = (f"lower data.val_fraction/data.test_fraction (now {val_fraction:g}/{test_fraction:g}), add images, "
               "or leave the class out of data.classes")
        split_of, why = data.hash_split(keys, labels, cuts=[test_cut, val_cut], rest="train", class_names=selected, fix=fix)
        rules = data.cut_rules([test_cut, val_cut], "train")
        how = {"train": rules["train"] + at_least_one, "val": rules["val"] + (at_least_one if val_fraction > 0 else ""),
               "test": rules["test"] + at_least_one}
        return split_of, why, how
    presplit = np.array([item.presplit for item in items], dtype=object)
    split_of = presplit.copy()
    why = [f"{item.presplit}: in {item.origin}" for item in items]
    how = dict(layout)
    train_idx = np.flatnonzero(presplit == "train")
    if "val" not in layout:
        cuts = [test_cut, val_cut] if "test" not in layout else [val_cut]
        fix = (f"lower data.val_fraction{'/data.test_fraction' if len(cuts) == 2 else ''} or add images to {layout['train']}")
        parts, reasons = data.hash_split(keys[train_idx], labels[train_idx], cuts=cuts, rest="train", class_names=selected,
                                         fix=f"in {layout['train']}: {fix}", where=f" (in {layout['train']})")
        split_of[train_idx] = parts
        for i, reason in zip(train_idx, reasons):
            why[i] = reason
        rules = data.cut_rules(cuts, "train")
        for cut in cuts:
            how[cut.split] = f"carved from {layout['train']}: {rules[cut.split]}" + (at_least_one if cut.fraction > 0 else "")
    elif "test" not in layout:
        # train/ + val/ only (the ants/bees layout): half of val/ becomes the test split, so the
        # epoch picked on validation is never also the one scored on test.
        val_idx = np.flatnonzero(presplit == "val")
        half = [data.Cut("test", 0.5, "0.5")]
        parts, reasons = data.hash_split(keys[val_idx], labels[val_idx], cuts=half, rest="val", class_names=selected,
                                         fix=f"in {layout['val']}: halving it into val and test needs 2 per class; add a "
                                             "test folder or more validation images", where=f" (in {layout['val']}, halved)")
        split_of[val_idx] = parts
        for i, reason in zip(val_idx, reasons):
            why[i] = reason
        rules = data.cut_rules(half, "val")
        how["val"] = f"half of {layout['val']}: {rules['val']}{at_least_one}"
        how["test"] = f"the other half of {layout['val']}: {rules['test']}{at_least_one}"
    return split_of, why, how


def main() -> None:
    p = load_params()
    # Mean and std are left out: they do not change the pixels stored here, so changing them does not
    # re-run this stage.
    spec = preprocess.resolve_spec(arch=p.backbone.arch, pretrained_source=p.pretrained.source, weights=p.pretrained.weights,
                                   image_size=p.data.image_size, interpolation=p.data.interpolation, crop_pct=p.data.crop_pct)
    counts = prepare(source=p.data.source, root=p.data.root, classes=p.data.classes, spec=spec,
                     val_fraction=p.data.val_fraction, test_fraction=p.data.test_fraction,
                     train_per_class=p.data.train_per_class, eval_per_class=p.data.eval_per_class,
                     max_rejected_fraction=p.data.max_rejected_fraction, split_seed=p.data.split_seed,
                     out_dir=paths.PREPARED, metrics_path=paths.METRICS / "prepare.json",
                     workers=data.worker_count(p.runtime.workers), timing_path=paths.LOGS / "prepare_timing.json",
                     csv_spec=data.CsvSpec.from_params(p.data))
    print(f"prepare: {counts}")


if __name__ == "__main__":
    cli.run("prepare", main)
