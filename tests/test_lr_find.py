"""The balanced sampler (finetune.sampler / train_head.sampler), off by default."""
import pytest
import torch

from test_recipe import _fit, _gaussians, _images, _net
from transfer import models, training

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny networks (conftest restores the thread count)


# --- the balanced sampler --------------------------------------------------------------------------------

def test_shuffle_is_the_epoch_it_always_was():
    labels = torch.arange(23) % 3
    a = training.epoch_batches(labels, 8, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    b = list(torch.tensor_split(torch.randperm(23, generator=g), 3))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 3


def test_balanced_draws_classes_evenly_and_reproducibly():
    labels = torch.tensor([0] * 900 + [1] * 100)
    epoch = lambda seed: training.epoch_batches(labels, 64, torch.Generator().manual_seed(seed), "balanced")
    drawn = torch.cat(epoch(0))
    assert len(drawn) == 1000 and len(epoch(0)) == 16  # as many draws as images, batched as shuffle batches
    minority = float((labels[drawn] == 1).float().mean())
    assert 0.45 < minority < 0.55, minority  # 10% of the images, half the draws (binomial sd 0.016)
    assert torch.equal(drawn, torch.cat(epoch(0))) and not torch.equal(drawn, torch.cat(epoch(1)))
    assert len(torch.unique(drawn[labels[drawn] == 1])) < 100  # with replacement: some minority images twice
    with pytest.raises(ValueError, match="sampler: 'oversample' is not valid; choose one of: shuffle, balanced"):
        training.epoch_batches(labels, 64, torch.Generator(), "oversample")


def test_balanced_sampler_raises_minority_recall():
    """9:1 overlapping Gaussians, as test_recipe's class-weights test: the head trained on balanced draws puts
    its boundary near the middle. Minority recall on a balanced test set of 2,000: measured 0.355 (shuffle) and
    0.765 (balanced); over training seeds 0-2 and another training sample, margins of 0.33 to 0.45."""
    train_x, train_y = _gaussians(90, 10, seed=0)
    test_x, test_y = _gaussians(1000, 1000, seed=2)
    recall = {}
    for sampler in ("shuffle", "balanced"):
        head = models.make_head("linear", 2, 2)
        state, _, _ = training.train_head(train_x=train_x, train_y=train_y, val_x=train_x[:0], val_y=train_y[:0],
                                          head=head, lr=0.1, epochs=60, weight_decay=0.0, batch_size=50, seed=0,
                                          device=CPU, sampler=sampler)
        head.load_state_dict(state)
        with torch.no_grad():
            recall[sampler] = float((head(test_x).argmax(1)[test_y == 1] == 1).float().mean())
    assert recall["balanced"] > recall["shuffle"] + 0.2, recall


def test_fit_draws_its_epochs_with_the_sampler(monkeypatch):
    calls = []
    real = training.epoch_batches
    monkeypatch.setattr(training, "epoch_batches", lambda *a, **k: calls.append(a[3:] or k) or real(*a, **k))
    images, labels = _images(12)
    _fit(_net(), images, labels, epochs=2, sampler="balanced")
    assert calls == [("balanced",), ("balanced",)]
