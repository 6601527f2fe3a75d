"""Run PaliGemma on an image from the command line: `python inference.py --model_path DIR --prompt "caption en" ...`.

The flags are checked, the image, tokenizer and prompt prepared, the weights loaded (utils.py), and generate.py
produces the answer. stdout carries only the answer; progress and diagnostics go to stderr.
"""

import contextlib
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import fire
import torch
from PIL import Image

import batch
import detection
from detection import load_vae
from generate import compile_decode, decode_forward, generate
from processing_paligemma import DEFAULT_MAX_PIXELS, PaliGemmaProcessor, load_image
from utils import (
    DTYPES,
    LoadError,
    is_number,
    load_config,
    load_hf_model,
    load_tokenizer,
    log,
    peak_rss_gib,
    stop_tokens,
)

DEFAULT_IMAGE = Path(__file__).resolve().parent / "test_images" / "cat.jpg"


def choose_device(only_cpu: bool) -> tuple[torch.device, str | None]:
    """The device to run on, and a note for the user when CUDA was wanted but is not there."""
    if only_cpu:
        return torch.device("cpu"), None
    if torch.cuda.is_available():
        return torch.device("cuda"), None
    return torch.device("cpu"), "note: CUDA is not available; running on the CPU"


def check_flags(max_tokens_to_generate, temperature, top_p, do_sample, only_cpu, dtype, output_format, seed,
                max_image_pixels, ignore_memory_check, verbose, compile, stream, batch_size):
    """Every flag's type and range, before anything is loaded; a ValueError names the first bad one."""
    if type(max_tokens_to_generate) is not int or max_tokens_to_generate < 0:
        raise ValueError(f"--max_tokens_to_generate must be a whole number >= 0, not {max_tokens_to_generate!r}")
    if not is_number(temperature) or not temperature >= 0:
        raise ValueError(f"--temperature must be a number >= 0, not {temperature!r}")
    if not is_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"--top_p must be a number in (0, 1], not {top_p!r}")
    for name, value in [("do_sample", do_sample), ("only_cpu", only_cpu), ("ignore_memory_check", ignore_memory_check),
                        ("verbose", verbose), ("compile", compile)]:
        if not isinstance(value, bool):
            raise ValueError(f"--{name} must be True or False, not {value!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if output_format not in ("text", "json"):
        raise ValueError(f"--output_format must be text or json, not {output_format!r}")
    if seed is not None and type(seed) is not int:
        raise ValueError(f"--seed must be a whole number, not {seed!r}")
    if type(max_image_pixels) is not int or max_image_pixels <= 0:
        raise ValueError(f"--max_image_pixels must be a whole number > 0, not {max_image_pixels!r}")
    if stream is not None and not isinstance(stream, bool):
        raise ValueError(f"--stream must be True or False, not {stream!r}")
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"--batch_size must be a whole number >= 1, not {batch_size!r}")


