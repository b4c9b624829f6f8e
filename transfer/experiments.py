"""Many DVC experiments at once, each on its own GPU or share of the cores, all in `dvc exp show`.

DVC's own queue (`dvc queue start -j N`) assigns no GPUs (dvc #4586) and its parallel workers race
(dvc #10673, #8763). Here a worker (a Slot: one GPU or none, and its share of the CPU cores) owns a
`git clone --shared` of the project at HEAD, with its own workspace and its own .dvc/tmp, and the
project's DVC cache as its cache. The run cache lives in that cache, so a stage that any worker (or
the project itself) ran with the same inputs is restored, not run again, wherever it is needed.

Before each experiment its clone is reset to HEAD, so an experiment is HEAD plus its own -S
overrides, whatever ran in that clone before: the same as `dvc exp run -S ...` in a clean workspace.
Each finished experiment is fetched into the project's git at once (refs/exps, the refs `dvc exp
show` reads; its data is already in the shared cache). The project's workspace is never touched.
The clones are removed at the end, after a failure or Ctrl-C too; a failed experiment is reported
with its output and the others still run.
"""
from __future__ import annotations

import contextlib
import difflib
import itertools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import yaml

from transfer import paths
from transfer.cli import UserError, one_line

# Inputs outside git and DVC that stages read (the raw data, weights files): linked into every clone.
# (Not in transfer/paths.py: every stage lists that file as a dep, so a new name there would mark
# every stage in dvc.lock as changed and re-run the whole pipeline for nothing.)
LINKED = (Path("data/raw"),)


# ---------------------------------------------------------------- running DVC


def dvc_env() -> dict:
    """`python` in dvc.yaml must be this interpreter (the venv's), whether or not it is activated."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                DVC_NO_ANALYTICS="1")


def stages_ran(dvc_output: str) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` actually ran (not those restored from the run cache)."""
    return sorted(set(re.findall(r"Running stage '([^']+)'", dvc_output)))


def stages_seen(dvc_output: str) -> set[str]:
    """Every stage the run went through: ran, restored from the run cache, or unchanged."""
    return set(re.findall(r"(?:Running stage|Stage) '([^']+)'", dvc_output))


class CommandError(RuntimeError):
    """git or dvc failed where the pool needed it (cloning, resetting, fetching)."""


