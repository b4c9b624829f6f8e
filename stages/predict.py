"""predict: classify new images with the exported model.

    python -m stages.predict PATH... [--top-k K] [--out predictions.csv] [--onnx] [--tta] [--model models/export]
    transfer-predict PATH... --model FOLDER [...]   # the same, installed by `pip install .`, from anywhere

PATH: image files and folders (searched recursively for image files). Each image gets exactly the
preprocessing the model was trained with, as model.json describes it; batches run on the GPU when
there is one. Unreadable files are listed in the output with the reason, never a crash; the exit
code is 2 only when nothing could be read. With --onnx the model runs in onnxruntime from
model.onnx, and torch is never imported: a deployment needs onnxruntime, Pillow and numpy only.
The probabilities are calibrated: both runners divide the logits by the temperature evaluate fitted on
the val split (model.json's "temperature"; the ONNX graph has it inside). With --tta each image's
probabilities are the mean of its own and its mirror image's, as evaluate.tta: flip scores them.

Every path given gets a row, or its images do: a broken link, a symlink loop, a file that cannot
be opened and a folder with no images are rows with the reason. Folders are searched through
links to other folders, each real folder once, so a link back up the tree cannot loop. File names
are written as UTF-8 whatever their bytes: a byte that is not part of valid UTF-8 is shown as
\\xNN (Python's backslashreplace), in the CSV and the printed table alike, so a name the file
system allows never stops the output (a name that literally contains "\\xNN" reads the same).

Not a DVC stage: it reads the pipeline's last output and writes where --out says.
"""
from __future__ import annotations

import argparse
import csv
import errno
import io as _io
import itertools
import multiprocessing
import os
import stat
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from transfer import cli, data, export, paths, preprocess
from transfer.cli import UserError
from transfer.io import read_json, write_text


def find_images(targets: list[str]) -> list[Path]:
    """Files named on the command line, and the image files under folders named, in a stable order.
    A named file is always tried (its decode says why it is unreadable), and so is a missing path or a
    folder without image files; inside folders, so is a link that leads nowhere, whatever its name
    (it could have been an image or a folder), and a sub-folder that cannot be listed."""
    out: list[Path] = []
    for target in targets:
        path = Path(target)
        if path.is_dir():
            found: list[Path] = []
            _search(path, found, seen=set())
            out.extend(sorted(found) or [path])
        else:
            out.append(path)
    return out


def _search(folder: Path, found: list[Path], seen: set[tuple[int, int]]) -> None:
    """Add the entries of `folder` to try, recursively. Links to folders are followed (a photo library
    is often one), each real folder once by device and inode: a link back up the tree adds nothing."""
    try:
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError:
        found.append(folder)  # its row says why (permission denied, ...)
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = folder / entry.name
        try:
            is_dir = entry.is_dir()  # follows a link
        except OSError:
            is_dir = False
        if is_dir:
            _search(path, found, seen)
        elif path.suffix.lower() in data.IMAGE_EXTS or (entry.is_symlink() and not os.path.exists(path)):
            found.append(path)


def shown(path: Path | str) -> str:
    """A path as text any UTF-8 writer accepts: bytes of the name that are not UTF-8 (which Python
    carries as lone surrogates) become \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _problem(path: Path) -> str | None:
    """Why `path` cannot be an image file, found before Pillow tries (which would call a link to
    nowhere 'truncated', and wait forever on a named pipe); None if it can be opened."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            os.listdir(path)
            return "a folder with no image files"
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file (a pipe, socket or device)"
        os.close(os.open(path, os.O_RDONLY))
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop (too many levels of symbolic links)"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            if os.path.islink(path):
                return f"broken link (its target {shown(os.readlink(path))} does not exist)"
            return "no such file"
        if e.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
        return f"cannot be opened: {e.strerror}"
    return None


def _decode(job: tuple[Path, preprocess.Spec]) -> tuple[np.ndarray | None, str | None]:
    path, spec = job
    problem = _problem(path)
    if problem:
        return None, problem
    img, reason = data.decode_item(None, path, spec)
    # Pillow's messages can quote the name, bytes and all.
    return img, reason and reason.encode("utf-8", "backslashreplace").decode()


def decoded(files: list[Path], spec: preprocess.Spec, workers: int) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """(image, None) or (None, reason) per file, in order, decoded in parallel as `spec` says."""
    jobs = [(f, spec) for f in files]
    if workers <= 1 or len(files) < 64:
        yield from map(_decode, jobs)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_decode, jobs, chunksize=16)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def make_runner(model_dir: Path, meta: dict, spec: preprocess.Spec, onnx: bool, device: str):
    """A function uint8 (B, 3, S, S) -> logits divided by the temperature (B, C) as numpy, and the
    device it runs on. (The ONNX graph has spec's mean and std and the temperature inside, put there by
    convert; a model.json without a temperature predates calibration: 1.)"""
    if onnx:
        session = export.onnx_session(model_dir / export.ONNX_FILE, device=device)
        return (lambda batch: export.onnx_logits(session, batch)), session.get_providers()[0]
    import torch

    from transfer import models, training

    weights = model_dir / "model_fp32.safetensors"
    if not weights.is_file():
        raise UserError(f"{weights}: not found; run `dvc repro convert` first (or pass --model)")
    dev = training.pick_device(device)
    net = export.deployable(models.load_model(weights, meta), spec.mean, spec.std,
                            temperature=meta.get("temperature", 1.0)).to(dev)
    net = net.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).pin_memory() if dev.type == "cuda" else torch.from_numpy(batch)
        with training.autocast(dev, amp=dev.type == "cuda"):
            return net(x.to(dev, non_blocking=True)).float().cpu().numpy()

    return run, str(dev)