def main(model_path: str, prompt: str = "caption en", image_file_path: str = str(DEFAULT_IMAGE),
         max_tokens_to_generate: int = 100, temperature: float = 0.8, top_p: float = 0.9, do_sample: bool = False,
         only_cpu: bool = False, dtype: str = "float16", output_format: str = "text", seed: int | None = None,
         max_image_pixels: int = DEFAULT_MAX_PIXELS, ignore_memory_check: bool = False, verbose: bool = False,
         compile: bool = False, stream: bool | None = None, annotate: str | None = None, vae_path: str | None = None,
         prompts_file: str | None = None, batch_size: int = 1, output: str | None = None):
    """Answer PROMPT about the image, or about every image of a folder, a glob or --prompts_file; prints the
    answer (text) or one JSON object per line (json, and always for several images)."""
    check_flags(max_tokens_to_generate, temperature, top_p, do_sample, only_cpu, dtype, output_format, seed,
                max_image_pixels, ignore_memory_check, verbose, compile, stream, batch_size)
    clock = Stopwatch()
    items = batch.gather(image_file_path, prompts_file, prompt)
    if items is None and output is not None:  # one image, written to a results file like a batch of one
        items = [batch.Item(0, image_file_path, prompt)]
    if items is None:
        with clock("image_s"):
            image = load_image(image_file_path, max_image_pixels)
    check_outputs(annotate, output, vae_path, [image_file_path] if items is None else [i.image for i in items],
                  single=items is None)
    vae = load_vae(vae_path) if vae_path is not None else None
    # Everything that can be wrong with the input is found before the weights are loaded.
    with clock("load_s"):
        config, tokenizer = load_config(model_path), load_tokenizer(Path(model_path))
        stop_ids = stop_tokens(Path(model_path), config)
        processor = PaliGemmaProcessor.from_folder(model_path, tokenizer, config.vision_config.image_size,
                                                   config.num_image_tokens)
    max_positions = config.text_config.max_position_embeddings
    if items is None:
        with clock("image_s"):
            inputs = processor([prompt], [image])
        budget = fit_budget(inputs["input_ids"].shape[1], max_tokens_to_generate, max_positions)
    else:
        todo = batch.resume(Path(output) if output else None, items)
    device, note = choose_device(only_cpu)
    with clock("load_s"):
        model, _ = load_hf_model(model_path, device, DTYPES[dtype], memory_check=not ignore_memory_check,
                                 tokenizer=tokenizer)
    for message in (note, do_sample and temperature == 0 and "note: --temperature 0 means greedy decoding"):
        if message:
            log(message)
    session = Session(model, tokenizer, processor, stop_ids, temperature if do_sample else 0.0, top_p,
                      torch.Generator(device).manual_seed(seed) if seed is not None else None,
                      compile_decode(device, log) if compile else decode_forward, vae)
    if items is not None:
        return answer_batch(session, items, todo, max_tokens_to_generate, batch_size, max_positions, output,
                            annotate, max_image_pixels, verbose, clock)
    streaming = stream if stream is not None else output_format == "text" and sys.stdout.isatty()
    printer = StreamPrinter(tokenizer) if streaming and output_format == "text" else None
    [(ids, logprobs)] = session.answer({k: v.to(device) for k, v in inputs.items()}, budget, clock, printer)
    timings = {"load_s": clock["load_s"], "first_token_s": clock["image_s"] + clock["prefill_s"],
               "decode_s": clock["decode_s"], "decode_tokens": max(len(ids) - 1, 0), "peak_rss_gib": peak_rss_gib()}
    if hasattr(session.forward, "compile_s"):  # --compile on CUDA: the part of decode_s spent compiling
        timings["compile_s"] = session.forward.compile_s
    if device.type == "cuda":
        timings["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if verbose:
        log(f"load {timings['load_s']:.1f} s | prefill {inputs['input_ids'].shape[1]} tokens in "
            f"{clock['prefill_s']:.2f} s, first token {timings['first_token_s']:.2f} s after opening the image | "
            f"decode {timings['decode_tokens']} tokens in {timings['decode_s']:.2f} s, "
            f"{timings['decode_tokens'] / max(timings['decode_s'], 1e-9):.2f} tok/s | "
            f"peak memory {timings['peak_rss_gib']:.2f} GiB")
    record = session.describe({"text": tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids,
                               "logprobs": logprobs}, image, prompt, annotate)
    if output_format == "json":
        print(json.dumps({**record, "timings": timings}, ensure_ascii=False))
    elif printer:
        printer.close(record["text"])
    elif ids:  # a zero token budget prints nothing
        print(record["text"])


@dataclass
class Session:
    """A loaded model with everything needed to answer: tokenizer, processor, stop ids, sampling settings."""

    model: torch.nn.Module
    tokenizer: object
    processor: PaliGemmaProcessor
    stop_ids: tuple[int, ...]
    temperature: float
    top_p: float
    generator: torch.Generator | None
    forward: object  # the decode step, eager or compiled
    vae: object  # the segmentation mask decoder, or None

    def answer(self, inputs: dict, budget: int, clock=None, printer=None) -> list[tuple[list[int], list[float]]]:
        """(token ids, logprobs) per row, each up to and including its stop token."""
        rows = [([], []) for _ in range(inputs["input_ids"].shape[0])]
        clock = clock or Stopwatch()
        with torch.inference_mode():
            steps = generate(self.model, inputs, budget, self.temperature, self.top_p, self.stop_ids,
                             self.generator, self.forward)
            while True:
                with clock("prefill_s" if not rows[0][0] else "decode_s"):
                    step = next(steps, None)
                    if step is not None:  # tolist() waits for the device: the clock sees the real time
                        tokens, logprobs = step[0].tolist(), step[1].tolist()
                if step is None:
                    return rows
                for (ids, lps), token, logprob in zip(rows, tokens, logprobs):
                    if not ids or ids[-1] not in self.stop_ids:
                        ids.append(token)
                        lps.append(logprob)
                if printer:
                    printer.add(rows[0][0])

    def describe(self, record: dict, image, prompt: str, annotate: str | None) -> dict:
        """The answer's record, with its detections or segments parsed, and the annotated image written."""
        task = prompt.strip().split(" ", 1)[0]
        if task not in ("detect", "segment"):
            return record
        parse = detection.parse_detections if task == "detect" else detection.parse_segments
        objects, warnings = parse(record["text"], *image.size)
        for warning in warnings:
            log(f"warning: {warning}")
        record = {**record, "detections" if task == "detect" else "segments": objects}
        if annotate is not None:
            masks = None
            if task == "segment" and self.vae is not None and objects:
                masks64 = detection.decode_masks(self.vae, [o["codes"] for o in objects])
                masks = [detection.mask_to_image(m, o["box"], *image.size) for m, o in zip(masks64, objects)]
            detection.annotate(image, objects, masks).save(annotate)
        return record


def answer_batch(session, items, todo, max_tokens, batch_size, max_positions, output, annotate, max_pixels,
                 verbose, clock):
    """Answer every item in batches, appending one JSON line per input, in input order, as each batch is done."""
    results = batch.Results(Path(output) if output else None)
    progress, failed = batch.Progress(len(items), len(items) - len(todo)), 0
    if annotate is not None:
        Path(annotate).mkdir(parents=True, exist_ok=True)
    try:
        progress.advance(0)
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
                device = session.model.language_model.lm_head.weight.device
                with clock("generate_s"):
                    rows = session.answer({k: v.to(device) for k, v in inputs.items()}, budget)
                for item, (ids, logprobs) in zip(ready, rows):
                    name = f"{item.index:05d}-{Path(item.image).stem}.png"
                    path = None if annotate is None else str(Path(annotate) / name)
                    records[item] = session.describe(
                        {**vars(item), "text": session.tokenizer.decode(ids, skip_special_tokens=True),
                         "token_ids": ids, "logprobs": logprobs}, images[item], item.prompt, path)
            results.write([records[item] for item in chunk])
            progress.advance(len(chunk))
    finally:
        results.close()
    if verbose:
        log(f"{len(todo)} inputs in {clock['generate_s']:.1f} s of generation, "
            f"{len(todo) / max(clock['generate_s'], 1e-9):.2f} images/s, peak memory {peak_rss_gib():.2f} GiB")
    if failed:
        raise ValueError(f"{failed} of {len(todo)} inputs failed; their records say why")


def check_outputs(annotate: str | None, output: str | None, vae_path: str | None, inputs: list[str], single: bool):
    """Refuse output paths that would overwrite an input image or could not be written, before any work."""
    given = {Path(p).resolve() for p in inputs}
    for flag, path in (("--annotate", annotate), ("--output", output)):
        if path is not None and Path(path).resolve() in given:
            raise ValueError(f"{flag} {path} is an input image; it is never overwritten")
    for flag, path in (("--annotate", annotate if single else None), ("--output", output)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"{flag} {path}: the folder it goes in does not exist")
    if single and annotate is not None and Path(annotate).suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--annotate {annotate}: give the picture a name ending in an image type, like .png")
    if vae_path is not None and not Path(vae_path).is_file():
        raise ValueError(f"--vae_path {vae_path}: file does not exist")


class StreamPrinter:
    """Prints the answer as it grows, holding back a character until all of its bytes have arrived (the
    tokenizer spells rare characters as several byte tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.shown = tokenizer, ""

    def add(self, ids: list[int]):
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text

    def close(self, text: str):
        if text or self.shown:
            sys.stdout.write(text[len(self.shown):] + "\n")
            sys.stdout.flush()


class Stopwatch:
    """Seconds spent in named stages, summed over every `with clock(name):` block (a monotonic clock)."""

    def __init__(self):
        self.totals = {}

    def __getitem__(self, name: str) -> float:
        return self.totals.get(name, 0.0)

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.monotonic()
        try:
            yield
        finally:
            self.totals[name] = self[name] + time.monotonic() - start


def fit_budget(prompt_len: int, budget: int, max_positions: int) -> int:
    """The token budget that fits the model's positions; a prompt that does not fit at all is an error."""
    if prompt_len > max_positions:
        raise ValueError(f"the prompt is {prompt_len} tokens with the image's, more than the model's "
                         f"{max_positions} positions")
    if prompt_len + budget > max_positions:
        log(f"note: only {max_positions - prompt_len} tokens fit after the {prompt_len}-token prompt")
        return max_positions - prompt_len
    return budget


STRING_FLAGS = ("model_path", "prompt", "image_file_path", "dtype", "output_format", "annotate", "vae_path",
                "prompts_file", "output")


def quote_string_flags(argv: list[str]) -> list[str]:
    """Quote the values of text flags, so that fire keeps a prompt like "1e3" or "[cat]" as the text typed."""
    out, quote_next = [], False
    for arg in argv:
        name, eq, value = arg.partition("=")
        if quote_next:
            arg, quote_next = repr(arg), False
        elif arg.startswith("--") and name[2:] in STRING_FLAGS:
            if eq:
                arg = f"{name}={value!r}"
            else:
                quote_next = True
        out.append(arg)
    return out


def check_flag_names(argv: list[str]):
    """Unknown flags and a missing --model_path get one line, not fire's usage screen."""
    known = inspect.signature(main).parameters
    names = [arg[2:].partition("=")[0] for arg in argv if arg.startswith("--")]
    for name in names:
        if name not in known and name != "help":
            raise ValueError(f"unknown flag --{name}; the flags are --{', --'.join(known)}")
    if "model_path" not in names and "help" not in names and not (argv and not argv[0].startswith("-")):
        raise ValueError("--model_path is required: the folder of a PaliGemma checkpoint")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def cli():
    argv = quote_string_flags(sys.argv[1:])
    try:
        check_flag_names(argv)
        fire.Fire(main, command=argv)
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
    except (LoadError, ValueError, OSError) as e:
        log(f"error: {one_line(e)}")
        sys.exit(1)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        log("error: out of memory; try --dtype bfloat16 or float16, or a machine with more memory")
        sys.exit(1)
    except Exception as e:  # a bug of ours: still one line, with the traceback on request
        if os.environ.get("PALIGEMMA_DEBUG"):
            raise
        log(f"error: unexpected {type(e).__name__}: {one_line(e)} (set PALIGEMMA_DEBUG=1 for the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    cli()
