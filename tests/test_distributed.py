"""Data parallel under torchrun: 2 gloo processes on the CPU against 1, same global batch."""
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import ROOT, tiny_params, write_params
from test_stages import STAGES, run_pipeline
from transfer import models, training
from transfer.io import load_tensors, read_json


def test_two_processes_match_one(in_tmp):
    params = tiny_params(strategy="finetune", pretrained={"source": "none"},
                         finetune={"epochs": 2, "batch_size": 16, "resume": True})
    write_params(in_tmp, params)
    run_pipeline(in_tmp, STAGES[:5])
    one, _ = load_tensors(in_tmp / "models/model/model.safetensors")
    emb_one = (in_tmp / "data/embeddings/val.safetensors").read_bytes()
    one_metrics = read_json(in_tmp / "metrics/finetune.json")
    assert (in_tmp / "models/checkpoints/finetune.pt").is_file()  # one process's finished run, resumable

    params["runtime"]["nproc"] = 2  # the stage relaunches itself as 2 torchrun processes
    write_params(in_tmp, params)
    out = {}
    for stage in ("extract", "finetune"):
        r = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=in_tmp, capture_output=True, text=True,
                           env={"PYTHONPATH": str(ROOT), "PATH": f"{ROOT / '.venv/bin'}:/usr/bin:/bin"}, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        out[stage] = r.stdout
    # The world size is in the resume fingerprint: 2 processes do not continue 1 process's checkpoint.
    assert "was written with other settings; starting from epoch 1" in out["finetune"], out["finetune"]
    # extract: each rank embeds its share, rank 0 writes all of it, byte for byte what one process writes
    assert (in_tmp / "data/embeddings/val.safetensors").read_bytes() == emb_one
    # finetune: each rank trains on its slice of the same global batch and DDP averages the gradients, each
    # rank's loss weighted by its share of the batch (13 images split 7/6). Measured max |difference| 3.0e-8
    # (weights up to 1.0; gloo's summation order); 1.7e-4 when the two slices' mean losses weighed equally.
    # (BatchNorm is frozen here: training it, resnet18 at 16 px normalises layer4 over 13 values per
    # channel, which turns any float difference, 1 thread against 2 in one process, into 1.6e-3 within an
    # epoch; the next test holds synchronised BatchNorm to one process on a network that does not.)
    two, _ = load_tensors(in_tmp / "models/model/model.safetensors")
    diff = max(float((one[k].float() - two[k].float()).abs().max()) for k in one)
    # And training moved the backbone and the head a hundred times further than that bound from where both
    # runs started (measured max |change| 9.5e-4 and 3.4e-3): runs that barely trained would agree within
    # any bound.
    start = {f"backbone.{k}": v for k, v in load_tensors(in_tmp / "models/backbone/backbone.safetensors")[0].items()}
    start.update({f"head.{k}": v for k, v in load_tensors(in_tmp / "models/head/head.safetensors")[0].items()})
    moved = {part: max(float((two[k] - start[k]).abs().max()) for k in two
                       if k.startswith(part) and k.endswith((".weight", ".bias"))) for part in ("backbone.", "head.")}
    assert diff < 1e-6 and 1e-4 < min(moved.values()), (diff, moved)
    two_metrics = read_json(in_tmp / "metrics/finetune.json")
    assert two_metrics["best_epoch"] == one_metrics["best_epoch"]
    assert two_metrics["val_acc"] == one_metrics["val_acc"]


def _bn_net() -> models.Classifier:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return models.Classifier(backbone, models.make_head("linear", 16, 3))


def _fit_bn_net(recalibrate_bn: bool) -> dict:
    """3 epochs from scratch, BatchNorm training, batches of 13 (split 7/6 over two ranks); the last weights."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (52, 3, 12, 12), dtype=torch.uint8, generator=g)
    labels = torch.arange(52) % 3
    model = _bn_net()
    last, _, _ = training.fit(
        model, train_images=images, train_labels=labels, val_images=images[:0], val_labels=labels[:0],
        param_groups=[{"params": model.parameters(), "lr": 0.1}], epochs=3, batch_size=13, momentum=0.9,
        weight_decay=5e-4, scheduler="cosine", step_size=1, gamma=1.0, augment_pad=2, augment_hflip=True,
        mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, device=torch.device("cpu"), amp=False, seed=0,
        eval_batch_size=20, recalibrate_bn=recalibrate_bn, log=lambda _: None)
    return last


def _rank(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        states = [_fit_bn_net(recalibrate_bn=False), _fit_bn_net(recalibrate_bn=True)]
        if rank == 0:
            torch.save(states, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_with_batchnorm_training_match_one(tmp_path, monkeypatch):
    """Without synchronisation each rank normalised its own 6 or 7 images and kept rank 0's running
    statistics: weights off by 2.0e-2 and running statistics by 3.9e-2 after 3 epochs. Synchronised
    (and the uneven split weighted as one batch) both measured within 1.5e-7 (weights up to 1.0, float
    summation order); held to 1e-5. The second run recalibrates BatchNorm, as pretrain's source task
    does, each rank over its share of every batch."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    one = [_fit_bn_net(recalibrate_bn=False), _fit_bn_net(recalibrate_bn=True)]
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path / "two.pt")), nprocs=2)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    stats = ("running_mean", "running_var")
    for a, b in zip(one, two):
        assert list(a) == list(b)  # the same state dict keys: synchronised layers save as plain BatchNorm
        assert all(torch.equal(a[k], b[k]) for k in a if k.endswith("num_batches_tracked"))
        diff = {k: float((a[k] - b[k]).abs().max()) for k in a if not k.endswith("num_batches_tracked")}
        weights = max(d for k, d in diff.items() if not k.endswith(stats))
        running = max(d for k, d in diff.items() if k.endswith(stats))
        assert weights <= 1e-5 and running <= 1e-5, (weights, running)
    recalibrated = max(float((one[0][k] - one[1][k]).abs().max()) for k in one[0] if k.endswith("running_var"))
    assert recalibrated > 1e-3  # the second run did recalibrate


def test_sync_batchnorm_only_where_batchnorm_trains_and_keeps_the_state_dict():
    plain = models.build_classifier(dict(arch="resnet18", image_size=16, num_classes=3, head=dict(kind="linear")))
    model = models.build_classifier(dict(arch="resnet18", image_size=16, num_classes=3, head=dict(kind="linear")))
    model.load_state_dict(plain.state_dict())
    model.bn_frozen = True
    assert not training.trains_batchnorm(model)  # fine-tuning with frozen statistics: nothing to synchronise
    model.bn_frozen = False
    models.freeze_first_blocks(model, "resnet18", 2)
    assert training.trains_batchnorm(model)
    params = list(model.parameters())
    model = training.sync_batchnorm(model, torch.device("cpu"))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 20 and all(type(m) is training.GlooSyncBatchNorm for m in bns)
    assert [id(q) for q in model.parameters()] == [id(q) for q in params]  # optimizer groups built before still apply
    assert list(model.state_dict()) == list(plain.state_dict())
    model.train()  # the frozen blocks' BatchNorm stays in eval mode, the others train
    assert not model.backbone.bn1.training and not model.backbone.layer1[0].bn1.training
    assert model.backbone.layer2[0].bn1.training
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(model.eval()(x), plain.eval()(x))
    models.freeze_first_blocks(plain, "resnet18", 2)
    assert torch.equal(model.train()(x), plain.train()(x))  # outside a process group it is BatchNorm, training too
