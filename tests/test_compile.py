"""The compiled decode step (--compile, for CUDA graphs): traceable whole, equal to the eager step, and a clean
fallback wherever it cannot be used. The CUDA run itself needs a GPU; these prove what can be proved on the CPU."""

import pytest
import torch
from test_model import PROMPT, load_ours

import generate
from generate import compile_decode, decode_forward, decode_one_token, prefill


def greedy_logits(model, inputs, forward, steps=5):
    """Logits of the prefill and of each greedy decode step, with the given step function."""
    logits, cache = prefill(model, inputs, inputs["input_ids"].shape[1] + steps)
    out = [logits]
    for _ in range(steps):
        out.append(decode_one_token(model, out[-1].argmax(-1), cache, forward))
    return torch.stack(out)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_decode_step_compiles_as_one_graph_and_matches_eager(backend, checkpoint, image):
    model, processor = load_ours(checkpoint("v2_gqa"))
    inputs = processor([PROMPT], [image])
    compiled = torch.compile(decode_forward, backend=backend, fullgraph=True, dynamic=False)  # no graph breaks
    with torch.no_grad():
        eager = greedy_logits(model, inputs, decode_forward)
        steps = greedy_logits(model, inputs, compiled)
    torch.testing.assert_close(steps, eager, atol=1e-5, rtol=0)


def test_decode_step_keeps_its_shapes_from_token_to_token(checkpoint, image):
    model, processor = load_ours(checkpoint("v1_mqa"))
    inputs = processor([PROMPT], [image])
    seen = set()

    def recording(model, *args):
        seen.add(tuple(tuple(a.shape) for a in args))
        return decode_forward(model, *args)

    with torch.no_grad():
        greedy_logits(model, inputs, recording)
    assert len(seen) == 1  # so one compiled graph, or one CUDA graph, serves every step


def test_compile_on_the_cpu_keeps_the_eager_step_and_says_why():
    messages = []
    assert compile_decode(torch.device("cpu"), messages.append) is decode_forward
    assert "CUDA only" in messages[0]


def test_a_step_that_fails_to_compile_falls_back_to_eager(checkpoint, image, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(generate.torch, "compile", lambda *a, **k: broken)
    messages = []
    forward = compile_decode(torch.device("cuda"), messages.append)  # the CUDA policy, run here on CPU tensors
    model, processor = load_ours(checkpoint("v1_mqa"))
    inputs = processor([PROMPT], [image])
    with torch.no_grad():
        torch.testing.assert_close(greedy_logits(model, inputs, forward), greedy_logits(model, inputs, decode_forward),
                                   atol=0, rtol=0)
    assert any("decoding eagerly" in m for m in messages)