def _command(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise CommandError(f"{' '.join(cmd)} (in {cwd}) failed: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def _git(cwd: Path, *args: str) -> str:
    return _command(["git", *args], cwd)


def _dvc(cwd: Path, *args: str) -> str:
    return _command([sys.executable, "-m", "dvc", *args], cwd, dvc_env())


def exp_ref(baseline: str, name: str) -> str:
    """Where DVC keeps experiment `name` of commit `baseline` (dvc.repo.experiments.refs.ExpRefInfo)."""
    return f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"


def existing_names(project: Path, baseline: str) -> set[str]:
    prefix = exp_ref(baseline, "")
    refs = _git(project, "for-each-ref", "--format=%(refname)", prefix).split()
    return {r[len(prefix):] for r in refs}


def metrics_files(project: Path) -> dict[str, list[str]]:
    """The metrics files each stage of dvc.yaml declares."""
    spec = yaml.safe_load((project / "dvc.yaml").read_text()) or {}
    out = {}
    for stage, body in (spec.get("stages") or {}).items():
        entries = (body or {}).get("metrics") or []
        out[stage] = [e if isinstance(e, str) else next(iter(e)) for e in entries]
    return out


# ---------------------------------------------------------------- slots: where experiments run


@dataclass(frozen=True)
class Slot:
    """Where one experiment at a time runs: one GPU (its CUDA_VISIBLE_DEVICES value) or none, and
    the cores its processes are pinned to. Pinning sizes everything a stage sizes from the cores it
    may use: torch's thread count, prepare's decode workers, the threads per torchrun rank."""
    label: str
    gpu: str | None
    cpus: tuple[int, ...]

    def env(self, base: dict) -> dict:
        # "" hides every GPU: a CPU slot must not fall back to GPU 0 with runtime.device auto.
        return dict(base, CUDA_VISIBLE_DEVICES=self.gpu if self.gpu is not None else "")

    def describe(self) -> str:
        cores = f"core {self.cpus[0]}" if len(self.cpus) == 1 else f"cores {_ranges(self.cpus)}"
        return f"{self.label} ({cores})"


def _ranges(cpus: Iterable[int]) -> str:
    cpus, out = sorted(cpus), []
    for _, group in itertools.groupby(enumerate(cpus), lambda p: p[1] - p[0]):
        run = [c for _, c in group]
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def _share_cores(n: int, cores: list[int] | None = None) -> list[tuple[int, ...]]:
    """n disjoint, contiguous shares of the cores this process may use (sizes differ by at most one);
    with fewer cores than slots, slots share cores round-robin."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if n > len(cores):
        return [(cores[i % len(cores)],) for i in range(n)]
    size, extra = divmod(len(cores), n)
    shares, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        shares.append(tuple(cores[start:end]))
        start = end
    return shares


def cpu_slots(n: int, cores: list[int] | None = None) -> list[Slot]:
    if n < 1:
        raise UserError(f"--workers {n}: give at least 1")
    return [Slot(f"cpu{i}", None, share) for i, share in enumerate(_share_cores(n, cores))]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as the CUDA_VISIBLE_DEVICES values that select them in a child."""
    import torch  # only when GPUs are asked for or looked for

    n = torch.cuda.device_count()
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s.strip() for s in inherited.split(",") if s.strip()] if inherited else [str(i) for i in range(n)]
    return ids[:n]


def gpu_slots(spec: str, visible: list[str] | None = None, cores: list[int] | None = None) -> list[Slot]:
    """`--gpus 0,1`: one slot per listed GPU (an index among the visible ones; listed twice, two
    experiments share it), each with its share of the cores."""
    items = [s.strip() for s in spec.split(",")]
    if not items or not all(s.isdigit() for s in items):
        raise UserError(f"--gpus {spec!r}: give GPU indices separated by commas, e.g. --gpus 0,1")
    visible = visible_gpus() if visible is None else visible
    missing = [s for s in items if int(s) >= len(visible)]
    if missing:
        seen = f"{len(visible)} visible ({', '.join(map(str, range(len(visible))))})" if visible else "none visible"
        raise UserError(f"--gpus {spec}: no GPU {missing[0]}; {seen}")
    shares = _share_cores(len(items), cores)
    return [Slot(f"gpu{s}" if items.count(s) == 1 else f"gpu{s}.{items[:i].count(s)}", visible[int(s)], share)
            for i, (s, share) in enumerate(zip(items, shares))]


def default_slots(cpu_workers: int = 2) -> list[Slot]:
    """One slot per visible GPU; without GPUs, `cpu_workers` CPU slots."""
    gpus = visible_gpus()
    return gpu_slots(",".join(map(str, range(len(gpus)))), gpus) if gpus else cpu_slots(cpu_workers)


def slots_for(*, gpus: str | None = None, workers: int | None = None) -> list[Slot]:
    """The slots a command's --gpus / --workers ask for (--gpus first); neither: default_slots()."""
    if gpus is not None:
        return gpu_slots(gpus)
    if workers is not None:
        return cpu_slots(workers)
    return default_slots()


# ---------------------------------------------------------------- experiments and what became of them


@dataclass
class Experiment:
    name: str
    overrides: list[str]  # what `dvc exp run -S` takes: "train_head.lr=0.02", "data.classes=[5,6]"
    target: str | None = None  # the stage to stop at; None: the whole pipeline


@dataclass
class Outcome:
    experiment: Experiment
    slot: str
    returncode: int
    seconds: float
    output: str  # dvc's stdout and stderr, interleaved as they came
    fetched: bool = False  # the experiment is in the project's refs/exps
    metrics: dict = field(default_factory=dict)  # {metrics file: contents}, of the stages this run went through

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.fetched

    @property
    def ran(self) -> list[str]:
        return stages_ran(self.output)

    @property
    def reason(self) -> str:
        """The line that says why it failed: the stage's own (one-line user error or the exception),
        not DVC's "ERROR: failed to reproduce ..." that follows it."""
        lines = [line for line in self.output.splitlines() if line.strip()]
        while len(lines) > 1 and lines[-1].startswith("ERROR: failed to reproduce"):
            lines.pop()
        return lines[-1].strip() if lines else f"exit code {self.returncode}"

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output.rstrip().splitlines()[-lines:])


def override(key: str, value) -> str:
    """One `-S` value for a params value as YAML holds it (strings quoted, so '1e-3' stays a string)."""
    if isinstance(value, str):
        return f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{key}={json.dumps(value)}"


