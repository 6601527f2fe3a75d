"""What the tool says on stderr: notes, one-line errors, sizes and peak memory, and its one kind of progress bar;
and what a user's mistake is (`UserError`), as opposed to a bug.

stdout carries answers only, so everything here writes to stderr.
"""

import errno
import math
import os
import signal
import stat
import sys
from pathlib import Path

from tqdm import tqdm


class UserError(Exception):
    """Input the tool cannot use: a flag, a file, a folder. The message names it and says what was expected."""


def kind_of(path: str | Path) -> str:
    """What is at path, symlinks followed, in words: "a file", "a folder", "a pipe", "a device", "a socket",
    "a dangling symlink", "a symlink loop", or "nothing"."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        return "a dangling symlink" if os.path.islink(path) else "nothing"
    except ValueError:  # a NUL in the name
        return "nothing"
    for test, kind in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a pipe"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "something else"


def require_file(path: str | Path, what: str):
    """UserError unless path is a regular file (a pipe or a device could hang or never end)."""
    kind = kind_of(path)
    if kind == "nothing":
        raise UserError(f"{path}: {what} does not exist")
    if kind != "a file":
        raise UserError(f"{path}: {what} is {kind}, not a file")


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (or its type's name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


def is_number(value) -> bool:
    """A finite int or float (not a bool, not NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f}" if nbytes >= 2**27 else f"{nbytes / 2**30:.5f}"


def peak_rss_gib() -> float:
    """The process's peak resident set (VmHWM, file-backed pages included), in GiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def progress(total: int, desc: str, unit: str, initial: int = 0, **kwargs) -> tqdm:
    """A progress bar on stderr with the rate and the time left; redrawn in place on a terminal, a line now and
    then in a log file."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.2 if sys.stderr.isatty() else 10.0, **kwargs)


def guard_start():
    """Before the command line's libraries load: ctrl-C ends it with one line, not a traceback; a closed stdout or
    stderr gets /dev/null in its place, so that no file opened later takes its number."""
    signal.signal(signal.SIGINT, interrupted)
    if sys.stdout is None:  # a closed stdout stays None: an answer with nowhere to go is an error (results.emit)
        stand_in(1)
    if not writable(2):  # a closed stderr drops progress and notes; the answer still goes to stdout
        stand_in(2)
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115


# Ctrl-C's one line, after a line break: on a line of its own, whatever line (a progress bar, ^C) it cut short.
INTERRUPTED = "\ninterrupted"


def interrupted(*_):
    os.write(2, f"{INTERRUPTED}\n".encode())
    os._exit(130)


def stand_in(fd: int):
    """/dev/null on a standard descriptor that the run cannot use."""
    null = os.open(os.devnull, os.O_RDWR)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


def writable(fd: int) -> bool:
    try:
        os.write(fd, b"")
        return True
    except OSError:  # closed, or open for reading only (as a closed stderr reaches Python through some launchers)
        return False
