"""Generation as a handful of small functions, as in gpt-fast: `prefill` runs the image and the whole prompt once,
`decode_one_token` feeds one token per row through the KV cache, `generate` loops, `sample` picks tokens; and the
`Session` that holds a loaded model with what answering needs.

A decode step keeps the same shapes from token to token and from prompt to prompt (one query over the model's
whole cache, masked, at a cache position held in a tensor; the caches are allocated once and only grown), so
`compile_decode` hands it to torch.compile once per process, and on CUDA that also captures it as a CUDA graph.
On the CPU the hand-written kernels are faster than anything compiled, and the step stays eager. `load_session`
loads a checkpoint folder into a Session, the same way for the command line and for a Ray worker.
"""

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from paligemma import detection, kernels
from paligemma.checkpoint import load_config, stop_tokens
from paligemma.console import UserError, log
from paligemma.modeling_paligemma import PaliGemmaForConditionalGeneration
from paligemma.processing_paligemma import PaliGemmaProcessor, read_image_settings
from paligemma.utils import load_hf_model


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax when temperature is 0, else a sample after transformers' temperature
    and top-p processors: keep the smallest set of likeliest tokens whose probability reaches top_p (at least
    one), summing from the least likely, as transformers does; top_p 1 keeps every token."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_p < 1:
        ascending, order = logits.sort(dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)[:, 0]


class NotFinite(Exception):
    """The model's logits hold NaN or infinity: its arithmetic overflowed the dtype it runs in."""


def prefill(model: PaliGemmaForConditionalGeneration, inputs: dict, max_new_tokens: int,
            all_logits: bool = False, first_row: int = 0) -> torch.Tensor:
    """Run the image and the whole (left-padded) prompt into cache rows first_row.., with room in the cache for
    max_new_tokens more; returns the last position's logits (B, V), or every position's (B, L, V) with
    all_logits."""
    B, L = inputs["input_ids"].shape
    model.setup_caches(first_row + B, L + max_new_tokens)
    logits = model(inputs["input_ids"], torch.arange(L, device=inputs["input_ids"].device), inputs["pixel_values"],
                   inputs["attention_mask"], inputs["token_type_ids"], last_only=not all_logits, first_row=first_row)
    return logits if all_logits else logits[:, -1]


def decode_one_token(model: PaliGemmaForConditionalGeneration, token: torch.Tensor,
                     input_pos: torch.Tensor) -> torch.Tensor:
    """(B,) tokens written at cache positions input_pos ((1,) for every row, or (B, 1) each row's own) -> the
    logits (B, V) for the tokens after them."""
    return model(token[:, None], input_pos)[:, -1]


class Logprobs:
    """Natural-log probabilities of (B, V) logits' tokens under the model's own distribution, before temperature
    and top-p, in float32: logit - largest - log(sum exp(logits - largest)), as torch's log_softmax computes them."""

    def __init__(self, logits: torch.Tensor, peak: torch.Tensor, logsum: torch.Tensor):
        self.logits, self.peak, self.logsum = logits, peak, logsum

    def of(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, k) token ids -> their logprobs (B, k)."""
        return self.logits.gather(-1, ids).float() - self.peak[:, None] - self.logsum[:, None]

    def top(self, k: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k likeliest of the first vocab tokens: their logprobs and ids (B, k), likeliest first and, among equal
        logits, the lower id first, as argmax (the greedy choice) orders them: topk orders ties as it likes."""
        logits = self.logits[:, :vocab]
        floor = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest
        ids = []
        for row, at_least in zip(logits, floor):
            candidates = (row >= at_least).nonzero().squeeze(-1)  # ids in ascending order, k or a few more
            ids.append(candidates[row[candidates].sort(descending=True, stable=True).indices[:k]])
        ids = torch.stack(ids)
        return self.of(ids), ids


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator=None,
         vocab: int | None = None) -> tuple[torch.Tensor, Logprobs]:
    """(B, V) logits -> the tokens chosen (B,) and the logprobs of every token. Logit columns from `vocab` on
    (embedding rows that no token names) are never chosen. Logits that are not finite raise NotFinite. On the CPU one
    pass of gemv.c finds the greedy choice, the largest logit and the softmax's sum (kernels.scan_logits): a tenth
    of the time PyTorch's argmax and log_softmax take over 257k logits."""
    vocab = logits.shape[-1] if vocab is None else min(vocab, logits.shape[-1])
    scanned, scores = kernels.scan_logits(logits, vocab), None
    if scanned is None:  # no compiled library, not on the CPU, or a logit that is not finite
        scores = logits.float()
        # a sum is NaN or infinite if any logit is, and 20x faster than the exact check, which only its overflow needs
        if not bool(scores.sum(-1).isfinite().all()) and not bool(scores.isfinite().all()):
            raise NotFinite()
        peak = scores.amax(-1)
        scanned = scores[..., :vocab].argmax(-1), peak, (scores - peak[:, None]).exp().sum(-1).log()
    top, peak, logsum = scanned
    logprobs = Logprobs(logits, peak, logsum)
    if temperature == 0:
        return top, logprobs
    scores = logits.float() if scores is None else scores
    allowed = scores.index_fill(-1, torch.arange(vocab, scores.shape[-1], device=scores.device), float("-inf"))
    return sample(allowed, temperature, top_p, generator), logprobs


