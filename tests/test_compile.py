"""The compiled decode step (--compile, for CUDA graphs): traceable whole, equal to the eager step, compiled once
per process across prompt lengths, and a clean fallback wherever it cannot be used. The CUDA run itself needs a
GPU; these prove what can be proved on the CPU, on the plain model (what CUDA runs: kernels.accelerate is for the
CPU)."""

import pytest
import torch
from conftest import random_image
from test_model import PROMPT, load_ours, teacher_forced

from paligemma import generate
from paligemma.generate import compile_decode, decode_one_token, prefill


def greedy_logits(model, inputs, step, steps=5):
    """Logits of the prefill and of each greedy decode step, with the given step function."""
    out = [prefill(model, inputs, steps)]
    input_pos = torch.tensor([inputs["input_ids"].shape[1]])
    for _ in range(steps):
        out.append(step(model, out[-1].argmax(-1), input_pos))
        input_pos += 1
    return torch.stack(out)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_decode_step_compiles_as_one_graph_and_matches_eager(backend, checkpoint, image):
    model, processor = load_ours(checkpoint("v2_gqa"), graph="plain")
    inputs = processor([PROMPT], [image])
    compiled = torch.compile(decode_one_token, backend=backend, fullgraph=True, dynamic=False)  # no graph breaks
    with torch.no_grad():
        eager = greedy_logits(model, inputs, decode_one_token)
        steps = greedy_logits(model, inputs, compiled)
    torch.testing.assert_close(steps, eager, atol=1e-5, rtol=0)


def test_the_step_compiles_once_per_batch_size_across_prompts_of_other_lengths(checkpoint):
    from torch._dynamo.backends.registry import lookup_backend

    graphs, aot_eager = [], lookup_backend("aot_eager")

    def counting(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    model, processor = load_ours(checkpoint("v1_mqa"), graph="plain")
    compiled = torch.compile(decode_one_token, backend=counting, fullgraph=True, dynamic=False)
    prompts = ["caption en", "answer en what is in the picture?", "detect cat", "caption en", "detect dog ; cat"]
    lengths = set()
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            inputs = processor([prompt], [random_image(30 + i, 20, seed=i)])
            lengths.add(inputs["input_ids"].shape[1])
            torch.testing.assert_close(greedy_logits(model, inputs, compiled, 3),
                                       greedy_logits(model, inputs, decode_one_token, 3), atol=1e-5, rtol=0)
        assert len(lengths) == 3 and len(graphs) == 1
        pair = processor(prompts[:2], [random_image(25, 25, seed=7)] * 2)  # a batch run: one more batch size
        for _ in range(2):
            torch.testing.assert_close(greedy_logits(model, pair, compiled, 3),
                                       greedy_logits(model, pair, decode_one_token, 3), atol=1e-5, rtol=0)
    assert len(graphs) == 2


def test_decode_step_keeps_its_shapes_from_token_to_token(checkpoint, image):
    model, processor = load_ours(checkpoint("v1_mqa"), graph="plain")
    inputs = processor([PROMPT], [image])
    seen = set()

    def recording(model, *args):
        seen.add(tuple(tuple(a.shape) for a in args))
        return decode_one_token(model, *args)

    with torch.no_grad():
        greedy_logits(model, inputs, recording)
    assert len(seen) == 1  # so one compiled graph, or one CUDA graph, serves every step


def test_compile_on_the_cpu_keeps_the_eager_step_and_says_why():
    messages = []
    assert compile_decode(torch.device("cpu"), messages.append) is decode_one_token
    assert "CUDA only" in messages[0]


def test_a_step_that_fails_to_compile_falls_back_to_eager(checkpoint, image, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(generate.torch, "compile", lambda *a, **k: broken)
    messages = []
    step = compile_decode(torch.device("cuda"), messages.append)  # the CUDA policy, run here on CPU tensors
    model, processor = load_ours(checkpoint("v1_mqa"), graph="plain")
    inputs = processor([PROMPT], [image])
    tokens = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        eager = teacher_forced(model, inputs, tokens)
        fallback = [prefill(model, inputs, 3)]
        input_pos = torch.tensor([inputs["input_ids"].shape[1]])
        for i in range(2):
            fallback.append(step(model, tokens[:, i], input_pos))
            input_pos += 1
    torch.testing.assert_close(torch.stack(fallback), torch.stack(eager), atol=0, rtol=0)
    assert any("decoding eagerly" in m for m in messages)
