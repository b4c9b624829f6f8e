"""Benchmarks: the pipeline's code paths against the tutorials' way, on the same data and model.

    python -m benchmarks.run                 # CPU, 32 px, everything (about 10 minutes on 2 cores)
    python -m benchmarks.run --device cuda --image-size 224 --skip-dvc

The baseline is the tutorials' loop, written faithfully: an ImageFolder of PNG files decoded by
PIL with per-image transforms on every epoch, fp32, NCHW, batch 64, num_workers=0, and in
feature-extraction mode the frozen backbone recomputed every epoch. Each measurement runs in a
fresh process so its peak memory is its own. Results: a JSON file in benchmarks/results/ and a
printed table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transfer.experiments import dvc_env, stages_ran

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EPOCHS = 10  # feature-extraction training epochs, both ways
BASELINE_BATCH = 64


# ---------------------------------------------------------------- data


def build_data(folder: Path, image_size: int, train_per_class: int, eval_per_class: int, *, source: str = "fashion-mnist",
               root: str = str(ROOT / "data/raw/fashion-mnist"), classes=(5, 6, 7, 8, 9)) -> None:
    """Five classes prepared by the pipeline's own prepare(), plus the same pixels as PNG files in
    the ImageFolder layout the tutorials read."""
    from PIL import Image

    from stages.prepare import prepare
    from transfer import preprocess, storage

    # The pixels the committed results were measured on: a plain bilinear resize, no crop margin.
    spec = preprocess.resolve_spec(arch="resnet18", pretrained_source="none", weights="DEFAULT", image_size=image_size,
                                   interpolation="bilinear", crop_pct=1.0)
    prepare(source=source, root=root, classes=list(classes),
            spec=spec, val_fraction=0.1, test_fraction=0.2, train_per_class=train_per_class,
            eval_per_class=eval_per_class, max_rejected_fraction=0.0, split_seed=0, out_dir=folder / "prepared",
            metrics_path=folder / "prepare.json")
    for split in ("train", "val"):
        tensors, meta = storage.read_split(folder / "prepared", split)
        for i, (img, label) in enumerate(zip(tensors["images"], tensors["labels"])):
            path = folder / "png" / split / f"{int(label)}_{meta['classes'][label]}".replace("/", "-") / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)


# ---------------------------------------------------------------- measurements (each in its own process)


def _backbone(backbone_dir: str | None, arch: str, image_size: int):
    from transfer import models
    from transfer.io import load_tensors

    backbone, dim = models.build_backbone(arch, image_size)
    if backbone_dir and (Path(backbone_dir) / "backbone.safetensors").is_file():
        state, _ = load_tensors(Path(backbone_dir) / "backbone.safetensors")
        backbone.load_state_dict(state)
    return backbone, dim


def _tutorial_loader(folder: Path, split: str, *, augment: bool, shuffle: bool):
    import torch
    from torchvision import datasets, transforms

    from transfer.models import IMAGENET_MEAN, IMAGENET_STD

    size = int(json.loads((folder / "meta.json").read_text())["image_size"])
    tf = [transforms.Resize(size), transforms.CenterCrop(size)]
    if augment:
        tf = [transforms.RandomCrop(size, padding=2), transforms.RandomHorizontalFlip()]
    tf += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    ds = datasets.ImageFolder(str(folder / "png" / split), transform=transforms.Compose(tf))
    return torch.utils.data.DataLoader(ds, batch_size=BASELINE_BATCH, shuffle=shuffle, num_workers=0)


def measure(name: str, folder: Path, device_name: str, arch: str, backbone_dir: str | None) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from transfer import models, storage, training

    torch.manual_seed(0)
    device = training.pick_device(device_name)
    meta = json.loads((folder / "meta.json").read_text())
    size = meta["image_size"]
    mean, std = models.IMAGENET_MEAN, models.IMAGENET_STD
    train, _ = storage.read_split(folder / "prepared", "train")
    val, _ = storage.read_split(folder / "prepared", "val")
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out: dict = {}

    if name == "extract_baseline":
        backbone, _ = _backbone(backbone_dir, arch, size)
        backbone.eval().to(device)
        loader = _tutorial_loader(folder, "train", augment=False, shuffle=False)
        with torch.no_grad():  # warm-up at its batch shape, as the project and the ceiling get
            backbone(torch.randn(BASELINE_BATCH, 3, size, size, device=device))
        sync()
        start = time.perf_counter()
        n = 0
        with torch.no_grad():
            for x, _ in loader:
                backbone(x.to(device))
                n += len(x)
        sync()
        out = dict(images=n, seconds=time.perf_counter() - start, batch=BASELINE_BATCH, dtype="float32", memory_format="NCHW")
    elif name == "extract_project":
        backbone, _ = _backbone(backbone_dir, arch, size)
        training.predict(backbone, train["images"][:512], mean=mean, std=std, batch_size=512, device=device)  # warm-up
        sync()
        start = time.perf_counter()
        training.predict(backbone, train["images"], mean=mean, std=std, batch_size=512, device=device)
        sync()
        out = dict(images=len(train["images"]), seconds=time.perf_counter() - start, batch=512,
                   dtype=_amp_dtype(device), memory_format="channels_last")
    elif name == "extract_ceiling":
        # The model's own forward-only speed on a batch already on the device, already normalised.
        backbone, _ = _backbone(backbone_dir, arch, size)
        backbone.eval().to(device, memory_format=torch.channels_last)
        x = torch.randn(512, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), training.autocast(device, True):  # the same dtype the project runs in
            backbone(x)
            sync()
            start, n = time.perf_counter(), 0
            while n < len(train["images"]):
                backbone(x)
                n += len(x)
            sync()
        out = dict(images=n, seconds=time.perf_counter() - start, batch=512, dtype=_amp_dtype(device))
    elif name == "head_baseline":
        # The tutorial's feature extraction: frozen backbone + new fc, PNGs through the whole network every epoch.
        backbone, dim = _backbone(backbone_dir, arch, size)
        model = models.Classifier(backbone, nn.Linear(dim, meta["classes"]))
        for p in model.backbone.parameters():
            p.requires_grad = False
        model.to(device)
        # The same optimizer and settings as the project's head (the seed tutorial also trains its
        # classifier with Adam), so accuracy differences come from the data path alone.
        opt = torch.optim.AdamW(model.head.parameters(), lr=0.01, weight_decay=1e-4)
        train_loader = _tutorial_loader(folder, "train", augment=False, shuffle=True)
        val_loader = _tutorial_loader(folder, "val", augment=False, shuffle=False)
        start, best = time.perf_counter(), 0.0
        for _ in range(EPOCHS):
            model.train()
            model.backbone.eval()  # the tutorial's frozen backbone still runs forward every batch
            for x, y in train_loader:
                x, y = x.to(device), y.to(device)
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for x, y in val_loader:
                    correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
            best = max(best, correct / len(val_loader.dataset))
        sync()
        out = dict(seconds=time.perf_counter() - start, val_acc=best, epochs=EPOCHS)
    elif name == "head_project":
        backbone, dim = _backbone(backbone_dir, arch, size)
        start = time.perf_counter()
        tr = training.predict(backbone, train["images"], mean=mean, std=std, batch_size=512, device=device)
        va = training.predict(backbone, val["images"], mean=mean, std=std, batch_size=512, device=device)
        sync()
        extract_s = time.perf_counter() - start
        # The embeddings as the extract stage caches them (float16), then the train_head stage's code.
        tr, va = tr.half().float(), va.half().float()
        start = time.perf_counter()
        _, history, best_epoch = training.train_head(
            train_x=tr, train_y=train["labels"], val_x=va, val_y=val["labels"], head=models.make_head("linear", dim, meta["classes"]),
            lr=0.01, epochs=EPOCHS, weight_decay=1e-4, batch_size=BASELINE_BATCH, seed=0, device=device)
        sync()
        out = dict(seconds=time.perf_counter() - start, extract_seconds=extract_s, val_acc=history[best_epoch - 1]["val_acc"], epochs=EPOCHS)
    elif name in ("finetune_baseline", "finetune_fp32", "finetune_project"):
        backbone, dim = _backbone(backbone_dir, arch, size)
        model = models.Classifier(backbone, nn.Linear(dim, meta["classes"])).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
        batch = BASELINE_BATCH if name == "finetune_baseline" else meta["finetune_batch"]
        n, start = 0, None
        if name == "finetune_baseline":
            model.train()
            for step, (x, y) in enumerate(_tutorial_loader(folder, "train", augment=True, shuffle=True)):
                if step == 1:  # the first batch pays one-off costs on both sides
                    sync()
                    start, n = time.perf_counter(), 0
                x, y = x.to(device), y.to(device)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                n += len(x)
            dtype, fmt = "float32", "NCHW"
        else:
            amp = name == "finetune_project"
            fmt = training.training_memory_format(device) if amp else torch.contiguous_format
            model.to(memory_format=fmt)
            gen = torch.Generator().manual_seed(0)
            images = train["images"].to(device)  # resident, as the fp32 ceiling measures compute alone
            labels = train["labels"].to(device)
            model.train()
            for step, idx in enumerate(torch.randperm(len(labels), generator=gen).split(batch)):
                if step == 1:
                    sync()
                    start, n = time.perf_counter(), 0
                b = training.augment(images[idx.to(images.device)], pad=2, hflip=True, generator=gen)
                x = training.to_input(b, mean=mean, std=std, device=device, memory_format=fmt)
                with training.autocast(device, amp, training=True):
                    loss = F.cross_entropy(model(x).float(), labels[idx.to(device)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n += len(idx)
            dtype = "bfloat16 autocast" if (amp and cuda) else "float32"
            fmt = "channels_last" if fmt == torch.channels_last else "NCHW"
        sync()
        out = dict(images=n, seconds=time.perf_counter() - start, batch=batch, dtype=dtype, memory_format=fmt)
    else:
        raise SystemExit(f"unknown measurement {name}")
    if "images" in out:
        out["images_per_second"] = out["images"] / out["seconds"]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cuda:
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _amp_dtype(device) -> str:
    from transfer import training

    on = device.type == "cuda" or training.cpu_has_native_bf16()
    return "bfloat16 autocast" if on else "float32"


def run_child(name: str, args, folder: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.run", "--measure", name, "--folder", str(folder), "--device", args.device,
           "--arch", args.arch, "--threads", str(args.threads)]
    if args.backbone:
        cmd += ["--backbone", args.backbone]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"measurement {name} failed:\n{r.stderr}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  {name}: {', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in result.items())}", flush=True)
    return result


# ---------------------------------------------------------------- dvc: full repro vs head-only experiment


def bench_dvc() -> dict:
    """Clone this repository, time `dvc repro` from nothing and then a head-only experiment."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-dvc-"))
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(tmp / "repo")], check=True)
        repo = tmp / "repo"
        (repo / "data" / "raw").mkdir(parents=True, exist_ok=True)
        for name in ("fashion-mnist", "pretrained"):
            src = ROOT / "data" / "raw" / name
            if src.exists():
                shutil.copytree(src, repo / "data" / "raw" / name)
        env = dvc_env()
        timings = {}
        for label, args in (("full_repro", ["repro", "-f"]), ("head_only_exp", ["exp", "run", "-S", "train_head.lr=0.02"])):
            start = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"dvc {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
            timings[label] = time.perf_counter() - start
            timings[f"{label}_stages"] = stages_ran(r.stdout)
            print(f"  dvc {' '.join(args)}: {timings[label]:.1f} s", flush=True)
        return timings
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--train-per-class", type=int, default=400, help="training images per class (5 classes)")
    ap.add_argument("--finetune-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--backbone", default=str(ROOT / "models" / "backbone"),
                    help="backbone weights folder (the pipeline's, when it has run); random weights otherwise")
    ap.add_argument("--skip-dvc", action="store_true", help="leave out the dvc repro vs experiment timing")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.folder), args.device, args.arch, args.backbone)))
        return

    import torch

    from transfer.training import pick_device

    device = pick_device(args.device)
    folder = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        print(f"data: Fashion-MNIST 5-9, {args.train_per_class}/class at {args.image_size} px -> {folder}", flush=True)
        build_data(folder, args.image_size, args.train_per_class, eval_per_class=100)
        (folder / "meta.json").write_text(json.dumps(dict(image_size=args.image_size, classes=5, finetune_batch=args.finetune_batch)))
        names = ["extract_baseline", "extract_project", "extract_ceiling", "head_baseline", "head_project",
                 "finetune_baseline", "finetune_fp32", "finetune_project"]
        m = {name: run_child(name, args, folder) for name in names}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    mem_key = "peak_cuda_mb" if device.type == "cuda" else "peak_rss_mb"
    ratios = {
        "extraction_speedup": m["extract_project"]["images_per_second"] / m["extract_baseline"]["images_per_second"],
        "extraction_of_ceiling": m["extract_project"]["images_per_second"] / m["extract_ceiling"]["images_per_second"],
        "head_training_speedup": m["head_baseline"]["seconds"] / m["head_project"]["seconds"],
        "head_training_speedup_incl_extraction": m["head_baseline"]["seconds"] / (m["head_project"]["seconds"] + m["head_project"]["extract_seconds"]),
        "head_val_acc_difference": m["head_project"]["val_acc"] - m["head_baseline"]["val_acc"],
        "finetune_speedup_vs_tutorial": m["finetune_project"]["images_per_second"] / m["finetune_baseline"]["images_per_second"],
        "finetune_speedup_vs_fp32_nchw": m["finetune_project"]["images_per_second"] / m["finetune_fp32"]["images_per_second"],
        "finetune_memory_vs_tutorial": m["finetune_project"][mem_key] / m["finetune_baseline"][mem_key],
        "finetune_memory_vs_fp32_nchw": m["finetune_project"][mem_key] / m["finetune_fp32"][mem_key],
    }
    if not args.skip_dvc:
        m["dvc"] = bench_dvc()
        ratios["head_only_exp_over_full_repro"] = m["dvc"]["head_only_exp"] / m["dvc"]["full_repro"]
    machine = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                   torch=torch.__version__, threads=torch.get_num_threads(), device=str(device),
                   gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                   arch=args.arch, image_size=args.image_size, train_images=5 * args.train_per_class,
                   baseline_batch=BASELINE_BATCH, project_inference_batch=512, finetune_batch=args.finetune_batch,
                   backbone=args.backbone if Path(args.backbone, "backbone.safetensors").is_file() else "random")
    report = dict(machine=machine, measurements=m, ratios=ratios, when=time.strftime("%Y-%m-%dT%H:%M:%S"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{device.type}-{args.arch}-{args.image_size}px-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\n{'ratio (project / baseline)':40s} value")
    for key, value in ratios.items():
        print(f"{key:40s} {value:8.3f}")
    print(f"\nmachine: {machine}\nwritten: {out}")


if __name__ == "__main__":
    main()
