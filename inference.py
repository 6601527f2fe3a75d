"""Run PaliGemma on images from the command line: `python inference.py --model_path DIR --prompt "caption en" ...`.

Everything that can be wrong with the input is checked first. Then the weights stream in (utils.py) while the
tokenizer loads beside them, kernels.accelerate swaps in the CPU fast path (generate.load_session), and generate.py
answers; with --ray_address, workers on a Ray cluster do that (ray_batch.py). stdout carries only the answer;
progress and diagnostics go to stderr.
"""

import os
import signal
import sys

if __name__ == "__main__":  # ctrl-C while the libraries below load: one line, not a traceback
    from paligemma.console import guard_start

    guard_start()

import contextlib  # noqa: E402
import inspect  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import fire  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from paligemma import api, batch, masks, quantization  # noqa: E402
from paligemma.checkpoint import (  # noqa: E402
    DTYPES,
    load_config,
    load_tokenizer,
    model_folder,
    stop_tokens,
    warn_about_dtype,
)
from paligemma.console import INTERRUPTED, UserError, kind_of, log, one_line, peak_rss_gib, require_file  # noqa: E402
from paligemma.flags import check_flag_names, check_flags, quote_string_flags  # noqa: E402
from paligemma.generate import Stopwatch, choose_device, load_session  # noqa: E402
from paligemma.processing_paligemma import (  # noqa: E402
    DEFAULT_MAX_PIXELS,
    PaliGemmaProcessor,
    check_tokenizer,
    load_image,
    max_prompt_length,
    read_image_settings,
)
from paligemma.results import emit  # noqa: E402
from paligemma.utils import load_hf_model  # noqa: E402

DEFAULT_IMAGE = Path(__file__).resolve().parent / "test_images" / "cat.jpg"
def ray_batch_module(flags: dict):
    """ray_batch.py for --ray_address, imported only then (None without it); a UserError says how to get Ray, or
    which flag needs --ray_address."""
    if flags["ray_address"] is None:
        for name, default in (("workers", 1), ("cpus_per_worker", None), ("gpus_per_worker", 0)):
            if flags[name] != default:
                raise UserError(f"--{name} goes with --ray_address; without it the batch runs in this one process")
        return None
    if flags["gpus_per_worker"] and flags["only_cpu"]:
        raise UserError("--gpus_per_worker gives the workers GPUs, which --only_cpu True forbids")
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")  # Ray starts when told to, never on a call after the run
    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError("--ray_address needs Ray: pip install -r requirements-ray.txt") from None
    from paligemma import ray_batch

    return ray_batch


