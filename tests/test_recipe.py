"""Issue 19's recipe pieces, each off by default: the optimizer from timm's factory, warmup, label smoothing,
gradient clipping and accumulation, the weights' moving average, class weights, CLIP's logistic-regression
probe as a head, and balanced accuracy in evaluate."""
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from conftest import tiny_params, write_params
from test_stages import run_pipeline
from transfer import models, training
from transfer.io import load_tensors, read_json

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """These networks are tiny: on 2 threads a 60 x 5 logistic-regression step took 6.3 ms, on 1 0.44 ms
    (conftest restores the thread count)."""
    torch.set_num_threads(1)


def _net(classes: int = 3, seed: int = 0) -> models.Classifier:
    """A small network without BatchNorm (so a batch's split changes nothing but summation order)."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return models.Classifier(backbone, models.make_head("linear", 8, classes))


def _images(n: int, classes: int = 3, seed: int = 1, size: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes told apart by brightness, with noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    base = (40 + 170 * labels / max(1, classes - 1)).view(-1, 1, 1, 1)
    images = (base + 30 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 255).to(torch.uint8)
    return images, labels


def _fit(model: nn.Module, images, labels, val_images=None, val_labels=None, **recipe):
    settings = dict(param_groups=[{"params": list(model.backbone.parameters()), "lr": 0.02, "name": "backbone"},
                                  {"params": list(model.head.parameters()), "lr": 0.2, "name": "head"}],
                    epochs=2, batch_size=8, momentum=0.9, weight_decay=5e-4, scheduler="cosine", step_size=1, gamma=1.0,
                    augment_pad=1, augment_hflip=True, mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, device=CPU,
                    amp=False, seed=0, eval_batch_size=64, log=lambda _: None)
    settings.update(recipe)
    if val_images is None:  # no validation split: the last epoch's weights are kept
        val_images, val_labels = images[:0], labels[:0]
    return training.fit(model, train_images=images, train_labels=labels, val_images=val_images, val_labels=val_labels,
                        **settings)


def _groups(model):
    return [{"params": list(model.backbone.parameters()), "lr": 0.01, "name": "backbone"},
            {"params": list(model.head.parameters()), "lr": 0.1, "name": "head"}]


def _hyper(opt) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


# --- the optimizer ---------------------------------------------------------------------------------------

def test_sgd_default_steps_bit_for_bit_as_torch_sgd_built_by_hand():
    """finetune.optimizer: sgd is the recipe until now (torch's SGD, weight decay on every parameter), and so is
    timm's factory given the same groups as `momentum`: make_optimizer's comment says why sgd stays torch's."""
    from timm.optim import create_optimizer_v2

    nets = [_net() for _ in range(3)]
    by_hand = torch.optim.SGD(_groups(nets[0]), momentum=0.9, weight_decay=5e-4)
    ours = training.make_optimizer(nets[1], _groups(nets[1]), name="sgd", momentum=0.9, weight_decay=5e-4)
    factory = create_optimizer_v2(_groups(nets[2]), opt="momentum", momentum=0.9, weight_decay=5e-4)
    assert type(ours) is type(factory) is torch.optim.SGD and _hyper(ours) == _hyper(by_hand) == _hyper(factory)
    images, labels = _images(24)
    x = training.to_input(images, mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, device=CPU,
                          memory_format=torch.contiguous_format)
    for step in range(4):
        for net, opt in zip(nets, (by_hand, ours, factory)):
            opt.zero_grad()
            F.cross_entropy(net(x[step * 6:(step + 1) * 6]), labels[step * 6:(step + 1) * 6]).backward()
            opt.step()
    start = _net().state_dict()
    for net in nets[1:]:
        assert all(torch.equal(a, b) for a, b in zip(nets[0].state_dict().values(), net.state_dict().values()))
    assert not torch.equal(nets[0].state_dict()["head.fc.weight"], start["head.fc.weight"])  # it did train


def test_fit_with_the_defaults_is_the_plain_sgd_loop():
    """fit() with every new option at its default takes exactly the steps of the loop it always was: shuffled
    near-equal batches, mean cross-entropy, torch SGD, per-epoch cosine."""
    images, labels = _images(20)
    net = _net()
    by_hand = _net()
    best, history, _ = _fit(net, images, labels, epochs=2, batch_size=8, augment_pad=0, augment_hflip=False)
    opt = torch.optim.SGD([{"params": list(by_hand.backbone.parameters()), "lr": 0.02},
                           {"params": list(by_hand.head.parameters()), "lr": 0.2}], momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for idx in torch.tensor_split(torch.randperm(20, generator=gen), math.ceil(20 / 8)):
            x = training.to_input(images[idx], mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, device=CPU,
                                  memory_format=torch.contiguous_format)
            loss = F.cross_entropy(by_hand(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    assert all(torch.equal(best[k], v) for k, v in by_hand.state_dict().items())
    assert [h["lr"] for h in history] == pytest.approx([0.2, 0.1])


def test_timm_optimizers_keep_our_lrs_with_no_decay_on_norm_and_bias_and_no_frozen_parameter():
    from stages.finetune import param_groups

    backbone, dim = models.build_backbone("resnet18", 32)
    model = models.Classifier(backbone, models.make_head("linear", dim, 3))
    models.freeze_first_blocks(model, "resnet18", 2)
    groups = param_groups(model, strategy="partial", lr=0.1, backbone_lr_factor=0.1, layer_decay=0.5, arch="resnet18")
    lr_of = {id(q): g["lr"] for g in groups for q in g["params"]}
    opt = training.make_optimizer(model, groups, name="adamw", momentum=0.9, weight_decay=0.05)
    assert type(opt) is torch.optim.AdamW
    group_of = {id(q): g for g in opt.param_groups for q in g["params"]}
    assert len(group_of) == sum(len(g["params"]) for g in opt.param_groups)  # each parameter once
    frozen = [n for n, q in model.named_parameters() if not q.requires_grad]
    assert frozen and not any(id(q) in group_of for q in model.parameters() if not q.requires_grad)
    assert set(group_of) == set(lr_of)  # every trainable parameter, at the lr its group had
    assert all(group_of[i]["lr"] == lr for i, lr in lr_of.items())
    decay = {n: group_of[id(q)]["weight_decay"] for n, q in model.named_parameters() if q.requires_grad}
    bns = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    norm_and_bias = {f"{bn}.{kind}" for bn in bns for kind in ("weight", "bias")} | {"head.fc.bias"}
    assert {n for n, d in decay.items() if d == 0.0} == norm_and_bias & set(decay)
    assert all(d == 0.05 for n, d in decay.items() if n not in norm_and_bias)  # convolutions and head.fc.weight
    assert opt.param_groups[-1]["lr"] == 0.1  # the last group is still the head's (fit logs its lr)
    # sgd keeps weight decay on everything, BatchNorm included, in our groups as they were.
    sgd = training.make_optimizer(model, groups, name="sgd", momentum=0.9, weight_decay=5e-4)
    assert [g["name"] for g in sgd.param_groups] == [g["name"] for g in groups]
    assert all(g["weight_decay"] == 5e-4 for g in sgd.param_groups)


def test_a_timm_models_no_weight_decay_list_is_honoured():
    """ViT's position embedding and class token are 3-d: the 1-d rule alone would decay them."""
    backbone, dim = models.build_backbone("timm/vit_tiny_patch16_224", 32)
    model = models.Classifier(backbone, models.make_head("linear", dim, 3))
    groups = [{"params": list(model.parameters()), "lr": 0.01, "name": "all"}]
    opt = training.make_optimizer(model, groups, name="lamb", momentum=0.9, weight_decay=0.05)
    no_decay = {id(q) for g in opt.param_groups if g["weight_decay"] == 0.0 for q in g["params"]}
    assert id(model.backbone.pos_embed) in no_decay and id(model.backbone.cls_token) in no_decay
    assert id(model.backbone.blocks[0].attn.qkv.weight) not in no_decay
    assert [g["name"] for g in opt.param_groups] == ["all", "all.no_decay"]


# --- the schedule ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cosine", "step", "none"])
def test_warmup_then_the_schedule_over_the_remaining_epochs(kind):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    sched = training.make_scheduler(opt, kind=kind, epochs=7, step_size=2, gamma=0.5, warmup_epochs=2)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    after = {"cosine": [0.3 * (1 + math.cos(math.pi * t / 5)) / 2 for t in range(5)],
             "step": [0.3, 0.3, 0.15, 0.15, 0.075], "none": [0.3] * 5}[kind]
    assert lrs == pytest.approx([0.1, 0.2] + after, rel=1e-6)
    # No warmup: the schedule as before, unwrapped.
    plain = training.make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3), kind="cosine",
                                    epochs=7, step_size=2, gamma=0.5)
    assert type(plain) is torch.optim.lr_scheduler.CosineAnnealingLR and plain.T_max == 7


def test_warmup_in_fit_logs_the_ramp():
    images, labels = _images(16)
    _, history, _ = _fit(_net(), images, labels, epochs=4, warmup_epochs=1, scheduler="cosine")
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.2, 0.2 * 0.75, 0.2 * 0.25], rel=1e-6)


