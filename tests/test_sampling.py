"""Sampling as transformers' temperature and top-p processors sample, ids that name no token never produced, and a
streamed answer that is always the final answer's beginning, byte for byte."""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from paligemma import generate as generation
from paligemma.checkpoint import load_tokenizer
from paligemma.generate import NotFinite, TextStream, generate, sample
from paligemma.processing_paligemma import PaliGemmaProcessor


def transformers_distribution(logits, temperature, top_p):
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


def our_distribution(logits, temperature, top_p, monkeypatch):
    """The exact distribution sample() draws from: torch.multinomial's input, caught on its way in."""
    seen = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, *a, **k: seen.append(probs) or real(probs, *a, **k))
    sample(logits, temperature, top_p)
    monkeypatch.setattr(torch, "multinomial", real)
    return seen[0]


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_sampling_draws_from_transformers_filtered_distribution(temperature, top_p, monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(3, 257_216) * 3  # the real vocabulary's width, where float sums round the most
    ours = our_distribution(logits, temperature, top_p, monkeypatch)
    torch.testing.assert_close(ours, transformers_distribution(logits, temperature, top_p), atol=1e-6, rtol=0)


def test_top_p_one_filters_nothing(monkeypatch):
    torch.manual_seed(1)
    logits = torch.randn(2, 257_216) * 3
    assert (our_distribution(logits, 1.0, 1.0, monkeypatch) > 0).all()


def test_ids_past_the_tokenizer_are_never_produced_greedy_or_sampled(checkpoint, image):
    from test_model import load_ours

    model, processor = load_ours(checkpoint("v1_mqa"))
    vocab = len(processor.tokenizer)
    assert model.config.text_config.vocab_size > vocab  # padding rows exist
    head = model.language_model.lm_head.weight
    with torch.no_grad():
        head[vocab:] = head[:vocab].abs().max() * 50  # the padding rows now win every argmax
        inputs = processor(["caption en"], [image])
        for temperature in (0.0, 1.0):
            steps = generate(model, inputs, 8, temperature, 1.0, stop_ids=(), vocab=vocab,
                             generator=torch.Generator().manual_seed(0))
            assert all(int(token) < vocab for token, _ in steps)


def stream(tokenizer, ids) -> list[str | None]:
    """The pieces TextStream gives (the CLI's --stream and the server's streams), with None where one token ends
    (not a string: any string may be a token's text)."""
    written = []
    pieces = TextStream(tokenizer)
    for n in range(1, len(ids) + 1):
        written += [pieces.add(ids[:n]), None]
    return written + [pieces.close(tokenizer.decode(ids, skip_special_tokens=True))]


def check_stream(tokenizer, ids):
    final = tokenizer.decode(ids, skip_special_tokens=True)
    written = stream(tokenizer, ids)
    assert "".join(w for w in written if w is not None) == final
    so_far = ""
    for piece in written:  # after every token, what was given is the beginning of the final text
        so_far += piece or ""
        assert final.startswith(so_far)


def token_ids(tokenizer) -> st.SearchStrategy:
    """Ids a model may produce: byte-fallback tokens (often, to make runs, some of valid UTF-8), text pieces,
    <loc>/<seg> tokens and special tokens."""
    bytes_ = tokenizer.convert_tokens_to_ids([f"<0x{i:02X}>" for i in range(256)])
    utf8 = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "é猫🐱".encode()]
    specials = list(tokenizer.all_special_ids)
    skip = set(bytes_) | set(specials)
    text = [i for i in [*range(min(2000, len(tokenizer))), *range(max(2000, len(tokenizer) - 1200), len(tokenizer))]
            if i not in skip]
    return st.lists(st.one_of(st.sampled_from(bytes_), st.sampled_from(utf8), st.sampled_from(specials),
                              st.sampled_from(text)), max_size=24)


@pytest.fixture(scope="module")
def tiny_tokenizer(checkpoint):
    tokenizer = load_tokenizer(checkpoint("v1_mqa"))
    PaliGemmaProcessor(tokenizer, 28, 4)  # adds <loc>, <seg> and <image> as the command line does
    return tokenizer, token_ids(tokenizer)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_streamed_text_is_always_the_beginning_of_the_final_text(tiny_tokenizer, data):
    tokenizer, ids = tiny_tokenizer
    check_stream(tokenizer, data.draw(ids))


REAL_TOKENIZER = os.environ.get("PALIGEMMA_TEST_TOKENIZER")  # the real Gemma tokenizer.json; .ci/run fetches it


@pytest.fixture(scope="module")
def real_tokenizer(tmp_path_factory):
    if not REAL_TOKENIZER:
        pytest.skip("PALIGEMMA_TEST_TOKENIZER is not set (.ci/run sets it to the real Gemma tokenizer.json)")
    folder = tmp_path_factory.mktemp("gemma-tokenizer")
    (folder / "tokenizer.json").symlink_to(Path(REAL_TOKENIZER).resolve())
    config = Path(REAL_TOKENIZER).with_name("tokenizer_config.json")
    if config.is_file():
        (folder / "tokenizer_config.json").symlink_to(config.resolve())
    tokenizer = load_tokenizer(folder)
    PaliGemmaProcessor(tokenizer, 224, 256)  # adds PaliGemma's <loc>, <seg> and <image> to Gemma's tokens
    assert len(tokenizer) == 257_153 and tokenizer.convert_tokens_to_ids("<image>") == 257_152
    assert tokenizer.convert_tokens_to_ids(["<loc0000>", "<seg127>"]) == [256_000, 257_151]
    return tokenizer, token_ids(tokenizer)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_streamed_text_is_the_final_texts_beginning_with_the_real_gemma_tokenizer(real_tokenizer, data):
    tokenizer, ids = real_tokenizer
    check_stream(tokenizer, data.draw(ids))


def test_a_budget_that_cuts_an_emoji_after_a_cjk_character_streams_what_the_answer_says(real_tokenizer):
    tokenizer, _ = real_tokenizer
    text = tokenizer.convert_tokens_to_ids(["▁a"])  # a text token, then the byte tokens of 乊 and half of 🐱
    ids = text + tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in "乊".encode() + "🐱".encode()[:2]])
    check_stream(tokenizer, ids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_logit_that_is_not_finite_in_any_row_stops_generation(dtype, bad, monkeypatch):
    logits = torch.zeros(3, 40, dtype=dtype)
    logits[1, 17] = bad
    monkeypatch.setattr(generation, "prefill", lambda *args: logits)
    with pytest.raises(NotFinite):
        next(generate(None, {"input_ids": torch.zeros(3, 4, dtype=torch.long)}, 5))
    logits[1, 17] = torch.finfo(dtype).max  # the largest finite value is an answer
    assert next(generate(None, {"input_ids": torch.zeros(3, 4, dtype=torch.long)}, 5))[0].tolist() == [0, 17, 0]
    logits[1] = torch.finfo(dtype).max  # and so is a row of them (in float32 their sum overflows: pick looks again)
    assert next(generate(None, {"input_ids": torch.zeros(3, 4, dtype=torch.long)}, 5))[0].tolist() == [0, 0, 0]
