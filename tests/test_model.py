"""Logits and generations against transformers' PaliGemmaForConditionalGeneration (eager attention, float32)."""

import pytest
import torch
from conftest import CHECKPOINTS

from generate import decode_one_token, generate, prefill
from modeling_gemma import GemmaConfig, attention_masks
from processing_paligemma import PaliGemmaProcessor
from utils import load_hf_model

PROMPT = "caption en"
DECODE_STEPS = 10


def load_ours(folder, dtype=torch.float32):
    model, tokenizer = load_hf_model(folder, "cpu", dtype, verbose=False)
    processor = PaliGemmaProcessor.from_folder(folder, tokenizer, model.config.vision_config.image_size,
                                               model.config.num_image_tokens)
    return model, processor


def reference_inputs(processor, image, prompt=PROMPT):
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    inputs.pop("labels", None)
    return inputs


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_prefill_logits_match_transformers_at_every_position(name, checkpoint, reference, image):
    ref, ref_processor = reference(name)
    model, processor = load_ours(checkpoint(name))
    inputs = processor([PROMPT], [image])
    with torch.no_grad():
        expected = ref(**reference_inputs(ref_processor, image)).logits
        logits, _ = prefill(model, inputs, inputs["input_ids"].shape[1], all_logits=True)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_each_decode_step_logits_match_transformers(name, checkpoint, reference, image):
    ref, ref_processor = reference(name)
    model, processor = load_ours(checkpoint(name))
    inputs = processor([PROMPT], [image])
    L = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = ref.generate(**reference_inputs(ref_processor, image), max_new_tokens=DECODE_STEPS + 1,
                           min_new_tokens=DECODE_STEPS + 1, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
        tokens = out.sequences[:, L:]
        logits, cache = prefill(model, inputs, L + DECODE_STEPS + 1)
        torch.testing.assert_close(logits, out.logits[0], atol=1e-5, rtol=0)
        for step in range(1, DECODE_STEPS + 1):  # fed transformers' own tokens, so the paths cannot drift apart
            logits = decode_one_token(model, tokens[:, step - 1], cache)
            torch.testing.assert_close(logits, out.logits[step], atol=1e-5, rtol=0, msg=f"decode step {step}")


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("prompt", ["caption en", "answer en what is this?"])
def test_greedy_generation_is_token_identical_to_transformers(name, prompt, checkpoint, reference, image):
    ref, ref_processor = reference(name)
    model, processor = load_ours(checkpoint(name))
    inputs = processor([prompt], [image])
    with torch.no_grad():
        expected = ref.generate(**reference_inputs(ref_processor, image, prompt), max_new_tokens=20,
                                do_sample=False)[0, inputs["input_ids"].shape[1]:]
        ours = torch.cat([token for token, _ in generate(model, inputs, 20)])
    assert ours.tolist() == expected.tolist()
    assert len(set(ours.tolist())) > 3  # a constant output would prove little


def test_generation_stops_at_the_stop_token(checkpoint, image):
    model, processor = load_ours(checkpoint("v1_mqa"))
    inputs = processor([PROMPT], [image])
    with torch.no_grad():
        free = [int(t) for t, _ in generate(model, inputs, 12)]
        stopped = [int(t) for t, _ in generate(model, inputs, 12, stop_ids=(free[4],))]
    assert stopped == free[:free.index(free[4]) + 1]


def test_prefix_attends_bidirectionally_and_generated_tokens_causally():
    config = GemmaConfig(num_hidden_layers=1)
    key_valid = torch.ones(1, 4, dtype=torch.bool)
    prefix = torch.tensor([[True, True, False, False]])
    mask = attention_masks(config, key_valid, prefix, torch.arange(4), 4)[None][0, 0]
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_prefix_overrides_the_sliding_window_but_generated_tokens_keep_it():
    config = GemmaConfig(model_type="gemma2", num_hidden_layers=2, sliding_window=2,
                         layer_types=["sliding_attention", "full_attention"])
    key_valid = torch.tensor([[False, True, True, True, True, True]])  # one left pad
    prefix = torch.tensor([[True, True, True, True, False, False]])
    sliding = attention_masks(config, key_valid, prefix, torch.arange(6), 6)[2][0, 0]
    expected = torch.tensor([[0, 1, 1, 1, 0, 0],
                             [0, 1, 1, 1, 0, 0],
                             [0, 1, 1, 1, 0, 0],
                             [0, 1, 1, 1, 0, 0],
                             [0, 0, 0, 1, 1, 0],  # window 2: itself and one key back
                             [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(sliding, expected)


def test_image_token_count_must_match_the_image_features(checkpoint, image):
    model, processor = load_ours(checkpoint("v1_mqa"))
    inputs = processor([PROMPT], [image])
    inputs["input_ids"] = inputs["input_ids"][:, 1:]  # one <image> slot short
    for key in ("attention_mask", "token_type_ids"):
        inputs[key] = inputs[key][:, 1:]
    with pytest.raises(ValueError, match="<image> tokens"), torch.no_grad():
        prefill(model, inputs, 20)


# Half precision: the reference is the float32 model. On these tiny models (|logits| < 1) transformers' own
# bfloat16 model lands 0.021 from its float32 one. A float16 model's CPU prefill computes in bfloat16 on purpose
# (kernels.prefill_dtype: several times faster), so both half dtypes get the same bound: twice that distance.
HALF_BOUND = 0.04
KERNEL_PATHS = {
    "default": {},
    "no compiled kernels": {"library": lambda: None},
    "matrix products only": {"MAX_GEMV_ROWS": 0},  # the path of a long prompt, here on a short one
}


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["v1_mqa", "v2_gqa"])
def test_half_precision_logits_stay_near_float32(name, dtype, path, checkpoint, image, monkeypatch):
    import kernels

    for attribute, value in KERNEL_PATHS[path].items():
        monkeypatch.setattr(kernels, attribute, value)
    model32, processor = load_ours(checkpoint(name))
    model16, _ = load_ours(checkpoint(name), dtype)
    inputs = processor([PROMPT], [image])
    L = inputs["input_ids"].shape[1]
    with torch.no_grad():
        exact, cache32 = prefill(model32, inputs, L + 4, all_logits=True)
        half, cache16 = prefill(model16, inputs, L + 4, all_logits=True)
        steps = [(exact[:, -1], half[:, -1])]
        token = exact[:, -1].argmax(-1)
        for _ in range(3):
            steps.append((decode_one_token(model32, token, cache32), decode_one_token(model16, token, cache16)))
            assert steps[-1][1].dtype == dtype  # decoding runs in the model's own dtype
            token = steps[-1][0].argmax(-1)
    torch.testing.assert_close(half.float(), exact, atol=HALF_BOUND, rtol=0)
    for exact_step, half_step in steps:
        torch.testing.assert_close(half_step.float(), exact_step, atol=HALF_BOUND, rtol=0)


def test_attention_in_query_chunks_matches_transformers(checkpoint, reference, image, monkeypatch):
    import modeling_gemma

    monkeypatch.setattr(modeling_gemma, "QUERY_CHUNK", 3)  # the 896-px path, on a 21-token prompt
    ref, ref_processor = reference("v2_448style")
    model, processor = load_ours(checkpoint("v2_448style"))
    inputs = processor([PROMPT], [image])
    with torch.no_grad():
        expected = ref(**reference_inputs(ref_processor, image)).logits
        logits, _ = prefill(model, inputs, inputs["input_ids"].shape[1], all_logits=True)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
