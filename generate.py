"""Generation as a handful of small functions, as in gpt-fast: `prefill` runs the vision tower and the whole prompt
once, `decode_one_token` feeds one token per row through the KV cache, `generate` loops, `sample` picks tokens.

A decode step keeps the same shapes from token to token (one query over the whole preallocated cache, masked, at a
position held in a tensor), so `compile_decode` can hand it to torch.compile, which on CUDA also captures it as a
CUDA graph. On the CPU the hand-written kernels are faster than anything compiled, and the step stays eager.
"""

import sys
import time
from dataclasses import dataclass

import torch

from kernels import prefill_dtype
from modeling_gemma import PaliGemmaForConditionalGeneration, attention_masks


@dataclass
class Cache:
    """Per-sequence bookkeeping beside the model's KV cache."""

    key_valid: torch.Tensor  # (B, T) bool: cache position holds a real token (not left padding, not yet written)
    prefix: torch.Tensor  # (B, T) bool: cache position belongs to the bidirectional prefix
    next_pos: torch.Tensor  # (B,) RoPE position of the next token
    index: torch.Tensor  # (1,) cache position the next token is written to


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax when temperature is 0, else top-p sampling at that temperature."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest set of most likely tokens whose mass reaches top_p (the first token always stays).
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)  # (B, 1), renormalised inside
    return order.gather(-1, choice)[:, 0]


def prefill(model: PaliGemmaForConditionalGeneration, inputs: dict, max_len: int,
            all_logits: bool = False) -> tuple[torch.Tensor, Cache]:
    """Run the image and the whole (left-padded) prompt; returns the last position's logits (B, V), or every
    position's (B, L, V) with all_logits, and the filled cache."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"].bool()
    B, L = input_ids.shape
    device = input_ids.device
    model.setup_caches(B, max_len)
    key_valid = torch.zeros(B, max_len, dtype=torch.bool, device=device)
    key_valid[:, :L] = attention_mask
    prefix = torch.zeros(B, max_len, dtype=torch.bool, device=device)
    prefix[:, :L] = inputs["token_type_ids"] == 0
    positions = attention_mask.long().cumsum(-1)  # 1-based, left padding skipped (REFERENCE.md §3.3)
    masks = attention_masks(model.config.text_config, key_valid, prefix, torch.arange(L, device=device), L)
    logits = model(input_ids, positions, masks, 0, inputs["pixel_values"], last_only=not all_logits,
                   dtype=prefill_dtype(model.language_model.lm_head.weight))
    cache = Cache(key_valid, prefix, positions[:, -1] + 1, torch.tensor([L], device=device))
    return (logits if all_logits else logits[:, -1]), cache


def decode_forward(model, tokens, positions, index, key_valid, prefix) -> torch.Tensor:
    """(B, 1) tokens at cache position index -> logits (B, V): the step that compile_decode compiles."""
    masks = attention_masks(model.config.text_config, key_valid, prefix, index, key_valid.shape[1])
    return model(tokens, positions, masks, index)[:, -1]


def decode_one_token(model, token: torch.Tensor, cache: Cache, forward=decode_forward) -> torch.Tensor:
    """Feed (B,) tokens at the next cache position; returns the logits (B, V) for the token after them."""
    cache.key_valid.index_fill_(1, cache.index, True)
    logits = forward(model, token[:, None], cache.next_pos[:, None], cache.index, cache.key_valid, cache.prefix)
    cache.next_pos += 1
    cache.index += 1
    return logits


def compile_decode(device: torch.device, log=lambda msg: print(msg, file=sys.stderr)):
    """decode_forward compiled for the device (CUDA: with CUDA graphs), or the eager step where that cannot help
    or fails. Compiling costs seconds to tens of seconds, paid on the first decode steps."""
    if device.type != "cuda":
        log("note: --compile helps on CUDA only; on the CPU the hand-written kernels are faster, decoding eagerly")
        return decode_forward
    try:
        compiled = torch.compile(decode_forward, mode="reduce-overhead", fullgraph=True, dynamic=False)
    except Exception as e:  # an old torch, no Triton, ...: the eager step gives the same tokens
        log(f"note: cannot compile the decode step ({type(e).__name__}: {e}); decoding eagerly")
        return decode_forward
    first = True

    def forward(*args):  # the first call compiles and captures: say what it cost, fall back if it fails
        nonlocal first, compiled
        if not first:
            return compiled(*args)
        first, start = False, time.monotonic()
        try:
            out = compiled(*args)
        except Exception as e:
            log(f"note: compiling the decode step failed ({type(e).__name__}); decoding eagerly")
            compiled = decode_forward
            return decode_forward(*args)
        forward.compile_s = time.monotonic() - start
        log(f"decode step compiled and captured in {forward.compile_s:.1f} s")
        return out

    forward.compile_s = 0.0
    return forward


def generate(model, inputs: dict, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             stop_ids: tuple[int, ...] = (1,), generator=None, forward=decode_forward):
    """Yield (tokens (B,), logprobs (B,)) one step at a time, until every row has stopped or the budget is spent.

    logprobs are natural-log probabilities under the model's own distribution, before temperature and top-p.
    A row that has stopped keeps producing pad tokens (id 0) until the others finish, as transformers does; the
    only host synchronisation per step is that check.
    """
    if max_new_tokens <= 0:
        return
    logits, cache = prefill(model, inputs, inputs["input_ids"].shape[1] + max_new_tokens)
    stop = torch.tensor(stop_ids, device=logits.device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_p, generator)
        logprob = torch.log_softmax(logits.float(), dim=-1).gather(-1, token[:, None])[:, 0]
        token = token.masked_fill(done, 0)
        yield token, logprob
        done |= torch.isin(token, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        logits = decode_one_token(model, token, cache, forward)
