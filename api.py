"""The Python API: a checkpoint loaded once, answering many prompts about many images.

    import paligemma

    model = paligemma.load("google/paligemma-3b-mix-224", quantize="int8")  # a folder, or a Hub id in the cache
    record = model.answer("cat.jpg", "detect cat")  # a path, a PIL image or the file's bytes
    record["text"], record["detections"]
    for piece in model.stream("cat.jpg", "caption en"):
        print(piece, end="", flush=True)
    records = model.answer_batch(["a.jpg", "b.jpg"], "caption en")

A record is the command line's `--output_format json` record (text, token_ids, logprobs, detections or segments,
timings): inference.py answers one image through Model.stream, and every answer, the batch mode's and the server's
included, becomes a record in Session.record.
"""

import io
import time
from collections.abc import Generator
from pathlib import Path

import torch
from PIL import Image

from paligemma.batch import check_fits, check_prompt
from paligemma.checkpoint import DTYPES, load_config, model_folder, stop_tokens
from paligemma.console import UserError, log, peak_rss_gib
from paligemma.generate import Session, Stopwatch, TextStream, choose_device, load_session
from paligemma.masks import load_vae
from paligemma.processing_paligemma import DEFAULT_MAX_PIXELS, check_tokenizer, decode_image, load_image


def load(model_path: str | Path, *, dtype: str | None = None, quantize: str | None = None, device: str | None = None,
         vae_path: str | Path | None = None, max_image_pixels: int = DEFAULT_MAX_PIXELS, memory_check: bool = True,
         batch_size: int = 1) -> "Model":
    """Load a checkpoint folder, or a Hub id (org/name[@revision]) from the local Hugging Face cache, as the
    command line does: dtype float16, bfloat16 or float32 (default: the checkpoint's own), quantize int8 or int4,
    device cpu or cuda (default: cuda where there is one), vae_path the mask decoder for segment prompts,
    batch_size the rows answer_batch decodes together. Errors are UserError with the command line's message."""
    start = time.monotonic()
    folder = model_folder(str(model_path))
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if quantize not in (None, "int8", "int4"):
        raise UserError(f"quantize must be int8 or int4, not {quantize!r}")
    config = load_config(folder)
    stop_tokens(folder, config)
    tokenizer = check_tokenizer(folder, config)
    device = torch.device(device) if device else choose_device(only_cpu=False)[0]
    vae = load_vae(vae_path) if vae_path is not None else None
    session = load_session(folder, device, DTYPES.get(dtype), vae=vae, memory_check=memory_check,
                           tokenizer=tokenizer, batch=batch_size, quantize=quantize)
    return Model(session, max_image_pixels, time.monotonic() - start, batch_size)


