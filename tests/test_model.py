"""Logits and generations against transformers' PaliGemmaForConditionalGeneration (eager attention): the plain
model, the accelerated one users run, in float32 and in half precision."""

import pytest
import tiny
import torch
from conftest import CHECKPOINTS, random_image

from paligemma import kernels
from paligemma.generate import decode_one_token, generate, prefill
from paligemma.modeling_gemma import GemmaConfig
from paligemma.modeling_paligemma import prefix_lm_masks
from paligemma.processing_paligemma import PaliGemmaProcessor
from paligemma.utils import load_hf_model

PROMPT = "caption en"
DECODE_STEPS = 10
# "accelerated" swaps in kernels.py's modules whatever the dtype: in float32 they compute what the plain modules do,
# so the 1e-5 comparison checks that the swap is wired right (every q, k, v, gate and up in its place).
GRAPHS = {"plain": lambda model: model, "accelerated": kernels.swap_modules}


def load_ours(folder, dtype=torch.float32, graph="accelerated"):
    """This project's model as users run it (kernels.accelerate after loading), and its processor."""
    model, tokenizer = load_hf_model(folder, "cpu", dtype, verbose=False)
    model = GRAPHS[graph](model) if dtype == torch.float32 else kernels.accelerate(model)
    processor = PaliGemmaProcessor.from_folder(folder, tokenizer, model.config.vision_config.image_size,
                                               model.config.num_image_tokens)
    return model, processor


def reference_inputs(processor, image, prompt=PROMPT):
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    inputs.pop("labels", None)
    return inputs


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_prefill_logits_match_transformers_at_every_position(name, graph, checkpoint, reference, image):
    ref, ref_processor = reference(name)
    model, processor = load_ours(checkpoint(name), graph=graph)
    inputs = processor([PROMPT], [image])
    with torch.no_grad():
        expected = ref(**reference_inputs(ref_processor, image)).logits
        logits = prefill(model, inputs, 0, all_logits=True)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def teacher_forced(model, inputs, tokens) -> list[torch.Tensor]:
    """The prefill's last logits, then each decode step's, fed the given tokens (B, n)."""
    steps = [prefill(model, inputs, tokens.shape[1])]
    input_pos = torch.tensor([inputs["input_ids"].shape[1]])
    for i in range(tokens.shape[1] - 1):
        steps.append(decode_one_token(model, tokens[:, i], input_pos))
        input_pos += 1
    return steps


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_each_decode_step_logits_match_transformers(name, graph, checkpoint, reference, image):
    ref, ref_processor = reference(name)
    model, processor = load_ours(checkpoint(name), graph=graph)
    with torch.no_grad():
        out = ref.generate(**reference_inputs(ref_processor, image), max_new_tokens=DECODE_STEPS + 1,
                           min_new_tokens=DECODE_STEPS + 1, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
        tokens = out.sequences[:, -(DECODE_STEPS + 1):]  # fed transformers' own tokens: the paths cannot drift apart
        for step, (ours, theirs) in enumerate(zip(teacher_forced(model, processor([PROMPT], [image]), tokens),
                                                  out.logits)):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0, msg=f"decode step {step}")


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
    key_valid = torch.ones(1, 4, dtype=torch.bool)
    prefix = torch.tensor([[True, True, False, False]])
    mask, sliding = prefix_lm_masks(key_valid, prefix, torch.arange(4), None)
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected) and sliding is None