def main(model_path: str, prompt: str = "caption en", image_file_path: str = str(DEFAULT_IMAGE),
         max_tokens_to_generate: int = 100, temperature: float = 0.8, top_p: float = 0.9, do_sample: bool = False,
         only_cpu: bool = False, dtype: str | None = None, output_format: str = "text", seed: int | None = None,
         max_image_pixels: int = DEFAULT_MAX_PIXELS, ignore_memory_check: bool = False, verbose: bool = False,
         compile: bool = False, stream: bool | None = None, annotate: str | None = None, vae_path: str | None = None,
         prompts_file: str | None = None, batch_size: int = 1, output: str | None = None, min_score: float = 0.0,
         quantize: str = "none", save_quantized: str | None = None, ray_address: str | None = None, workers: int = 1,
         cpus_per_worker: int | None = None, gpus_per_worker: float = 0):
    """Answer a prompt about an image, or about every image of a folder, a glob or a prompts file.

    Args:
        model_path: the checkpoint folder (config.json, safetensors weights and the tokenizer), or a Hub id such as
            google/paligemma-3b-mix-224 (@revision optional) found in the local Hugging Face cache, never downloaded
        prompt: the task prompt, e.g. "caption en", "answer en what is this?", "detect cat ; dog"
        image_file_path: an image file, a folder of images, or a quoted glob such as 'photos/*.jpg'
        max_tokens_to_generate: the most tokens to generate; generation also stops at a stop token
        temperature: the sampling temperature, from 0.001 to 1000, with --do_sample True (0 means greedy)
        top_p: sample from the smallest set of likeliest tokens whose probability reaches this, in (0, 1]
        do_sample: True to sample with --temperature and --top_p, False for greedy decoding
        only_cpu: True to never use CUDA, False to use it when present
        dtype: float16, bfloat16 or float32; by default the checkpoint's own half precision
        output_format: text (the answer alone) or json (one object per line with ids, logprobs and timings)
        seed: a seed for sampling (0 to 2**64 - 1), for reproducible samples
        max_image_pixels: refuse images with more pixels than this (a guard against decompression bombs)
        ignore_memory_check: True to load even when the model looks larger than the memory available
        verbose: True to print timings and peak memory on stderr
        compile: True to compile the decode step and capture it as a CUDA graph (CUDA only)
        stream: True to print the answer as it is generated (on by default when stdout is a terminal)
        annotate: write a copy of the image with the detected boxes, labels and masks drawn to this path
        vae_path: big_vision's vae-oid.npz, to decode the masks of segment answers
        prompts_file: a JSON Lines file of {"image": "path", "prompt": "text"} to answer in one run
        batch_size: inputs answered together when there are several
        output: append the answers to this JSON Lines file; a rerun skips the inputs already there
        min_score: drop detected and segmented objects whose score is below this, from the JSON and the picture
        quantize: none, int8 or int4: the decoder's weights as integers, quantized while they load (CPU only)
        save_quantized: write the quantized model to this new folder, which later loads in place, and answer nothing
        ray_address: answer on Ray: local (start it on this machine), auto (this machine's cluster) or an address
        workers: Ray workers, each an actor with its own copy of the model (with --ray_address)
        cpus_per_worker: CPUs (torch threads) of each Ray worker; by default the cluster's CPUs shared evenly
        gpus_per_worker: GPUs of each Ray worker (a fraction shares one); 0 answers on the workers' CPUs
    """
    check_flags(locals())
    folder = model_folder(model_path)
    if save_quantized is not None:
        return save(folder, Path(save_quantized), quantize, DTYPES.get(dtype), not ignore_memory_check)
    on_ray = ray_batch_module(locals())
    clock = Stopwatch()
    items = batch.gather(image_file_path, prompts_file, prompt)
    if items is None and output is not None:  # one image, written to a results file like a batch of one
        items = [batch.Item(0, image_file_path, prompt)]
    if items is None and on_ray is not None:
        raise UserError("--ray_address answers many inputs: give a folder, a glob or --prompts_file (or --output for "
                        "one image)")
    if items is None:
        with clock("image_s"):
            image = load_image(image_file_path, max_image_pixels)
        batch.check_prompt(prompt)
    check_outputs(annotate, output, [image_file_path] if items is None else [i.path for i in items if i.path],
                  single=items is None)
    if vae_path is not None:
        require_file(vae_path, "the --vae_path file")
    vae = masks.load_vae(vae_path) if vae_path is not None else None
    config, settings = load_config(folder), read_image_settings(folder)
    stop_tokens(folder, config)  # read now, so that a broken generation_config.json is refused before loading
    tokenizer = check_tokenizer(folder, config)  # its ids, from its files; built here only from tokenizer.model
    max_positions, image_tokens = config.text_config.max_position_embeddings, config.num_image_tokens
    longest = max(max_prompt_length(p, image_tokens) for p in dict.fromkeys(
        [prompt] if items is None else [i.prompt for i in items if i.prompt is not None] or [""]))
    if items is not None:  # the shortest prompt is the image, <bos> and its "\n"; a longer one gets fewer tokens
        batch.check_fits(image_tokens + 2, max_tokens_to_generate, max_positions, image_tokens, "the shortest prompt")
    elif longest + max_tokens_to_generate > max_positions:
        # This prompt may not fit: tokenise it before loading, which then cannot overlap the tokenizer.
        tokenizer = tokenizer or load_tokenizer(folder)
        processor = PaliGemmaProcessor(tokenizer, config.vision_config.image_size, image_tokens, **settings)
        batch.check_fits(processor([prompt], [image])["input_ids"].shape[1], max_tokens_to_generate, max_positions,
                         image_tokens)
    with contextlib.ExitStack() as stack:
        results = None if items is None else stack.enter_context(contextlib.closing(batch.open_results(output)))
        if do_sample and temperature == 0:
            log("note: --temperature 0 means greedy decoding")
        sampling = dict(temperature=temperature if do_sample else 0.0, top_p=top_p, seed=seed, compile=compile,
                        min_score=min_score)
        length = min(longest + max_tokens_to_generate, max_positions)
        quantize = None if quantize == "none" else quantize
        if on_ray is not None:
            warn_about_dtype(config, DTYPES.get(dtype))  # said here once: the workers load without a word
            job = on_ray.Job(folder=os.getcwd(), model_path=str(folder), dtype=dtype,
                             memory_check=not ignore_memory_check, batch_size=batch_size, length=length,
                             max_tokens=max_tokens_to_generate, max_pixels=max_image_pixels, **sampling,
                             vae_path=vae_path, annotate=annotate, quantize=quantize)
            with clock("ray_s"):
                answered, failed = on_ray.answer_on_ray(items, results, job, address=ray_address, workers=workers,
                                                        cpus=cpus_per_worker, gpus=gpus_per_worker)
        else:
            device, note = choose_device(only_cpu)
            if note:
                log(note)
            with clock("load_s"):
                session = load_session(folder, device, DTYPES.get(dtype), **sampling, vae=vae,
                                       memory_check=not ignore_memory_check, tokenizer=tokenizer,
                                       batch=min(batch_size, len(items or [None])), length=length,
                                       quantize=quantize)
            if items is None:
                model = api.Model(session, max_image_pixels, clock["load_s"])
                asked = {name: sampling[name] for name in ("temperature", "top_p", "seed")}
                return answer_one(model, image, prompt, max_tokens_to_generate, asked, clock, output_format, stream,
                                  annotate, verbose)
            answered, failed = batch.answer_batch(session, items, results, max_tokens=max_tokens_to_generate,
                                                  batch_size=batch_size, annotate=Path(annotate) if annotate else None,
                                                  max_pixels=max_image_pixels, clock=clock)
    if verbose and on_ray is None:
        log(f"{answered} inputs in {clock['generate_s']:.1f} s of generation, "
            f"{answered / max(clock['generate_s'], 1e-9):.2f} images/s, peak memory {peak_rss_gib():.2f} GiB")
    elif verbose:  # the workers said their peak memory as they loaded
        log(f"{answered} inputs in {clock['ray_s']:.1f} s on Ray, starting the workers included, "
            f"{answered / max(clock['ray_s'], 1e-9):.2f} images/s")
    if failed:
        raise UserError(f"{failed} of {answered} inputs failed; their records say why")