def predict(*, targets: list[str], model_dir: Path, top_k: int, batch_size: int, onnx: bool, device: str,
            workers: int, tta: bool = False) -> tuple[list[dict], list[str], str]:
    """Rows (path, status, reason, top-k labels and probabilities) for every file found, the class
    names, and where the model ran. tta: average each image's probabilities with its mirror image's."""
    meta_file = model_dir / "model.json"
    if not meta_file.is_file():
        raise UserError(f"{meta_file}: not found; run `dvc repro` (the convert stage writes it) or pass --model")
    meta = read_json(meta_file)
    recipe = meta.get("preprocess", {}).get("recipe")
    if recipe != export.PREPROCESS["recipe"]:
        raise UserError(f"{meta_file}: preprocessing {recipe!r} is not one this version knows "
                        f"({export.PREPROCESS['recipe']!r}); re-run `dvc repro convert`")
    spec = preprocess.Spec.from_dict(meta["preprocess"], where=str(meta_file))
    files = find_images(targets)
    if not files:
        raise UserError(f"no image files in {' '.join(map(shown, targets))}")
    classes = meta["classes"]
    top_k = min(top_k, len(classes))
    # Decoding starts (and its workers fork) before the model is loaded: no torch thread pool is copied.
    stream = decoded(files, spec, workers)
    first = next(stream)
    run, where = make_runner(model_dir, meta, spec, onnx, device)
    rows: list[dict] = []
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        batch = np.stack([img for _, img in pending])
        probs = softmax(run(batch).astype(np.float64))
        if tta:
            probs = (probs + softmax(run(np.ascontiguousarray(batch[..., ::-1])).astype(np.float64))) / 2
        order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
        for (i, _), top, p in zip(pending, order, probs):
            for rank, c in enumerate(top, 1):
                rows[i][f"label_{rank}"] = classes[c]
                rows[i][f"prob_{rank}"] = round(float(p[c]), 6)
        pending.clear()

    bar = cli.progress(None, desc="predict", total=len(files), unit="img")
    for path, (img, reason) in zip(files, itertools.chain([first], stream)):
        rows.append(dict(path=shown(path), status="ok" if reason is None else "unreadable", reason=reason or ""))
        if img is not None:
            pending.append((len(rows) - 1, img))
            if len(pending) == batch_size:
                flush()
        bar.update(1)
    if pending:
        flush()
    bar.close()
    if not any(r["status"] == "ok" for r in rows):
        first_reasons = "; ".join(f"{r['path']}: {r['reason']}" for r in rows[:3])
        raise UserError(f"none of the {len(rows)} files could be read ({first_reasons})")
    return rows, classes, where


def to_csv(rows: list[dict], top_k: int) -> str:
    fields = ["path", "status", "reason"] + [f"{kind}_{r}" for r in range(1, top_k + 1) for kind in ("label", "prob")]
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def table(rows: list[dict], top_k: int, limit: int = 40) -> str:
    """The terminal view: one line per image, top-k as 'label 97.1%'."""
    shown = rows[:limit]
    width = min(60, max(len("path"), *(len(r["path"]) for r in shown)))
    lines = [f"{'path':<{width}}  prediction"]
    for r in shown:
        path = r["path"] if len(r["path"]) <= width else "..." + r["path"][-(width - 3):]
        if r["status"] == "ok":
            guess = ", ".join(f"{r[f'label_{k}']} {100 * r[f'prob_{k}']:.1f}%" for k in range(1, top_k + 1) if f"label_{k}" in r)
        else:
            guess = f"UNREADABLE: {r['reason']}"
        lines.append(f"{path:<{width}}  {guess}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more rows in the CSV")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m stages.predict") -> None:
    ap = argparse.ArgumentParser(prog=prog, description="Classify images with the exported model.")
    ap.add_argument("paths", nargs="+", help="image files and folders")
    ap.add_argument("--top-k", type=int, default=3, help="how many classes to list per image (default 3)")
    ap.add_argument("--out", default="predictions.csv", help="CSV to write (default predictions.csv; '-' for none)")
    ap.add_argument("--model", default=str(paths.EXPORT_DIR), help=f"the exported model's folder (default {paths.EXPORT_DIR})")
    ap.add_argument("--onnx", action="store_true", help="run model.onnx with onnxruntime (no torch needed)")
    ap.add_argument("--tta", action="store_true",
                    help="test-time augmentation: average each image's probabilities with its mirror image's")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--workers", type=int, default=0, help="decoding processes (0 = all cores)")
    args = ap.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1 or args.workers < 0:
        raise UserError("--top-k and --batch-size must be at least 1, --workers at least 0")
    rows, classes, where = predict(targets=args.paths, model_dir=Path(args.model), top_k=args.top_k,
                                   batch_size=args.batch_size, onnx=args.onnx, device=args.device,
                                   workers=data.worker_count(args.workers), tta=args.tta)
    top_k = min(args.top_k, len(classes))
    # Names are UTF-8 by now (shown()); a terminal in another encoding gets \xNN for what it lacks.
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(table(rows, top_k).encode(encoding, "backslashreplace").decode(encoding))
    bad = sum(r["status"] != "ok" for r in rows)
    if args.out != "-":
        write_text(args.out, to_csv(rows, top_k))
    print(f"predict: {len(rows) - bad} images classified{' with flip TTA' if args.tta else ''}, {bad} unreadable, on {where}"
          + (f"; written to {args.out}" if args.out != "-" else ""), file=sys.stderr)


def command() -> None:
    """`transfer-predict`, the command `pip install .` puts on PATH: predict from any folder, given --model."""
    cli.run("predict", lambda: main(prog="transfer-predict"))


if __name__ == "__main__":
    cli.run("predict", main)
