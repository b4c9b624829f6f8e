import pytest
import yaml

from conftest import ROOT
from transfer.params import SCHEMA, ParamsError, defaults, load_params, validate


def test_committed_params_are_valid_and_complete():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = validate(raw)

    def keys(schema, prefix=""):
        for k, v in schema.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

    def raw_keys(d, prefix=""):
        for k, v in d.items():
            yield from raw_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

    # DVC tracks params by key, so params.yaml must spell out every key a stage reads.
    assert set(raw_keys(raw)) == set(keys(SCHEMA))
    assert p.pretrained.source == "file" and p.strategy in ("feature_extract", "finetune", "partial", "scratch")


@pytest.mark.parametrize("change, fragment", [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"finetune": {"lrr": 0.1}}, "did you mean finetune.lr"),
    ({"finetune": {"lr": -0.1}}, "finetune.lr: -0.1 is not above the minimum"),
    ({"finetune": {"epochs": "ten"}}, "finetune.epochs: expected int, got str"),
    ({"finetune": {"epochs": True}}, "finetune.epochs: expected int, got bool"),
    ({"finetune": {"epochs": 2.5}}, "finetune.epochs: expected int"),
    ({"strategy": "freeze_all"}, "choose one of: feature_extract, finetune, partial, scratch"),
    ({"backbone": {"arch": "resnet19"}}, "backbone.arch: 'resnet19' is not valid; choose one of: resnet18"),
    ({"pretrained": {"source": "hub"}}, "pretrained.source: 'hub' is not valid"),
    ({"data": {"source": "cifar"}}, "data.source: 'cifar' is not valid; choose one of: digits, fashion-mnist, imagefolder"),
    ({"data": {"val_fraction": 0.6, "test_fraction": 0.5}}, "must leave some images for training"),
    ({"data": {"classes": [4, 5]}, "pretrained": {"source": "train"}}, "overlap on ['Coat']"),
    # Spellings differ, classes do not: T-shirt/top is source class 0.
    ({"data": {"classes": ["Sandal", "Shirt", "T-shirt/top"]}, "pretrained": {"source": "train"}}, "overlap on ['T-shirt/top']"),
    ({"pretrained": {"source": "train", "train": {"classes": ["Sandal"]}}}, "overlap on ['Sandal']"),
    ({"data": {"classes": ["Sandal", "Zebra"]}, "pretrained": {"source": "train"}}, "data.classes: 'Zebra' is not a class of this dataset"),
    ({"backbone": {"arch": "timm/convnext_tnyy"}}, "'convnext_tnyy' is not a timm model; did you mean timm/convnext_tiny"),
    ({"backbone": {"arch": "convnext_tiny"}}, "or timm/<model name> for any timm model"),
    ({"pretrained": {"source": "timm"}, "backbone": {"arch": "resnet18"}}, "pretrained.source: timm needs a timm backbone.arch"),
    ({"pretrained": {"source": "torchvision"}}, "pretrained.source: torchvision has no weights for timm/tf_efficientnet_lite0"),
    ({"pretrained": {"rename": [["^model\\.", ""], ["(", "x"]]}}, "pretrained.rename: '(' is not a valid regular expression"),
    ({"pretrained": {"rename": [["only-one"]]}}, "should be a [regex, replacement] pair of strings"),
    ({"pretrained": {"match": "position"}}, "pretrained.match: 'position' is not valid; choose one of: name, order"),
    ({"finetune": {"layer_decay": 1.5}}, "finetune.layer_decay: 1.5 is above the maximum 1.0"),
    ({"data": {"test_fraction": 0.0}}, "data.test_fraction: 0.0 is below the minimum 0.01"),
    ({"pretrained": {"train": {"per_class": 1}}}, "pretrained.train.per_class: 1 is below the minimum 2"),
    ({"pretrained": {"source": "url", "url": "file:///x"}}, "pretrained.url and pretrained.sha256: both are required"),
    ({"pretrained": {"source": "url", "url": "file:///x", "sha256": "abc"}}, "not a 64-character hex digest"),
    ({"backbone": {"arch": "inception_v3"}, "data": {"image_size": 64}}, "too small for inception_v3"),
    ({"data": {"classes": [5, 5]}}, "lists an entry twice"),
    ({"finetune": None}, None),
])
def test_bad_values_name_the_key(change, fragment):
    raw = defaults()
    def merge(into, change):
        for k, v in change.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v

    merge(raw, change)
    if fragment is None:  # an empty section means "all defaults"
        assert validate(raw).finetune.epochs == SCHEMA["finetune"]["epochs"].default
        return
    with pytest.raises(ParamsError) as e:
        validate(raw)
    assert fragment in str(e.value)


def test_load_params_reports_yaml_errors(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_stage_stops_before_work_on_bad_params(in_tmp):
    import subprocess
    import sys

    raw = defaults()
    raw["finetune"]["lr"] = -1
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=in_tmp, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert r.returncode != 0 and "finetune.lr: -1.0 is not above the minimum" in r.stderr
    assert not (in_tmp / "data").exists()  # nothing was written


def test_committed_params_are_the_schema_defaults():
    # One place for defaults: params.yaml as committed is exactly what the schema documents.
    assert validate(yaml.safe_load((ROOT / "params.yaml").read_text())).to_dict() == defaults()


def test_overlap_is_checked_on_the_folder_classes_of_an_imagefolder(tmp_path):
    from conftest import make_tree

    root = make_tree(tmp_path / "raw", classes=("ants", "bees", "wasps"), per_class=1)
    raw = defaults()
    raw["data"].update(source="imagefolder", root=str(root), classes=["bees", "wasps"])
    raw["pretrained"]["source"] = "train"
    raw["pretrained"]["train"]["classes"] = [0, 1]  # ants and bees
    with pytest.raises(ParamsError, match=r"overlap on \['bees'\]"):
        validate(raw)
    raw["pretrained"]["train"]["classes"] = [0]
    assert validate(raw).data.classes == ["bees", "wasps"]


def test_reads_are_recorded_only_after_validation():
    from transfer.params import record_reads

    raw = defaults()
    p = validate(raw)
    with record_reads() as reads:
        assert p.finetune.lr == 0.01
        dict(p.runtime.items())
        validate(raw)
    assert reads == {"finetune.lr", "runtime.device", "runtime.threads", "runtime.nproc", "runtime.workers", "runtime.deterministic", "runtime.amp",
                     "runtime.compile"}
