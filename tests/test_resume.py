"""fit()'s resume: a run stopped after an epoch and resumed from its checkpoint ends exactly as an
uninterrupted one, dropout included. Dropout draws from the global generator of the device it runs
on, the CPU's or the GPU's, so the checkpoint holds both."""
import pytest
import torch
from torch import nn

from transfer import io, models, training


class Killed(Exception):
    pass


def _fit(device: torch.device, checkpoint, *, stop_at: int | None = None) -> dict:
    """3 epochs of a small BatchNorm network with an mlp head (dropout 0.5), checkpointed every epoch,
    the last epoch's weights kept (no validation split); with stop_at, the run dies when epoch stop_at
    is reported (before its checkpoint is written)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 3, 12, 12), dtype=torch.uint8, generator=g)
    labels = torch.arange(40) % 3
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())
    model = models.Classifier(backbone, models.make_head("mlp", 8, 3, hidden=32, dropout=0.5))

    def log(line: str) -> None:
        if stop_at is not None and line.startswith(f"epoch {stop_at}/"):
            raise Killed

    best, _, _ = training.fit(
        model, train_images=images, train_labels=labels, val_images=images[:0], val_labels=labels[:0],
        param_groups=[{"params": model.parameters(), "lr": 0.05}], epochs=3, batch_size=8, momentum=0.9,
        weight_decay=0.0, scheduler="cosine", step_size=1, gamma=1.0, augment_pad=0, augment_hflip=False,
        mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, device=device, amp=False, seed=0,
        checkpoint=checkpoint, resume=True, fingerprint="same settings", log=log)
    return best


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_resume_with_dropout_matches_uninterrupted(tmp_path, device):
    device = torch.device(device)
    training.configure_runtime(threads=0, deterministic=True)  # CUDA: bit-identical runs are the claim
    try:
        uninterrupted = _fit(device, tmp_path / "a.pt")
        ckpt = tmp_path / "b.pt"
        with pytest.raises(Killed):
            _fit(device, ckpt, stop_at=2)
        state = io.load_checkpoint(ckpt)
        assert state["epoch"] == 1 and (state["rng"][0]["cuda"] is not None) == (device.type == "cuda")
        # The killed run drew epoch 2's dropout masks; the resumed one starts from epoch 1's states.
        resumed = _fit(device, ckpt)
        assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
        # And the test can tell: the same checkpoint with the device's generator reset resumes differently.
        fresh = torch.Generator(device=device).manual_seed(0).get_state()
        state["rng"][0][device.type] = fresh
        io.save_checkpoint(ckpt, state)
        other = _fit(device, ckpt)
        assert not all(torch.equal(uninterrupted[k], other[k]) for k in uninterrupted)
    finally:
        torch.use_deterministic_algorithms(False)