# ---------------------------------------------------------------- the pool


class Pool:
    """One clone of the project at HEAD per slot, sharing its DVC cache; run() spreads experiments
    over them. Use it as a context manager: on leaving, running experiments are stopped, finished
    ones fetched, the clones removed."""

    def __init__(self, project: Path, slots: list[Slot], *, workdir: Path | None = None, linked=LINKED,
                 log: Callable[[str], None] = print):
        self.project = Path(project).resolve()
        self.slots = slots
        self.log = log
        self.baseline = _git(self.project, "rev-parse", "HEAD").strip()
        self.fetched: list[str] = []
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self._stop = threading.Event()
        self._metrics = metrics_files(self.project)
        if workdir is not None:
            Path(workdir).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="dvc-exps-", dir=workdir))
        try:
            cache = Path(_dvc(self.project, "cache", "dir").strip()).resolve()
            self.clones = [self._clone(self.root / f"w{i}", cache, linked) for i in range(len(slots))]
        except BaseException:
            self.close()
            raise

    def _clone(self, clone: Path, cache: Path, linked) -> Path:
        _git(self.project, "clone", "-q", "--shared", "--no-checkout", str(self.project), str(clone))
        _git(clone, "checkout", "-q", "--detach", self.baseline)
        for rel in linked:
            src = self.project / rel
            if src.exists() and not os.path.lexists(clone / rel):
                (clone / rel).parent.mkdir(parents=True, exist_ok=True)
                (clone / rel).symlink_to(src.resolve(), target_is_directory=src.is_dir())
                # A link to a folder is a file to git, so a folder pattern (/data/raw/) does not hide it.
                with open(clone / ".git" / "info" / "exclude", "a") as f:
                    f.write(f"/{Path(rel).as_posix()}\n")
        local = self.project / ".dvc" / "config.local"
        if local.exists():  # remotes, credentials, cache type: as the project has them
            shutil.copy(local, clone / ".dvc" / "config.local")
        _dvc(clone, "config", "--local", "cache.dir", str(cache))
        return clone

    def run(self, experiments: list[Experiment], on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        """Every experiment on the first free slot; on_done(outcome) for each as it ends, one at a
        time. A failed experiment is an outcome like any other; an exception in on_done stops the pool."""
        todo: queue.Queue = queue.Queue()
        for exp in experiments:
            todo.put(exp)
        outcomes: list[Outcome] = []
        errors: list[BaseException] = []
        done_lock = threading.Lock()

        def work(slot: Slot, clone: Path) -> None:
            # Affinity is per thread on Linux, and the processes this thread starts inherit it.
            os.sched_setaffinity(0, slot.cpus)
            while not self._stop.is_set():
                try:
                    exp = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    outcome = self._run_one(exp, slot, clone)
                    if outcome is None:  # stopped midway
                        return
                    with done_lock:
                        outcomes.append(outcome)
                        if on_done is not None:
                            on_done(outcome)
                except BaseException as e:  # noqa: BLE001 - raised in the calling thread below
                    errors.append(e)
                    self.stop()
                    return

        threads = [threading.Thread(target=work, args=(s, c), daemon=True) for s, c in zip(self.slots, self.clones)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)  # a bare join() would not see Ctrl-C
        except BaseException:
            self.stop()
            for t in threads:
                t.join()
            raise
        if errors:
            raise errors[0]
        return outcomes

    def _run_one(self, exp: Experiment, slot: Slot, clone: Path) -> Outcome | None:
        _git(clone, "reset", "-q", "--hard", self.baseline)
        _git(clone, "clean", "-fdq")  # what the last experiment left; outputs and links are ignored files
        args = [sys.executable, "-m", "dvc", "exp", "run", "-n", exp.name]
        for o in exp.overrides:
            args += ["-S", o]
        if exp.target:
            args.append(exp.target)
        start = time.perf_counter()
        with self._lock:  # started and registered at once, so stop() ends it or it never starts
            if self._stop.is_set():
                return None
            # Its own process group: Ctrl-C reaches it through stop(), which also ends what it started.
            proc = subprocess.Popen(args, cwd=clone, env=slot.env(dvc_env()), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
            self._running.add(proc)
        try:
            output, _ = proc.communicate()
        finally:
            with self._lock:
                self._running.discard(proc)
        outcome = Outcome(exp, slot.label, proc.returncode, round(time.perf_counter() - start, 1), output)
        if self._stop.is_set() and proc.returncode != 0:
            return None
        if proc.returncode == 0:
            outcome.fetched = self._fetch(clone, exp.name)
            if not outcome.fetched:
                outcome.output += f"\n(dvc exp run succeeded but left no {exp_ref(self.baseline, exp.name)})"
            seen = stages_seen(output)
            for stage, files in self._metrics.items():
                for rel in files if stage in seen else []:
                    with contextlib.suppress(OSError, yaml.YAMLError):
                        outcome.metrics[rel] = yaml.safe_load((clone / rel).read_text())
        return outcome

    def _fetch(self, clone: Path, name: str) -> bool:
        ref = exp_ref(self.baseline, name)
        if not _git(clone, "for-each-ref", "--format=%(refname)", ref).strip():
            return False
        with self._lock:  # one writer of the project's refs at a time
            _git(self.project, "fetch", "-q", str(clone), f"+{ref}:{ref}")
            if name not in self.fetched:
                self.fetched.append(name)
        return True

    def collect(self) -> list[str]:
        """Fetch every experiment the clones hold and the project does not yet (one that ended while
        the pool was being stopped); the names fetched so far."""
        prefix = exp_ref(self.baseline, "")
        for clone in self.clones:
            for ref in _git(clone, "for-each-ref", "--format=%(refname)", prefix).split():
                if ref[len(prefix):] not in self.fetched:
                    self._fetch(clone, ref[len(prefix):])
        return list(self.fetched)

    def stop(self, grace: float = 15.0) -> None:
        """Stop handing out experiments and end the running ones (SIGINT, then SIGKILL after `grace` s)."""
        with self._lock:
            self._stop.set()
            procs = list(self._running)
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 5.0)):
            for p in procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, sig)
            deadline = time.monotonic() + wait
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.1)
            if all(p.poll() is not None for p in procs):
                return

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.stop()
            self.collect()
        except Exception as e:  # noqa: BLE001 - never hide the exception that got us here
            if exc is None:
                raise
            self.log(f"experiments: could not fetch the finished experiments: {one_line(e)}")
        finally:
            self.close()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """`kill PID` cleans up like Ctrl-C: the running experiments stop and the clones go."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- planning: grid, queue, names


def grid(sets: list[str]) -> list[list[str]]:
    """`-S` values as `dvc exp run --queue` takes them, with DVC's own parser (Hydra's override
    grammar): `key=a,b` or `key=choice(a,b)` sweeps, `key=range(0,3)` too; several sweeps make a grid,
    their cartesian product. One list of plain overrides per point."""
    if not sets:
        return [[]]
    from dvc.exceptions import DvcException
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps
    from hydra.errors import HydraException

    by_file = to_path_overrides(sets)
    others = [f for f in by_file if f != str(paths.PARAMS)]
    if others:
        raise UserError(f"-S {others[0]}:...: this project's params are all in {paths.PARAMS}")
    try:
        return [point[str(paths.PARAMS)] for point in get_hydra_sweeps(by_file)]
    except (HydraException, DvcException) as e:
        raise UserError(f"-S: {_first_line(e)} (syntax: KEY=VALUE, KEY=A,B,C for a sweep; as dvc exp run -S)") from None


def _first_line(e: BaseException) -> str:
    return one_line(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def read_queue(path: Path) -> list[list[str]]:
    """A YAML list of experiments, each a mapping of params (nested as in params.yaml, or dotted keys)."""
    try:
        entries = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError(f"--queue {path}: {e.strerror.lower()}") from None
    except yaml.YAMLError as e:
        raise UserError(f"--queue {path}: not valid YAML: {one_line(e)}") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) and e for e in entries):
        raise UserError(f"--queue {path}: expected a list of experiments, each a mapping of params "
                        "(e.g. - {{strategy: finetune, finetune: {{lr: 0.003}}}})")
    return [[override(k, v) for k, v in _flatten(e).items()] for e in entries]


def _flatten(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _key(o: str) -> str:
    return o.split("=", 1)[0].lstrip("+~")


def combine(queue_points: list[list[str]], grid_points: list[list[str]]) -> list[list[str]]:
    """Every queued experiment at every point of the grid, queue order first."""
    out = []
    for q in queue_points:
        for g in grid_points:
            both = {_key(o) for o in q} & {_key(o) for o in g}
            if both:
                raise UserError(f"{sorted(both)[0]}: set both in --queue and by -S; set it in one place")
            out.append(q + g)
    return out


def names(prefix: str | None, n: int, taken: set[str]) -> list[str]:
    """NAME-1 ... NAME-n, as `dvc exp run --queue -n NAME` names a sweep; without a prefix DVC's own
    random names (adjective-noun). A name already used at this commit is an error, never overwritten."""
    if prefix is None:
        from dvc.repo.experiments.utils import gen_random_name

        out: list[str] = []
        while len(out) < n:
            name = gen_random_name()
            if name not in taken and name not in out:
                out.append(name)
        return out
    out = [prefix] if n == 1 else [f"{prefix}-{i + 1}" for i in range(n)]
    bad = re.search(r"[/\s~^:?*\[\\]|\.\.|@\{|^[.-]|\.lock$|\.$", prefix)
    if bad or not prefix:
        raise UserError(f"-n {prefix!r}: not a valid experiment name (no spaces, '/', '..', '~', '^', ':', '?', '*', "
                        "'[' or '\\'; git's ref-name rules)")
    clash = [name for name in out if name in taken]
    if clash:
        raise UserError(f"-n {prefix}: experiment {clash[0]} exists at this commit; choose another name or remove it "
                        f"(dvc exp remove {clash[0]})")
    return out


def resolve(base: dict, overrides: list[str]) -> dict:
    """params.yaml as `dvc exp run -S` would leave it: `base` with the overrides applied by DVC itself."""
    from dvc.exceptions import DvcException
    from dvc.utils.hydra import apply_overrides, to_hydra_overrides

    from hydra.errors import HydraException

    known = set(_flatten(base)) | set(_sections(base))
    try:
        parsed = to_hydra_overrides(overrides)
    except HydraException as e:
        raise UserError(f"-S {' '.join(overrides)}: {_first_line(e)}") from None
    for o in parsed:
        if not o.key_or_group:
            raise UserError(f"-S {o.input_line}: no key before '='")
        if not (o.is_add() or o.is_force_add()) and o.key_or_group not in known:
            close = difflib.get_close_matches(o.key_or_group, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"-S {o.input_line}: {paths.PARAMS} has no key {o.key_or_group}{hint}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(base, sort_keys=False))
        try:
            apply_overrides(path, overrides)
        except DvcException as e:
            cause = e.__cause__ or e
            raise UserError(f"-S {' '.join(overrides)}: {_first_line(cause)}") from None
        return yaml.safe_load(path.read_text())


def _sections(mapping: dict, prefix: str = "") -> Iterator[str]:
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield f"{prefix}{key}"
            yield from _sections(value, f"{prefix}{key}.")


def plan(project: Path, *, sets: list[str], queue_file: Path | None, prefix: str | None, target: str | None,
         validate: Callable[[dict], object] | None = None) -> list[Experiment]:
    """The experiments to run, every one checked before any runs: the grid and queue parse, every
    point's params (HEAD's params.yaml plus its overrides) pass `validate`, the target is a stage,
    the names are free."""
    project = Path(project).resolve()
    try:
        baseline = _git(project, "rev-parse", "HEAD").strip()
        base = yaml.safe_load(_git(project, "show", f"HEAD:{paths.PARAMS.as_posix()}")) or {}
    except CommandError:
        raise UserError(f"{project}: experiments run on a commit; run this in a git project with {paths.PARAMS} "
                        "committed") from None
    if target is not None:
        stages = yaml.safe_load((project / "dvc.yaml").read_text()).get("stages") or {}
        if target not in stages:
            close = difflib.get_close_matches(target, list(stages), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"--target {target}: no such stage{hint}; stages: {', '.join(stages)}")
    if not sets and queue_file is None:
        raise UserError("nothing to run: give -S KEY=A,B (a grid) and/or --queue FILE")
    points = combine(read_queue(queue_file) if queue_file is not None else [[]], grid(sets))
    for point in points:
        params = resolve(base, point)
        if validate is not None:
            try:
                validate(params)
            except UserError as e:
                raise UserError(f"-S {' '.join(point)}: {e}") from None
    chosen = names(prefix, len(points), existing_names(project, baseline))
    return [Experiment(name, point, target) for name, point in zip(chosen, points)]
