"""Run PaliGemma on images from the command line: `python inference.py --model_path DIR --prompt "caption en" ...`.

Everything that can be wrong with the input is checked first. Then the weights stream in (utils.py) while the
tokenizer loads beside them, kernels.accelerate swaps in the CPU fast path, and generate.py answers. stdout carries
only the answer; progress and diagnostics go to stderr.
"""

import inspect
import json
import os
import sys
from pathlib import Path

import fire
import torch
from PIL import Image

import batch
import detection
import kernels
from checkpoint import DTYPES, LoadError, load_config, load_tokenizer, stop_tokens
from console import is_number, log, one_line, peak_rss_gib
from generate import Session, Stopwatch, compile_decode, decode_one_token
from processing_paligemma import (
    DEFAULT_MAX_PIXELS,
    IMAGE_TOKEN,
    PaliGemmaProcessor,
    load_image,
    max_prompt_length,
    read_image_settings,
)
from utils import load_hf_model

DEFAULT_IMAGE = Path(__file__).resolve().parent / "test_images" / "cat.jpg"
FLAG_RULES = {  # flag -> (test of its value, what it must be)
    "max_tokens_to_generate": (lambda v: type(v) is int and v >= 0, "a whole number >= 0"),
    "temperature": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "dtype": (lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "output_format": (lambda v: v in ("text", "json"), "text or json"),
    "seed": (lambda v: v is None or type(v) is int, "a whole number"),
    "max_image_pixels": (lambda v: type(v) is int and v > 0, "a whole number > 0"),
    "stream": (lambda v: v is None or isinstance(v, bool), "True or False"),
    "batch_size": (lambda v: type(v) is int and v >= 1, "a whole number >= 1"),
    **{name: (lambda v: isinstance(v, bool), "True or False")
       for name in ("do_sample", "only_cpu", "ignore_memory_check", "verbose", "compile")},
}


def check_flags(flags: dict):
    """Every flag's type and range, before anything is loaded; a ValueError names the first bad one."""
    for name, (valid, what) in FLAG_RULES.items():
        if not valid(flags[name]):
            raise ValueError(f"--{name} must be {what}, not {flags[name]!r}")


def choose_device(only_cpu: bool) -> tuple[torch.device, str | None]:
    """The device to run on, and a note for the user when CUDA was wanted but is not there."""
    if only_cpu:
        return torch.device("cpu"), None
    if torch.cuda.is_available():
        return torch.device("cuda"), None
    return torch.device("cpu"), "note: CUDA is not available; running on the CPU"


def main(model_path: str, prompt: str = "caption en", image_file_path: str = str(DEFAULT_IMAGE),
         max_tokens_to_generate: int = 100, temperature: float = 0.8, top_p: float = 0.9, do_sample: bool = False,
         only_cpu: bool = False, dtype: str = "float16", output_format: str = "text", seed: int | None = None,
         max_image_pixels: int = DEFAULT_MAX_PIXELS, ignore_memory_check: bool = False, verbose: bool = False,
         compile: bool = False, stream: bool | None = None, annotate: str | None = None, vae_path: str | None = None,
         prompts_file: str | None = None, batch_size: int = 1, output: str | None = None):
    """Answer a prompt about an image, or about every image of a folder, a glob or a prompts file.

    Args:
        model_path: the checkpoint folder: config.json, safetensors weights and the tokenizer
        prompt: the task prompt, e.g. "caption en", "answer en what is this?", "detect cat ; dog"
        image_file_path: an image file, a folder of images, or a quoted glob such as 'photos/*.jpg'
        max_tokens_to_generate: the most tokens to generate; generation also stops at a stop token
        temperature: the sampling temperature, with --do_sample True (0 means greedy)
        top_p: sample from the smallest set of likeliest tokens whose probability reaches this, in (0, 1]
        do_sample: True to sample with --temperature and --top_p, False for greedy decoding
        only_cpu: True to never use CUDA, False to use it when present
        dtype: the weights' dtype: float16, bfloat16 or float32
        output_format: text (the answer alone) or json (one object per line with ids, logprobs and timings)
        seed: a seed for sampling, for reproducible samples
        max_image_pixels: refuse images with more pixels than this (a guard against decompression bombs)
        ignore_memory_check: True to load even when the weights look larger than the memory available
        verbose: True to print timings and peak memory on stderr
        compile: True to compile the decode step and capture it as a CUDA graph (CUDA only)
        stream: True to print the answer as it is generated (on by default when stdout is a terminal)
        annotate: write a copy of the image with the detected boxes, labels and masks drawn to this path
        vae_path: big_vision's vae-oid.npz, to decode the masks of segment answers
        prompts_file: a JSON Lines file of {"image": "path", "prompt": "text"} to answer in one run
        batch_size: inputs answered together when there are several
        output: append the answers to this JSON Lines file; a rerun skips the inputs already there
    """
    check_flags(locals())
    clock, folder = Stopwatch(), Path(model_path)
    items = batch.gather(image_file_path, prompts_file, prompt)
    if items is None and output is not None:  # one image, written to a results file like a batch of one
        items = [batch.Item(0, image_file_path, prompt)]
    if items is None:
        with clock("image_s"):
            image = load_image(image_file_path, max_image_pixels)
    check_outputs(annotate, output, vae_path, [image_file_path] if items is None else [i.image for i in items],
                  single=items is None)
    vae = detection.load_vae(vae_path) if vae_path is not None else None
    config, settings = load_config(folder), read_image_settings(folder)
    stop_ids, max_positions = stop_tokens(folder, config), config.text_config.max_position_embeddings
    for text in [prompt] if items is None else dict.fromkeys(i.prompt for i in items):
        if text.count(IMAGE_TOKEN) > 1:
            raise ValueError(f"the prompt {text[:40]!r} has {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} tokens; "
                             "PaliGemma takes one image")
    tokenizer = None
    if items is None and max_prompt_length(prompt, config.num_image_tokens) > max_positions:
        # A prompt that may not fit: tokenise it before loading, which then cannot overlap the tokenizer.
        tokenizer = load_tokenizer(folder)
        processor = PaliGemmaProcessor(tokenizer, config.vision_config.image_size, config.num_image_tokens, **settings)
        batch.fit_budget(processor([prompt], [image])["input_ids"].shape[1], 0, max_positions)
    todo = batch.resume(Path(output) if output else None, items) if items is not None else None
    device, note = choose_device(only_cpu)
    with clock("load_s"):
        model, tokenizer = load_hf_model(folder, device, DTYPES[dtype], memory_check=not ignore_memory_check,
                                         tokenizer=tokenizer)
        model = kernels.accelerate(model)
        processor = PaliGemmaProcessor(tokenizer, config.vision_config.image_size, config.num_image_tokens, **settings)
    for message in (note, do_sample and temperature == 0 and "note: --temperature 0 means greedy decoding"):
        if message:
            log(message)
    session = Session(model, tokenizer, processor, stop_ids, temperature if do_sample else 0.0, top_p,
                      torch.Generator(device).manual_seed(seed) if seed is not None else None,
                      compile_decode(device, log) if compile else decode_one_token, vae)
    if items is not None:
        failed = batch.answer_batch(session, todo, len(items), max_tokens=max_tokens_to_generate,
                                    batch_size=batch_size, output=Path(output) if output else None,
                                    annotate=Path(annotate) if annotate else None, max_pixels=max_image_pixels,
                                    clock=clock)
        if verbose:
            log(f"{len(todo)} inputs in {clock['generate_s']:.1f} s of generation, "
                f"{len(todo) / max(clock['generate_s'], 1e-9):.2f} images/s, peak memory {peak_rss_gib():.2f} GiB")
        if failed:
            raise ValueError(f"{failed} of {len(todo)} inputs failed; their records say why")
        return
    with clock("image_s"):
        inputs = processor([prompt], [image])
    budget = batch.fit_budget(inputs["input_ids"].shape[1], max_tokens_to_generate, max_positions)
    streaming = stream if stream is not None else output_format == "text" and sys.stdout.isatty()
    printer = StreamPrinter(tokenizer) if streaming and output_format == "text" else None
    [(ids, logprobs)] = session.answer(inputs, budget, clock, printer and printer.add)
    timings = {"load_s": clock["load_s"], "first_token_s": clock["image_s"] + clock["prefill_s"],
               "decode_s": clock["decode_s"], "decode_tokens": max(len(ids) - 1, 0), "peak_rss_gib": peak_rss_gib()}
    if hasattr(session.step, "compile_s"):  # --compile on CUDA: the part of decode_s spent compiling
        timings["compile_s"] = session.step.compile_s
    if device.type == "cuda":
        timings["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if verbose:
        log(f"load {timings['load_s']:.1f} s | prefill {inputs['input_ids'].shape[1]} tokens in "
            f"{clock['prefill_s']:.2f} s, first token {timings['first_token_s']:.2f} s after opening the image | "
            f"decode {timings['decode_tokens']} tokens in {timings['decode_s']:.2f} s, "
            f"{timings['decode_tokens'] / max(timings['decode_s'], 1e-9):.2f} tok/s | "
            f"peak memory {timings['peak_rss_gib']:.2f} GiB")
    record = detection.describe({"text": tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids,
                                 "logprobs": logprobs}, image, prompt, annotate, vae)
    if output_format == "json":
        print(json.dumps({**record, "timings": timings}, ensure_ascii=False))
    elif printer:
        printer.close(record["text"])
    elif ids:  # a zero token budget prints nothing
        print(record["text"])


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
