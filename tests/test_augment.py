"""Issue 19's photo augmentation, each piece checked on a real batch (scikit-image's sample photos at 64 px, uint8
NCHW): RandomResizedCrop per image, the flip, TrivialAugmentWide / RandAugment, timm's mixup and cutmix, all drawn
from fit's generator and leaving torch's and numpy's global generators alone; and the default (pad-crop + flip)
drawing exactly what it always drew, so the default run's outputs stay byte-identical."""
import functools

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from conftest import tiny_params, write_params
from test_recipe import _fit, _images, _net
from test_stages import STAGES, run_pipeline, run_stage
from transfer import augment as aug
from transfer import training

CPU = torch.device("cpu")
PHOTOS = ("astronaut", "chelsea", "coffee")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # conftest restores the thread count


@functools.cache
def _photo_stack(size: int) -> torch.Tensor:
    from skimage import data

    out = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(data, name)())
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return torch.stack(out).contiguous()


def _photos(n: int = 3, size: int = 64) -> torch.Tensor:
    """n uint8 (3, size, size) photos: astronaut, chelsea, coffee, astronaut, ... (a copy each call)."""
    return _photo_stack(size)[torch.arange(n) % len(PHOTOS)].clone()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _global_states():
    return torch.get_rng_state(), np.random.get_state()


def _same_global_states(before, after) -> bool:
    (t0, n0), (t1, n1) = before, after
    return torch.equal(t0, t1) and n0[0] == n1[0] and np.array_equal(n0[1], n1[1]) and n0[2:] == n1[2:]


# --- the default: pad-crop and flip, as before ------------------------------------------------------------