class Model:
    """A loaded checkpoint: answer, stream and answer_batch take an image and a task prompt (caption en, detect
    cat, segment cup, answer en what is this?, ocr, ...); temperature 0 is greedy, above it samples with top_p (0.9,
    as the command line), and seed for a repeatable sample."""

    def __init__(self, session: Session, max_image_pixels: int = DEFAULT_MAX_PIXELS, load_s: float = 0.0,
                 batch_size: int = 1):
        self.session, self.max_image_pixels, self.load_s = session, max_image_pixels, load_s
        self.batch_size = batch_size

    def answer(self, image, prompt: str = "caption en", on_text=None, **options) -> dict:
        """The record of one answer, on_text(piece) called with its text as it is decoded; options as for stream."""
        run = self.stream(image, prompt, **options)
        while True:
            try:
                piece = next(run)
            except StopIteration as end:
                return end.value
            if on_text is not None:
                on_text(piece)

    def stream(self, image, prompt: str = "caption en", *, max_tokens: int = 100, temperature: float = 0.0,
               top_p: float = 0.9, seed: int | None = None, min_score: float = 0.0, annotate: str | None = None,
               verbose: bool = False, clock: Stopwatch | None = None) -> Generator[str, None, dict]:
        """The answer's text in pieces of whole characters as it is decoded (joined: the record's text); the record
        is the generator's return value. min_score leaves out objects that score below it; annotate: a PNG path to
        draw boxes and masks on; verbose: the timings on stderr; clock: the command line's, which includes opening
        the image before the model loaded."""
        clock = clock or Stopwatch()
        check_prompt(prompt)
        with clock("image_s"):
            image = self.image(image)
            inputs = self.session.processor([prompt], [image])
        config = self.session.model.config
        check_fits(inputs["input_ids"].shape[1], max_tokens, config.text_config.max_position_embeddings,
                   config.num_image_tokens)
        self.sample(temperature, top_p, seed)
        text, ids, logprobs = TextStream(self.session.tokenizer), [], []
        for [(ids, logprobs)] in self.session.steps(inputs, max_tokens, clock):  # noqa: B007 (used after it too)
            if piece := text.add(ids):
                yield piece
        timings = {"load_s": self.load_s, "first_token_s": clock["image_s"] + clock["prefill_s"],
                   "decode_s": clock["decode_s"], "decode_tokens": max(len(ids) - 1, 0), "peak_rss_gib": peak_rss_gib()}
        if hasattr(self.session.step, "compile_s"):  # compiled on CUDA: the part of decode_s spent compiling
            timings["compile_s"] = self.session.step.compile_s
        if self.session.device.type == "cuda":
            timings["peak_gpu_gib"] = torch.cuda.max_memory_allocated(self.session.device) / 2**30
        if verbose:
            log_timings(timings, inputs["input_ids"].shape[1], clock["prefill_s"])
        answer = self.session.record(ids, logprobs, image, prompt, min_score, annotate)
        if last := text.close(answer["text"]):
            yield last
        return {**answer, "timings": timings}

    def answer_batch(self, images: list, prompts: str | list[str] = "caption en", *, max_tokens: int = 100,
                     temperature: float = 0.0, top_p: float = 0.9, seed: int | None = None,
                     min_score: float = 0.0) -> list[dict]:
        """One record per image (without timings), batch_size rows decoded together as the command line's batch mode
        does: the same tokens as alone, the logprobs within the dtype's rounding of alone (the rows are padded)."""
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise UserError(f"{len(images)} images but {len(prompts)} prompts")
        self.sample(temperature, top_p, seed)
        records = []
        for first in range(0, len(images), self.batch_size):
            chunk = [self.image(i) for i in images[first:first + self.batch_size]]
            asked = prompts[first:first + self.batch_size]
            for prompt in asked:
                check_prompt(prompt)
            inputs = self.session.processor(asked, chunk)
            config = self.session.model.config
            check_fits(inputs["input_ids"].shape[1], max_tokens, config.text_config.max_position_embeddings,
                       config.num_image_tokens)
            rows = self.session.answer(inputs, max_tokens)
            records += [self.session.record(ids, lps, image, prompt, min_score)
                        for (ids, lps), image, prompt in zip(rows, chunk, asked)]
        return records

    def image(self, image) -> Image.Image:
        """A path, a PIL image or an image file's bytes, checked as the command line checks a file."""
        if isinstance(image, (str, Path)):
            return load_image(image, self.max_image_pixels)
        if isinstance(image, (bytes, bytearray, memoryview)):
            return decode_image(io.BytesIO(image), "the image", self.max_image_pixels)
        if isinstance(image, Image.Image):
            return image
        raise UserError(f"an image is a path, a PIL image or bytes, not {type(image).__name__}")

    def sample(self, temperature: float, top_p: float, seed: int | None):
        if not (temperature >= 0 and 0 < top_p <= 1):
            raise UserError(f"temperature must be >= 0 and top_p in (0, 1], not {temperature} and {top_p}")
        session = self.session
        session.temperature, session.top_p = temperature, top_p
        session.generator = torch.Generator(session.device).manual_seed(seed) if seed is not None else None


def log_timings(timings: dict, prompt_tokens: int, prefill_s: float):
    """The command line's --verbose line."""
    log(f"load {timings['load_s']:.1f} s | prefill {prompt_tokens} tokens in {prefill_s:.2f} s, first token "
        f"{timings['first_token_s']:.2f} s after opening the image | decode {timings['decode_tokens']} tokens in "
        f"{timings['decode_s']:.2f} s, {timings['decode_tokens'] / max(timings['decode_s'], 1e-9):.2f} tok/s | peak "
        f"memory {timings['peak_rss_gib']:.2f} GiB")
