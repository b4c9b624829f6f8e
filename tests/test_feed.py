"""transfer.feed: batches read by several threads into staging buffers allocated once, in order,
never overwritten under the consumer, failures raised in the consumer, threads gone when it stops."""
import copy
import threading
import time

import numpy as np
import pytest
import torch

from transfer import feed, storage, training
from transfer.feed import Feed


def write(tmp_path, n=50, size=4, seed=0, split="train"):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    storage.write_split(tmp_path, split, iter(images), count=n, image_size=size, labels=torch.zeros(n, dtype=torch.long),
                        meta={"classes": ["a"], "split": split})
    return storage.read_split(tmp_path, split)[0]["images"], images


def feed_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("feed")]


@pytest.fixture
def small_parts(monkeypatch):
    """Every batch split between all the threads, however small its rows (tiny test images are far
    below the 1 MiB a part normally needs)."""
    monkeypatch.setattr(feed, "MIN_PART_BYTES", 1)


@pytest.mark.parametrize("threads,depth", [(1, 1), (3, 2), (4, 3)])
def test_contiguous_and_index_batches_arrive_whole_and_in_order(tmp_path, small_parts, threads, depth):
    images, want = write(tmp_path)
    slices = [slice(s, s + 16) for s in range(0, 50, 16)]  # 16, 16, 16 and a last partial batch of 2
    got = [b.clone() for b in Feed(images, slices, device="cpu", threads=threads, depth=depth)]
    assert [len(b) for b in got] == [16, 16, 16, 2]
    assert torch.equal(torch.cat(got), torch.from_numpy(want))
    # Training's batches: shuffled rows, a run of consecutive rows, a repeat, and an empty batch.
    index = [torch.randperm(50, generator=torch.Generator().manual_seed(0))[:13], torch.tensor([7, 8, 9, 3, 3, 49, 0]),
             torch.tensor([], dtype=torch.long), torch.arange(50)]
    got = [b.clone() for b in Feed(images, index, device="cpu", threads=threads, depth=depth)]
    assert [len(b) for b in got] == [13, 7, 0, 50]
    for batch, idx in zip(got, index):
        assert torch.equal(batch, torch.from_numpy(want[idx.numpy()]))
    assert not feed_threads()


def test_an_empty_split_feeds_nothing_or_empty_batches(tmp_path):
    images, _ = write(tmp_path, n=0)
    assert list(Feed(images, [], device="cpu")) == []
    (batch,) = Feed(images, [slice(0, 8)], device="cpu")
    assert batch.shape == (0, 3, 4, 4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5))
    out = training.predict(model, images, mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=8, device=torch.device("cpu"), amp=False)
    assert out.shape == (0, 5)


def test_a_held_batch_is_never_overwritten(tmp_path, small_parts):
    """The consumer holds the previous batch while the readers run ahead: the ring of depth + 2 is
    enough, nothing is reallocated, and the held batch still reads as it arrived."""
    images, want = write(tmp_path, n=64)
    batches = [slice(s, s + 4) for s in range(0, 64, 4)]
    f = Feed(images, batches, device="cpu", threads=2, depth=2)
    previous = None
    for i, batch in enumerate(f):
        time.sleep(0.02)  # the readers fill every buffer they may while the consumer works
        assert torch.equal(batch, torch.from_numpy(want[4 * i:4 * i + 4]))
        if previous is not None:
            assert torch.equal(previous, torch.from_numpy(want[4 * i - 4:4 * i]))
        previous = batch
    assert f.buffers_used == 2 + 2
    again = Feed(images, batches, device="cpu", threads=2, depth=2)
    assert all(torch.equal(b, torch.from_numpy(want[4 * i:4 * i + 4])) for i, b in enumerate(again))
    assert again.buffers_new <= 1  # the buffers left free by the first feed (all but the one `previous` holds)


def test_batches_a_consumer_keeps_are_left_to_it(tmp_path, small_parts):
    """A consumer that keeps every batch (list(), or a view of one) gets buffers of its own: a buffer
    still referenced is replaced in the ring, never refilled."""
    images, want = write(tmp_path, n=64)
    batches = [slice(s, s + 4) for s in range(0, 64, 4)]
    kept = list(Feed(images, batches, device="cpu", threads=2, depth=1))
    assert torch.equal(torch.cat(kept), torch.from_numpy(want))
    f = Feed(images, batches, device="cpu", threads=2, depth=1)
    first_rows = [batch[0] for batch in f]  # views: the batch itself is dropped, its buffer is not free
    assert all(torch.equal(row, torch.from_numpy(want[4 * i])) for i, row in enumerate(first_rows))
    assert f.buffers_used == len(batches)


