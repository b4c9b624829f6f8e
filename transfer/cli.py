"""What a user sees of a stage: one-line errors with exit code 2, and progress bars.

A user error (params, data, weights, device) is a UserError: the stage ends with one line on stderr,
"<stage>: <what went wrong and what to do>", and exit code 2, with no traceback. Anything else is a
bug in this code and keeps its traceback (exit code 1).
"""
from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Iterable

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A problem the user fixes: a params key, a data file, a weights file, a device."""


class DeviceError(UserError):
    """The device asked for (runtime.device, runtime.nproc) is not there."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def run(stage: str, main: Callable[[], None]) -> None:
    """Run a stage's main(); a UserError becomes one line on stderr and exit code 2. With
    TRANSFER_PROFILE=<file>, one JSON line of where the process's time went is appended to it."""
    profile = os.environ.get("TRANSFER_PROFILE")
    started = _since_process_start() if profile else 0.0  # the stage module and its imports are loaded by now
    try:
        main()
        if profile:
            _profile(profile, stage, started)
    except UserError as e:
        _say(f"{stage}: {one_line(e)}")
        sys.exit(EXIT_USER_ERROR)
    except FileNotFoundError as e:
        # A stage run before the ones it reads from, or a path in params.yaml that is not there.
        _say(f"{stage}: {e.filename or e}: not found; run the stages before this one (dvc repro {stage}) or fix "
             "the path in params.yaml")
        sys.exit(EXIT_USER_ERROR)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # A writer other than transfer.io's (a library writing its own files): no size to report.
        _say(f"{stage}: could not write {e.filename or 'an output'}: {e.strerror.lower()}; free some space there and re-run")
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        _say(f"{stage}: interrupted")
        sys.exit(130)


def _since_process_start() -> float:
    """Seconds since this process started (interpreter start-up included), from /proc: 10 ms resolution."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _profile(path: str, stage: str, started: float) -> None:
    """Wall time (split into start-up + imports and the work), CPU time, bytes read and written and peak
    memory of this process and the children it waited for (decode workers, torchrun ranks)."""
    import json
    import resource

    t = os.times()
    io = {}
    try:
        with open("/proc/self/io") as f:
            io = dict(line.split(": ") for line in f.read().splitlines())
    except OSError:
        pass
    wall = _since_process_start()
    row = dict(stage=stage, rank=int(os.environ.get("RANK", "0")), wall_s=round(wall, 2), startup_imports_s=round(started, 2),
               work_s=round(wall - started, 2), cpu_s=round(t.user + t.system + t.children_user + t.children_system, 2),
               read_mb=round(int(io.get("rchar", 0)) / 2**20, 1), written_mb=round(int(io.get("wchar", 0)) / 2**20, 1),
               peak_rss_mb=round(max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                     resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024))
    with open(path, "a") as f:  # one write of one line: O_APPEND keeps concurrent ranks' lines whole
        f.write(json.dumps(row) + "\n")


def _say(line: str) -> None:
    # One write of the whole line: torchrun ranks share stderr, and two ranks' lines must not interleave.
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), (line + "\n").encode())
    except (AttributeError, ValueError, OSError):  # stderr replaced by something without a descriptor
        sys.stderr.write(line + "\n")


def is_user_error_line(stage: str, line: str) -> bool:
    """A line run() prints for a user error (used to keep torchrun's report of the failed rank short)."""
    return line.startswith(f"{stage}: ") and "\n" not in line.rstrip("\n")


def progress(iterable: Iterable | None, *, desc: str, total: int | None = None, unit: str = "it", leave: bool = True):
    """A tqdm bar on stderr (iterable None: update it by hand). On a terminal it redraws in place;
    otherwise (CI, DVC logs, pipes) it writes a line at most every 30 s plus the final one, so logs
    stay short. Off on non-zero torchrun ranks (rank 0 speaks for all) and with TRANSFER_PROGRESS=0."""
    from tqdm import tqdm

    # No monitor thread: prepare forks its decode workers while a bar is open.
    tqdm.monitor_interval = 0
    tty = sys.stderr.isatty()
    quiet = os.environ.get("TRANSFER_PROGRESS") == "0" or int(os.environ.get("RANK", "0")) > 0
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr, disable=quiet,
                mininterval=0.1 if tty else 30.0, maxinterval=10.0 if tty else 60.0, dynamic_ncols=tty,
                ncols=None if tty else 100, ascii=not tty)
