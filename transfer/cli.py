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
    """Run a stage's main(); a UserError becomes one line on stderr and exit code 2."""
    try:
        main()
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
