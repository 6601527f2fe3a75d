"""What the tool says on stderr: notes, one-line errors, sizes and peak memory, and its one kind of progress bar.

stdout carries answers only, so everything here writes to stderr.
"""

import sys

from tqdm import tqdm


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (or its type's name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
