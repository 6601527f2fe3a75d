"""Many images in one run: the inputs (a folder, a glob, or a JSON Lines file of prompts), the results file that a
rerun resumes from, and a progress line on stderr.

Results are appended, one JSON line per input and in input order, as each batch finishes, and flushed to disk, so a
run that is stopped loses at most the batch in flight; a rerun with the same --output skips every input already
there (matched by index, image and prompt).
"""

import glob
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Item:
    """One input: an image and the prompt to ask about it."""

    index: int
    image: str
    prompt: str

    def key(self) -> tuple:
        return self.index, self.image, self.prompt


def gather(image_file_path: str, prompts_file: str | None, prompt: str) -> list[Item] | None:
    """The inputs of a batch run, or None for a single image (a plain file path and no prompts file)."""
    if prompts_file is not None:
        return read_prompts(Path(prompts_file), prompt)
    path = Path(image_file_path)
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif glob.has_magic(image_file_path):
        files = sorted(p for p in glob.glob(image_file_path, recursive=True) if Path(p).is_file())
    else:
        return None
    if not files:
        raise ValueError(f"{image_file_path}: no images there")
    return [Item(i, f, prompt) for i, f in enumerate(files)]


def read_prompts(path: Path, default_prompt: str) -> list[Item]:
    """A JSON Lines file of {"image": ..., "prompt": ...}; an image path is relative to the file's folder."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the prompts file ({e})") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number}: not a JSON object") from None
        prompt = entry.get("prompt", default_prompt) if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not isinstance(prompt, str):
            raise ValueError(f'{path}:{number}: expected {{"image": "path", "prompt": "text"}}')
        items.append(Item(len(items), str(path.parent / entry["image"]), prompt))
    if not items:
        raise ValueError(f"{path}: no prompts in the file")
    return items


def resume(output: Path | None, items: list[Item]) -> list[Item]:
    """The items still to do, given the results already in output (a torn last line is dropped)."""
    if output is None or not output.exists():
        return items
    try:
        lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{output}: cannot read the results file ({e})") from None
    torn = bool(lines) and not lines[-1].endswith("\n")  # the run stopped while writing this line
    done = set()
    for line in lines[:-1] if torn else lines:
        try:
            record = json.loads(line)
            done.add((record["index"], record["image"], record["prompt"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{output}: not a results file of this tool (a line is not one of its records)") from None
    if torn:  # only once the rest is known to be ours: rewrite the file without the torn line
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text("".join(lines[:-1]), encoding="utf-8")
        os.replace(tmp, output)
    return [item for item in items if item.key() not in done]


class Results:
    """Appends one JSON line per record to a file (flushed to disk) or to stdout."""

    def __init__(self, output: Path | None):
        self.file = open(output, "a", encoding="utf-8") if output else sys.stdout  # noqa: SIM115

    def write(self, records: list[dict]):
        self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.file.flush()
        if self.file is not sys.stdout:
            os.fsync(self.file.fileno())

    def close(self):
        if self.file is not sys.stdout:
            self.file.close()


class Progress:
    """A progress bar on stderr (one line per batch when stderr is not a terminal)."""

    def __init__(self, total: int, skipped: int):
        self.total, self.done, self.start = total, 0, time.monotonic()
        if skipped:
            print(f"resuming: {skipped} inputs already done", file=sys.stderr)

    def advance(self, n: int):
        self.done += n
        rate = self.done / max(time.monotonic() - self.start, 1e-9)
        width = 30
        bar = "#" * (width * self.done // self.total) + "." * (width - width * self.done // self.total)
        end = "\n" if self.done == self.total or not sys.stderr.isatty() else ""
        print(f"\r[{bar}] {self.done}/{self.total} inputs, {rate:.2f} images/s", end=end, file=sys.stderr,
              flush=True)
