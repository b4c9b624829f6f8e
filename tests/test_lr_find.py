"""finetune.lr / train_head.lr: auto (fastai's learning-rate range test, transfer/lr_find.py) and the balanced
sampler (finetune.sampler / train_head.sampler), both off by default."""
import functools
import math

import pytest
import torch
from torch import nn

from conftest import tiny_params, write_params
from test_recipe import _fit, _gaussians, _images, _net
from test_stages import STAGES, run_stage, stage_error
from transfer import lr_find, models, training
from transfer.io import read_json

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny networks (conftest restores the thread count)


def _find(model, images, labels, **settings):
    """find_finetune_lr with fit's settings as tests/test_recipe.py's _fit uses them (base lr 1: head 1, backbone 0.1)."""
    args = dict(param_groups=[{"params": list(model.backbone.parameters()), "lr": 0.1, "name": "backbone"},
                              {"params": list(model.head.parameters()), "lr": 1.0, "name": "head"}],
                train_images=images, train_labels=labels, batch_size=8, accumulate=1, optimizer="sgd", momentum=0.9,
                weight_decay=5e-4, augment_pad=1, augment_hflip=True, label_smoothing=0.0, clip_grad=None,
                class_weights=None, sampler="shuffle", mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, device=CPU,
                amp=False, seed=0)
    args.update(settings)
    return lr_find.find_finetune_lr(model, **args)


# --- fastai's rules --------------------------------------------------------------------------------------

def test_schedule_smoothing_and_the_stop_are_fastais():
    """lr_i = 1e-7 * (10 / 1e-7)^(i / 100); the loss an exponential average (beta 0.98) divided by
    1 - 0.98^(i + 1); the test stops at the first smoothed loss above 4x the lowest."""
    losses = iter([2.0, 1.0, 1.5] + [1.0] * 20 + [400.0] * 5)
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": 0.1},
                           {"params": [torch.zeros(1, requires_grad=True)], "lr": 1.0}])
    seen = []

    def step():
        seen.append([g["lr"] for g in opt.param_groups])
        return next(losses)

    curve = lr_find.range_test(step, opt)  # each group at its ratio (0.1, 1) to the base lr
    lrs = [1e-7 * 1e8 ** (i / 100) for i in range(len(curve))]
    assert [row["lr"] for row in curve] == pytest.approx(lrs, rel=1e-12)
    assert [lr for pair in seen for lr in pair] == pytest.approx([x for lr in lrs for x in (0.1 * lr, lr)], rel=1e-12)
    average, expected = 0.0, []
    for i, loss in enumerate([2.0, 1.0, 1.5] + [1.0] * 20 + [400.0] * 5):
        average = 0.98 * average + 0.02 * loss
        expected.append(average / (1 - 0.98 ** (i + 1)))
        if expected[-1] > 4 * min(expected):
            break
    assert [row["loss"] for row in curve] == pytest.approx(expected, rel=1e-12)
    assert len(curve) == 24 and curve[-2]["loss"] < 4 * min(expected) < curve[-1]["loss"]  # stopped at the first 400
    assert curve[0]["loss"] == 2.0  # debiased: the first point is the first loss, not 0.02 of it


@pytest.mark.parametrize("losses, index, length", [
    ([5, 4, 3, 2, 1, 2, 3], 0, 5),  # falls from the start: fastai's start is one before it
    ([1, 1, 1, 0.9, 0.8, 0.7, 0.6, 0.5, 2], 4, 6),  # start 1, end 7: 1 + int(2) + int(1)
    ([3, 1, 2.5, 2, 1.5, 1.2, 0.5, 4], 3, 6),  # the longest fall skips the early dip: 3 > 2.5 > 2 > 1.5 > 1.2 > 0.5
    ([1, 2, 3], 0, 1),  # nothing falls
])
def test_valley_picks_fastais_point(losses, index, length):
    assert lr_find.valley(losses) == (index, length)


