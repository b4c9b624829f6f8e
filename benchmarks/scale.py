"""Scale benchmark: decode throughput and peak memory per stage as the dataset grows.

    python -m benchmarks.scale [--sizes 5000 20000 50000] [--image-size 128] [--workdir /tmp/scale-bench]

Generates photo-sized JPEGs (500x375, four classes, from scikit-image's sample photos with random
rotations, crops and colour shifts) once for the largest N, then for each N:
- the tutorials' decode: one process, PIL open + Resize(S) + CenterCrop(S) of every file;
- the pipeline's prepare (parallel, draft mode), in its own process;
- extract, train_head, finetune (feature_extract), evaluate, convert on that data, each in its own
  process, with their peak RSS.
Results go to benchmarks/results/scale-*.json and a printed table. Speed is measured here, never
asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "pretrain", "extract", "train_head", "finetune", "evaluate", "convert")


def make_photos(folder: Path, n: int, seed: int = 0) -> None:
    """n JPEGs of 500x375 in 4 class folders; existing files are kept (generated once for the largest N)."""
    import numpy as np
    from PIL import Image, ImageEnhance
    from skimage import data as photos

    bases = [Image.fromarray(getattr(photos, name)()[..., :3]).resize((640, 480))
             for name in ("chelsea", "coffee", "astronaut", "rocket")]
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % 4
        path = folder / f"c{c}" / f"{i:06d}.jpg"
        if path.exists():
            rng.random(4)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        angle, x, y, shift = rng.random(4)
        img = bases[c].rotate(angle * 20 - 10).crop((int(x * 140), int(y * 105), int(x * 140) + 500, int(y * 105) + 375))
        ImageEnhance.Brightness(img).enhance(0.7 + 0.6 * shift).save(path, quality=90)


def subset(src: Path, dst: Path, n: int) -> None:
    """The first n images (n/4 per class) of src as symlinks: one generated set serves every N."""
    if dst.exists():
        shutil.rmtree(dst)
    for c in range(4):
        (dst / f"c{c}").mkdir(parents=True)
        files = sorted((src / f"c{c}").iterdir())[: n // 4]
        for f in files:
            (dst / f"c{c}" / f.name).symlink_to(f)


def tutorial_decode(root: Path, size: int) -> dict:
    """The tutorials' data path: ImageFolder-style PIL decode + Resize + CenterCrop, one process."""
    code = f"""
import time, resource, sys
from pathlib import Path
from PIL import Image
from torchvision import transforms
tf = transforms.Compose([transforms.Resize({size}), transforms.CenterCrop({size})])
files = sorted(Path({str(root)!r}).rglob('*.jpg'))
start = time.perf_counter()
for f in files:
    with Image.open(f) as img:
        tf(img.convert('RGB'))
sec = time.perf_counter() - start
print(len(files), sec, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    n, sec, rss = int(out[0]), float(out[1]), int(out[2])
    return dict(images=n, seconds=round(sec, 2), images_per_second=round(n / sec, 1), peak_rss_mb=round(rss / 1024))


def run_stage(project: Path, stage: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = (f"import resource, runpy, sys, time; t = time.perf_counter(); sys.argv = ['{stage}'];"
            f"runpy.run_module('stages.{stage}', run_name='__main__');"
            "print('RESULT', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    sec, rss = r.stdout.strip().splitlines()[-1].split()[1:]
    return dict(seconds=round(float(sec), 2), peak_rss_mb=round(int(rss) / 1024))


def measure(workdir: Path, n: int, size: int, arch: str) -> dict:
    import yaml

    from transfer.params import defaults

    data_root = workdir / f"data-{n}"
    subset(workdir / "photos", data_root, n)
    project = workdir / f"project-{n}"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir()
    p = defaults()
    p["data"].update(source="imagefolder", root=str(data_root), classes=None, image_size=size, train_per_class=None,
                     eval_per_class=None, val_fraction=0.1, test_fraction=0.2)
    p["backbone"]["arch"] = arch
    p["pretrained"].update(source="none", match="name")
    p["train_head"]["epochs"] = 20
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    result = dict(n=n, tutorial_decode=tutorial_decode(data_root, size), stages={})
    for stage in STAGES:
        result["stages"][stage] = run_stage(project, stage)
    prep = result["stages"]["prepare"]
    prep["images_per_second"] = round(n / prep["seconds"], 1)
    prep["decode_loop"] = json.loads((project / "logs" / "prepare_timing.json").read_text())
    result["decode_speedup"] = round(prep["images_per_second"] / result["tutorial_decode"]["images_per_second"], 2)
    shutil.rmtree(project)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--arch", default="mobilenet_v3_small", help="a light backbone: this measures data paths")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scale-bench"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    make_photos(args.workdir / "photos", max(args.sizes))
    print(f"photos ready ({time.perf_counter() - start:.0f} s)", flush=True)
    results = []
    for n in args.sizes:
        results.append(measure(args.workdir, n, args.image_size, args.arch))
        r = results[-1]
        print(f"N={n}: tutorial {r['tutorial_decode']['images_per_second']} img/s, prepare "
              f"{r['stages']['prepare']['images_per_second']} img/s ({r['decode_speedup']}x; decode loop "
              f"{r['stages']['prepare']['decode_loop']['images_per_second']} img/s); peak RSS MB "
              + ", ".join(f"{s} {v['peak_rss_mb']}" for s, v in r["stages"].items()), flush=True)
    out = ROOT / "benchmarks" / "results" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=platform.processor() or platform.machine(), cores=os.cpu_count(),
                                   image_size=args.image_size, arch=args.arch, results=results), indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