def test_a_truncated_file_stops_the_consumer_with_the_reason(tmp_path, small_parts):
    images, _ = write(tmp_path)
    path = storage.images_file(tmp_path, "train")
    path.write_bytes(path.read_bytes()[:-100])
    got = []
    with pytest.raises(EOFError, match="truncated; re-run prepare"):
        for batch in Feed(images, [slice(s, s + 10) for s in range(0, 50, 10)], device="cpu", threads=3):
            got.append(batch.clone())
    assert len(got) == 4  # the rows before the damage arrived
    assert not feed_threads()
    with pytest.raises(IndexError, match="out of range for 50 images"):
        list(Feed(images, [torch.tensor([1, 50])], device="cpu"))


def test_stopping_early_ends_the_threads(tmp_path, small_parts):
    images, want = write(tmp_path, n=200)
    batches = [slice(s, s + 2) for s in range(0, 200, 2)]
    it = iter(Feed(images, batches, device="cpu", threads=4, depth=3))
    assert torch.equal(next(it), torch.from_numpy(want[:2]))
    assert feed_threads()
    it.close()
    assert not feed_threads()
    for _ in Feed(images, batches, device="cpu", threads=4):  # a break does the same
        break
    assert not feed_threads()


def test_bad_arguments_are_refused():
    images = torch.zeros((4, 3, 2, 2), dtype=torch.uint8)
    with pytest.raises(ValueError, match="threads >= 1 and depth >= 1"):
        Feed(images, [], device="cpu", threads=0)
    with pytest.raises(ValueError, match="slices of step 1"):
        Feed(images, [slice(0, 4, 2)], device="cpu")


def test_a_tensor_is_sliced_directly_on_the_cpu():
    images = torch.randint(0, 256, (10, 3, 2, 2), dtype=torch.uint8)
    f = Feed(images, [slice(0, 6), torch.tensor([9, 0])], device="cpu")
    first, second = f
    assert first.data_ptr() == images.data_ptr() and torch.equal(second, images[[9, 0]])
    assert f.buffers_used == 0


def test_predictions_and_training_from_the_file_equal_those_from_memory(tmp_path):
    """The feed changes where bytes travel, never a result: predict and fit from the prepared file
    give exactly what they give from the same images held in memory."""
    images, want = write(tmp_path, n=40, size=8)
    memory = torch.from_numpy(want)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=16, device=torch.device("cpu"), amp=False)
    assert torch.equal(training.predict(model, images, **kw), training.predict(model, memory, **kw))
    labels = torch.arange(40) % 3
    results = []
    for source, val in ((images, images.rows(0, 10)), (memory, memory[:10])):
        net = copy.deepcopy(model)
        best, history, _ = training.fit(
            net, train_images=source, train_labels=labels, val_images=val, val_labels=labels[:10], param_groups=[{"params": list(net.parameters()), "lr": 0.05}], epochs=2, batch_size=8,
            momentum=0.9, weight_decay=0.0, scheduler="none", step_size=1, gamma=1.0, augment_pad=1, augment_hflip=True,
            mean=(0.5,) * 3, std=(0.25,) * 3, device=torch.device("cpu"), amp=False, seed=0, eval_batch_size=16,
            recalibrate_bn=True, log=lambda _: None)
        results.append((best, history))
    (a, ha), (b, hb) = results
    assert ha == hb and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
def test_cuda_batches_arrive_on_the_device_intact_behind_a_busy_stream(tmp_path):
    """The side-stream copy: batches on the GPU equal the file's rows even when the consumer's stream is
    kept busy (its kernels queue behind every batch) and the readers reuse every staging buffer."""
    images, want = write(tmp_path, n=96, size=32)
    device = torch.device("cuda")
    batches = [slice(s, s + 8) for s in range(0, 96, 8)] + [torch.randperm(96)[:16]]
    f = Feed(images, batches, device=device, threads=3, depth=2)
    busy = torch.randn(2048, 2048, device=device)
    sums = []
    for batch, key in zip(f, batches):
        assert batch.device.type == "cuda"
        for _ in range(4):
            busy = busy @ busy / busy.norm()  # the consumer's stream lags the host
        sums.append((batch.int().sum((1, 2, 3)), key))
    torch.cuda.synchronize()
    for got, key in sums:
        rows = want[key] if isinstance(key, slice) else want[key.numpy()]
        assert torch.equal(got.cpu(), torch.from_numpy(rows).int().sum((1, 2, 3)))
    assert f.buffers_used == 2 + 2
    memory = torch.from_numpy(want)  # a CPU tensor for a CUDA target is staged through pinned memory too
    assert torch.equal(torch.cat([b.cpu() for b in Feed(memory, batches[:-1], device=device)]), memory)
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=32, device=device, amp=False)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    assert torch.equal(training.predict(model, images, **kw), training.predict(model, memory.to(device), **kw))
