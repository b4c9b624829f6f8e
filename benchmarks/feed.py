"""Host feed benchmark: how fast prepared images reach the consumer, in images/s and GB/s (1 GB = 1e9 bytes).

    python -m benchmarks.feed                                   # CPU: 20,000 images at 224 px (3 GB)
    python -m benchmarks.feed --device cuda --arch resnet18     # on a GPU, also extraction fed vs resident

Writes a uint8 split with storage.write_split into a scratch folder (removed afterwards), reads it
once so that it sits in the page cache, then times each way of delivering it in batches (best of
--repeats passes, every pass recorded):
- old: the path before issue 18, one prefetch thread and a fresh array per batch (Images[s:e]),
  pinned per batch for CUDA;
- feed-Nt: transfer.feed.Feed with N reader threads over contiguous batches (inference), and
  feed-shuffled-Nt over shuffled index batches (training) at the largest N;
- memcpy-Nt: the same number of bytes copied from memory into one preallocated batch buffer by N
  threads: what the host's memory allows, without the file system.
On CUDA each batch also goes through training.to_input (normalised float on the device), and
`resident` is the same loop over the split already on the GPU: the ceiling of any feed. With
--arch, extraction (training.predict_batches) runs from the file and from the resident split.
Results: benchmarks/results/feed-*.json and a printed table. Speed is measured, never asserted in tests.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MEMCPY_SOURCE_BYTES = 1 << 30  # the memcpy ceiling cycles through this much memory (a split's worth would double the RAM needed)


def available_memory() -> int:
    """Bytes the kernel could give without swapping (MemAvailable), or 0 where it does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_room(folder: Path, nbytes: int) -> None:
    """Stop before writing a split that the disk cannot hold or the page cache cannot keep."""
    free = shutil.disk_usage(folder).free
    memory = available_memory()
    if free < nbytes * 1.1:
        raise SystemExit(f"{folder} has {free / 1e9:.1f} GB free; the split needs {nbytes / 1e9:.1f} GB: lower --images")
    if memory and memory < nbytes + MEMCPY_SOURCE_BYTES + (1 << 30):
        raise SystemExit(f"{memory / 1e9:.1f} GB of memory available; the split ({nbytes / 1e9:.1f} GB) must stay in "
                         f"the page cache beside the memcpy source: lower --images")


def write_data(folder: Path, n: int, size: int):
    """n uint8 (3, size, size) images (64 random ones, repeated) as a prepared split; its Images."""
    from transfer import storage

    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (64, 3, size, size), dtype=np.uint8)
    storage.write_split(folder, "train", (pool[i % 64] for i in range(n)), count=n, image_size=size,
                        labels=torch.zeros(n, dtype=torch.long), meta={"classes": ["x"], "split": "train"})
    return storage.read_split(folder, "train")[0]["images"]


def warm_page_cache(path: Path) -> float:
    """Read the file twice with plain read() calls into one 8 MiB buffer; the second pass's GB/s (from
    the page cache, one thread: the kernel's copy alone)."""
    buf = memoryview(torch.empty(8 << 20, dtype=torch.uint8).numpy())  # 64-byte aligned, as Feed's buffers
    rate = 0.0
    for _ in range(2):
        start, total = time.perf_counter(), 0
        with open(path, "rb", buffering=0) as f:
            while got := f.readinto(buf):
                total += got
        rate = total / (time.perf_counter() - start) / 1e9
    return rate


def old_read(images, start: int, stop: int) -> torch.Tensor:
    """Images[start:stop] as storage.py read it before issue 18: a fresh bytearray per batch."""
    from transfer import storage

    with storage._opened(images.path) as fd:
        buf = bytearray((stop - start) * images._row)
        view, pos = memoryview(buf), images._offset + start * images._row
        while view:
            got = os.preadv(fd, [view], pos)
            if got == 0:
                raise EOFError(f"{images.path}: truncated")
            view, pos = view[got:], pos + got
    return torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).reshape(stop - start, *images.shape[1:]))


def old_path(images, batch_size: int, device: torch.device):
    """The feed before issue 18, as it was in transfer/training.py: prefetch(lambda s: _host(images[s:s + b]))
    with one thread, two batches ahead, each pinned afresh for a CUDA target."""
    cuda = device.type == "cuda"

    def fetch(s):
        batch = old_read(images, s, min(s + batch_size, len(images)))
        return batch.pin_memory() if cuda else batch

    keys = list(range(0, len(images), batch_size))
    with ThreadPoolExecutor(1) as pool:
        pending = deque(pool.submit(fetch, k) for k in keys[:2])
        for i in range(len(keys)):
            item = pending.popleft().result()
            if i + 2 < len(keys):
                pending.append(pool.submit(fetch, keys[i + 2]))
            yield item


