"""prepare: read the dataset once, split it, and store uint8 tensors per split.

Outputs (data/prepared/): {train,val,test}.safetensors (images uint8 (N,3,S,S), labels int64),
classes.json, manifest.csv (one row per input), report.json (rejections, leaks, notes);
metrics/prepare.json (counts).
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from transfer import data, paths
from transfer.data import DataError
from transfer.io import save_tensors, write_json
from transfer.params import load_params


def prepare(*, source: str, root: str, classes: list | None, image_size: int, val_fraction: float,
            test_fraction: float, train_per_class: int | None, eval_per_class: int | None,
            max_rejected_fraction: float, seed: int, out_dir: Path, metrics_path: Path) -> dict:
    """Decode, split and store the dataset; return the counts written to metrics."""
    collected = data.collect(source, root)
    selected = data.resolve_classes(classes, collected.classes, "data.classes")
    rows = list(collected.skipped)
    kept = []
    for item in collected.items:
        if item.presplit and item.presplit.startswith("excluded:"):
            rows.append(dict(ref=item.ref, label=item.label, split="", status="excluded", reason=item.presplit[9:]))
        elif item.label not in selected:
            rows.append(dict(ref=item.ref, label=item.label, split="", status="excluded", reason="class not in data.classes"))
        else:
            kept.append(item)

    arrays, reasons = data.decode_items(kept, image_size)
    for item, reason in zip(kept, reasons):
        if reason is not None:
            rows.append(dict(ref=item.ref, label=item.label, split="", status="rejected", reason=reason))
    rejected_all = [dict(path=r["ref"], reason=r["reason"]) for r in rows if r["status"] == "rejected"]
    n_rejected = len(rejected_all)
    # The fraction is of the files that were candidates for use (excluded classes and hidden files are not).
    n_inputs = sum(r is None for r in reasons) + n_rejected
    report = dict(rejected=rejected_all, notes=collected.notes, classes=selected)
    out_dir.mkdir(parents=True, exist_ok=True)
    rejected_fraction = n_rejected / max(n_inputs, 1)
    if rejected_fraction > max_rejected_fraction:
        write_json(out_dir / "report.json", report)
        listing = "\n".join(f"  {r['path']}: {r['reason']}" for r in rejected_all[:20])
        raise DataError(f"{n_rejected} of {n_inputs} input files ({rejected_fraction:.1%}) are unreadable, more than "
                        f"data.max_rejected_fraction={max_rejected_fraction}. Fix or remove them, or raise the limit. "
                        f"Full list in {out_dir / 'report.json'}; first ones:\n{listing}")

    good = [(item, arr) for item, arr in zip(kept, arrays) if arr is not None]
    label_of = {name: i for i, name in enumerate(selected)}
    labels = np.array([label_of[item.label] for item, _ in good], dtype=np.int64)
    present = sorted(set(labels.tolist()))
    if len(present) < len(selected):
        missing = [selected[i] for i in range(len(selected)) if i not in present]
        raise DataError(f"classes {missing} have no readable images; remove them from data.classes or add images")

    split_of = _assign_splits(good, labels, val_fraction, test_fraction, seed, report)
    rng = np.random.default_rng(seed)
    final: dict[str, np.ndarray] = {}
    for split in paths.SPLITS:
        idx = np.flatnonzero(split_of == split)
        cap = train_per_class if split == "train" else eval_per_class
        if split == "train" and cap is not None:
            have = Counter(labels[idx].tolist())
            short = {selected[c]: n for c, n in have.items() if n < cap}
            if short:
                raise DataError(f"data.train_per_class: {cap} is more than the training images of {short}; "
                                f"lower it (at most {min(have.values())}) or add images")
        final[split], dropped = data.take_per_class(idx, labels, cap, rng)
        split_of[dropped] = "unused"

    for (item, _), split in zip(good, split_of):
        status = "unused" if split == "unused" else "used"
        reason = "over the labelled budget or evaluation cap" if status == "unused" else ""
        rows.append(dict(ref=item.ref, label=item.label, split="" if status == "unused" else split, status=status, reason=reason))

    used = np.flatnonzero(split_of != "unused")
    report["leaks"] = data.find_leaks([good[i][1] for i in used], [split_of[i] for i in used], [good[i][0].ref for i in used])
    for split, idx in final.items():
        images = data.to_tensor([good[i][1] for i in idx], image_size)
        save_tensors(paths.split_file(out_dir, split),
                     {"images": images, "labels": torch.from_numpy(labels[idx])},
                     meta={"classes": selected, "split": split})
    write_json(out_dir / "classes.json", selected)
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


def _assign_splits(good, labels, val_fraction, test_fraction, seed, report) -> np.ndarray:
    """Split names per good item: pre-split trees keep their folders, one tree is split here."""
    presplit = [item.presplit for item, _ in good]
    split_of = np.empty(len(good), dtype=object)
    if all(p is None for p in presplit):
        for split, idx in data.stratified_split(labels, val_fraction, test_fraction, seed).items():
            split_of[idx] = split
        return split_of
    split_of[:] = presplit
    if "test" not in presplit:
        # train/ + val/ only (the ants/bees layout): half of val/ becomes the test split, so the
        # epoch picked on validation is never also the one scored on test.
        val_idx = np.flatnonzero(split_of == "val")
        parts = data.stratified_split(labels[val_idx], 0.0, 0.5, seed)
        split_of[val_idx[parts["test"]]] = "test"
        report["notes"].append("no test/ folder: val/ was split in half (stratified) into val and test")
    return split_of


def main() -> None:
    p = load_params()
    try:
        counts = prepare(source=p.data.source, root=p.data.root, classes=p.data.classes, image_size=p.data.image_size,
                         val_fraction=p.data.val_fraction, test_fraction=p.data.test_fraction,
                         train_per_class=p.data.train_per_class, eval_per_class=p.data.eval_per_class,
                         max_rejected_fraction=p.data.max_rejected_fraction, seed=p.seed,
                         out_dir=paths.PREPARED, metrics_path=paths.METRICS / "prepare.json")
    except DataError as e:
        sys.exit(f"prepare: {e}")
    print(f"prepare: {counts}")


if __name__ == "__main__":
    main()
