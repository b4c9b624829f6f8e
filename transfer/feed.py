"""Batches of uint8 images fed to the compute device as fast as the host can read them.

Feed(images, batches, device=...) yields the uint8 (B, 3, S, S) batches asked for, in order: rows
[a, b) for inference (slices), any rows for training (index tensors). Behind it:
- several threads read each batch (os.preadv releases the GIL) straight into a ring of staging
  buffers, `depth` batches ahead of the consumer. The buffers are allocated once: pinned ones are
  kept by torch's caching host allocator, CPU ones by this module, for the next Feed;
- on CUDA each batch is copied to the device on a side stream; the consumer's stream waits for that
  copy alone, and a staging buffer is refilled only after its copy has finished;
- normalisation stays on the device (training.to_input), so the host moves uint8, a quarter of float32.

On the CPU the consumer gets a view of a staging buffer. It is never overwritten while the consumer
can see it: the ring holds depth + 2 buffers (the batches in flight, the one being handed over, and
the previous one, which a `for` loop's variable still holds while the next is fetched), and a buffer
still referenced when its turn comes (a consumer that keeps batches) is left to the consumer and
replaced by a new one.

A tensor is sliced directly, except a CPU tensor for a CUDA target, which is staged like a file:
for a CPU target or a tensor already on the GPU nothing needs reading, and a copy would only cost time.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

# Enough readers to keep one H200 fed from the page cache (6 GB/s at 224 px; one thread copied up
# to 4 GB/s on this project's VM), without taking every core from the consumer on small machines.
DEFAULT_THREADS = min(4, len(os.sched_getaffinity(0)))
# Smaller parts than this are not split between threads: handing a task to a thread and back took
# ~150 us here, and reading 4 MiB from the page cache about 1 ms.
MIN_PART_BYTES = 4 << 20


# CPU staging buffers a finished Feed left free are kept (up to this much) for the next Feed: fit
# makes one per epoch and predict one per call, and memory touched for the first time cost 3 s per
# GB on this project's VM, four to five times what reading into it costs. (Pinned buffers need no
# such list: torch's caching host allocator keeps them.)
SPARE_BYTES = 1 << 30


class _Spares:
    def __init__(self, limit: int):
        self.limit, self.buffers, self.lock = limit, [], threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor | None:
        """The smallest spare flat uint8 buffer of at least nbytes, or None."""
        with self.lock:
            fits = [i for i, b in enumerate(self.buffers) if b.numel() >= nbytes]
            if not fits:
                return None
            return self.buffers.pop(min(fits, key=lambda i: self.buffers[i].numel()))

    def give(self, buffer: torch.Tensor) -> None:
        """Keep `buffer` (no longer referenced by anyone else) for a later Feed; the largest are kept."""
        with self.lock:
            self.buffers.append(buffer.view(-1))
            self.buffers.sort(key=torch.Tensor.numel, reverse=True)
            while sum(b.numel() for b in self.buffers) > self.limit:
                self.buffers.pop()


_spares = _Spares(SPARE_BYTES)


def _storage_refs(buffer: torch.Tensor) -> int:
    """How many tensors share `buffer`'s memory (views included), whoever holds them."""
    return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata)


