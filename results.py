"""Where answers go: stdout, and the results file that a batch run appends to and a rerun resumes from.

A results file is JSON Lines, one record per input, each record marked `"pytorch_paligemma": 1` (the format's
version). That mark makes it decidable which files this tool wrote: it appends only to an empty file or to one whose
every line is such a record (blank lines and a byte-order mark are tolerated), and refuses anything else, untouched.
While a run writes a file it holds an exclusive lock on it (`fcntl.flock`), so that a second run on the same file
stops with one line instead of answering every input twice. An input is identified by its image's resolved path
and its prompt, so a rerun skips what is done however the inputs are named or ordered. A last line cut off
mid-write by a killed run (it still begins as every record does), or blanks an editor left after the last
newline, are dropped, and the line redone, by the next run, only once it has an answer to write.
"""

import fcntl
import json
import os
import sys
from pathlib import Path

from paligemma.console import UserError, kind_of

MARKER = "pytorch_paligemma"  # every record carries MARKER: FORMAT, as its first field
FORMAT = 1
RECORD_START = json.dumps({MARKER: FORMAT})[:-1].encode()  # how every line this tool writes begins


def json_line(record: dict) -> str:
    """One record as a line of UTF-8 JSON; NaN and infinity are refused, never written."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


def emit(text: str):
    """Write to stdout now; a stdout that cannot be written (closed, a full disk) is an error, not a silent loss."""
    if sys.stdout is None:  # started with stdout closed
        raise UserError("cannot write the answer to stdout (it is closed)")
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError) as e:
        try:  # so that Python's own flush at exit does not fail again with a traceback
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        raise UserError(f"cannot write the answer to stdout ({getattr(e, 'strerror', None) or e})") from None


def identity(record: dict) -> tuple[str | None, str] | None:
    """What a record answered: (image, prompt), or (None, the line) for a line of a prompts file that named no input
    (batch.Item.key); None if it is not one of this tool's records."""
    if not isinstance(record, dict) or record.get(MARKER) != FORMAT:
        return None
    image, prompt = record.get("image"), record.get("prompt")
    if isinstance(image, str) and isinstance(prompt, str):
        return image, prompt
    return (None, record["input"]) if isinstance(record.get("input"), str) else None


class ResultsFile:
    """A results file, locked from open() to close(): what it already holds, and appending to it."""

    def __init__(self, path: Path):
        self.path, self.fd, self.created, self.written = path, None, False, False
        self.done: set[tuple[str | None, str]] = set()
        self.torn, self.keep = False, 0  # a torn last line beyond `keep` bytes is cut off before the first write

    def open(self) -> "ResultsFile":
        kind = kind_of(self.path)
        if kind not in ("a file", "nothing"):
            raise UserError(f"--output {self.path} is {kind}, not a file")
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)  # follows a symlink
            self.created = kind == "nothing"
        except OSError as e:
            raise UserError(f"--output {self.path} cannot be opened for writing ({e.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise UserError(f"--output {self.path} is being written by another run (it is locked); wait for it, "
                            "or choose another file") from None
        try:
            self.read()
        except UserError:
            self.close()
            raise
        return self

    def read(self):
        with open(self.fd, "rb", closefd=False) as f:
            data = f.read()
        lines = data.removeprefix(b"\xef\xbb\xbf").splitlines(keepends=True)  # a byte-order mark is fine
        self.torn = bool(lines) and not lines[-1].endswith(b"\n")
        self.keep = len(data) - (len(lines[-1]) if self.torn else 0)
        if self.torn and lines[-1].strip() and not (lines[-1].startswith(RECORD_START)
                                                    or RECORD_START.startswith(lines[-1])):
            raise UserError(f"--output {self.path}: its last line is not a record of this tool, so the file is not "
                            "its results file; it is left as it is (choose another file)")
        for number, line in enumerate(lines[:-1] if self.torn else lines, 1):
            if not line.strip():
                continue
            try:
                key = identity(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError):
                key = None
            if key is None:
                raise UserError(f"--output {self.path}: line {number} is not a record of this tool, so the file is "
                                "not its results file; it is left as it is (choose another file)")
            self.done.add(key)

    def write(self, records: list[dict]):
        """Append records (and flush them to the disk), cutting off a torn last line before the first write."""
        try:
            if not self.written and self.torn:
                os.ftruncate(self.fd, self.keep)
            os.write(self.fd, "".join(json_line(r) for r in records).encode("utf-8"))
            os.fsync(self.fd)
        except OSError as e:
            raise UserError(f"cannot write --output {self.path} ({e.strerror})") from None
        self.written = True

    def close(self):
        if self.fd is None:
            return
        if self.created and not self.written:
            self.path.unlink(missing_ok=True)  # a run that wrote nothing leaves no file behind
        os.close(self.fd)  # releases the lock
        self.fd = None


class StdoutResults:
    """Records as JSON lines on stdout, for a batch run without --output."""

    done: set = set()

    def open(self) -> "StdoutResults":
        return self

    def write(self, records: list[dict]):
        emit("".join(json_line(r) for r in records))

    def close(self):
        pass
