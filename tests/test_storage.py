"""Prepared splits are written as a stream and read by row, never whole."""
import numpy as np
import pytest
import torch

from transfer import storage


def write(tmp_path, n=50, size=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    storage.write_split(tmp_path, "train", iter(images), count=n, image_size=size, labels=torch.arange(n) % 3,
                        meta={"classes": ["a", "b", "c"], "split": "train"})
    return images


def test_rows_read_back_exactly_by_slice_index_and_iteration(tmp_path):
    images = write(tmp_path)
    split, meta = storage.read_split(tmp_path, "train")
    imgs = split["images"]
    assert len(imgs) == 50 and imgs.shape == (50, 3, 4, 4) and meta["classes"] == ["a", "b", "c"]
    assert torch.equal(imgs[10:20], torch.from_numpy(images[10:20]))
    assert torch.equal(imgs[:], torch.from_numpy(images)) and imgs[50:].shape == (0, 3, 4, 4)
    idx = torch.tensor([7, 3, 4, 5, 49, 0, 3])  # shuffled, with a run (3, 4, 5) and a repeat
    assert torch.equal(imgs[idx], torch.from_numpy(images[idx.numpy()]))
    assert torch.equal(imgs[::7], torch.from_numpy(images[::7]))
    assert torch.equal(torch.stack(list(imgs)), torch.from_numpy(images))
    assert torch.equal(split["labels"], torch.arange(50) % 3)
    # A single index drops the leading dimension, as a tensor's does (it returned (1,3,H,W) before).
    for key, want in ((7, images[7]), (np.int64(7), images[7]), (torch.tensor(7), images[7]), (-1, images[49])):
        assert torch.equal(imgs[key], torch.from_numpy(want)), key
    for bad in (torch.tensor([50]), 50, -51):
        with pytest.raises(IndexError):
            imgs[bad]
    # The file is a plain .npy: numpy opens it too.
    assert np.array_equal(np.load(storage.images_file(tmp_path, "train")), images)


def test_a_wrong_count_or_a_truncated_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="9 images written, 10 announced"):
        storage.write_split(tmp_path, "val", iter(np.zeros((9, 3, 4, 4), np.uint8)), count=10, image_size=4,
                            labels=torch.zeros(10, dtype=torch.long), meta={})
    assert not storage.images_file(tmp_path, "val").exists()  # atomic: nothing half-written stays
    write(tmp_path)
    path = storage.images_file(tmp_path, "train")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(EOFError, match="truncated; re-run prepare"):
        storage.read_split(tmp_path, "train")[0]["images"][40:50]
