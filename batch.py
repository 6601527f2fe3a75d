"""Many images in one run: the inputs (a folder, a glob, or a JSON Lines file of prompts); `answer_chunk`, which
answers a batch of them; and `write_answers`, the one writer of a run, locally (`answer_batch`) or on Ray
(ray_batch.py), which appends to the results (results.py) behind a progress bar on stderr.

Results are appended, one JSON line per input, as each batch finishes (locally in input order), and flushed to
disk, so a run that is stopped loses at most the batches in flight; a rerun with the same --output skips every
input already there. An input that cannot be answered (an image that is not one, a prompt too long) gets a record
with an `error` field, and the others go on.
"""

import contextlib
import glob
import json
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

from paligemma.console import UserError, kind_of, log, one_line, progress, require_file
from paligemma.generate import Session, Stopwatch
from paligemma.processing_paligemma import IMAGE_TOKEN, load_image
from paligemma.results import FORMAT, MARKER, ResultsFile, StdoutResults

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


def path_text(path: str | Path) -> str:
    """A path as text that is always valid UTF-8: bytes of a file name that are not UTF-8 are escaped (\\xff)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Item:
    """One input: an image and the prompt to ask about it; or a line of a prompts file that names none."""

    index: int  # its place among this run's inputs
    path: str | None  # the image file, as the operating system names it
    prompt: str | None
    line: int | None = None  # its line in the prompts file
    problem: str | None = None  # why it cannot be answered, found as the prompts file was read
    text: str | None = None  # the line as written, where it names no input

    @property
    def image(self) -> str | None:
        """The image as records name it, and resuming identifies it: its resolved path, as valid UTF-8."""
        return None if self.path is None else path_text(os.path.realpath(self.path))  # never fails, loops included

    @property
    def key(self) -> tuple[str | None, str]:
        """What resuming identifies the input by (results.identity reads it back from the record)."""
        return (self.image, self.prompt) if self.text is None else (None, self.text)

    def record(self, **fields) -> dict:
        extra = {"line": self.line} if self.line is not None else {}
        extra.update({"input": self.text} if self.text is not None else {})
        return {MARKER: FORMAT, "index": self.index, "image": self.image, "prompt": self.prompt, **extra, **fields}


def gather(image_file_path: str, prompts_file: str | None, prompt: str) -> list[Item] | None:
    """The inputs of a batch run, or None for a single image (a file, or anything that is neither a folder nor a
    glob: loading it will say what is wrong). A file whose name looks like a glob, photo[1].jpg, is that file."""
    if prompts_file is not None:
        return read_prompts(Path(prompts_file), prompt)
    if not image_file_path:
        raise UserError("--image_file_path is empty: give an image, a folder of images or a quoted glob")
    kind = kind_of(image_file_path)
    if kind == "a folder":
        files = sorted(str(p) for p in Path(image_file_path).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif kind == "nothing" and glob.has_magic(image_file_path):  # what is not an image gets an error record
        files = sorted(p for p in glob.glob(image_file_path, recursive=True) if kind_of(p) != "a folder")
    else:
        return None
    if not files:
        raise UserError(f"{image_file_path}: no images there")
    return [Item(i, f, prompt) for i, f in enumerate(files)]


def read_prompts(path: Path, default_prompt: str) -> list[Item]:
    """A JSON Lines file of {"image": ..., "prompt": ...}; an image path is relative to the file's folder. Blank
    lines and a byte-order mark are fine; a line that is not such an object becomes an Item with a problem, which
    gets an error record, so that it costs no other line its answer."""
    require_file(path, "the prompts file")
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read the prompts file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: the prompts file is not UTF-8 text") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            entry = None
        prompt = entry.get("prompt", default_prompt) if isinstance(entry, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("image"), str) and isinstance(prompt, str):
            items.append(Item(len(items), str(path.parent / entry["image"]), prompt, number))
        else:
            problem = (f"{path}:{number}: " + ("not a JSON object" if entry is None else
                                               'expected {"image": "path", "prompt": "text"}'))
            items.append(Item(len(items), None, None, number, problem, line))
    if not items:
        raise UserError(f"{path}: no prompts in the file")
    return items


def check_prompt(prompt: str):
    if prompt.count(IMAGE_TOKEN) > 1:
        raise UserError(f"the prompt {prompt[:40]!r} has {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} tokens; PaliGemma "
                        "takes one image")


def open_results(output: str | None) -> ResultsFile | StdoutResults:
    """The results to append to, opened and locked now, before any work: what they already hold is skipped."""
    return ResultsFile(Path(output)).open() if output else StdoutResults().open()


def check_fits(prompt_len: int, max_tokens: int, max_positions: int, image_tokens: int, prompt: str = "the prompt"):
    """UserError unless a prompt of prompt_len tokens (the image's included) and max_tokens more fit the positions."""
    if prompt_len > max_positions:
        raise UserError(f"{prompt} is {prompt_len} tokens with the image's, more than the model's {max_positions} "
                        "positions")
    if prompt_len + max_tokens > max_positions:
        raise UserError(f"--max_tokens_to_generate {max_tokens} does not fit: {prompt} takes {prompt_len} of the "
                        f"model's {max_positions} positions ({image_tokens} of them the image's), so at most "
                        f"{max_positions - prompt_len} tokens can follow it")


def answer_batch(session: Session, items: list[Item], results: ResultsFile | StdoutResults, *, max_tokens: int,
                 batch_size: int, annotate: Path | None, max_pixels: int, clock: Stopwatch) -> tuple[int, int]:
    """Answer the items that results do not hold yet, batch_size at a time, appending one record per input, in
    input order, as each batch is done. Returns how many were answered now, and how many of them failed (their
    records say why)."""
    inputs_on_disk = input_files(items) if annotate else set()

    def answer(chunks: list[list[Item]]) -> Generator[list[dict], None, None]:
        for chunk in chunks:
            yield answer_chunk(session, chunk, max_tokens=max_tokens, annotate=annotate, max_pixels=max_pixels,
                               clock=clock, refused=lambda picture: overwrites(picture, inputs_on_disk))

    return write_answers(items, results, batch_size, annotate, answer)


def write_answers(items: list[Item], results: ResultsFile | StdoutResults, batch_size: int, annotate: Path | None,
                  answer: Callable[[list[list[Item]]], Generator[list[dict], None, None]]) -> tuple[int, int]:
    """The one writer of a batch run, locally or on Ray: hands the items that results do not hold yet, in chunks of
    batch_size, to answer, which yields each chunk's records, and appends them behind a progress bar. An input
    answered twice (a batch that Ray retried) is written once; the answers are closed however the run ends, so
    that their work stops with it. Returns (answered now, of them failed)."""
    todo = [item for item in items if item.key not in results.done]
    if annotate is not None:
        annotate.mkdir(parents=True, exist_ok=True)
    if len(todo) < len(items):
        log(f"resuming: {len(items) - len(todo)} inputs already done")
    written, failed = set(), 0
    chunks = [todo[first:first + batch_size] for first in range(0, len(todo), batch_size)]
    with progress(len(items), "answering", "image", initial=len(items) - len(todo)) as bar, \
            contextlib.closing(answer(chunks)) as answers:
        for records in answers:
            fresh = [r for r in records if r["index"] not in written]
            for record in fresh:
                if "error" in record:
                    log(f"warning: input {record['index']}: {record['error']}")
            if fresh:
                results.write(fresh)
            written.update(r["index"] for r in fresh)
            failed += sum("error" in r for r in fresh)
            bar.update(len(fresh))
    if len(written) < len(todo):  # never expected: an answer that went missing is a bug, not a success
        raise RuntimeError(f"{len(todo) - len(written)} inputs came back without a record")
    return len(todo), failed


def answer_chunk(session: Session, chunk: list[Item], *, max_tokens: int, annotate: Path | None, max_pixels: int,
                 clock: Stopwatch, refused: Callable[[Path], bool]) -> list[dict]:
    """One record per item, in order: its answer (and its annotated picture, unless refused(picture) says that
    would overwrite an input), or an error saying why it could not be answered."""
    records, images, max_positions = {}, {}, session.model.config.text_config.max_position_embeddings
    for item in chunk:
        try:
            if item.problem:
                raise UserError(item.problem)
            images[item] = load_image(item.path, max_pixels)
            check_prompt(item.prompt)
            check_fits(session.processor([item.prompt], [images[item]])["input_ids"].shape[1], 0, max_positions,
                       session.model.config.num_image_tokens)
        except UserError as e:
            records[item] = item.record(error=one_line(e))
    ready = [item for item in chunk if item not in records]
    if ready:
        inputs = session.processor([i.prompt for i in ready], [images[i] for i in ready])
        budget = min(max_tokens, max_positions - inputs["input_ids"].shape[1])
        with clock("generate_s"):
            rows = session.answer(inputs, budget)
        for item, (ids, logprobs) in zip(ready, rows):
            picture = None if annotate is None else picture_path(annotate, item)
            if picture is not None and refused(picture):
                records[item] = item.record(error=f"{picture} is an input image; it is never overwritten")
                continue
            records[item] = session.record(ids, logprobs, images[item], item.prompt, session.min_score,
                                           None if picture is None else str(picture), fields=item.record())
    return [records[item] for item in chunk]


def picture_path(annotate: Path, item: Item) -> Path:
    """Where --annotate draws an input's answer in a batch run."""
    return annotate / f"{item.index:05d}-{Path(item.path).stem}.png"


def input_files(items: list[Item]) -> set[tuple[int, int]]:
    """The inputs' files as (device, inode), so that a picture reaching one by any name is found."""
    return {(s.st_dev, s.st_ino) for s in map(stat_or_none, (i.path for i in items if i.path is not None)) if s}


def overwrites(picture: Path, inputs_on_disk: set[tuple[int, int]]) -> bool:
    """Whether writing picture would overwrite one of these input files."""
    stat = stat_or_none(picture)
    return stat is not None and (stat.st_dev, stat.st_ino) in inputs_on_disk


def stat_or_none(path: str | Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None
