"""The benchmark's measurements run (tiny data, seconds); their speed is measured by
`python -m benchmarks.run`, never asserted here."""
import json

import pytest

from benchmarks import run as bench


def test_every_measurement_runs_on_tiny_data(tmp_path):
    bench.build_data(tmp_path, image_size=16, train_per_class=20, eval_per_class=8, source="digits", root="unused",
                     classes=(0, 1, 2, 3, 4))
    assert len(list((tmp_path / "png" / "train").rglob("*.png"))) == 100
    (tmp_path / "meta.json").write_text(json.dumps(dict(image_size=16, classes=5, finetune_batch=32)))
    names = ["extract_baseline", "extract_project", "extract_ceiling", "head_baseline", "head_project",
             "finetune_baseline", "finetune_fp32", "finetune_project"]
    results = {n: bench.measure(n, tmp_path, "cpu", "resnet18", None) for n in names}
    assert results["extract_baseline"]["images"] == results["extract_project"]["images"] == 100
    for name in ("head_baseline", "head_project"):
        assert results[name]["epochs"] == bench.EPOCHS
    # The two ways train the same head on the same frozen features (measured 0.900 and 0.925 on these
    # 40 validation images; chance is 0.2): both learn, and the project's faster path loses nothing.
    assert results["head_baseline"]["val_acc"] >= 0.6 and results["head_project"]["val_acc"] >= 0.6
    assert abs(results["head_project"]["val_acc"] - results["head_baseline"]["val_acc"]) <= 0.1
    # Throughput counts exactly the timed images: every training image but the first (warm-up) batch.
    assert results["finetune_baseline"]["images"] == 100 - bench.BASELINE_BATCH
    assert results["finetune_fp32"]["images"] == results["finetune_project"]["images"] == 100 - 32
    assert results["extract_ceiling"]["images"] >= 100
    assert all(r["seconds"] > 0 for r in results.values())


def test_scale_benchmark_runs_on_tiny_data(tmp_path):
    """benchmarks/scale.py end to end on 40 generated photos at 32 px (its numbers come from
    `python -m benchmarks.scale`, never from here)."""
    from benchmarks import scale

    scale.make_photos(tmp_path / "photos", 40)
    assert len(list((tmp_path / "photos").rglob("*.jpg"))) == 40
    from PIL import Image
    with Image.open(next((tmp_path / "photos").rglob("*.jpg"))) as img:
        assert img.size == (500, 375) and img.format == "JPEG"
    result = scale.measure(tmp_path, 40, 32, "mobilenet_v3_small")
    assert result["tutorial_decode"]["images"] == 40
    assert set(result["stages"]) == set(scale.STAGES) and all(s["peak_rss_mb"] > 0 for s in result["stages"].values())
    assert result["decode_speedup"] > 0


def test_feed_benchmark_runs_on_tiny_data(tmp_path):
    """benchmarks/feed.py on 100 images at 16 px: every way of feeding delivers every image, and the
    scratch split is removed (its numbers come from `python -m benchmarks.feed`, never from here)."""
    from benchmarks import feed

    result = feed.measure(workdir=tmp_path, images=100, image_size=16, batch_size=32, threads=[1, 2], repeats=2)
    assert set(result["results"]) == {"old", "feed-1t", "feed-2t", "feed-shuffled-2t", "memcpy-1t", "memcpy-2t"}
    for r in result["results"].values():
        assert r["images"] == 100 and len(r["runs_seconds"]) == 2 and r["images_per_second"] > 0
        assert r["gb_per_second"] == pytest.approx(r["images_per_second"] * 3 * 16 * 16 / 1e9, abs=1e-3)
    assert result["page_cache_read_gb_per_second"] > 0
    assert list(tmp_path.iterdir()) == []
