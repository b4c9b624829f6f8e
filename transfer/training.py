"""Training and inference loops shared by pretrain, extract, train_head, finetune and evaluate.

Data stays uint8 (N, 3, S, S) in memory until a batch is taken; conversion to float,
normalisation and augmentation happen per batch on the compute device (channels_last, except
for CPU training: see training_memory_format).
"""
from __future__ import annotations

import functools
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from transfer import cli
from transfer.augment import augment, make_mixup, mix_batch  # augment is re-exported: benchmarks call training.augment
from transfer.cli import DeviceError
from transfer.feed import Feed
from transfer.io import load_checkpoint, save_checkpoint
from transfer.params import OPTIMIZERS, SAMPLERS


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("runtime.device: cuda was asked for but torch sees no CUDA device; use auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per torchrun process
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def launch(nproc: int, module: str) -> None:
    """runtime.nproc > 1 outside torchrun: run this stage as nproc local torchrun processes instead,
    and exit with their status. Under torchrun (WORLD_SIZE set, e.g. a multi-node launch) it returns."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        import subprocess
        import sys

        stage = module.rsplit(".", 1)[-1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module]
        # The ranks' stderr passes through line by line, except that after a rank's one-line user error
        # torchrun's own multi-page failure report is dropped: the user sees the one line and exit code 2.
        user_error = None
        # Each rank gets its share of the cores (torchrun would otherwise set 1 and print a banner about it).
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, len(os.sched_getaffinity(0)) // nproc))}
        with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1, env=env) as proc:
            for line in proc.stderr:
                if user_error is None and cli.is_user_error_line(stage, line):
                    user_error = line
                if user_error is None:
                    sys.stderr.write(line)
        if user_error is not None:
            sys.stderr.write(user_error)
            sys.exit(cli.EXIT_USER_ERROR)
        sys.exit(proc.returncode)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 outside torchrun)."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Under torchrun with more than one process, joins the process group:
    NCCL on GPUs, gloo on CPUs. A plain `python -m stages.x` is rank 0 of 1."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return rank_and_world()


def finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) that autograd can pass through: a sum over ranks has the sum of the ranks'
    gradients as its gradient. (torch.distributed.nn.functional.all_reduce does this but is deprecated.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm for CPU processes (gloo), where torch's own cannot run: in torch 2.14 its
    forward raises "SyncBatchNorm expected input tensor to be on GPU or XPU" for CPU tensors, the kernels
    it calls (torch.batch_norm_stats, batch_norm_gather_stats_with_counts, ...) have no CPU
    implementation, and DistributedDataParallel refuses any SyncBatchNorm on CPU ("SyncBatchNorm layers
    only work with GPU modules"), hence a _BatchNorm, not a SyncBatchNorm subclass. Same parameters and
    buffers, so the same state dict keys. In training under a process group the batch statistics are
    those of the whole global batch: the per-channel sum and count, then the centred sum of squares
    (two passes, as stable as one process's), summed over ranks; everything else is _BatchNorm's."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = (1, -1) + (1,) * (input.dim() - 2)
        local = torch.cat([input.sum(dims), input.new_full((1,), input.numel() // input.size(1))])
        total = _AllReduceSum.apply(local)
        n = float(total[-1].detach())  # values per channel (images x positions), over all ranks
        if n < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got {n:g} over all ranks")
        mean = total[:-1] / n
        centred = input - mean.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims)) / n  # biased: what normalises the batch
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():  # as F.batch_norm updates them: the unbiased variance, at the momentum
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean, alpha=f)
                self.running_var.mul_(1 - f).add_(var * (n / (n - 1)), alpha=f)
        return out


def trains_batchnorm(model: nn.Module) -> bool:
    """Some BatchNorm layer is in training mode after model.train() (Classifier keeps frozen blocks and,
    with bn_frozen, every backbone BatchNorm in eval mode), i.e. one that would compute batch statistics."""
    was = model.training
    model.train()
    trains = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
    model.train(was)
    return trains


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `model` synchronised over the process group: torch's SyncBatchNorm on GPUs,
    GlooSyncBatchNorm on the CPU. In place (the root of a Classifier is no BatchNorm); parameters and
    buffers are shared with the layers replaced, so optimizer groups built beforehand still hold them,
    and the state dict keys are unchanged (checkpoints and best_state load into the plain model)."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cpu":
        for m in model.modules():
            if type(m) is nn.SyncBatchNorm:
                m.__class__ = GlooSyncBatchNorm  # the same attributes; only forward differs
    return model


def configure_runtime(*, threads: int, deterministic: bool, seed: int | None = None) -> None:
    """Threads, determinism and (for stages that draw random numbers) the seed, once per stage process."""
    if threads:
        torch.set_num_threads(threads)
    if seed is not None:
        torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic matmuls.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    # cuDNN's autotuner stays off (PyTorch's default), deterministic or not. With it on, an H200
    # searched again for every new input shape, about 6 s each for Lite0 at 224 px: extract's val
    # split (a new last-batch shape) took 6.0 s, the same-shaped test split 0.2 s. A
    # 3-epoch fine-tune with it averaged 18 s per epoch on 2,500 images, where the benchmark's loop
    # (autotuner off) trains at 5,555 img/s. Every stage is a fresh process, so that search would be
    # paid in every stage of every experiment.
    torch.backends.cudnn.benchmark = False


@functools.cache
def cpu_has_native_bf16() -> bool:
    """oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX); elsewhere it is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, amp: bool, training: bool = False):
    """bfloat16 autocast on CUDA; on CPUs with native bf16, for inference only.

    Measured on a 2-core EPYC with AVX512-BF16 (resnet18, 32 px): inference 2,470 -> 4,542 img/s,
    bit-identical run to run, embeddings within cosine 0.9999 of fp32. Training would gain
    452 -> 605 img/s, but oneDNN's bf16 backward is not deterministic (two identical runs
    differ), and exact reproducibility on CPU matters more, so CPU training stays fp32.
    """
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if amp and not training and device.type == "cpu" and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def compile_enabled(setting: bool | None, device: torch.device) -> bool:
    """runtime.compile resolved: null means on CUDA only. The CPU default stays eager mode, whose
    outputs are the byte-identical ones the tests and dvc.lock hold."""
    return device.type == "cuda" if setting is None else bool(setting)