def test_prefix_overrides_the_sliding_window_but_generated_tokens_keep_it():
    key_valid = torch.tensor([[False, True, True, True, True, True]])  # one left pad
    prefix = torch.tensor([[True, True, True, True, False, False]])
    full, sliding = prefix_lm_masks(key_valid, prefix, torch.arange(6), 2)
    expected = torch.tensor([[0, 1, 1, 1, 0, 0],
                             [0, 1, 1, 1, 0, 0],
                             [0, 1, 1, 1, 0, 0],
                             [0, 1, 1, 1, 0, 0],
                             [0, 0, 0, 1, 1, 0],  # window 2: itself and one key back
                             [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(sliding[0, 0], expected)
    assert full[0, 0, 5].tolist() == [False, True, True, True, True, True]


def test_a_decode_step_reads_one_row_of_the_mask_over_the_whole_cache():
    key_valid = torch.tensor([[True, True, True, False]])
    prefix = torch.tensor([[True, True, False, False]])
    mask, _ = prefix_lm_masks(key_valid, prefix, torch.tensor([2]), None)
    assert mask.shape == (1, 1, 1, 4) and mask[0, 0, 0].tolist() == [True, True, True, False]


def test_a_gemma_config_ignores_the_gemma2_attention_keys_but_not_the_final_soft_cap_as_transformers_does():
    config = GemmaConfig.from_dict({"model_type": "gemma", "attn_logit_softcapping": 50.0, "sliding_window": 4,
                                    "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 7})
    assert (config.attn_logit_softcapping, config.final_logit_softcapping, config.sliding_window,
            config.query_pre_attn_scalar) == (None, 30.0, None, None)


def test_image_token_count_must_match_the_image_features(checkpoint, image):
    model, processor = load_ours(checkpoint("v1_mqa"))
    inputs = processor([PROMPT], [image])
    inputs["input_ids"] = inputs["input_ids"][:, 1:]  # one <image> slot short
    for key in ("attention_mask", "token_type_ids"):
        inputs[key] = inputs[key][:, 1:]
    with pytest.raises(ValueError, match="<image> tokens"), torch.no_grad():
        prefill(model, inputs, 20)


# Half precision, the accelerated model users run, against transformers' model of the same dtype (eager). The
# bound is twice the distance of transformers' own bfloat16 model from its float32 model on the same input
# (0.014-0.028 here, |logits| < 1): a prompt computes in bfloat16 where the CPU multiplies it natively (kernels.py),
# so both half dtypes are held to what bfloat16 arithmetic itself costs; elsewhere in float32, closer still.
KERNEL_PATHS = {
    "default": {},
    "no compiled kernels": {"library": lambda: None},
    "matrix products only": {"MAX_GEMV_ROWS": 0},  # the path of a long prompt
    "prompts in float32": {"prompt_dtype": lambda: torch.float32},  # CPUs without bfloat16 arithmetic
    "prompts in bfloat16": {"prompt_dtype": lambda: torch.bfloat16},  # CPUs with it
}


@pytest.fixture(scope="module")
def bfloat16_distance(checkpoint):
    """name -> the largest |logit| gap between transformers' bfloat16 and float32 models at prefill."""
    measured = {}

    def get(name):
        if name not in measured:
            (model32, processor), (model16, _) = (tiny.load_reference(checkpoint(name), dtype)
                                                  for dtype in (torch.float32, torch.bfloat16))
            inputs = reference_inputs(processor, random_image(51, 37))  # the `image` fixture's picture
            with torch.no_grad():
                measured[name] = (model16(**inputs).logits.float() - model32(**inputs).logits).abs().max().item()
        return measured[name]

    return get


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["v1_odd", "v2_odd"])
def test_half_precision_logits_stay_near_transformers_in_the_same_dtype(name, dtype, path, checkpoint, image,
                                                                        bfloat16_distance, monkeypatch):
    for attribute, value in KERNEL_PATHS[path].items():
        monkeypatch.setattr(kernels, attribute, value)
    bound = 2 * bfloat16_distance(name)
    ref, ref_processor = tiny.load_reference(checkpoint(name), dtype)
    model, processor = load_ours(checkpoint(name), dtype)
    inputs = processor([PROMPT], [image])
    with torch.no_grad():
        expected = ref(**reference_inputs(ref_processor, image)).logits
        out = ref.generate(**reference_inputs(ref_processor, image), max_new_tokens=4, min_new_tokens=4,
                           do_sample=False, output_logits=True, return_dict_in_generate=True)
        torch.testing.assert_close(prefill(model, inputs, 0, all_logits=True).float(), expected.float(),
                                   atol=bound, rtol=0)
        steps = teacher_forced(model, inputs, out.sequences[:, -4:])
    for step, (ours, theirs) in enumerate(zip(steps, out.logits)):
        torch.testing.assert_close(ours.float(), theirs.float(), atol=bound, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("prompt_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_computes_a_prompt_in_the_prompt_dtype_and_decodes_in_its_own(dtype, prompt_dtype,
                                                                                          checkpoint, image,
                                                                                          monkeypatch):
    monkeypatch.setattr(kernels, "prompt_dtype", lambda: prompt_dtype)
    model, processor = load_ours(checkpoint("v1_odd"), dtype)
    inputs = processor(["answer en " + "what is in the picture? " * 3], [image])
    assert inputs["input_ids"].shape[1] > kernels.MAX_GEMV_ROWS
    with torch.no_grad():
        logits = prefill(model, inputs, 2)
        step = decode_one_token(model, logits.argmax(-1), torch.tensor([inputs["input_ids"].shape[1]]))
    assert (logits.dtype, step.dtype) == (prompt_dtype, dtype)


def test_attention_in_query_chunks_matches_transformers(checkpoint, reference, image, monkeypatch):
    from paligemma import modeling_gemma

    monkeypatch.setattr(modeling_gemma, "QUERY_CHUNK", 3)  # the 896-px path, on a 21-token prompt
    ref, ref_processor = reference("v2_448style")
    model, processor = load_ours(checkpoint("v2_448style"))
    inputs = processor([PROMPT], [image])
    with torch.no_grad():
        expected = ref(**reference_inputs(ref_processor, image)).logits
        logits = prefill(model, inputs, 0, all_logits=True)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