def test_suggest_leaves_out_the_first_tenth_and_the_last_five():
    # Falls over steps 0-49, then rises: valley sees points 10..94, where the fall is its points 0..39 and
    # picks -1 + int(40 / 3) + int(40 / 6) = 18 (fastai's start is one before the fall's first point).
    curve = [dict(lr=1e-7 * 1e8 ** (i / 100), loss=100.0 - i if i < 50 else 100.0 + i) for i in range(100)]
    assert lr_find.suggest(curve, key="finetune.lr") == curve[10 + 18]["lr"]
    # A NaN at step 60: the curve up to it (fastai trains on to step 100 and cuts at the first NaN), the
    # same points here; with the last 5 left out as usual it would be steps 10..55.
    nan = curve[:60] + [dict(lr=1.0, loss=math.nan)]
    assert lr_find.suggest(nan, key="finetune.lr") == curve[10 + 18]["lr"]
    shorter = curve[:40] + [dict(lr=1.0, loss=math.nan)]  # the fall is steps 10..39 there: -1 + 10 + 5
    assert lr_find.suggest(shorter, key="finetune.lr") == curve[10 + 14]["lr"]


def test_a_curve_that_never_falls_is_a_user_error_saying_what_to_do():
    rising = [dict(lr=1e-7 * 1e8 ** (i / 100), loss=1.0 + i / 100) for i in range(100)]
    with pytest.raises(lr_find.LRFindError) as e:
        lr_find.suggest(rising, key="train_head.lr")
    message = str(e.value)
    assert message.startswith("train_head.lr: auto found no learning rate at which the training loss falls")
    assert "never fell between lr 1e-07 and" in message and "set train_head.lr to a number" in message
    assert "\n" not in message


# --- on a model ------------------------------------------------------------------------------------------