class _SideStreamCopy:
    """Host-to-device copies on their own stream, so the next batch's copy overlaps the consumer's
    kernels on the current stream instead of queueing behind them."""

    def __init__(self, device: torch.device):
        self.device, self.stream = device, torch.cuda.Stream(device)

    def __call__(self, host: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """(the batch on the device, an event that completes when `host` may be overwritten)."""
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            on_device = torch.empty(host.shape, dtype=host.dtype, device=self.device)
            on_device.copy_(host, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        consumer.wait_event(copied)  # the consumer's kernels start after the copy, not before
        # Allocated on the side stream: without this, its memory could be handed to the next copy once
        # the consumer drops it, while the consumer's kernels still read it.
        on_device.record_stream(consumer)
        return on_device, copied


def _read_part(images, buffer: torch.Tensor, lo: int, hi: int, rows, copied) -> None:
    """One thread's share of a batch: `rows` into buffer[lo:hi], once the buffer's last copy is done."""
    if copied is not None:
        copied.synchronize()
    out = buffer[lo:hi]
    if not torch.is_tensor(images):  # storage.Images, or anything else that reads rows into an array
        images.read_into(out.numpy(), rows)
    elif isinstance(rows, slice):
        out.copy_(images[rows])
    else:
        torch.index_select(images, 0, torch.from_numpy(rows), out=out)


class Feed:
    """The batches `batches` (slices of step 1, or index tensors/arrays) of `images` (a uint8 tensor,
    or storage.Images: anything with a shape and read_into(array, rows)), as uint8 tensors on
    `device`, read by `threads` threads `depth` batches ahead. Stopping early (break, close, an
    exception) cancels the reads not yet started and waits for the others: no thread outlives it."""

    def __init__(self, images, batches: Sequence, *, device: torch.device, threads: int | None = None, depth: int = 2):
        threads = DEFAULT_THREADS if threads is None else threads
        if threads < 1 or depth < 1:
            raise ValueError(f"Feed needs threads >= 1 and depth >= 1, got threads={threads}, depth={depth}")
        self.images, self.device, self.threads, self.depth = images, torch.device(device), threads, depth
        self.keys = [self._key(b) for b in batches]
        self.buffers_used = 0  # staging buffers: depth + 2, one more for each batch the consumer keeps
        self.buffers_new = 0  # ... of which were allocated, not spares left by an earlier Feed

    def _key(self, batch):
        """A slice with its bounds resolved; anything else as an int64 array of row numbers."""
        if isinstance(batch, slice):
            start, stop, step = batch.indices(len(self.images))
            if step != 1:
                raise ValueError(f"Feed takes slices of step 1, not {step}")
            return slice(start, max(start, stop))
        return np.asarray(batch.cpu() if torch.is_tensor(batch) else batch, dtype=np.int64).reshape(-1)

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[torch.Tensor]:
        images, device = self.images, self.device
        if torch.is_tensor(images) and not (images.is_cpu and device.type == "cuda"):
            for key in self.keys:
                yield images[key if isinstance(key, slice) else torch.from_numpy(key)].to(device)
            return
        if not self.keys:
            return
        yield from self._staged()

    def _rows(self, key) -> int:
        return key.stop - key.start if isinstance(key, slice) else len(key)

    def _parts(self, key) -> list[tuple[int, int, object]]:
        """(lo, hi, rows): the batch's rows split between the threads, each part filling buffer[lo:hi]."""
        n = self._rows(key)
        row_bytes = int(np.prod(self.images.shape[1:]))
        count = max(1, min(self.threads, n * row_bytes // MIN_PART_BYTES))
        bounds = [n * p // count for p in range(count + 1)]
        if isinstance(key, slice):
            return [(lo, hi, slice(key.start + lo, key.start + hi)) for lo, hi in zip(bounds, bounds[1:])]
        return [(lo, hi, key[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]

    def _new_buffer(self, rows: int) -> torch.Tensor:
        shape = (rows, *self.images.shape[1:])
        self.buffers_used += 1
        if self.device.type == "cpu" and (spare := _spares.take(int(np.prod(shape)))) is not None:
            return spare[:int(np.prod(shape))].view(shape)
        # Not an inference tensor even under inference_mode, so the threads may write into it.
        with torch.inference_mode(False):
            buffer = torch.empty(shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        self.buffers_new += 1
        return buffer

    def _staged(self) -> Iterator[torch.Tensor]:
        cuda = self.device.type == "cuda"
        keys, depth = self.keys, self.depth
        rows = max(self._rows(k) for k in keys)
        ring = [self._new_buffer(rows) for _ in range(depth + 2)]
        free_refs = [_storage_refs(b) for b in ring]  # the count while only the ring holds a buffer
        copied = [None] * len(ring)  # per buffer: the CUDA event after which it may be refilled
        copy = _SideStreamCopy(self.device) if cuda else None
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="feed")
        pending: deque = deque()
        batch = None

        def submit(i: int) -> None:
            slot = i % len(ring)
            if not cuda and _storage_refs(ring[slot]) != free_refs[slot]:
                ring[slot] = self._new_buffer(rows)  # the consumer still holds this one: it keeps it
                free_refs[slot] = _storage_refs(ring[slot])
            parts = self._parts(keys[i])
            pending.append((slot, [pool.submit(_read_part, self.images, ring[slot], lo, hi, part, copied[slot])
                                   for lo, hi, part in parts]))

        try:
            for i in range(min(depth, len(keys))):
                submit(i)
            for i in range(len(keys)):
                slot, reads = pending.popleft()
                for read in reads:
                    read.result()  # a reader's exception (e.g. a truncated file) is raised here
                if i + depth < len(keys):
                    submit(i + depth)  # into the buffer of batch i - 2: neither in flight nor in hand
                batch = ring[slot][:self._rows(keys[i])]
                if cuda:
                    batch, copied[slot] = copy(batch)
                yield batch
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if cuda:
                copy.stream.synchronize()  # no copy still reads a buffer that is about to be freed
            else:
                batch = None
                for buffer, refs in zip(ring, free_refs):
                    if _storage_refs(buffer) == refs:  # not a batch the consumer still holds
                        _spares.give(buffer)
