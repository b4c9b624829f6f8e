"""transfer.export.provenance: what models/export/model.json records about where a model came from."""
import subprocess

import yaml

from transfer import export


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", *args], cwd=cwd, check=True, capture_output=True)


def test_provenance_reads_the_upstream_lock_entries_and_the_revision(tmp_path):
    lock = {"schema": "2.0", "stages": {
        "prepare": {"cmd": "python -m stages.prepare", "params": {"params.yaml": {"data": {"image_size": 32}}},
                    "outs": [{"path": "data/prepared", "hash": "md5", "md5": "aa.dir", "size": 1, "nfiles": 2}]},
        "finetune": {"cmd": "python -m stages.finetune", "params": {"params.yaml": {"strategy": "finetune", "seed": 3}},
                     "outs": [{"path": "models/model", "hash": "md5", "md5": "bb.dir"},
                              {"path": "metrics/finetune.json", "hash": "md5", "md5": "cc"}]},
        "convert": {"cmd": "python -m stages.convert", "outs": [{"path": "models/export", "md5": "dd.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "dvc.lock")
    _git(tmp_path, "commit", "-qm", "lock")
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    prov = export.provenance(lock_path=tmp_path / "dvc.lock", project=tmp_path, weights_sha256="ff")
    assert prov["git"] == {"revision": rev, "uncommitted_changes": []}
    assert prov["weights_sha256"] == "ff"
    assert prov["stages"] == {  # upstream only, in pipeline order; convert's own entry is not its input
        "prepare": {"params": {"data": {"image_size": 32}}, "outs": {"data/prepared": "aa.dir"}},
        "finetune": {"params": {"strategy": "finetune", "seed": 3},
                     "outs": {"models/model": "bb.dir", "metrics/finetune.json": "cc"}}}
    # What a run writes (dvc.lock, params.yaml under `dvc exp run -S`, git-kept metrics) is no difference
    # from the revision; changed code is, by name.
    (tmp_path / "stages").mkdir()
    for name in ("params.yaml", "metrics/evaluate.json", "stages/finetune.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("a: 1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "code")
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    for name in ("dvc.lock", "params.yaml", "metrics/evaluate.json"):
        (tmp_path / name).write_text("a: 2\n")
    assert export.provenance(lock_path=tmp_path / "dvc.lock", project=tmp_path, weights_sha256="ff")["git"] == {
        "revision": rev, "uncommitted_changes": []}
    (tmp_path / "stages/finetune.py").write_text("a: 3\n")
    assert export.provenance(lock_path=tmp_path / "dvc.lock", project=tmp_path,
                             weights_sha256="ff")["git"]["uncommitted_changes"] == ["stages/finetune.py"]


def test_provenance_without_git_or_lock_says_so(tmp_path):
    prov = export.provenance(lock_path=tmp_path / "dvc.lock", project=tmp_path, weights_sha256="ff")
    assert prov["git"] is None and prov["dvc_lock"] is None and prov["stages"] == {}