# --- the loss --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighted", [False, True])
def test_label_smoothing_and_class_weights_give_f_cross_entropys_loss(weighted):
    """One full-batch step at lr 0: the epoch's training loss is the initial model's loss on the batch, as
    F.cross_entropy computes it with the same smoothing and weights."""
    images, labels = _images(12)
    labels = torch.tensor([0] * 8 + [1] * 3 + [2])  # imbalanced, so the weights matter
    weights = training.balanced_class_weights(labels, 3) if weighted else None
    net = _net()
    with torch.no_grad():
        net.head.fc.weight.mul_(30)  # confident logits, far from the uniform ones smoothing aims at
    x = training.to_input(images, mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, device=CPU,
                          memory_format=torch.contiguous_format)
    with torch.no_grad():
        logits = copy.deepcopy(net)(x)
    smoothed = F.cross_entropy(logits, labels, weight=weights, label_smoothing=0.2)
    plain = F.cross_entropy(logits, labels, weight=weights)
    groups = [{"params": list(net.parameters()), "lr": 0.0}]
    _, history, _ = _fit(net, images, labels, param_groups=groups, epochs=1, batch_size=12, augment_pad=0,
                         augment_hflip=False, label_smoothing=0.2, class_weights=weights)
    # The epoch's loss is summed per image and divided by the image count; with weights the step's mean is
    # over the summed weights, which balanced weights make the image count over a whole epoch.
    assert history[0]["train_loss"] == pytest.approx(float(smoothed), rel=1e-6)
    assert abs(float(smoothed) - float(plain)) > 0.05, (float(smoothed), float(plain))