@contextlib.contextmanager
def memcpy(n: int, row_shape: tuple[int, ...], batch_size: int, threads: int):
    """A function making one pass of n images' worth of batches, each copied from memory into one
    preallocated buffer by `threads` threads."""
    row = int(np.prod(row_shape))
    rows = max(batch_size, min(n, MEMCPY_SOURCE_BYTES // row))
    source = np.random.default_rng(1).integers(0, 256, (rows, row), dtype=np.uint8)
    out = torch.ones((batch_size, row), dtype=torch.uint8).numpy()  # touched before the clock starts, 64-byte aligned

    def one_pass():
        for s in range(0, n, batch_size):
            b = min(batch_size, n - s)
            first = s % (rows - b + 1)
            bounds = [b * t // threads for t in range(threads + 1)]
            list(pool.map(np.copyto, [out[lo:hi] for lo, hi in zip(bounds, bounds[1:])],
                          [source[first + lo:first + hi] for lo, hi in zip(bounds, bounds[1:])]))
            yield out[:b]

    with ThreadPoolExecutor(threads) as pool:
        yield one_pass


def time_passes(make_batches, consume, n: int, row_bytes: int, repeats: int, sync) -> dict:
    """Best and median rate over `repeats` full passes of make_batches()."""
    seconds = []
    for _ in range(repeats):
        sync()
        start, count = time.perf_counter(), 0
        for batch in make_batches():
            consume(batch)
            count += len(batch)
        sync()
        seconds.append(time.perf_counter() - start)
        if count != n:
            raise RuntimeError(f"a pass delivered {count} images, not {n}")
    best = min(seconds)
    return dict(images=n, seconds=round(best, 4), images_per_second=round(n / best, 1),
                gb_per_second=round(n * row_bytes / best / 1e9, 3),
                median_images_per_second=round(n / statistics.median(seconds), 1),
                runs_seconds=[round(s, 4) for s in seconds])


def measure(*, workdir: Path, images: int, image_size: int, batch_size: int, threads: list[int], repeats: int,
            device: str = "cpu", arch: str | None = None) -> dict:
    """Every measurement on a split of `images` images written under `workdir` (removed afterwards)."""
    from transfer import training
    from transfer.feed import Feed

    device = training.pick_device(device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    row_shape = (3, image_size, image_size)
    row_bytes = int(np.prod(row_shape))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    # On CUDA the consumer turns each batch into the model's input on the device; on the CPU it takes it.
    consume = (lambda b: training.to_input(b, mean=mean, std=std, device=device)) if cuda else (lambda b: None)
    folder = Path(tempfile.mkdtemp(prefix="feed-bench-", dir=workdir))
    result = dict(load_average_before=[round(x, 2) for x in os.getloadavg()], results={})
    try:
        check_room(folder, images * row_bytes)
        start = time.perf_counter()
        split = write_data(folder, images, image_size)
        result["write_seconds"] = round(time.perf_counter() - start, 1)
        result["page_cache_read_gb_per_second"] = round(warm_page_cache(split.path), 3)
        slices = [slice(s, s + batch_size) for s in range(0, images, batch_size)]
        shuffled = list(torch.randperm(images, generator=torch.Generator().manual_seed(0)).split(batch_size))
        runs = {"old": lambda: old_path(split, batch_size, device)}
        for t in threads:
            runs[f"feed-{t}t"] = lambda t=t: Feed(split, slices, device=device, threads=t)
        runs[f"feed-shuffled-{max(threads)}t"] = lambda: Feed(split, shuffled, device=device, threads=max(threads))
        if cuda:
            resident = split[:].to(device)
            runs["resident"] = lambda: (resident[s] for s in slices)
        for name, make in runs.items():
            result["results"][name] = time_passes(make, consume, images, row_bytes, repeats, sync)
            print(f"{name:>20}: {result['results'][name]['images_per_second']:>9,.0f} img/s "
                  f"{result['results'][name]['gb_per_second']:6.2f} GB/s", flush=True)
        for t in threads:
            with memcpy(images, row_shape, batch_size, t) as make:
                name = f"memcpy-{t}t"
                result["results"][name] = time_passes(make, lambda b: None, images, row_bytes, repeats, lambda: None)
                print(f"{name:>20}: {result['results'][name]['images_per_second']:>9,.0f} img/s "
                      f"{result['results'][name]['gb_per_second']:6.2f} GB/s", flush=True)
        if arch:
            result["extraction"] = extraction(arch, split, resident if cuda else split[:], batch_size, device, repeats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def extraction(arch: str, split, resident: torch.Tensor, batch_size: int, device: torch.device, repeats: int) -> dict:
    """Extraction (predict_batches, random weights, amp as the stages run it) from the file against
    from the split already on the device: how much of the model's own speed the feed leaves."""
    from transfer import models, training

    backbone, _ = models.build_backbone(arch, split.shape[-1])
    kw = dict(mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, batch_size=batch_size, device=device, amp=True)
    training.predict(backbone, resident[:batch_size], **kw)  # warm-up at the batch shape
    out = {}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for name, source in (("fed", split), ("resident", resident)):
        out[name] = time_passes(lambda: training.predict_batches(backbone, source, **kw), lambda y: None,
                                len(split), int(np.prod(split.shape[1:])), repeats, sync)
        print(f"{'extract-' + name:>20}: {out[name]['images_per_second']:>9,.0f} img/s", flush=True)
    out["fed_over_resident"] = round(out["fed"]["images_per_second"] / out["resident"]["images_per_second"], 3)
    return dict(arch=arch, **out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000, help="images in the split (20,000 at 224 px = 3 GB)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=512, help="extract's default")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4], help="reader thread counts to time")
    ap.add_argument("--repeats", type=int, default=3, help="passes per measurement (the best is reported)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--arch", default=None, help="also time extraction with this backbone (fed vs resident)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                    help="where the scratch split is written (a disk, so reads come from the page cache)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.images < 1 or args.batch_size < 1 or args.repeats < 1 or min(args.threads) < 1:
        raise SystemExit("--images, --batch-size, --repeats and every --threads must be at least 1")
    result = dict(machine=platform.processor() or platform.machine(), cores=len(os.sched_getaffinity(0)),
                  torch=torch.__version__, device=args.device,
                  gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
                  images=args.images, image_size=args.image_size, batch_size=args.batch_size, repeats=args.repeats,
                  **measure(workdir=args.workdir, images=args.images, image_size=args.image_size,
                            batch_size=args.batch_size, threads=args.threads, repeats=args.repeats,
                            device=args.device, arch=args.arch))
    out = ROOT / "benchmarks" / "results" / f"feed-{args.device}-{args.image_size}px-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