def compile_decode(device: torch.device, log=lambda msg: print(msg, file=sys.stderr)):
    """decode_one_token compiled for the device (CUDA: with CUDA graphs), or the eager step where that cannot help
    or fails. Compiling costs seconds to tens of seconds, paid once, on the first decode step."""
    if device.type != "cuda":
        log("note: --compile helps on CUDA only; on the CPU the hand-written kernels are faster, decoding eagerly")
        return decode_one_token
    try:
        compiled = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True, dynamic=False)
    except Exception as e:  # an old torch, no Triton, ...: the eager step gives the same tokens
        log(f"note: cannot compile the decode step ({type(e).__name__}: {e}); decoding eagerly")
        return decode_one_token
    first = True

    def step(*args):  # the first call compiles and captures: say what it cost, fall back if it fails
        nonlocal first, compiled
        if not first:
            return compiled(*args)
        first, start = False, time.monotonic()
        try:
            out = compiled(*args)
        except Exception as e:
            log(f"note: compiling the decode step failed ({type(e).__name__}); decoding eagerly")
            compiled = decode_one_token
            return decode_one_token(*args)
        step.compile_s = time.monotonic() - start
        log(f"decode step compiled and captured in {step.compile_s:.1f} s")
        return out

    step.compile_s = 0.0
    return step