def _augment_before_issue_19(batch, *, pad, hflip, generator):
    """transfer/training.py's augment before this change, verbatim."""
    b, _, h, w = batch.shape
    if pad:
        padded = F.pad(batch, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(batch.device)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(batch.device)
        rows = (oy[:, None] + torch.arange(h, device=batch.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=batch.device))[:, None, None, :]
        bidx = torch.arange(b, device=batch.device)[:, None, None, None]
        cidx = torch.arange(batch.shape[1], device=batch.device)[None, :, None, None]
        batch = padded[bidx, cidx, rows, cols]
    if hflip:
        flip = (torch.rand(b, generator=generator) < 0.5).to(batch.device)
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    return batch


@pytest.mark.parametrize("pad, hflip", [(2, True), (0, True), (3, False), (0, False)])
def test_the_default_pad_crop_and_flip_draw_what_they_always_drew(pad, hflip):
    """The same images and the same generator state after, batch after batch: the default run's outputs (and
    dvc.lock) stay as they were."""
    old, new = _gen(), _gen()
    for _ in range(3):
        batch = _photos(8)
        expected = _augment_before_issue_19(batch, pad=pad, hflip=hflip, generator=old)
        assert torch.equal(training.augment(batch, pad=pad, hflip=hflip, generator=new), expected)
        assert torch.equal(old.get_state(), new.get_state())


def test_flip_mirrors_some_images_and_leaves_the_others():
    batch = _photos(16)
    out = aug.augment(batch, crop="none", hflip=True, generator=_gen())
    flipped = [bool(torch.equal(o, b.flip(-1))) for o, b in zip(out, batch)]
    kept = [bool(torch.equal(o, b)) for o, b in zip(out, batch)]
    assert all(f != k for f, k in zip(flipped, kept))  # each image is one or the other (none is symmetric)
    assert 3 <= sum(flipped) <= 13, flipped  # p = 1/2 each
    assert torch.equal(aug.augment(batch, crop="none", hflip=True, generator=_gen()), out)


def test_pad_crop_is_a_shifted_window_of_the_zero_padded_image():
    batch = _photos(6)
    out = aug.augment(batch, pad=4, crop="pad_crop", generator=_gen(3))
    padded = F.pad(batch, (4, 4, 4, 4))
    for o, p in zip(out, padded):
        windows = [(dy, dx) for dy in range(9) for dx in range(9) if torch.equal(o, p[:, dy:dy + 64, dx:dx + 64])]
        assert len(windows) == 1
    assert not torch.equal(out, batch)


# --- RandomResizedCrop per image --------------------------------------------------------------------------

def test_resized_crop_of_the_whole_square_image_is_the_image():
    batch = _photos(6)
    boxes = aug.crop_boxes(6, 64, 64, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=_gen())
    assert boxes.tolist() == [[0, 0, 64, 64]] * 6
    assert torch.equal(aug.augment(batch, crop="resized_crop", scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=_gen()),
                       batch)


def test_resized_crop_falls_back_to_torchvisions_centred_crop():
    """No try can fit (an area of at least 90% at an aspect ratio of 2 or more in a square): torchvision's fallback,
    the whole width at ratio 2, centred, which its get_params returns deterministically here."""
    from torchvision.transforms import RandomResizedCrop

    expected = list(RandomResizedCrop.get_params(torch.zeros(3, 64, 64), scale=[0.9, 1.0], ratio=[2.0, 3.0]))
    boxes = aug.crop_boxes(5, 64, 64, scale=(0.9, 1.0), ratio=(2.0, 3.0), generator=_gen())
    assert expected == [16, 0, 32, 64] and boxes.tolist() == [expected] * 5
    # A wide image at ratio 1: its centred square.
    expected = list(RandomResizedCrop.get_params(torch.zeros(3, 48, 64), scale=[1.0, 1.0], ratio=[1.0, 1.0]))
    assert aug.crop_boxes(2, 48, 64, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=_gen()).tolist() == [expected] * 2


def test_crop_boxes_follow_torchvisions_distribution():
    """4,000 boxes each from torchvision's RandomResizedCrop.get_params and from ours, on a 64 x 48 image: the same
    means of area fraction, log aspect ratio and relative position (standard errors about 0.005, 0.004, 0.005),
    every box inside the image with its area and ratio within the ranges (up to whole-pixel rounding)."""
    from torchvision.transforms import RandomResizedCrop

    n, height, width, scale, ratio = 4000, 48, 64, (0.08, 1.0), (3 / 4, 4 / 3)
    ours = aug.crop_boxes(n, height, width, scale=scale, ratio=ratio, generator=_gen()).double()
    torch.manual_seed(0)  # conftest restores the global state
    theirs = torch.tensor([RandomResizedCrop.get_params(torch.zeros(3, height, width), scale=list(scale), ratio=list(ratio))
                           for _ in range(n)], dtype=torch.float64)

    def summary(boxes):
        top, left, h, w = boxes.T
        centre_y = torch.where(h < height, top / (height - h).clamp(min=1), torch.full_like(top, 0.5))
        return torch.stack([(h * w / (height * width)).mean(), (w / h).log().mean(), centre_y.mean(),
                            (left / (width - w).clamp(min=1)).mean()])

    assert torch.allclose(summary(ours), summary(theirs), atol=0.025), (summary(ours), summary(theirs))
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    assert area.min() >= 0.08 * 0.8 and area.max() <= 1.0
    assert (w / h).min() >= 0.75 * 0.85 and (w / h).max() <= 4 / 3 / 0.85
    assert len(set(map(tuple, ours.long().tolist()))) > 0.9 * n  # boxes differ image to image


def test_small_crops_zoom_into_a_different_region_of_each_image():
    """Eight copies of one photo, crops of 5-20% of it: eight different outputs, each its box enlarged (bilinear,
    within 1 grey level of torchvision's float resize of the same box); shrunk back to the box's size, it matches
    the photo at the box and nowhere else."""
    from torchvision.transforms.v2.functional import resized_crop

    batch = _photos(1).expand(8, -1, -1, -1).contiguous()
    out = aug.augment(batch, crop="resized_crop", scale=(0.05, 0.2), ratio=(3 / 4, 4 / 3), generator=_gen(5))
    boxes = aug.crop_boxes(8, 64, 64, scale=(0.05, 0.2), ratio=(3 / 4, 4 / 3), generator=_gen(5))
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert len({tuple(b) for b in boxes.tolist()}) == 8
    assert all(not torch.equal(out[i], out[j]) for i in range(8) for j in range(i))
    for image, (top, left, h, w), o in zip(batch, boxes.tolist(), out):
        assert h * w <= 0.25 * 64 * 64
        reference = resized_crop(image.float(), top, left, h, w, [64, 64], antialias=False).round()
        assert (o.float() - reference).abs().max() <= 1
        back = F.interpolate(o[None].float(), size=(h, w), mode="bilinear")  # (1, 3, h, w)
        windows = F.unfold(image[None].float(), (h, w))  # every h x w window of the photo: (1, 3*h*w, positions)
        error = (windows - back.reshape(1, -1, 1)).abs().mean(1)[0]
        assert int(error.argmin()) == top * (64 - w + 1) + left
        # Measured 2.2-3.6 grey levels at the box, at least 13 at any other position.
        others = torch.cat([error[:top * (64 - w + 1) + left], error[top * (64 - w + 1) + left + 1:]])
        assert error.min() < 5 and others.min() > 2 * error.min()


# --- TrivialAugmentWide and RandAugment -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["trivial", "randaugment"])
def test_auto_augment_changes_images_per_image_reproducibly_on_our_generator(kind):
    batch = _photos(12)
    before = _global_states()
    out = aug.augment(batch, crop="none", auto_augment=kind, generator=_gen(1))
    assert _same_global_states(before, _global_states())  # torch's and numpy's global generators untouched
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    changed = [not torch.equal(o, b) for o, b in zip(out, batch)]
    assert sum(changed) >= 8, changed  # TrivialAugmentWide's identity op, or a zero magnitude, leaves a few
    # Each image its own op: the four astronauts do not all come out alike.
    astronauts = out[0::3]
    assert any(not torch.equal(astronauts[0], a) for a in astronauts[1:])
    # Our generator decides, not the global one; another seed gives other images.
    torch.manual_seed(1234)
    np.random.seed(1234)
    assert torch.equal(aug.augment(batch, crop="none", auto_augment=kind, generator=_gen(1)), out)
    assert not torch.equal(aug.augment(batch, crop="none", auto_augment=kind, generator=_gen(2)), out)


def test_every_augmentation_together_takes_as_many_numbers_whatever_the_images():
    """Crop, flip and TrivialAugment on one batch: uint8 at the image size, changed, and the generator moved by an
    amount that depends on the batch size only (the boxes' ten tries are drawn whether needed or not), so what is
    drawn after the batch (the next batches, the next epoch's order) does not depend on the pictures."""
    photos, noise = _photos(9), torch.randint(0, 256, (9, 3, 64, 64), dtype=torch.uint8, generator=_gen(7))
    gens = [_gen(), _gen()]
    for batch, gen in zip((photos, noise), gens):
        out = aug.augment(batch, crop="resized_crop", hflip=True, auto_augment="trivial", generator=gen)
        assert out.dtype == torch.uint8 and out.shape == batch.shape and not torch.equal(out, batch)
    assert torch.equal(gens[0].get_state(), gens[1].get_state())


# --- mixup and cutmix -------------------------------------------------------------------------------------

def _mixed(n: int, *, mixup: float, cutmix: float, smoothing: float = 0.0, seed: int = 0):
    x = _photos(n).float()
    labels = torch.arange(n)  # every image its own class, so each share shows in the targets
    mixer = aug.make_mixup(mixup=mixup, cutmix=cutmix, label_smoothing=smoothing, num_classes=n)
    mixed = x.clone()
    targets = aug.mix_batch(mixed, labels, mixer, generator=_gen(seed))
    return x, mixed, targets


@pytest.mark.parametrize("n", [6, 5])  # fit's batches may be odd: then the middle image stays itself
def test_mixup_mixes_each_image_with_its_mirror_by_one_lambda(n):
    before = _global_states()
    x, mixed, targets = _mixed(n, mixup=0.4, cutmix=0.0)
    assert _same_global_states(before, _global_states())
    assert targets.shape == (n, n) and torch.allclose(targets.sum(1), torch.ones(n))
    lam = float(targets[0, 0])
    assert 0.0 < lam < 1.0 and lam != 0.5
    mirror = torch.arange(n).flip(0)
    expected = lam * torch.eye(n) + (1 - lam) * torch.eye(n)[mirror]
    assert torch.allclose(targets, expected, atol=1e-6)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-3)
    if n % 2:
        assert torch.allclose(mixed[n // 2], x[n // 2], atol=1e-3)
    # Reproducible from our generator; another seed draws another lambda.
    assert torch.equal(_mixed(n, mixup=0.4, cutmix=0.0)[2], targets)
    assert float(_mixed(n, mixup=0.4, cutmix=0.0, seed=1)[2][0, 0]) != lam


def test_mixup_targets_carry_the_label_smoothing():
    _, _, targets = _mixed(6, mixup=1.0, cutmix=0.0, smoothing=0.3)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert float(targets.min()) == pytest.approx(0.3 / 6)  # every class keeps smoothing / classes
    lam = float(targets[0, 0]) - 0.3 / 6
    assert lam / (1 - 0.3) + float(targets[0, 5] - 0.3 / 6) / (1 - 0.3) == pytest.approx(1.0)


def test_cutmix_pastes_one_box_of_the_mirror_image_with_its_area_as_the_share():
    for seed in range(4):
        x, mixed, targets = _mixed(6, mixup=0.0, cutmix=1.0, seed=seed)
        own, pasted = (mixed == x).all(1), (mixed == x.flip(0)).all(1)  # (B, H, W): per pixel, all channels
        assert (own | pasted).all()  # every pixel is the image's own or its mirror's
        region = pasted[0] & ~own[0]
        if not region.any():
            continue
        rows, cols = region.any(1).nonzero().flatten(), region.any(0).nonzero().flatten()
        box = torch.zeros_like(region)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert torch.equal(pasted[0] & box, box) and not (region & ~box).any()  # one rectangle
        assert all(torch.equal(pasted[i] & box, box) for i in range(6))  # the same for every image
        lam = float(targets[0, 0])
        assert 1 - lam == pytest.approx(float(box.float().mean()))  # the box's area is the mirror's share
        assert torch.allclose(targets.sum(1), torch.ones(6))
        break
    else:
        pytest.fail("no seed pasted a box")


def test_with_both_alphas_each_batch_is_mixup_or_cutmix():
    kinds = set()
    for seed in range(12):
        x, mixed, _ = _mixed(6, mixup=1.0, cutmix=1.0, seed=seed)
        kinds.add("cutmix" if ((mixed == x) | (mixed == x.flip(0))).all() else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_soft_target_loss_weighs_each_share_by_its_class_weight():
    g = _gen(0)
    logits = torch.randn(4, 3, generator=g)
    weight = torch.tensor([0.5, 2.0, 1.0])
    labels = torch.tensor([0, 1, 2, 1])
    one_hot = torch.eye(3)[labels]
    # One-hot targets over the summed weights: F.cross_entropy's weighted mean of hard labels.
    assert float(training.soft_target_loss(logits, one_hot, weight) / (one_hot @ weight).sum()) == pytest.approx(
        float(F.cross_entropy(logits, labels, weight=weight)), rel=1e-6)
    # A mix of classes 0 and 1 at 0.3 / 0.7 costs the two images' weighted losses in those shares.
    target = torch.tensor([[0.3, 0.7, 0.0]])
    ce = -F.log_softmax(logits[:1], 1)[0]
    assert float(training.soft_target_loss(logits[:1], target, weight)) == pytest.approx(
        0.3 * 0.5 * float(ce[0]) + 0.7 * 2.0 * float(ce[1]), rel=1e-6)
    assert float(training.soft_target_loss(logits[:1], target)) == pytest.approx(0.3 * float(ce[0]) + 0.7 * float(ce[1]),
                                                                                  rel=1e-6)


# --- in fit -----------------------------------------------------------------------------------------------

_AUGMENTED = dict(crop="resized_crop", crop_scale=(0.3, 1.0), auto_augment="trivial", mixup=0.4, cutmix=1.0,
                  num_classes=3, label_smoothing=0.1)


@pytest.mark.parametrize("weighted", [False, True])
def test_fits_step_with_mixup_descends_the_soft_targets_weighted_mean(weighted):
    """One full-batch step: fit's weights are those of an SGD step by hand on the batch fit mixed (drawn again here
    from the same seed), whose loss is the images' shares weighed by their classes' weights, over the summed weights
    of the targets. The epoch's logged loss is that sum over the image count, as with hard labels."""
    from transfer import models

    images, labels = _images(12, size=16)
    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 2)
    weights = training.balanced_class_weights(labels, 3) if weighted else None
    gen = _gen(0)
    (idx,) = training.epoch_batches(labels, 12, gen)
    x = training.to_input(images[idx], mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, device=CPU,
                          memory_format=torch.contiguous_format)
    mixer = aug.make_mixup(mixup=1.0, cutmix=0.0, label_smoothing=0.1, num_classes=3)
    targets = aug.mix_batch(x, labels[idx], mixer, generator=gen)
    w = torch.ones(3) if weights is None else weights

    def by_hand(norm: torch.Tensor) -> dict:
        net = _net()
        opt = torch.optim.SGD([{"params": list(net.backbone.parameters()), "lr": 0.02},
                               {"params": list(net.head.parameters()), "lr": 0.2}], momentum=0.9, weight_decay=5e-4)
        summed = -(F.log_softmax(net(x), 1) * targets * w).sum()
        (summed / norm).backward()
        opt.step()
        return net.state_dict(), float(summed.detach())

    expected, summed = by_hand((targets @ w).sum())
    net = _net()
    _, history, _ = _fit(net, images, labels, epochs=1, batch_size=12, augment_pad=0, augment_hflip=False, mixup=1.0,
                         label_smoothing=0.1, num_classes=3, class_weights=weights)
    apart = lambda a, b: max(float((a[k] - b[k]).abs().max()) for k in a)
    assert apart(net.state_dict(), expected) < 1e-6
    assert history[0]["train_loss"] == pytest.approx(summed / 12, rel=1e-5)
    if weighted:  # the normaliser matters: over the image count instead, another step
        assert apart(net.state_dict(), by_hand(torch.tensor(12.0))[0]) > 1e-4


def test_fit_mixes_the_steps_whole_batch_so_accumulation_takes_the_same_steps():
    """Mixed before the batch is split into micro-batches: batch 8 accumulated twice takes batch 16's steps."""
    images, labels = _images(32, size=16)
    runs = {}
    for name, batch, k in (("b8x2", 8, 2), ("b16", 16, 1)):
        net = _net()
        _, history, _ = _fit(net, images, labels, epochs=2, batch_size=batch, accumulate=k, **_AUGMENTED)
        runs[name] = (net.state_dict(), history)
    (a, ha), (b, hb) = runs["b8x2"], runs["b16"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert [h["train_loss"] for h in ha] == pytest.approx([h["train_loss"] for h in hb], rel=1e-6)
    plain = _net()
    _fit(plain, images, labels, epochs=2, batch_size=16)
    assert max(float((a[k] - plain.state_dict()[k]).abs().max()) for k in a) > 1e-3  # augmentation did change the run


def test_fit_with_augmentation_leaves_the_global_generators_and_resumes_exactly(tmp_path):
    class Killed(Exception):
        pass

    images, labels = _images(30, size=16)

    def run(checkpoint, stop_at=None):
        def log(line):
            if stop_at is not None and line.startswith(f"epoch {stop_at}/"):
                raise Killed
        return _fit(_net(), images, labels, epochs=3, batch_size=7, checkpoint=checkpoint, resume=True,
                    fingerprint="same", log=log, class_weights=training.balanced_class_weights(labels, 3), **_AUGMENTED)[0]

    uninterrupted = run(tmp_path / "a.pt")
    with pytest.raises(Killed):
        run(tmp_path / "b.pt", stop_at=2)
    np.random.seed(99)  # a resumed process starts with other global states; the run must not depend on them
    numpy_before = np.random.get_state()
    resumed = run(tmp_path / "b.pt")
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    assert np.array_equal(np.random.get_state()[1], numpy_before[1])


def _fit_augmented() -> dict:
    images, labels = _images(26, size=16)
    labels = torch.tensor([0] * 16 + [1] * 6 + [2] * 4)
    net = _net()
    _fit(net, images, labels, epochs=2, batch_size=7, accumulate=2, class_weights=training.balanced_class_weights(labels, 3),
         **_AUGMENTED)
    return net.state_dict()


def _rank(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        state = _fit_augmented()
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_draw_the_same_augmentation_and_match_one(tmp_path, monkeypatch):
    """Each rank augments and mixes the whole step's batch from the shared generator (26 images: two steps of 13, an
    odd batch whose middle image mixes with itself) and trains on its slice (micro-batches of 7 and 6, split 4/3 and
    3/3): two processes take one process's steps, class weights on the soft targets included."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = _fit_augmented()
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path / "two.pt")), nprocs=2)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert diff < 1e-5, diff


# --- through the finetune stage ---------------------------------------------------------------------------

def test_finetune_stage_with_every_augmentation_is_reproducible_byte_for_byte(in_tmp):
    augmented = dict(augment="resized_crop", crop_scale=[0.35, 1.0], auto_augment="trivial", mixup=0.2, cutmix=1.0,
                     label_smoothing=0.1, class_weights="balanced", epochs=2)
    write_params(in_tmp, tiny_params(pretrained={"source": "none"}, strategy="finetune", finetune=augmented))
    run_pipeline(in_tmp, STAGES[:4])
    weights = in_tmp / "models/model/model.safetensors"
    runs = []
    for _ in range(2):
        run_stage("finetune")
        runs.append(weights.read_bytes())
    assert runs[0] == runs[1]
    write_params(in_tmp, tiny_params(pretrained={"source": "none"}, strategy="finetune", finetune={"epochs": 2}))
    run_stage("finetune")
    assert weights.read_bytes() != runs[0]  # the params reached fit: the default augmentation is another run


# --- params -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, fragment", [
    ({"crop_scale": [0.5, 0.2]}, "finetune.crop_scale: [0.5, 0.2] is not valid; give [low, high] with low <= high, both in (0, 1]"),
    ({"crop_scale": [0.0, 1.0]}, "finetune.crop_scale: [0.0, 1.0] is not valid"),
    ({"crop_scale": [0.5, 1.5]}, "finetune.crop_scale: [0.5, 1.5] is not valid"),
    ({"crop_scale": [0.5]}, "finetune.crop_scale: [0.5] is not valid"),
    ({"crop_scale": 0.5}, "finetune.crop_scale: 0.5 is not valid"),
    ({"crop_scale": ["a", "b"]}, "finetune.crop_scale: ['a', 'b'] is not valid"),
    ({"crop_ratio": [0, 1]}, "finetune.crop_ratio: [0, 1] is not valid; give [low, high] with low <= high, both above 0"),
    ({"crop_ratio": [2.0, 1.0]}, "finetune.crop_ratio: [2.0, 1.0] is not valid"),
    ({"augment": "random_crop"}, "finetune.augment: 'random_crop' is not valid; choose one of: pad_crop, resized_crop, none"),
    ({"auto_augment": "autoaugment"}, "finetune.auto_augment: 'autoaugment' is not valid; choose one of: none, trivial, randaugment"),
    ({"mixup": -0.2}, "finetune.mixup: -0.2 is below the minimum 0.0"),
    ({"cutmix": True}, "finetune.cutmix: expected float, got bool"),
])
def test_augmentation_params_fail_with_the_key_and_what_is_valid(change, fragment):
    from transfer.params import ParamsError, defaults, validate

    p = defaults()
    with pytest.raises(ParamsError) as e:
        validate({**p, "finetune": {**p["finetune"], **change}})
    assert fragment in str(e.value)


def test_augmentation_params_accept_sensible_ranges():
    from transfer.params import defaults, validate

    p = defaults()
    f = validate({**p, "finetune": {**p["finetune"], "crop_scale": [1, 1], "crop_ratio": [1, 3]}}).finetune
    assert f.crop_scale == [1.0, 1.0] and f.crop_ratio == [1.0, 3.0]
    assert (p["finetune"]["augment"], p["finetune"]["auto_augment"], p["finetune"]["mixup"], p["finetune"]["cutmix"]) == (
        "pad_crop", "none", 0.0, 0.0)


# --- on a GPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_augmentation_runs_on_the_batchs_device_and_matches_the_cpu():
    """On CUDA: the crops and flips are the CPU's (the boxes and coin flips are drawn on the CPU generator either
    way), the resize within one grey level; auto-augment reproducible there too; no global generator moves."""
    batch = _photos(8)
    cuda = torch.device("cuda")
    cuda_state = torch.cuda.get_rng_state(cuda)
    for settings in (dict(pad=2, hflip=True), dict(crop="resized_crop", hflip=True)):
        on_cpu = aug.augment(batch, generator=_gen(), **settings)
        on_gpu = aug.augment(batch.to(cuda), generator=_gen(), **settings)
        assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8
        assert (on_gpu.cpu().int() - on_cpu.int()).abs().max() <= 1
    before = _global_states()
    out = aug.augment(batch.to(cuda), crop="resized_crop", auto_augment="trivial", generator=_gen())
    assert out.device.type == "cuda" and out.shape == batch.shape and out.dtype == torch.uint8
    assert torch.equal(aug.augment(batch.to(cuda), crop="resized_crop", auto_augment="trivial", generator=_gen()), out)
    assert _same_global_states(before, _global_states()) and torch.equal(torch.cuda.get_rng_state(cuda), cuda_state)
