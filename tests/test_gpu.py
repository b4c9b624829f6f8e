"""GPU paths. Marked `gpu`: skipped without CUDA (CI has none); run them where a GPU is lent."""
import pytest
import torch

from transfer import io, models, training

pytestmark = pytest.mark.gpu


def _data(n=64, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % 3


def test_cuda_saved_checkpoint_loads_on_cpu(tmp_path):
    meta = dict(arch="resnet18", image_size=32, num_classes=3, head=dict(kind="linear"))
    model = models.build_classifier(meta).cuda()
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "gpu.pt")
    state = io.load_state_dict(tmp_path / "gpu.pt")
    assert all(v.device.type == "cpu" for v in state.values())
    again = models.load_model(tmp_path / "gpu.pt", meta)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.eval().cpu()(x), again.eval()(x))


def test_gpu_predictions_match_cpu():
    """70 images in batches of 32: the last batch is padded on CUDA (one shape for cuDNN's
    autotuner), which must not change any image's output or the number of outputs."""
    images, _ = _data(n=70)
    backbone, _ = models.build_backbone("resnet18", 32)
    kw = dict(mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, batch_size=32)
    # The reference is fp32 on the CPU: amp=True there would autocast to bf16 on CPUs with native bf16.
    cpu = training.predict(backbone, images, device=torch.device("cpu"), amp=False, **kw)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # TF32 is not fp32
    try:
        gpu = training.predict(backbone, images, device=torch.device("cuda"), amp=False, **kw)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    bf16 = training.predict(backbone, images, device=torch.device("cuda"), amp=True, **kw)
    assert cpu.shape == gpu.shape == bf16.shape == (70, 512)
    scale = cpu.abs().max()
    assert (cpu - gpu).abs().max() <= 1e-4 * scale
    # bf16 keeps 8 mantissa bits (~0.4% per rounding); through 18 layers a few percent of the largest
    # activation is its honest tolerance, and the direction of each embedding must hold.
    assert (cpu - bf16).abs().max() <= 0.05 * scale
    assert torch.nn.functional.cosine_similarity(cpu, bf16).min() > 0.99


def _fit_two_epochs(model, images, labels, **extra):
    """Two epochs of fit on CUDA with bf16 autocast, validating on the first 16 images."""
    return training.fit(
        model, train_images=images, train_labels=labels, val_images=images[:16], val_labels=labels[:16],
        param_groups=[{"params": model.parameters(), "lr": 0.01}], epochs=2, batch_size=16, momentum=0.9,
        weight_decay=0.0, scheduler="cosine", step_size=1, gamma=1.0, augment_pad=2, augment_hflip=True,
        mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, device=torch.device("cuda"), amp=True, seed=0,
        log=lambda _: None, **extra)


@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
def test_deterministic_finetune_on_gpu_is_bit_identical(arch):
    """vgg11's 7x7 adaptive pool has no deterministic CUDA backward: it must train (by matmul), not raise."""
    training.configure_runtime(threads=0, deterministic=True, seed=0)
    try:
        images, labels = _data()
        results = []
        for _ in range(2):
            torch.manual_seed(0)
            backbone, dim = models.build_backbone(arch, 32)
            model = models.Classifier(backbone, models.make_head("linear", dim, 3))
            best, _, _ = _fit_two_epochs(model, images, labels)
            results.append(best)
        assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    finally:
        torch.use_deterministic_algorithms(False)


def test_compiled_extraction_and_finetuning_match_eager():
    """runtime.compile on CUDA (inductor's kernels): embeddings within the fp32 bound of
    test_gpu_predictions_match_cpu, and a compiled fine-tune saves the model's own keys and learns."""
    images, labels = _data(n=70)
    backbone, dim = models.build_backbone("resnet18", 32)
    kw = dict(mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, batch_size=32, device=torch.device("cuda"), amp=False)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        eager = training.predict(backbone, images, **kw)
        compiled = training.predict(torch.compile(backbone), images, **kw)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert (eager - compiled).abs().max() <= 1e-4 * eager.abs().max()
    model = models.Classifier(backbone, models.make_head("linear", dim, 3))
    best, history, _ = _fit_two_epochs(model, images, labels, compile=True)
    assert set(best) == set(model.state_dict()) and len(history) == 2
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
