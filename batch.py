"""Many images in one run: the inputs (a folder, a glob, or a JSON Lines file of prompts), the results file that a
rerun resumes from, and `answer_batch`, which answers them a batch at a time behind a progress bar on stderr.

Results are appended, one JSON line per input and in input order, as each batch finishes, and flushed to disk, so a
run that is stopped loses at most the batch in flight; a rerun with the same --output skips every input already
there (matched by index, image and prompt).
"""

import glob
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import detection
from console import log, one_line, progress
from generate import Session, Stopwatch
from processing_paligemma import load_image

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


def fit_budget(prompt_len: int, budget: int, max_positions: int) -> int:
    """The token budget that fits the model's positions; a prompt that does not fit at all is an error."""
    if prompt_len > max_positions:
        raise ValueError(f"the prompt is {prompt_len} tokens with the image's, more than the model's "
                         f"{max_positions} positions")
    if prompt_len + budget > max_positions:
        log(f"note: only {max_positions - prompt_len} tokens fit after the {prompt_len}-token prompt")
        return max_positions - prompt_len
    return budget


def answer_batch(session: Session, todo: list[Item], total: int, *, max_tokens: int, batch_size: int,
                 output: Path | None, annotate: Path | None, max_pixels: int, clock: Stopwatch) -> int:
    """Answer the items batch_size at a time, appending one JSON line per input, in input order, as each batch is
    done; total counts the inputs already done in an earlier run too. Returns how many inputs failed (their
    records say why)."""
    results, failed = Results(output), 0
    max_positions = session.model.config.text_config.max_position_embeddings
    if annotate is not None:
        annotate.mkdir(parents=True, exist_ok=True)
    if len(todo) < total:
        log(f"resuming: {total - len(todo)} inputs already done")
    try:
        with progress(total, "answering", "image", initial=total - len(todo)) as bar:
            for first in range(0, len(todo), batch_size):
                chunk, records, images = todo[first:first + batch_size], {}, {}
                for item in chunk:
                    try:
                        images[item] = load_image(item.image, max_pixels)
                        length = session.processor([item.prompt], [images[item]])["input_ids"].shape[1]
                        fit_budget(length, 0, max_positions)
                    except (ValueError, OSError) as e:
                        records[item], failed = {**vars(item), "error": one_line(e)}, failed + 1
                        log(f"warning: input {item.index}: {one_line(e)}")
                ready = [item for item in chunk if item not in records]
                if ready:
                    inputs = session.processor([i.prompt for i in ready], [images[i] for i in ready])
                    budget = min(max_tokens, max_positions - inputs["input_ids"].shape[1])
                    with clock("generate_s"):
                        rows = session.answer(inputs, budget)
                    for item, (ids, logprobs) in zip(ready, rows):
                        name = f"{item.index:05d}-{Path(item.image).stem}.png"
                        record = {**vars(item), "text": session.tokenizer.decode(ids, skip_special_tokens=True),
                                  "token_ids": ids, "logprobs": logprobs}
                        records[item] = detection.describe(record, images[item], item.prompt,
                                                           None if annotate is None else str(annotate / name),
                                                           session.vae)
                results.write([records[item] for item in chunk])
                bar.update(len(chunk))
    finally:
        results.close()
    return failed
