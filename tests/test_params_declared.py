"""dvc.yaml declares, per stage, exactly the params its code reads: an undeclared read means an
experiment that changes it silently reuses a stale result; a declared key that is never read
re-runs the stage for nothing. Reads are recorded through the Params object while each stage runs,
over configurations that take every branch that reads a param."""
import pytest
import torch
import yaml

from conftest import ROOT, tiny_params, write_params
from test_stages import STAGES, run_stage
from transfer import cli, models
from transfer.io import sha256_file
from transfer.params import SCHEMA, SPEED_ONLY, record_reads


def declared(stage: str) -> set[str]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage].get("params", [])

    def leaves(schema, prefix):
        for k, v in schema.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

    out = set()
    for key in spec:
        node = SCHEMA
        for part in key.split("."):
            node = node[part]
        out |= set(leaves(node, key + ".")) if isinstance(node, dict) else {key}
    return out


def test_each_stage_declares_exactly_the_params_it_reads(in_tmp, monkeypatch):
    reads = {name: set() for name in STAGES}

    def run(name, params, fails=False):
        write_params(in_tmp, params)
        with record_reads() as r:
            if fails:
                with pytest.raises(cli.UserError):
                    run_stage(name)
            else:
                run_stage(name)
        reads[name] |= r

    base = tiny_params(strategy="finetune", finetune={"epochs": 1, "resume": True})
    for name in STAGES:
        run(name, base)
    run("finetune", {**base, "strategy": "feature_extract"})
    # Issue 19's recipe: the logreg head and class weights, and every finetune option on (ema_decay is read
    # only with ema).
    recipe = tiny_params(strategy="finetune", train_head={"kind": "logreg", "class_weights": "balanced"},
                         finetune={"epochs": 2, "optimizer": "adamw", "warmup_epochs": 1, "label_smoothing": 0.1,
                                   "clip_grad": 1.0, "accumulate": 2, "ema": True, "class_weights": "balanced"})
    for name in ("train_head", "finetune"):
        run(name, recipe)
    # The other weight sources: none, a file, a url (file://), torchvision (offline: fails after reading its keys).
    backbone, _ = models.build_backbone("resnet18", 16)
    torch.save(backbone.state_dict(), in_tmp / "w.pt")

    run("pretrain", tiny_params(pretrained={"source": "none"}))
    run("pretrain", tiny_params(pretrained={"source": "file", "path": "w.pt"}))
    run("pretrain", tiny_params(pretrained={"source": "url", "url": (in_tmp / "w.pt").as_uri(),
                                            "sha256": sha256_file(in_tmp / "w.pt")}))
    monkeypatch.setenv("TORCH_HOME", str(in_tmp / "torch"))
    monkeypatch.setenv("TRANSFER_WEIGHTS_MIRROR", (in_tmp / "nowhere").as_uri())
    run("pretrain", tiny_params(pretrained={"source": "torchvision", "weights": "IMAGENET1K_V1"}), fails=True)

    problems = []
    for name in STAGES:
        undeclared, unread = reads[name] - declared(name) - SPEED_ONLY.get(name, frozenset()), declared(name) - reads[name]
        if undeclared:
            problems.append(f"{name} reads {sorted(undeclared)} but dvc.yaml does not declare them")
        if unread:
            problems.append(f"{name} declares {sorted(unread)} but never reads them")
    assert not problems, "\n".join(problems)


def _module_imports(path) -> set[str]:
    """transfer/stages modules a module imports at its top level (what runs whenever it runs)."""
    import ast

    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("transfer", "stages"):
            if node.module in ("transfer", "stages"):
                found |= {f"{node.module}/{alias.name}.py" for alias in node.names}
            else:
                found.add(node.module.replace(".", "/") + ".py")
        elif isinstance(node, ast.Import):
            found |= {a.name.replace(".", "/") + ".py" for a in node.names if a.name.split(".")[0] in ("transfer", "stages")}
    return {f for f in found if (ROOT / f).is_file()}


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_declares_the_code_it_imports(stage):
    """dvc.yaml's deps list every project module a stage imports, directly or through another module,
    so a code change re-runs the stages it can affect (transfer/storage.py was once missing)."""
    todo, code = [f"stages/{stage}.py"], set()
    while todo:
        module = todo.pop()
        if module not in code:
            code.add(module)
            todo += sorted(_module_imports(ROOT / module))
    deps = {d for d in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"] if d.endswith(".py")}
    assert code == deps, f"imported but not declared: {sorted(code - deps)}; declared but not imported: {sorted(deps - code)}"