def generate(model, inputs: dict, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             stop_ids: tuple[int, ...] = (1,), generator=None, step=decode_one_token, vocab: int | None = None):
    """Yield (tokens (B,), logprobs (B,)) one step at a time, until every row has stopped or the budget is spent.

    Tokens are chosen and logprobs taken by `pick`. A row that has stopped keeps producing pad tokens (id 0) until
    the others finish, as transformers does. The host waits for the device twice a step, for the finite check and
    the stop check.
    """
    if max_new_tokens <= 0:
        return
    logits = prefill(model, inputs, max_new_tokens)
    input_pos = torch.tensor([inputs["input_ids"].shape[1]], device=logits.device)
    stop = torch.tensor(stop_ids, device=logits.device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for i in range(max_new_tokens):
        token, logprobs = pick(logits, temperature, top_p, generator, vocab)
        logprob = logprobs.of(token[:, None])[:, 0]
        token = token.masked_fill(done, 0)
        yield token, logprob
        done |= torch.isin(token, stop)
        if bool(done.all()) or i == max_new_tokens - 1:
            return
        logits = step(model, token, input_pos)
        input_pos += 1


class TextStream:
    """An answer's text as it grows, in pieces that only ever extend what the final text begins with. A run of byte
    tokens (`<0xNN>`, the tokenizer's spelling of rare characters) decodes as a whole: into characters, or into one
    U+FFFD per byte where the bytes are not valid UTF-8; and special tokens are dropped, which joins the runs around
    them. So the text is given up to the last token that is neither."""

    def __init__(self, tokenizer):
        self.tokenizer, self.shown = tokenizer, ""
        byte_tokens = tokenizer.convert_tokens_to_ids([f"<0x{i:02X}>" for i in range(256)])
        self.pending = set(byte_tokens) | set(tokenizer.all_special_ids)

    def add(self, ids: list[int]) -> str:
        """The new piece of text once the answer's tokens are ids ("" while it waits for a run to end)."""
        stable = next((n for n in range(len(ids), 0, -1) if ids[n - 1] not in self.pending), 0)
        text = self.tokenizer.decode(ids[:stable], skip_special_tokens=True)
        if len(text) > len(self.shown) and text.startswith(self.shown):
            piece, self.shown = text[len(self.shown):], text
            return piece
        return ""

    def close(self, text: str) -> str:
        """The rest of the final text."""
        return text[len(self.shown):]


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


@dataclass
class Session:
    """A loaded model with everything needed to answer: tokenizer, processor, stop ids, sampling settings."""

    model: PaliGemmaForConditionalGeneration
    tokenizer: object
    processor: PaliGemmaProcessor
    stop_ids: tuple[int, ...]
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    step: object = decode_one_token  # the decode step, eager or compiled
    vae: object = None  # the segmentation mask decoder, or None
    min_score: float = 0.0  # objects of detect and segment answers that score below this are dropped

    @property
    def device(self) -> torch.device:
        return self.model.language_model.model.norm.weight.device

    def overflowed(self) -> UserError:
        """What to tell the user when the logits are not finite (NotFinite)."""
        dtype = str(self.model.language_model.model.norm.weight.dtype).removeprefix("torch.")
        return UserError(f"the model's values overflowed {dtype} (its logits are not finite): run it with another "
                         f"--dtype ({'bfloat16' if dtype == 'float16' else 'float32'}, say)")

    def answer(self, inputs: dict, budget: int, clock: Stopwatch | None = None) -> list[tuple[list[int], list[float]]]:
        """(token ids, logprobs) per row, each up to and including its stop token."""
        rows = [([], []) for _ in range(inputs["input_ids"].shape[0])]
        for rows in self.steps(inputs, budget, clock):  # noqa: B007 (the rows after the last step are the answer)
            pass
        return rows

    def record(self, ids: list[int], logprobs: list[float], image, prompt: str, min_score: float = 0.0,
               annotate: str | None = None, fields: dict | None = None, text: str | None = None) -> dict:
        """An answer's record: fields (a batch input's index, say), its text (the ids decoded, unless given: a chat
        answer cut at a stop string), ids and logprobs, with the objects of a detect or segment prompt; the picture
        drawn to annotate when given. Every answer, the command line's, a batch's and the server's, is made here."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if text is None else text
        return detection.describe({**(fields or {}), "text": text, "token_ids": ids, "logprobs": logprobs}, image,
                                  prompt, tokenizer=self.tokenizer, picture=annotate, vae=self.vae, min_score=min_score)

    def steps(self, inputs: dict, budget: int, clock: Stopwatch | None = None):
        """After every step, (token ids, logprobs) per row so far, each row up to and including its stop token."""
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        rows = [([], []) for _ in range(inputs["input_ids"].shape[0])]
        clock = clock or Stopwatch()
        steps = generate(self.model, inputs, budget, self.temperature, self.top_p, self.stop_ids, self.generator,
                         self.step, len(self.tokenizer))
        while True:
            with clock("prefill_s" if not rows[0][0] else "decode_s"), torch.inference_mode():
                try:
                    step = next(steps, None)
                except NotFinite:
                    raise self.overflowed() from None
                if step is not None:  # tolist() waits for the device: the clock sees the real time
                    tokens, logprobs = step[0].tolist(), step[1].tolist()
            if step is None:
                return
            for (ids, lps), token, logprob in zip(rows, tokens, logprobs):
                if not ids or ids[-1] not in self.stop_ids:
                    ids.append(token)
                    lps.append(logprob)
            yield rows


def choose_device(only_cpu: bool) -> tuple[torch.device, str | None]:
    """The device to run on, and a note for the user when CUDA was wanted but is not there."""
    if only_cpu:
        return torch.device("cpu"), None
    if torch.cuda.is_available():
        return torch.device("cuda"), None
    return torch.device("cpu"), "note: CUDA is not available; running on the CPU"


def load_session(folder: Path, device: torch.device, dtype: torch.dtype | None, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, compile: bool = False, vae=None, min_score: float = 0.0,
                 **load_args) -> Session:
    """A checkpoint folder loaded (utils.load_hf_model, then kernels.accelerate) into a Session that samples with
    these settings (temperature 0: greedy); load_args go to load_hf_model (memory_check, tokenizer, batch, ...)."""
    config = load_config(folder)
    model, tokenizer = load_hf_model(folder, device, dtype, **load_args)
    processor = PaliGemmaProcessor(tokenizer, config.vision_config.image_size, config.num_image_tokens,
                                   **read_image_settings(folder))
    return Session(kernels.accelerate(model), tokenizer, processor, stop_tokens(folder, config), temperature, top_p,
                   torch.Generator(device).manual_seed(seed) if seed is not None else None,
                   compile_decode(device, log) if compile else decode_one_token, vae, min_score)