def save(folder: Path, out: Path, scheme: str, dtype: torch.dtype | None, memory_check: bool):
    """--save_quantized: quantize the checkpoint while it loads, and write it as a folder that loads in place."""
    if scheme == "none" and quantization.read_scheme(folder) is None:
        raise UserError("--save_quantized needs --quantize int8 or int4")
    if kind_of(out) != "nothing":
        raise UserError(f"--save_quantized {out} already exists; name a new folder")
    if kind_of(out.resolve().parent) != "a folder":
        raise UserError(f"--save_quantized {out}: the folder it goes in does not exist")
    check_tokenizer(folder, load_config(folder))  # copied beside the weights: refused now, not after quantizing
    model, _ = load_hf_model(folder, "cpu", dtype, memory_check=memory_check,
                             quantize=None if scheme == "none" else scheme)
    quantization.save_quantized(model, folder, out)
    log(f"wrote {out}: {model.quantization.name} weights that load in place (--model_path {out})")


def answer_one(model: api.Model, image: Image.Image, prompt: str, max_tokens: int, sampling: dict, clock: Stopwatch,
               output_format: str, stream: bool | None, annotate: str | None, verbose: bool):
    """One image's answer on stdout: the text (streamed as it comes, on a terminal), or a JSON object."""
    if stream is None:
        stream = output_format == "text" and bool(sys.stdout and sys.stdout.isatty())
    stream, shown = stream and output_format == "text", []

    def show(piece: str):
        emit(piece)
        shown.append(piece)

    record = model.answer(image, prompt, on_text=show if stream else None, max_tokens=max_tokens,
                          min_score=model.session.min_score, annotate=annotate, verbose=verbose, clock=clock,
                          **sampling)
    if output_format == "json":
        emit(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
    elif stream:
        if shown:
            emit("\n")
    elif record["token_ids"]:  # a zero token budget prints nothing
        emit(record["text"] + "\n")


def check_outputs(annotate: str | None, output: str | None, inputs: list[str], single: bool):
    """Refuse output paths that could not be written, or would reach an input image by any name (a symlink, a
    hard link), before any work."""
    on_disk = {(s.st_dev, s.st_ino) for s in map(batch.stat_or_none, inputs) if s} if annotate or output else set()
    if annotate is not None and output is not None and Path(annotate).resolve() == Path(output).resolve():
        raise UserError(f"--annotate and --output are the same file, {output}")
    for flag, path, wanted in (("--annotate", annotate, "a file" if single else "a folder"),
                               ("--output", output, "a file")):
        if path is None:
            continue
        kind, stat = kind_of(path), batch.stat_or_none(path)
        if stat and (stat.st_dev, stat.st_ino) in on_disk:
            raise UserError(f"{flag} {path} is an input image; it is never overwritten")
        if kind not in ("nothing", wanted):
            raise UserError(f"{flag} {path} is {kind}, not {wanted}")
        parent = Path(path).resolve().parent
        if kind == "nothing" and kind_of(parent) != "a folder":
            raise UserError(f"{flag} {path}: the folder it goes in does not exist")
        if not os.access(path if kind != "nothing" else parent, os.W_OK):
            raise UserError(f"{flag} {path}: {'it' if kind != 'nothing' else 'its folder'} is not writable")
    picture_format = Image.registered_extensions().get(Path(annotate or "").suffix.lower())
    if single and annotate is not None and not writes_rgb(picture_format):
        raise UserError(f"--annotate {annotate}: give the picture a name ending in a type pillow can write, like .png")


def writes_rgb(image_format: str | None) -> bool:
    """Whether pillow can save a colour picture in this format (it reads some it cannot write, like XBM)."""
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=image_format)
        return image_format is not None
    except (OSError, KeyError, ValueError):
        return False


def failure(e: BaseException, debug: bool) -> tuple[str, int]:
    """The one line, and the exit status, for a run that ended in e."""
    if isinstance(e, KeyboardInterrupt):
        return INTERRUPTED, 130
    if isinstance(e, UserError):
        return f"error: {one_line(e)}", 1
    if isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)):
        return "error: out of memory; try a smaller --dtype or --batch_size, or a machine with more memory", 1
    hint = "" if debug else " (set PALIGEMMA_DEBUG=1 for the traceback)"  # a bug of ours: still one line
    return f"error: unexpected {type(e).__name__}: {one_line(e)}{hint}", 1


def cli():
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, ctrl-C ends the run cleanly
    debug = bool(os.environ.get("PALIGEMMA_DEBUG"))
    try:
        check_flag_names(sys.argv[1:], list(inspect.signature(main).parameters))
        fire.Fire(main, command=quote_string_flags(sys.argv[1:]))
    except SystemExit:
        raise
    except BaseException as e:
        message, code = failure(e, debug)
        if debug:
            traceback.print_exc()
        log(message)
        sys.exit(code)


if __name__ == "__main__":
    cli()