def test_balanced_class_weights_are_n_over_k_count():
    weights = training.balanced_class_weights(torch.tensor([0] * 9 + [1]), 3)
    assert weights.tolist() == pytest.approx([10 / (3 * 9), 10 / 3, 0.0])  # a class with no image: weight 0


def _gaussians(n0: int, n1: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([0] * n0 + [1] * n1)
    x = torch.randn(n0 + n1, 2, generator=g) + torch.tensor([[0.0, 0.0], [1.5, 0.0]])[y]
    return x, y


@pytest.mark.parametrize("head_kind", ["linear", "logreg"])
def test_balanced_class_weights_raise_minority_recall(head_kind):
    """9:1 overlapping Gaussians: unweighted, the boundary moves into the minority class; balanced, it sits
    near the middle. Recall of the minority on a balanced test set of 2,000: measured 0.35 -> 0.76 (linear),
    0.11 -> 0.76 (logreg)."""
    train_x, train_y = _gaussians(90, 10, seed=0)
    val_x, val_y = _gaussians(90, 10, seed=1)
    test_x, test_y = _gaussians(1000, 1000, seed=2)
    recall = {}
    for weights in ("none", "balanced"):
        head = models.make_head("linear", 2, 2)
        w = training.balanced_class_weights(train_y, 2) if weights == "balanced" else None
        if head_kind == "logreg":
            state, _, _ = training.train_logreg(train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y, head=head,
                                                device=CPU, class_weights=w)
        else:
            state, _, _ = training.train_head(train_x=train_x, train_y=train_y, val_x=val_x[:0], val_y=val_y[:0],
                                              head=head, lr=0.05, epochs=300, weight_decay=0.0, batch_size=100, seed=0,
                                              device=CPU, class_weights=w)
        head.load_state_dict(state)
        with torch.no_grad():
            predicted = head(test_x).argmax(1)
        recall[weights] = float((predicted[test_y == 1] == 1).float().mean())
    assert recall["balanced"] > recall["none"] + 0.2, recall


# --- accumulation and clipping ---------------------------------------------------------------------------

def test_accumulating_two_batches_takes_the_steps_of_one_twice_as_large():
    images, labels = _images(32)
    runs = {}
    for name, batch, k in (("b8x2", 8, 2), ("b16", 16, 1), ("b8", 8, 1)):
        net = _net()
        _, history, _ = _fit(net, images, labels, epochs=2, batch_size=batch, accumulate=k)
        runs[name] = (net.state_dict(), history)
    (a, ha), (b, hb), (c, _) = runs["b8x2"], runs["b16"], runs["b8"]
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-6, diff  # measured 1.5e-8 (summation order); batch 8 alone ends 4.7e-2 away
    assert [h["train_loss"] for h in ha] == pytest.approx([h["train_loss"] for h in hb], rel=1e-6)
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-3  # and batch 8 alone is another run


def test_clip_grad_bounds_the_gradient_norm_the_optimizer_sees(monkeypatch):
    norms = []
    step = torch.optim.SGD.step

    def recording(self, *args, **kwargs):
        grads = [q.grad for g in self.param_groups for q in g["params"] if q.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    images, labels = _images(32)
    _fit(_net(), images, labels)
    free = list(norms)
    norms.clear()
    bound = min(free) / 2  # below every unclipped step's norm
    _fit(_net(), images, labels, clip_grad=bound)
    assert len(norms) == len(free) == 8 and max(norms) <= bound * (1 + 1e-5), (norms, bound)
    assert norms[0] == pytest.approx(bound, rel=1e-5)  # the first step, the same as unclipped, was cut to it


# --- the moving average ----------------------------------------------------------------------------------

def test_ema_weights_are_validated_and_kept_and_differ_from_the_raw_model(monkeypatch):
    import timm.utils

    made = []

    class Recorded(timm.utils.ModelEmaV3):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(timm.utils, "ModelEmaV3", Recorded)
    images, labels = _images(48)
    net = _net()
    start = copy.deepcopy(net.state_dict())
    best, history, best_epoch = _fit(net, images[:32], labels[:32], images[32:], labels[32:], epochs=3, ema_decay=0.9)
    (ema,) = made
    raw, averaged = net.state_dict(), ema.module.state_dict()
    apart = lambda s, t: max(float((s[k] - t[k]).abs().max()) for k in s)
    # Neither the raw weights nor the start (measured 3.4e-2 and 1.1e-1 away): timm's warmup lets a dozen steps count.
    assert apart(raw, averaged) > 1e-3 and apart(averaged, start) > 1e-3
    # Validation ran on the average: the last epoch's val loss is the average's, not the raw model's.
    val_loss = lambda m: float(F.cross_entropy(training.predict(m, images[32:], mean=models.IMAGENET_MEAN,
                                                                std=models.IMAGENET_STD, batch_size=64, device=CPU,
                                                                amp=False), labels[32:]))
    assert history[-1]["val_loss"] == val_loss(ema.module) != val_loss(net)
    # The kept weights are the average's at the best epoch (the last, when it is the best).
    last = _fit(_net(), images[:32], labels[:32], epochs=3, ema_decay=0.9)[0]
    assert all(torch.equal(last[k], made[-1].module.state_dict()[k]) for k in last)


def test_resume_with_the_recipe_matches_uninterrupted(tmp_path):
    class Killed(Exception):
        pass

    images, labels = _images(40)

    def run(checkpoint, stop_at=None):
        def log(line):
            if stop_at is not None and line.startswith(f"epoch {stop_at}/"):
                raise Killed
        return _fit(_net(), images, labels, epochs=3, batch_size=4, accumulate=2, optimizer="adamw", warmup_epochs=1,
                    ema_decay=0.9, clip_grad=1.0, label_smoothing=0.1, checkpoint=checkpoint, resume=True,
                    fingerprint="same", log=log)[0]

    uninterrupted = run(tmp_path / "a.pt")
    with pytest.raises(Killed):
        run(tmp_path / "b.pt", stop_at=2)
    resumed = run(tmp_path / "b.pt")
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


# --- data parallel ---------------------------------------------------------------------------------------

def _fit_recipe() -> dict:
    images, labels = _images(26)
    labels = torch.tensor([0] * 16 + [1] * 6 + [2] * 4)
    net = _net()
    averaged, _, _ = _fit(net, images, labels, epochs=2, batch_size=7, accumulate=2, label_smoothing=0.1, ema_decay=0.8,
                          class_weights=training.balanced_class_weights(labels, 3))
    return {**{f"raw.{k}": v for k, v in net.state_dict().items()}, **averaged}


def _rank(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        state = _fit_recipe()
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_accumulating_with_class_weights_match_one(tmp_path, monkeypatch):
    """Batches of 14 as two micro-batches of 7, each split 4/3 over two ranks, gradients exchanged once per
    step (DDP's no_sync on the first), each rank's loss over the step's summed class weights."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    one = _fit_recipe()
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path / "two.pt")), nprocs=2)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert diff < 1e-5, diff  # measured 1.5e-8 (gloo's summation order), the average and the raw weights alike


# --- the logistic-regression probe -----------------------------------------------------------------------

def _clusters(per_class: int, seed: int, dim: int = 16, classes: int = 3, spread: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(per_class)
    centres = 3.0 * torch.eye(classes, dim)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_logreg_separates_separable_embeddings_with_a_weak_l2():
    train_x, train_y = _clusters(10, seed=0)
    val_x, val_y = _clusters(10, seed=1)
    head = models.make_head("linear", 16, 3)
    state, history, chosen = training.train_logreg(train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y,
                                                   head=head, device=CPU)
    assert [row["l2"] for row in history] == pytest.approx([10.0 ** e for e in range(-6, 3)])
    best = history[chosen - 1]
    assert best["val_acc"] == 1.0 and best["l2"] <= 1e-3, history
    assert history[-1]["val_loss"] > 10 * best["val_loss"]  # the strongest L2 is far from it
    head.load_state_dict(state)
    with torch.no_grad():
        assert (head(val_x).argmax(1) == val_y).all()
    assert set(state) == {"fc.weight", "fc.bias"}


def test_logreg_finds_scikit_learns_l2_penalised_optimum():
    """On overlapping clusters (a unique, well-conditioned optimum): mean cross-entropy + l2 / 2 ||W||^2 is
    scikit-learn's multinomial LogisticRegression with C = 1 / (l2 * n), unpenalised intercept."""
    from sklearn.linear_model import LogisticRegression

    x, y = _clusters(20, seed=3, dim=5, spread=2.0)
    l2 = 0.1
    head = models.make_head("linear", 5, 3)
    state, _, _ = training.train_logreg(train_x=x, train_y=y, val_x=x, val_y=y, head=head, device=CPU, l2_grid=(l2,))
    ref = LogisticRegression(C=1 / (l2 * len(y)), tol=1e-12, max_iter=100_000).fit(x.double().numpy(), y.numpy())

    def objective(weight, bias):
        return float(F.cross_entropy(x.double() @ weight.T + bias, y) + 0.5 * l2 * weight.square().sum())

    ours = objective(state["fc.weight"].double(), state["fc.bias"].double())
    theirs = objective(torch.from_numpy(ref.coef_), torch.from_numpy(ref.intercept_))
    # Measured 2.1e-7 apart: float32 resolves a loss near 0.5 to about 6e-8, and L-BFGS stops there.
    assert theirs <= ours < theirs + 1e-6, (ours, theirs)
    # The L2 penalty fixes the weights (measured 4e-4 apart); the unpenalised intercepts are defined up to a
    # shared shift, and flat along the optimum's valley (measured 1.7e-3 apart, centred).
    assert torch.allclose(state["fc.weight"].double(), torch.from_numpy(ref.coef_), atol=1e-3)
    assert torch.allclose(state["fc.bias"].double() - state["fc.bias"].double().mean(),
                          torch.from_numpy(ref.intercept_ - ref.intercept_.mean()), atol=5e-3)


def test_logreg_needs_a_val_split():
    x, y = _clusters(4, seed=0)
    from transfer.cli import UserError

    with pytest.raises(UserError, match="train_head.kind: logreg chooses its L2 strength on the val split"):
        training.train_logreg(train_x=x, train_y=y, val_x=x[:0], val_y=y[:0], head=models.make_head("linear", 16, 3),
                              device=CPU)


def test_logreg_head_and_the_recipe_through_the_pipeline(in_tmp):
    """train_head kind logreg writes a linear head that finetune (with every recipe piece on), evaluate and
    convert use unchanged; evaluate's balanced accuracy is scikit-learn's on its own predictions."""
    from sklearn.metrics import balanced_accuracy_score

    write_params(in_tmp, tiny_params(
        pretrained={"source": "none"}, strategy="finetune", train_head={"kind": "logreg", "class_weights": "balanced"},
        finetune={"epochs": 2, "optimizer": "adamw", "weight_decay": 0.05, "warmup_epochs": 1, "label_smoothing": 0.1,
                  "clip_grad": 1.0, "accumulate": 2, "batch_size": 8, "ema": True, "ema_decay": 0.9,
                  "class_weights": "balanced"}))
    run_pipeline(in_tmp)
    head_desc = read_json(in_tmp / "models/head/head.json")
    assert head_desc["kind"] == "linear" and head_desc["num_classes"] == 5
    metrics = read_json(in_tmp / "metrics/train_head.json")
    grid = metrics["val_acc_by_l2"]
    assert sorted(grid, key=float) == [f"{10.0 ** e:.0e}" for e in range(-6, 3)] and metrics["val_acc"] == max(grid.values())
    assert grid[f"{metrics['l2']:.0e}"] == metrics["val_acc"]
    curve = (in_tmp / "metrics/curves/train_head/plots/metrics/val/acc.tsv").read_text().splitlines()
    assert len(curve) == 1 + 9  # one point per L2 strength
    model, meta = load_tensors(in_tmp / "models/model/model.safetensors")
    assert meta["head"]["kind"] == "linear" and model["head.fc.weight"].shape == (5, 512)
    rows = read_json(in_tmp / "metrics/evaluate/plots/sklearn/confusion_matrix.json")
    ev = read_json(in_tmp / "metrics/evaluate/metrics.json")
    expected = balanced_accuracy_score([r["actual"] for r in rows], [r["predicted"] for r in rows])
    assert ev["balanced_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert read_json(in_tmp / "metrics/convert.json")["fp32_agreement"] == 1.0


def test_balanced_accuracy_is_scikit_learns():
    """Imbalanced, one class never predicted, one class absent from the truth (scikit-learn leaves it out)."""
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score

    from stages.evaluate import classification_metrics

    rng = np.random.default_rng(0)
    y_true = rng.choice(4, size=200, p=[0.7, 0.2, 0.1, 0.0])
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.choice([0, 1, 3], size=200))
    y_pred[y_pred == 2] = 0
    assert 2 in y_true and 3 in y_pred and 3 not in y_true
    metrics = classification_metrics(y_true, y_pred, ["a", "b", "c", "d"])
    with pytest.warns(UserWarning):  # "y_pred contains classes not in y_true"
        expected = balanced_accuracy_score(y_true, y_pred)
    assert metrics["balanced_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert metrics["balanced_accuracy"] != pytest.approx(metrics["accuracy"])


# --- params ----------------------------------------------------------------------------------------------

def test_recipe_params_fail_with_the_key_and_the_choices():
    from transfer.params import ParamsError, defaults, validate

    p = defaults()
    with pytest.raises(ParamsError, match="finetune.optimizer: 'adam' is not valid; choose one of: sgd, momentum"):
        validate({**p, "finetune": {**p["finetune"], "optimizer": "adam"}})
    with pytest.raises(ParamsError, match="finetune.warmup_epochs: 15 leaves none of the 15"):
        validate({**p, "finetune": {**p["finetune"], "warmup_epochs": 15}})
    with pytest.raises(ParamsError, match="train_head.class_weights: 'inverse' is not valid; choose one of: none, balanced"):
        validate({**p, "train_head": {**p["train_head"], "class_weights": "inverse"}})
    with pytest.raises(ParamsError, match="finetune.clip_grad: 0.0 is not above the minimum"):
        validate({**p, "finetune": {**p["finetune"], "clip_grad": 0}})


# --- what fit keeps for evaluate ---------------------------------------------------------------------------

@pytest.mark.parametrize("val_subset, eval_every", [(None, 1), (None, 2), (9, 1)])
def test_fit_keeps_the_kept_weights_val_logits(val_subset, eval_every):
    """fit's outputs["val_logits"] are the kept (best-epoch) weights' logits over the validated images, as
    evaluate would compute them from the saved weights, so evaluate's temperature needs no val pass; with a
    subset, the subset's (finetune then runs the whole split itself)."""
    images, labels = _images(24)
    val_images, val_labels = _images(15, seed=2)
    model, out = _net(), {}
    best, history, best_epoch = _fit(model, images, labels, val_images, val_labels, epochs=3, val_subset=val_subset,
                                     eval_every=eval_every, outputs=out)
    model.load_state_dict(best)
    seen = training.balanced_subset(val_labels, val_subset)
    shown = val_images if seen is None else val_images[seen]
    expected = training.predict(model, shown, mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, batch_size=64,
                                device=CPU, amp=False)
    assert out["val_logits"].dtype == torch.float32 and torch.equal(out["val_logits"], expected)
    no_val = {}
    _fit(_net(), images, labels, outputs=no_val)
    assert no_val["val_logits"] is None


def test_resumed_fit_keeps_the_val_logits_of_the_epoch_chosen_before_the_stop(tmp_path):
    """The best epoch's logits travel in the checkpoint: a run stopped after its best epoch (2 of 3 here)
    and resumed returns them, though the resumed process never validated that epoch."""
    images, labels = _images(24)
    val_images, val_labels = _images(15, seed=2)
    kw = dict(epochs=3, batch_size=4)
    whole = {}
    best, _, best_epoch = _fit(_net(), images, labels, val_images, val_labels, outputs=whole, **kw)
    assert best_epoch == 2

    class Stop(Exception):
        pass

    def stop_at_3(line):
        if line.startswith("epoch 3/"):  # after epoch 3's validation, before its checkpoint
            raise Stop

    kw.update(checkpoint=tmp_path / "fit.pt", resume=True, fingerprint="same")
    with pytest.raises(Stop):
        _fit(_net(), images, labels, val_images, val_labels, log=stop_at_3, **kw)
    resumed = {}
    again, _, again_epoch = _fit(_net(), images, labels, val_images, val_labels, outputs=resumed, **kw)
    assert again_epoch == 2 and all(torch.equal(best[k], again[k]) for k in best)
    assert torch.equal(resumed["val_logits"], whole["val_logits"])