def training_memory_format(device: torch.device) -> torch.memory_format:
    """channels_last everywhere except CPU training, where fp32 NCHW measured faster here
    (resnet18 32 px, 2-core EPYC: 535 vs 463 img/s); inference is faster channels_last on both."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def to_input(batch: torch.Tensor, *, mean, std, device: torch.device,
             memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """uint8 (B,3,H,W) -> normalised float32 on `device`, in `memory_format`."""
    x = batch.to(device, non_blocking=True).float().div_(255.0)
    m, s = _normalisation(tuple(mean), tuple(std), device)
    return ((x - m) / s).contiguous(memory_format=memory_format)


@functools.lru_cache(maxsize=8)
def _normalisation(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as (1,C,1,1) tensors on `device`, made once: building them per batch from Python
    lists is a synchronous host-to-device copy on CUDA, which stalled the host behind every batch."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


@torch.inference_mode()
def predict_batches(model: nn.Module, images: torch.Tensor, *, mean, std, batch_size: int, device: torch.device,
                    amp: bool = True, desc: str | None = None) -> Iterator[torch.Tensor]:
    """Model outputs (logits or embeddings) for uint8 images, one float32 CPU batch at a time, so a
    caller can write them out as they come and hold no more than a batch. With `desc`, a progress bar."""
    model.eval().to(device, memory_format=torch.channels_last)
    if len(images) == 0:  # an empty split still needs the output width
        yield from (y[:0] for y in predict_batches(model, torch.zeros((1, *images.shape[1:]), dtype=torch.uint8),
                                                   mean=mean, std=std, batch_size=1, device=device, amp=amp))
        return
    batches = [slice(s, s + batch_size) for s in range(0, len(images), batch_size)]
    bar = cli.progress(None, desc=desc, total=len(images), unit="img") if desc else None
    for chunk in Feed(images, batches, device=device):
        with autocast(device, amp):
            y = model(to_input(chunk, mean=mean, std=std, device=device))
        yield y.float().cpu()
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()


def predict(model: nn.Module, images: torch.Tensor, *, mean, std, batch_size: int, device: torch.device,
            amp: bool = True, desc: str | None = None) -> torch.Tensor:
    """Model outputs (logits or embeddings) for uint8 images, as one float32 CPU tensor."""
    return torch.cat(list(predict_batches(model, images, mean=mean, std=std, batch_size=batch_size, device=device,
                                          amp=amp, desc=desc)))


def _share(lo: int, hi: int, *, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous part of rows [lo, hi), as torch.tensor_split divides fit's batches."""
    q, r = divmod(hi - lo, world)
    start = lo + rank * q + min(rank, r)
    return start, start + q + (rank < r)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images, *, mean, std, batch_size: int, device: torch.device, amp: bool,
                          memory_format: torch.memory_format = torch.contiguous_format) -> int:
    """Recompute every BatchNorm's running statistics as the exact average over `images` (no
    augmentation, no gradient), leaving the weights alone; returns how many layers were reset.

    Why: a BatchNorm's running statistics follow the batches at its momentum. torchvision builds
    MobileNetV3 with momentum 0.01, so after a short source task (tens of steps) they are still
    mostly their initial 0 and 1, and everything that runs the model in eval mode (validation,
    frozen features, bn_frozen fine-tuning) normalises with them: mobilenet_v3_small's source task
    scored exactly chance in validation while its train accuracy rose to 0.68.

    Under torchrun with synchronised BatchNorm (see fit), each rank runs its slice of every batch and
    the layers combine the slices, so every rank ends with the statistics one process computes.

    Why not torch.optim.swa_utils.update_bn, which does the same reset and cumulative average: it
    puts the whole model in train mode, so stochastic depth and dropout ahead of a BatchNorm enter
    its statistics, and it runs with autograd on. Measured on tf_efficientnet_lite0 (256 random
    64 px images, batches of 64): without drop path both give identical statistics (max relative
    variance difference 0.0); with drop_path_rate 0.2, update_bn's variances differ from the exact
    eval-mode ones by up to 42% (median 9% over 49 layers) and eval logits move by 5.5 (of 14)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    n = len(images)
    if not bns or n < 2:  # a single image has no batch variance to measure
        return 0
    rank, world = rank_and_world()
    # Unsynchronised, every rank runs whole batches: a slice's statistics would be the slice's alone.
    synced = world > 1 and all(isinstance(m, (nn.SyncBatchNorm, GlooSyncBatchNorm)) for m in bns)
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in bns]
    model.eval()  # dropout and the rest as in evaluation; only the BatchNorm layers measure
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch counts equally
        m.train()
    try:
        # Near-equal contiguous batches, so every batch weighs about the same in the average.
        bounds = torch.linspace(0, n, max(1, math.ceil(n / batch_size)) + 1).round().long().tolist()
        spans = list(zip(bounds, bounds[1:]))
        if synced:
            spans = [_share(lo, hi, rank=rank, world=world) for lo, hi in spans]
        for chunk in Feed(images, [slice(lo, hi) for lo, hi in spans], device=device):
            with autocast(device, amp, training=True):
                model(to_input(chunk, mean=mean, std=std, device=device, memory_format=memory_format))
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    return len(bns)


def epoch_batches(labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                  sampler: str = "shuffle") -> list[torch.Tensor]:
    """One epoch's indices into `labels`, in near-equal batches: no ragged 1- or 2-image batch to upset BatchNorm.

    shuffle: every index once, in random order. balanced: len(labels) indices drawn with replacement, each
    with probability inversely proportional to its class's count, so every class present is drawn equally
    often on average (torch's WeightedRandomSampler with those weights). Both draw from `generator` only, so
    the same seed gives the same epochs, on every torchrun rank alike."""
    n = len(labels)
    if sampler == "balanced":
        labels = labels.cpu().long()
        order = torch.multinomial(1.0 / torch.bincount(labels)[labels].double(), n, replacement=True,
                                  generator=generator)
    elif sampler == "shuffle":
        order = torch.randperm(n, generator=generator)
    else:
        raise ValueError(f"sampler: {sampler!r} is not valid; choose one of: {', '.join(SAMPLERS)}")
    return list(torch.tensor_split(order, max(1, math.ceil(n / batch_size))))


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights, unaffected by further training."""
    return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Loss weights n / (k * count_c) from the training labels (scikit-learn's "balanced"): every class then
    weighs as much in the loss as the others, whatever its count. A class with no training image gets 0:
    nothing of it is there to balance (and F.cross_entropy's label smoothing then leaves it out too)."""
    counts = torch.bincount(labels.long(), minlength=num_classes).double()
    weights = torch.where(counts > 0, len(labels) / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


def train_head(*, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
               head: nn.Module, lr: float, epochs: int, weight_decay: float, batch_size: int, seed: int,
               device: torch.device, class_weights: torch.Tensor | None = None,
               sampler: str = "shuffle") -> tuple[dict, list[dict], int]:
    """Train a classifier on cached embeddings in memory; return (best-val state, history, best epoch).
    `class_weights` weigh the training loss per class (validation loss stays unweighted); `sampler` draws
    each epoch's embeddings (epoch_batches)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head.to(device)
    train_x, train_y = train_x.to(device).float(), train_y.to(device)
    val_x, val_y = val_x.to(device).float(), val_y.to(device)
    weight = class_weights.to(device) if class_weights is not None else None
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    history, best, best_state, best_epoch = [], -1.0, None, 0
    for epoch in cli.progress(range(1, epochs + 1), desc="train_head", unit="epoch"):
        head.train()
        total, correct, loss_sum = 0, 0, 0.0
        for idx in epoch_batches(train_y, batch_size, gen, sampler):
            idx = idx.to(device)
            logits = head(train_x[idx])
            loss = F.cross_entropy(logits, train_y[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == train_y[idx]).sum())
            total += len(idx)
        head.eval()
        with torch.inference_mode():
            val_logits = head(val_x)
            val_loss = float(F.cross_entropy(val_logits, val_y)) if len(val_y) else float("nan")
        val_acc = accuracy(val_logits, val_y)
        history.append(dict(epoch=epoch, train_loss=loss_sum / total, train_acc=correct / total, val_loss=val_loss, val_acc=val_acc))
        score = val_acc if len(val_y) else epoch  # no validation split: keep the last epoch
        if score > best:
            best, best_epoch = score, epoch
            best_state = _snapshot(head)
    return best_state, history, best_epoch


# The L2 strengths train_logreg tries: 1e-6 to 1e2, one per decade (9 fits). CLIP's linear probes swept
# 1e-6..1e6; a strength above 1e2 pulls a head on unit-scale embeddings to all-zero weights.
LOGREG_L2 = tuple(10.0 ** e for e in range(-6, 3))


def train_logreg(*, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 head: nn.Module, device: torch.device, l2_grid=LOGREG_L2, class_weights: torch.Tensor | None = None,
                 max_iter: int = 1000) -> tuple[dict, list[dict], int]:
    """The CLIP linear probe: multinomial logistic regression on the embeddings, fitted full-batch by L-BFGS
    (strong-Wolfe line search, so no learning rate) for each L2 strength of `l2_grid`, minimising
    mean cross-entropy + l2 / 2 * ||W||^2 (the bias is not penalised). Each fit starts from zero weights.
    The strength with the best val accuracy is kept, ties going to the lower val loss.

    `head` is a linear head (make_head("linear"): one layer named fc). Returns (the chosen fit's state,
    one history row per strength in grid order, the chosen row's 1-based index)."""
    if not len(val_y):
        raise cli.UserError("train_head.kind: logreg chooses its L2 strength on the val split, which is empty; "
                            "set data.val_fraction above 0, or use kind linear")
    fc = head.fc
    head.to(device)
    train_x, train_y = train_x.to(device).float(), train_y.to(device)
    val_x, val_y = val_x.to(device).float(), val_y.to(device)
    weight = class_weights.to(device) if class_weights is not None else None
    history, best, best_state, best_index = [], None, None, 0
    for index, l2 in enumerate(cli.progress(l2_grid, desc="train_head (logreg)", unit="fit"), start=1):
        with torch.no_grad():
            fc.weight.zero_()
            fc.bias.zero_()
        opt = torch.optim.LBFGS(fc.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

        def objective():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(fc(train_x), train_y, weight=weight) + 0.5 * l2 * fc.weight.square().sum()
            loss.backward()
            return loss

        opt.step(objective)
        with torch.inference_mode():
            train_logits, val_logits = fc(train_x), fc(val_x)
            row = dict(l2=l2, train_loss=float(F.cross_entropy(train_logits, train_y, weight=weight)),
                       train_acc=accuracy(train_logits, train_y), val_loss=float(F.cross_entropy(val_logits, val_y)),
                       val_acc=accuracy(val_logits, val_y))
        history.append(row)
        score = (row["val_acc"], -row["val_loss"])
        if best is None or score > best:
            best, best_index = score, index
            best_state = _snapshot(head)
    return best_state, history, best_index


def _rng_states(device: torch.device, world: int) -> list[dict]:
    """The global generators' states of every rank, by rank: the CPU's, and on CUDA the rank's GPU's,
    which dropout draws from there (the mlp head's, torchvision EfficientNet's classifier). Per rank,
    because each rank draws for its own slice on its own GPU: rank 0's states are not the others'."""
    import torch.distributed as dist

    mine = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    if world == 1:
        return [mine]
    every = [None] * world
    dist.all_gather_object(every, mine)
    return every


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def make_scheduler(optimizer, *, kind: str, epochs: int, step_size: int, gamma: float, warmup_epochs: int = 0):
    """The per-epoch learning-rate schedule. With `warmup_epochs` w, epochs 1..w ramp linearly (epoch e
    at lr * e / (w + 1), so none is wasted at lr 0), then `kind` runs over the remaining epochs, as
    torchvision's references chain them (SequentialLR of LinearLR and the main schedule)."""
    main_epochs = epochs - warmup_epochs
    if kind == "step":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    elif kind == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, main_epochs))
    else:
        main = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if not warmup_epochs:
        return main
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup_epochs + 1), end_factor=1.0,
                                               total_iters=warmup_epochs)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[warmup_epochs])


def make_optimizer(model: nn.Module, param_groups: list[dict], *, name: str, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer over our parameter groups, each keeping its learning rate.

    sgd: torch's SGD, classical momentum, weight decay on every parameter (the pipeline's recipe until
    issue 19). timm's factory given our groups unsplit, as `momentum` (its own `sgd` is Nesterov), builds
    this same class with the same arguments, and tests/test_recipe.py measures its steps bit-identical to
    this one's; sgd stays torch's own only because importing timm.optim costs 3-5 s (measured on 2 cores) in
    every stage that trains a torchvision backbone and would otherwise never import timm.

    Any other name comes from timm.optim.create_optimizer_v2, with each of our groups split in two so that
    norm and bias parameters get no weight decay (timm's rule: 1-d or named .bias, or listed by a timm
    model's no_weight_decay()). timm's own grouping would take the whole model and lose our per-group
    learning rates (backbone_lr_factor, layer_decay)."""
    groups = [dict(g, params=[q for q in g["params"] if q.requires_grad]) for g in param_groups]
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay)
    if name not in OPTIMIZERS:
        raise ValueError(f"finetune.optimizer: {name!r} is not valid; choose one of: {', '.join(OPTIMIZERS)}")
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(split_weight_decay(model, groups, weight_decay), opt=name, weight_decay=weight_decay,
                               momentum=momentum)


def split_weight_decay(model: nn.Module, groups: list[dict], weight_decay: float) -> list[dict]:
    """Each group as two with its other settings: the parameters that decay, then those that do not
    (weight_decay 0): norm weights and every bias (1-d, or named .bias) and what a timm model names in
    no_weight_decay() (position embeddings, class tokens), as timm's param_groups_weight_decay decides."""
    import fnmatch

    names = {id(q): name for name, q in model.named_parameters()}
    patterns = []
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            patterns += [f"{prefix}.{n}" if prefix else n for n in listed()]

    def decays(q: torch.Tensor) -> bool:
        name = names.get(id(q), "")
        return q.ndim > 1 and not name.endswith(".bias") and not any(fnmatch.fnmatch(name, p) for p in patterns)

    out = []
    for g in groups:
        label = g.get("name")
        out.append(dict(g, params=[q for q in g["params"] if decays(q)], weight_decay=weight_decay))
        out.append(dict(g, params=[q for q in g["params"] if not decays(q)], weight_decay=0.0,
                        **({"name": f"{label}.no_decay"} if label else {})))
    return [g for g in out if g["params"]]


def fit(model: nn.Module, *, train_images: torch.Tensor, train_labels: torch.Tensor, val_images: torch.Tensor,
        val_labels: torch.Tensor, param_groups: list[dict], epochs: int, batch_size: int, momentum: float,
        weight_decay: float, scheduler: str, step_size: int, gamma: float, augment_pad: int, augment_hflip: bool,
        mean, std, device: torch.device, amp: bool, seed: int, eval_batch_size: int = 512,
        checkpoint: Path | None = None, resume: bool = False, fingerprint: str = "",
        recalibrate_bn: bool = False, eval_every: int = 1, val_subset: int | None = None, compile: bool = False,
        optimizer: str = "sgd", warmup_epochs: int = 0, label_smoothing: float = 0.0, clip_grad: float | None = None,
        accumulate: int = 1, ema_decay: float | None = None, class_weights: torch.Tensor | None = None,
        crop: str = "pad_crop", crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), auto_augment: str = "none",
        mixup: float = 0.0, cutmix: float = 0.0, num_classes: int | None = None,
        sampler: str = "shuffle", log: Callable[[str], None] = print,
        outputs: dict | None = None) -> tuple[dict, list[dict], int]:
    """Training with per-group learning rates; keeps the best-validation weights.

    The recipe: `optimizer` (make_optimizer: sgd, or timm's, with no weight decay on norm and bias), the
    per-epoch schedule after `warmup_epochs` of linear warmup (make_scheduler), cross-entropy with
    `label_smoothing` and per-class `class_weights` (balanced_class_weights), the gradient's norm clipped
    to `clip_grad`, each epoch's images drawn by `sampler` (epoch_batches), and one optimizer step per
    `accumulate` batches of `batch_size`: the images of a step are drawn and augmented together, so
    accumulate=k at batch b takes the steps batch k*b would (up to summation order), with k micro-batches'
    activations at a time.

    Augmentation (transfer/augment.py), per image on the uint8 batch on the device, all of it drawn from the
    epoch generator: the crop (`crop`: pad_crop by `augment_pad`, resized_crop in `crop_scale` and
    `crop_ratio`, or none), the flip (`augment_hflip`), torchvision's `auto_augment` (trivial, randaugment).
    With `mixup` or `cutmix` (Beta alphas), timm's Mixup mixes each step's whole batch (before it is split
    into micro-batches and ranks, so accumulation and data parallelism take the steps one batch would) over
    `num_classes`, `label_smoothing` goes into its soft targets, and the loss is their cross-entropy, with
    `class_weights` weighing each image by its target's weights (see soft_target_loss). Training accuracy
    then counts the class with the larger share of each mixed image.

    With `ema_decay`, timm's ModelEmaV3 averages the weights after every step (its warmup on: decay
    1 - (1 + step)^(-2/3), capped at ema_decay, so a few-shot run's dozen steps count), and validation,
    the best-epoch choice and the kept weights are the average's.

    Validation runs after every `eval_every`-th epoch and after the last, on `val_subset` images of the val
    split (a class-balanced subset, the same every time; None = all): the curves and the best epoch
    are the subset's.

    With `recalibrate_bn`, BatchNorm statistics are recomputed over the training images before each
    validation (see recalibrate_batchnorm), so validation, the best-epoch choice and the kept
    weights all use statistics that match the trained weights. Under torchrun the ranks share the
    work and the synchronised BatchNorm layers combine it, so they are identical everywhere.

    With `checkpoint`, the full training state (model, optimizer, scheduler, average, epoch, every rank's
    RNG states) is written atomically after every epoch; with `resume`, a checkpoint whose fingerprint
    matches these settings is continued, so a killed run ends exactly as an uninterrupted one.

    With `compile`, training steps and validation run through torch.compile; the weights, their
    names and everything saved are the model's own.

    With `outputs` (a dict), fit puts there `val_logits`: the kept weights' logits (float32, on the CPU)
    over the validated images (the subset's with `val_subset`), as validation computed them, so that
    nothing has to run the model over val again for them (evaluate's temperature); None if no epoch
    was validated on any image.
    """
    import torch.distributed as dist

    rank, world = rank_and_world()
    fmt = training_memory_format(device)
    model.to(device, memory_format=fmt)
    # Data parallel: every rank draws the same global batch and augmentation (same generator),
    # trains on its own slice, and DDP averages the gradients, so N processes take the steps one
    # process would take on the whole batch. A BatchNorm that trains would normalise each slice by
    # its own statistics (and keep rank 0's as running statistics): synchronised, it uses the
    # global batch's, as one process does. Recalibration trains them too (on every rank's share).
    if world > 1 and (recalibrate_bn or trains_batchnorm(model)):
        model = sync_batchnorm(model, device)
    ema = None
    if ema_decay is not None:  # copied from the model before DDP wraps it, as timm's train.py does
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=ema_decay, use_warmup=True)
    net = ddp = model
    if world > 1:
        net = ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        log = log if rank == 0 else (lambda _: None)
    averaged = ema.module if ema is not None else model  # what is validated and kept
    # Compiled wrappers share the model's parameters; state dicts are taken from the model, so no
    # "_orig_mod." enters a checkpoint or the saved weights.
    evaluated = torch.compile(averaged) if compile else averaged
    net = torch.compile(net) if compile else net
    opt = make_optimizer(model, param_groups, name=optimizer, momentum=momentum, weight_decay=weight_decay)
    trained = [q for g in opt.param_groups for q in g["params"]]
    sched = make_scheduler(opt, kind=scheduler, epochs=epochs, step_size=step_size, gamma=gamma,
                           warmup_epochs=warmup_epochs)
    weight = class_weights.to(device) if class_weights is not None else None
    if (mixup or cutmix) and num_classes is None:
        raise ValueError("fit: mixup and cutmix need num_classes (the width of their soft targets)")
    mixer = make_mixup(mixup=mixup, cutmix=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    history: list[dict] = []
    best_acc, best_epoch = -1.0, 0
    best_state = _snapshot(averaged)
    best_logits = None
    start, steps = 1, 0
    if resume and checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if ema is not None:
                ema.module.load_state_dict(state["ema"])
                steps = state["steps"]
            gen.set_state(state["generator"])
            _set_rng_state(state["rng"][rank], device)
            history, best_acc, best_epoch, best_state = state["history"], state["best_acc"], state["best_epoch"], state["best_state"]
            best_logits = state.get("best_val_logits")
            start = state["epoch"] + 1
            log(f"resuming from {checkpoint} after epoch {state['epoch']}")
        else:
            log(f"{checkpoint} was written with other settings; starting from epoch 1")
    train_labels_dev = train_labels.to(device)
    subset = balanced_subset(val_labels, val_subset)
    val_seen, val_seen_labels = (val_images, val_labels) if subset is None else (val_images[subset], val_labels[subset])
    for epoch in range(start, epochs + 1):
        model.to(memory_format=fmt)  # predict() below switches it to channels_last for evaluation
        model.train()
        loss_sum, correct, total = 0.0, 0, 0
        order = epoch_batches(train_labels, batch_size * accumulate, gen, sampler)
        batches = cli.progress(Feed(train_images, order, device=device), desc=f"epoch {epoch}/{epochs}",
                               total=len(order), unit="batch")
        for batch, idx in zip(batches, order):  # the bar first: it closes when its iterator ends
            batch = augment(batch, pad=augment_pad, hflip=augment_hflip, crop=crop, scale=crop_scale, ratio=crop_ratio,
                            auto_augment=auto_augment, generator=gen)
            y = train_labels_dev[idx.to(device)]
            targets = None
            if mixer is not None:  # the step's whole batch, normalised: each image is mixed with its mirror in it
                batch = to_input(batch, mean=mean, std=std, device=device, memory_format=fmt)
                targets = mix_batch(batch, y, mixer, generator=gen)
            norm = loss_norm(y, weight, targets)
            opt.zero_grad(set_to_none=True)
            micro = torch.tensor_split(torch.arange(len(idx)), accumulate)
            for i, part in enumerate(micro):
                if world > 1:
                    part = torch.tensor_split(part, world)[rank]
                whole = len(part) == len(idx)
                xs, ys = (batch, y) if whole else (batch[part.to(device)], y[part.to(device)])
                if targets is None:
                    x = to_input(xs, mean=mean, std=std, device=device, memory_format=fmt)
                else:
                    x, ts = xs.contiguous(memory_format=fmt), targets if whole else targets[part.to(device)]
                # DDP averages gradients at the backward of the step's last micro-batch only.
                with ddp.no_sync() if world > 1 and i < accumulate - 1 else nullcontext():
                    with autocast(device, amp, training=True):
                        logits = net(x)
                        if targets is not None:  # summed over the slice, then as below
                            loss = soft_target_loss(logits.float(), ts, weight) * (world / norm)
                        elif world == 1 and accumulate == 1:
                            loss = F.cross_entropy(logits.float(), ys, weight=weight, label_smoothing=label_smoothing)
                        else:
                            # Each micro-batch's summed loss over the whole step's norm (the mean the step
                            # minimises). Under DDP, which averages the ranks' gradients, scaled by world
                            # too: then also a batch split unevenly (13 images as 7 and 6) weighs each image
                            # the same, where a mean of the slices' means would weigh each of the 6 more.
                            loss = F.cross_entropy(logits.float(), ys, weight=weight, label_smoothing=label_smoothing,
                                                   reduction="sum") * (world / norm)
                    loss.backward()
                loss_sum += float(loss.detach()) * (norm / world)  # this slice's summed loss
                correct += int((logits.argmax(1) == (ys if targets is None else ts.argmax(1))).sum())
                total += len(ys)
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(trained, clip_grad)
            opt.step()
            steps += 1
            if ema is not None:
                ema.update(model, step=steps)
        if world > 1:
            sums = torch.tensor([loss_sum, correct, total], dtype=torch.float64, device=device)
            dist.all_reduce(sums)
            loss_sum, correct, total = float(sums[0]), int(sums[1]), int(sums[2])
        lr = opt.param_groups[-1]["lr"]
        sched.step()
        if recalibrate_bn:
            recalibrate_batchnorm(averaged, train_images, mean=mean, std=std, batch_size=eval_batch_size,
                                  device=device, amp=amp, memory_format=fmt)
        entry = dict(epoch=epoch, train_loss=loss_sum / total, train_acc=correct / total, lr=lr)
        line = f"epoch {epoch}/{epochs}: train loss {loss_sum / total:.4f} acc {correct / total:.3f}"
        if epoch % eval_every == 0 or epoch == epochs:
            # Every rank validates the whole subset (the same numbers everywhere, so every rank keeps the same best epoch).
            val_logits = predict(evaluated, val_seen, mean=mean, std=std, batch_size=eval_batch_size, device=device, amp=amp)
            val_acc = accuracy(val_logits, val_seen_labels)
            val_loss = float(F.cross_entropy(val_logits, val_seen_labels)) if len(val_seen_labels) else float("nan")
            entry.update(val_loss=val_loss, val_acc=val_acc)
            line += f", val acc {val_acc:.4f}"
            score = val_acc if len(val_seen_labels) else float(epoch)
            if score > best_acc:
                best_acc, best_epoch = score, epoch
                best_state = _snapshot(averaged)
                best_logits = val_logits.float().cpu() if len(val_seen_labels) else None
        log(line)
        history.append(entry)
        if checkpoint is not None:
            rng = _rng_states(device, world)  # a collective: every rank takes part
            if rank == 0:
                extra = dict(ema=ema.module.state_dict(), steps=steps) if ema is not None else {}
                save_checkpoint(checkpoint, dict(
                    model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                    epoch=epoch, generator=gen.get_state(), rng=rng, history=history, best_acc=best_acc,
                    best_epoch=best_epoch, best_state=best_state, best_val_logits=best_logits,
                    fingerprint=fingerprint, **extra))
    if outputs is not None:
        outputs["val_logits"] = best_logits
    return best_state, history, best_epoch


def loss_norm(labels: torch.Tensor, weight: torch.Tensor | None, targets: torch.Tensor | None) -> float:
    """What a step's loss is the mean over: its images, or their summed class weights (of the soft targets
    when the batch was mixed). fit and the lr range test divide each micro-batch's summed loss by it."""
    if weight is None:
        return float(len(labels))
    return float(weight[labels].sum()) if targets is None else float((targets @ weight).sum())


def soft_target_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The summed cross-entropy of soft targets (B, classes), as timm's SoftTargetCrossEntropy computes it
    per image; with `weight`, image i's term for class c is weighed by weight[c], so a mixed image of
    classes a and b (shares lam, 1 - lam) costs lam * w_a * CE_a + (1 - lam) * w_b * CE_b: the weighted
    losses of the two images it mixes. Dividing by the summed (targets @ weight), as fit does, makes it the
    weighted mean F.cross_entropy takes of hard labels (exactly so for one-hot targets)."""
    return F.cross_entropy(logits, targets, weight=weight, reduction="sum")


def balanced_subset(labels: torch.Tensor, n: int | None) -> torch.Tensor | None:
    """Indices of `n` of `labels`, as many of each class as the class has up to an equal share (the
    first ones in storage order, so a larger n holds a smaller one's); None when n is None or covers all."""
    if n is None or n >= len(labels):
        return None
    queues = [(labels == c).nonzero().flatten().tolist() for c in torch.unique(labels)]
    chosen, depth = [], 0
    while len(chosen) < n:  # round robin over the classes: small classes give what they have
        chosen += [q[depth] for q in queues if depth < len(q)][:n - len(chosen)]
        depth += 1
    return torch.tensor(sorted(chosen), dtype=torch.long)