def _colours(n: int, seed: int = 1, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable by colour: class c has channel c bright (190) and the others dark (60), with noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    base = torch.full((n, 3), 60.0)
    base[torch.arange(n), labels] = 190.0
    images = (base[:, :, None, None] + 25 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 255).to(torch.uint8)
    return images, labels


def _toy_net() -> models.Classifier:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return models.Classifier(backbone, models.make_head("linear", 8, 3))


def _val_acc(lr: float, images, labels) -> float:
    net = _toy_net()
    groups = [{"params": list(net.backbone.parameters()), "lr": 0.1 * lr, "name": "backbone"},
              {"params": list(net.head.parameters()), "lr": lr, "name": "head"}]
    _, history, best = _fit(net, images[:36], labels[:36], images[36:], labels[36:], param_groups=groups, epochs=5)
    return history[best - 1]["val_acc"]


def test_finder_picks_an_lr_that_trains_and_leaves_the_model_and_rng_alone():
    images, labels = _colours(60)
    net = _toy_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    lr, curve = _find(net, images[:36], labels[:36])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the copy trained, not the model
    assert torch.equal(torch.get_rng_state(), rng)
    assert lr_find.START_LR < lr < lr_find.END_LR and math.isfinite(lr)
    assert len(curve) > 20 and set(curve[0]) == {"lr", "loss"} and lr in [row["lr"] for row in curve]
    # The same test twice gives the same curve (its own seeds).
    assert _find(_toy_net(), images[:36], labels[:36]) == (lr, curve)
    # Five epochs at the chosen lr (measured 0.023) learn the toy: val accuracy measured 1.0; at 1e-4, 0.67.
    assert _val_acc(lr, images, labels) == 1.0 and _val_acc(1e-4, images, labels) < 0.9


def test_the_fine_tune_after_the_finder_is_the_one_given_its_lr_by_hand():
    images, labels = _images(36)
    net = _net()
    lr, _ = _find(net, images, labels)
    groups = lambda m: [{"params": list(m.backbone.parameters()), "lr": 0.1 * lr, "name": "backbone"},
                        {"params": list(m.head.parameters()), "lr": lr, "name": "head"}]
    after, _, _ = _fit(net, images, labels, param_groups=groups(net))
    by_hand = _net()
    direct, _, _ = _fit(by_hand, images, labels, param_groups=groups(by_hand))
    assert all(torch.equal(after[k], direct[k]) for k in direct)


def test_the_finder_augments_and_mixes_as_fit_will(monkeypatch):
    """With the photo augmentation and mixup on, the range test draws its batches through them too (the loss
    it sees is the one fit will minimise): the resized crop, auto-augment and timm's Mixup each run on every
    step, and the curve differs from the plain one."""
    from transfer import augment

    calls = {"crop_boxes": 0, "auto_augment_batch": 0, "mix_batch": 0}
    for name in calls:
        real = getattr(augment, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(augment, name, counted)
    monkeypatch.setattr(lr_find, "mix_batch", augment.mix_batch)
    images, labels = _colours(60)
    plain_lr, plain = _find(_toy_net(), images[:36], labels[:36])
    assert calls == {"crop_boxes": 0, "auto_augment_batch": 0, "mix_batch": 0}
    lr, curve = _find(_toy_net(), images[:36], labels[:36], crop="resized_crop", crop_scale=(0.5, 1.0),
                      auto_augment="trivial", mixup=0.4, num_classes=int(labels.max()) + 1)
    assert calls["crop_boxes"] == calls["auto_augment_batch"] == calls["mix_batch"] == len(curve) > 20
    assert curve != plain and lr_find.START_LR < lr < lr_find.END_LR


class _Ascent(torch.autograd.Function):
    """Identity forward, gradient negated: every optimizer step climbs the loss, at any positive lr."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class _Climber(nn.Module):
    """A classifier whose loss rises under any positive lr: large logits (so even lr 1e-7 moves the loss),
    their gradient reversed."""

    def __init__(self):
        super().__init__()
        self.inner = _net()
        self.backbone, self.head = self.inner.backbone, self.inner.head

    def forward(self, x):
        return _Ascent.apply(1e4 * self.inner(x))


@pytest.mark.parametrize("case", ["loss rises under any lr", "huge start_lr"])
def test_a_loss_that_never_falls_stops_with_one_line(case):
    images, labels = _images(24)
    if case == "huge start_lr":
        net, extra = _net(), dict(start_lr=1e4, end_lr=1e8)
    else:
        net, extra = _Climber(), {}
    with pytest.raises(lr_find.LRFindError) as e:
        _find(net, images, labels, **extra)
    message = str(e.value)
    assert "\n" not in message and message.startswith("finetune.lr: auto found no learning rate")
    assert "diverged" in message and "of 100 steps" in message and "set finetune.lr to a number" in message


def test_few_images_cycle_through_the_split_for_all_steps(monkeypatch):
    """8 images in batches of 4: 100 steps are 50 passes, each a fresh draw."""
    drawn = []
    real = training.epoch_batches

    def spy(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(training, "epoch_batches", spy)
    images, labels = _images(8)
    _, curve = _find(_net(), images, labels, batch_size=4, end_lr=1e-3)  # low enough never to diverge
    assert len(curve) == 100 and len(drawn) == 50
    assert not all(torch.equal(drawn[0][0], d[0]) for d in drawn[1:])


def test_head_finder_on_embeddings():
    x, y = _gaussians(60, 60, seed=0)
    head = models.make_head("linear", 2, 2)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    lr, curve = lr_find.find_head_lr(head, train_x=x, train_y=y, weight_decay=1e-4, batch_size=32, class_weights=None,
                                     sampler="shuffle", seed=0, device=CPU)
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    assert lr_find.START_LR < lr < lr_find.END_LR and len(curve) > 20


# --- through the stages ----------------------------------------------------------------------------------

def test_lr_auto_through_the_stages_writes_the_curve_and_matches_the_chosen_lr_by_hand(in_tmp, monkeypatch):
    """train_head and finetune with lr: auto (and the balanced sampler): each writes its curve and lr_chosen, and
    is byte for byte the run given lr_chosen by hand, which writes an empty curve and no lr_chosen. Then (on the
    same prepared data, to spare the 2 cores a second pipeline) a range test that diverges stops the stage with
    one line."""
    # mobilenet_v3_small: its 100 range-test steps took 12 s here, resnet18's 28 s.
    auto = tiny_params(pretrained={"source": "none"}, backbone={"arch": "mobilenet_v3_small"}, strategy="finetune",
                       finetune={"lr": "auto", "epochs": 2, "sampler": "balanced"},
                       train_head={"lr": "auto", "sampler": "balanced"})
    write_params(in_tmp, auto)
    for name in STAGES[:4]:
        run_stage(name)
    outputs = {}
    for stage, out in (("train_head", "models/head/head.safetensors"), ("finetune", "models/model/model.safetensors")):
        if stage == "finetune":
            run_stage(stage)
        metrics = read_json(in_tmp / f"metrics/{stage}.json")
        curve = read_json(in_tmp / f"metrics/{stage}/lr_find.json")
        assert len(curve) > 20 and set(curve[0]) == {"lr", "loss"}
        assert metrics["lr_chosen"] in [row["lr"] for row in curve]
        outputs[stage] = ((in_tmp / out).read_bytes(), metrics)
        by_hand = tiny_params(**{**{k: auto[k] for k in ("pretrained", "backbone", "strategy")},
                                 stage: {**auto[stage], "lr": metrics["lr_chosen"]}})
        write_params(in_tmp, by_hand)
        run_stage(stage)
        assert (in_tmp / out).read_bytes() == outputs[stage][0]
        fixed = read_json(in_tmp / f"metrics/{stage}.json")
        assert "lr_chosen" not in fixed and fixed == {k: v for k, v in metrics.items() if k != "lr_chosen"}
        assert read_json(in_tmp / f"metrics/{stage}/lr_find.json") == []
        write_params(in_tmp, auto)  # the head by hand is the auto one, byte for byte: the fine-tune reads it

    (in_tmp / "models/model/model.safetensors").unlink()
    monkeypatch.setattr(lr_find, "find_finetune_lr", functools.partial(lr_find.find_finetune_lr, start_lr=1e4, end_lr=1e8))
    line = stage_error("finetune")
    assert line.startswith("finetune: finetune.lr: auto found no learning rate") and "set finetune.lr to a number" in line
    assert not (in_tmp / "models/model/model.safetensors").exists()  # it stopped before training


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


# --- params ----------------------------------------------------------------------------------------------

def test_lr_is_a_positive_number_or_auto_and_the_sampler_a_choice():
    from transfer.params import ParamsError, defaults, validate

    p = defaults()
    with_ = lambda section, **kv: validate({**p, section: {**p[section], **kv}})
    assert with_("finetune", lr="auto").finetune.lr == "auto" and with_("train_head", lr="auto").train_head.lr == "auto"
    assert with_("finetune", lr=3).finetune.lr == 3.0
    with pytest.raises(ParamsError, match="finetune.lr: 'Auto' is not valid; give a number or auto"):
        with_("finetune", lr="Auto")
    with pytest.raises(ParamsError, match=r"train_head.lr: '1e-3' is not valid; give a number or auto \(YAML reads 1e-3 as text"):
        with_("train_head", lr="1e-3")
    with pytest.raises(ParamsError, match="finetune.lr: 0.0 is not above the minimum 0.0"):
        with_("finetune", lr=0)
    with pytest.raises(ParamsError, match="finetune.lr: expected float or 'auto', got bool"):
        with_("finetune", lr=True)
    with pytest.raises(ParamsError, match="train_head.sampler: 'weighted' is not valid; choose one of: shuffle, balanced"):
        with_("train_head", sampler="weighted")
    assert p["finetune"]["sampler"] == p["train_head"]["sampler"] == "shuffle" and p["finetune"]["lr"] == 0.01
