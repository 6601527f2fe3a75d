"""The CPU kernels and `kernels.accelerate`: matrix-vector products, a prompt's dtype and its widened products,
fused groups, and the fallbacks."""

import os
import shutil
import subprocess
import sys

import pytest
import tiny
import torch
import torch.nn.functional as F
from conftest import CHECKPOINTS, ROOT

from paligemma import clib, decoder, kernels, modeling_gemma, modeling_siglip
from paligemma.generate import decode_one_token, pick, prefill
from paligemma.quantization import SCHEMES, QuantizedWeight, quantize
from paligemma.utils import load_hf_model

HALF = [torch.float16, torch.bfloat16]


@pytest.fixture
def compiled():
    """The compiled kernels; where they cannot be built the test skips, unless PALIGEMMA_REQUIRE_KERNELS=1 (as in
    CI), where the build's failure fails it."""
    if kernels.library() is None:  # with PALIGEMMA_REQUIRE_KERNELS=1, library() has raised instead
        pytest.skip("no C compiler with AVX2 here: the PyTorch fallback is what runs")
    return kernels.library()


@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@pytest.mark.parametrize("shape", [(13, 37), (8, 16), (1, 5), (64, 2048), (1000, 72)])
@pytest.mark.parametrize("rows", [1, 3, 4, 6, 9])
def test_gemv_equals_the_float32_product_for_any_shape(dtype, shape, rows, compiled):
    torch.manual_seed(0)
    weight, x = torch.randn(shape).to(dtype), torch.randn(rows, shape[1])
    (y,) = kernels.gemv([weight], x)
    torch.testing.assert_close(y, x @ weight.float().T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@pytest.mark.parametrize("quantized", [None, "int8", "int4"])
def test_a_rows_product_is_bit_identical_whatever_rows_share_the_pass(dtype, quantized, compiled):
    # A server decodes rows that joined at different times in one step: none may change another's numbers.
    torch.manual_seed(0)
    weight = torch.randn(45, 160).to(dtype)
    if quantized:
        weight = QuantizedWeight(45, 160, SCHEMES[quantized])
        weight.qweight, weight.scales = quantize(torch.randn(45, 160), weight.scheme)
    x = torch.randn(9, 160).to(dtype)
    for rows in range(1, 10):
        together = kernels.products(x[:rows], [weight], [None])[0]
        for i in range(rows):
            assert torch.equal(together[i], kernels.products(x[i:i + 1], [weight], [None])[0][0])


@pytest.mark.parametrize("dtype", HALF)
def test_gemv_of_several_weights_equals_each_alone(dtype, compiled):
    torch.manual_seed(0)
    weights = [torch.randn(n, 96).to(dtype) for n in (5, 40, 8, 17)]
    x = torch.randn(2, 96)
    for together, weight in zip(kernels.gemv(weights, x), weights):
        torch.testing.assert_close(together, kernels.gemv([weight], x)[0], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", HALF)
def test_gemv_reads_and_writes_half_precision_as_one_rounding_of_the_float32_sums(dtype, compiled):
    torch.manual_seed(0)
    weights = [torch.randn(n, 77).to(dtype) for n in (9, 33)]
    x = torch.randn(3, 77).to(dtype)
    for got, wide in zip(kernels.gemv(weights, x, dtype), kernels.gemv(weights, x.float())):
        assert got.dtype == dtype and torch.equal(got.view(torch.int16), wide.to(dtype).view(torch.int16))


@pytest.mark.parametrize("source, dtype", [(torch.float16, torch.bfloat16), (torch.float16, torch.float32),
                                           (torch.bfloat16, torch.float32)], ids=["f16-bf16", "f16-f32", "bf16-f32"])
def test_widening_rounds_every_half_precision_value_exactly_as_torch(source, dtype, compiled):
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)  # every value there is
    values = bits.view(source)
    values = values[~values.isnan()]
    out = kernels.widened(values[None], dtype)[0]
    as_int = torch.int16 if dtype.itemsize == 2 else torch.int32
    assert torch.equal(out.view(as_int), values.to(dtype).view(as_int))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_products_equal_f_linear_within_half_precision(dtype, rows):
    torch.manual_seed(0)
    weights = [(torch.randn(n, 64) / 8).to(dtype) for n in (32, 48)]  # nn.Linear's scale: outputs of about 1
    biases = [None, (torch.randn(48) / 8).to(dtype)]
    x = torch.randn(2, rows, 64).to(dtype)
    for got, weight, bias in zip(kernels.products(x, weights, biases), weights, biases):
        expected = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        assert got.dtype == dtype and got.shape == expected.shape
        torch.testing.assert_close(got.float(), expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("weight_dtype", HALF)
def test_many_rows_multiply_in_their_own_dtype_or_the_prompts_and_keep_it(weight_dtype):
    torch.manual_seed(0)
    weight, x = torch.randn(24, 40).to(weight_dtype), torch.randn(kernels.MAX_GEMV_ROWS + 1, 40)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        (y,) = kernels.products(x.to(dtype), [weight], [None])
        computed = dtype if dtype != torch.float16 else kernels.prompt_dtype()
        expected = F.linear(x.to(dtype).to(computed), weight.to(computed)).to(dtype)
        assert y.dtype == dtype and torch.equal(y, expected)


@pytest.mark.parametrize("prompt_dtype", [torch.float32, torch.bfloat16])
def test_a_short_prompt_computes_as_a_long_one_so_a_row_answers_alone_as_in_a_batch(prompt_dtype, monkeypatch):
    monkeypatch.setattr(kernels, "prompt_dtype", lambda: prompt_dtype)
    torch.manual_seed(0)
    weight, x = torch.randn(24, 40).half(), torch.randn(3, 5, 40)  # 5 positions: 5 rows alone, 15 together
    embedding = kernels.Embedding(torch.nn.Parameter(weight), torch.float16)
    assert embedding(torch.zeros(1, 5, dtype=torch.long)).dtype == prompt_dtype
    assert embedding(torch.zeros(3, 1, dtype=torch.long)).dtype == torch.float16  # a decode step of 3 rows
    for rows in (x[:1], x):
        (y,) = kernels.products(rows.to(prompt_dtype), [weight], [None])
        assert torch.equal(y, F.linear(rows.to(prompt_dtype), weight.to(prompt_dtype)))


@pytest.mark.parametrize("prompt_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", HALF)
def test_a_half_precision_embedding_gives_a_prompt_the_prompt_dtype_and_a_step_its_own(dtype, prompt_dtype,
                                                                                     monkeypatch):
    monkeypatch.setattr(kernels, "prompt_dtype", lambda: prompt_dtype)
    embedding = kernels.Embedding(torch.nn.Parameter(torch.randn(10, 4).to(dtype)), dtype)
    assert embedding(torch.zeros(1, kernels.MAX_GEMV_ROWS + 1, dtype=torch.long)).dtype == prompt_dtype
    assert embedding(torch.zeros(4, 1, dtype=torch.long)).dtype == dtype


@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@pytest.mark.parametrize("quantized", ["int8", "int4"])
def test_a_quantized_embedding_gives_the_rows_pytorch_dequantizes(dtype, quantized, compiled):
    torch.manual_seed(0)
    weight = QuantizedWeight(45, 77, SCHEMES[quantized])  # rows in every place of a tile, columns past a chunk
    weight.qweight, weight.scales = quantize(torch.randn(45, 77) * 3, weight.scheme)
    ids = torch.tensor([[0, 44, 41], [5, 6, 7]])
    assert torch.equal(kernels.Embedding(weight, dtype)(ids[:, :1]), weight.rows(ids[:, :1], dtype))
    assert torch.equal(kernels.quantized_rows(weight, ids, dtype), weight.rows(ids, dtype))
    with pytest.raises(IndexError):  # out of range: PyTorch's path, which says so
        kernels.quantized_rows(weight, torch.tensor([48]), dtype)


# What torch reports on each CPU class -> the dtype a prompt computes in: (capability, AVX512-BF16, AMX,
# ONEDNN_MAX_CPU_ISA, expected).
CPU_CLASSES = {
    "Sapphire Rapids": ("AVX512", True, True, "", torch.bfloat16),
    "Zen 4": ("AVX512", True, False, "", torch.bfloat16),
    "Ice Lake": ("AVX512", False, False, "", torch.float32),
    "an AVX2 laptop": ("AVX2", False, False, "", torch.float32),
    "Zen 4 held to AVX2": ("AVX2", True, False, "AVX2", torch.float32),
    "Zen 4 with only oneDNN held to AVX2": ("AVX512", True, False, "avx2", torch.float32),
    "Sapphire Rapids with oneDNN below bfloat16": ("AVX512", True, True, "AVX512_CORE_VNNI", torch.float32),
    "Sapphire Rapids with oneDNN at AMX": ("AVX512", True, True, "AVX512_CORE_AMX", torch.bfloat16),
}


@pytest.mark.parametrize("cpu", CPU_CLASSES)
def test_a_prompt_computes_in_bfloat16_only_where_the_cpu_multiplies_it_natively(cpu, monkeypatch):
    capability, bf16, amx, isa, expected = CPU_CLASSES[cpu]
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    kernels.prompt_dtype.cache_clear()
    try:
        assert kernels.prompt_dtype() == expected
    finally:
        kernels.prompt_dtype.cache_clear()


AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.mark.parametrize("held", [False, True], ids=["as the CPU is", "held to AVX2"])
def test_this_cpus_prompt_dtype_follows_its_own_bfloat16_instructions_and_the_avx2_limits(held):
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"}) and "avx512f" in flags
    code = "import sys; sys.path.insert(0, sys.argv[1]); from paligemma import kernels; print(kernels.prompt_dtype())"
    env = {k: v for k, v in os.environ.items() if k not in AVX2} | (AVX2 if held else {})
    result = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.stdout.strip() == str(torch.bfloat16 if native and not held else torch.float32), result.stderr


@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@pytest.mark.parametrize("with_up", [False, True])
def test_fused_gelu_equals_torch_within_its_dtype(dtype, with_up):
    torch.manual_seed(0)
    x, up = (torch.randn(7, 45).to(dtype) * 3 for _ in range(2))
    expected = modeling_siglip.GELUTanh()(x.float(), up.float() if with_up else None)
    got = kernels.GELUTanh()(x, up if with_up else None)
    assert got.dtype == dtype
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.02, "rtol": 0.01}
    torch.testing.assert_close(got.float(), expected, **tolerance)


@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 2048), (2, 5, 37), (1, 40, 64)])
def test_rms_norm_kernel_equals_gemma_rms_norm_within_its_dtype(dtype, weight_dtype, shape, compiled,
                                                                     monkeypatch):
    torch.manual_seed(0)
    plain = modeling_gemma.GemmaRMSNorm(shape[-1], 1e-6)
    plain.weight.data = torch.randn(shape[-1]).to(weight_dtype)
    x = (torch.randn(shape) * 4).to(dtype)
    expected = plain(x)
    monkeypatch.setattr(modeling_gemma.GemmaRMSNorm, "forward", None)  # the kernel's own result, not PyTorch's
    got = kernels.RMSNorm(plain.weight, plain.eps)(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected)


def cache_and_mask(B, n_kv, T, hd, dtype, masked_rows=()):
    """Keys and values as the KV cache hands them over (the first T of 2T positions) and a random mask that lets
    each row read at least one position, except the rows in masked_rows, which may read none."""
    k_cache, v_cache = (torch.randn(B, n_kv, 2 * T, hd).to(dtype) for _ in range(2))
    mask = torch.rand(B, 1, 1, T) < 0.7
    mask[..., -1] = True
    mask[list(masked_rows)] = False
    return k_cache[:, :, :T], v_cache[:, :, :T], mask


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("heads", [(8, 1), (4, 2), (2, 2), (12, 2)])
@pytest.mark.parametrize("T, hd", [(1, 256), (37, 12), (300, 256)])
@pytest.mark.parametrize("softcap", [None, 50.0])
def test_decode_attention_kernel_equals_attend_within_half_precision(dtype, heads, T, hd, softcap, compiled,
                                                                    monkeypatch):
    torch.manual_seed(0)
    (n_heads, n_kv), B = heads, 3
    q = torch.randn(B, n_heads, 1, hd).to(dtype)
    k, v, mask = cache_and_mask(B, n_kv, T, hd, dtype, masked_rows=[1])
    expected = modeling_gemma.attend(q, k, v, mask, hd**-0.5 * 4, softcap)
    monkeypatch.setattr(modeling_gemma.Attend, "forward", None)  # the kernel's own result, not PyTorch's
    got = kernels.Attend(hd**-0.5 * 4, softcap)(q, k, v, mask)
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype, quantize", [(torch.float16, None), (torch.bfloat16, None), (torch.float16, "int8"),
                                             (torch.bfloat16, "int4")])
@pytest.mark.parametrize("name", ["v1_mqa", "v1_mha", "v2_gqa", "v1_odd", "v2_28bstyle"])
def test_a_decode_steps_one_call_layers_give_the_modules_logits_bit_for_bit(name, dtype, quantize, checkpoint,
                                                                            compiled, monkeypatch):
    model = kernels.accelerate(load_hf_model(checkpoint(name), "cpu", dtype, verbose=False, quantize=quantize)[0])
    assert type(model.language_model.model) is decoder.Decoder and model.language_model.model.specs(dtype)

    def logits():  # two rows, one left-padded; steps at a shared position, then at each row's own
        with torch.no_grad():
            model.setup_caches(2, 16)
            out = [model(torch.tensor([[0, 2, 40, 41], [2, 43, 44, 45]]), torch.arange(4),
                         attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))[:, -1]]
            for step in range(4):
                positions = torch.tensor([4 + step]) if step < 2 else torch.tensor([[4 + step], [7 + step]])
                out.append(decode_one_token(model, out[-1].argmax(-1), positions))
        return torch.stack(out)

    fused = logits()
    monkeypatch.setattr(decoder.Decoder, "forward", modeling_gemma.GemmaModel.forward)
    torch.testing.assert_close(logits(), fused, atol=0, rtol=0)


def test_a_decode_step_past_the_kv_cache_is_an_error_not_a_write_past_it(checkpoint, compiled):
    model = kernels.accelerate(load_hf_model(checkpoint("v1_mqa"), "cpu", torch.float16, verbose=False)[0])
    model.setup_caches(2, 8)
    decoder = model.language_model.model
    caches = [layer.self_attn.kv_cache.k_cache.clone() for layer in decoder.layers]
    T = caches[0].shape[2]
    x = torch.ones(2, 1, model.config.text_config.hidden_size).half()
    with torch.no_grad(), pytest.raises(IndexError, match="outside the KV cache"):
        decoder(x, torch.tensor([[3], [T]]), torch.tensor([[3], [T]]), torch.ones(2, 1, 1, T, dtype=torch.bool))
    assert all(torch.equal(layer.self_attn.kv_cache.k_cache, cache) for layer, cache in zip(decoder.layers, caches))


def gemv_calls(monkeypatch) -> list[int]:
    """Spy on kernels.gemv: the list receives the number of weights of each call."""
    calls, real = [], kernels.gemv
    monkeypatch.setattr(kernels, "gemv", lambda weights, *rest: calls.append(len(weights)) or real(weights, *rest))
    return calls


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["v1_mqa", "v1_gqa", "v1_mha", "v2_gqa"])
def test_q_k_v_and_gate_up_are_multiplied_in_one_pass_in_every_layout_and_dtype(name, dtype, checkpoint, image,
                                                                                 compiled, monkeypatch):
    model, _ = load_hf_model(checkpoint(name), "cpu", dtype, verbose=False)
    assert_fused_and_one_pass_per_group(kernels.accelerate(model), monkeypatch)


def test_weights_used_in_place_from_a_bfloat16_file_fuse_too(tmp_path, compiled, monkeypatch):
    tiny.build_checkpoint(tmp_path, dtype=torch.bfloat16, **CHECKPOINTS["v2_gqa"])
    model, _ = load_hf_model(tmp_path, "cpu", torch.bfloat16, verbose=False)
    q = model.language_model.model.layers[0].self_attn.q_proj.weight
    assert q.untyped_storage().nbytes() > q.nbytes  # a view into the mapped shard, not a copy
    assert_fused_and_one_pass_per_group(kernels.accelerate(model), monkeypatch)


def assert_fused_and_one_pass_per_group(model, monkeypatch):
    layers = model.language_model.model.layers
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert isinstance(attn.qkv, kernels.Fused) and isinstance(mlp.gate_up, kernels.Fused)
        assert all(a is b for a, b in zip(attn.qkv.weights, (attn.q_proj.weight, attn.k_proj.weight,
                                                               attn.v_proj.weight)))
        assert all(a is b for a, b in zip(mlp.gate_up.weights, (mlp.gate_proj.weight, mlp.up_proj.weight)))
    for layer in model.vision_tower.vision_model.encoder.layers:
        assert isinstance(layer.self_attn.qkv, kernels.Fused) and len(layer.self_attn.qkv.weights) == 3
    # the modules' own decode step (decode.c's one-call decoder passes the same groups to the same C functions)
    monkeypatch.setattr(decoder.Decoder, "forward", modeling_gemma.GemmaModel.forward)
    calls = gemv_calls(monkeypatch)
    with torch.no_grad():
        model.setup_caches(1, 8)
        model(torch.tensor([[2, 40, 41]]), torch.arange(3), attention_mask=torch.ones(1, 3, dtype=torch.long))
        calls.clear()
        decode_one_token(model, torch.tensor([42]), torch.tensor([3]))
    # one pass each for q/k/v, o, gate/up and down in every layer, and one for the head
    assert calls == [3, 1, 2, 1] * len(layers) + [1]


def test_accelerate_leaves_a_model_under_no_kernels_as_it_is(checkpoint, monkeypatch):
    monkeypatch.setenv("PALIGEMMA_NO_KERNELS", "1")
    model, _ = load_hf_model(checkpoint("v1_mqa"), "cpu", torch.float16, verbose=False)
    assert not any(type(m).__module__ == "kernels" for m in kernels.accelerate(model).modules())


def test_an_accelerated_model_keeps_the_plain_models_parameter_names(checkpoint):
    model, _ = load_hf_model(checkpoint("v2_gqa"), "cpu", torch.bfloat16, verbose=False)
    names = [name for name, _ in model.named_parameters()]
    assert [name for name, _ in kernels.accelerate(model).named_parameters()] == names


def test_library_is_built_once_into_the_cache_and_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels.library.cache_clear()
    try:
        lib = kernels.library()
        built = list((tmp_path / "pytorch-paligemma").glob("kernels-*.so"))
        assert (lib is None) == (built == [])
        monkeypatch.setenv("PALIGEMMA_NO_KERNELS", "1")
        kernels.library.cache_clear()
        assert kernels.library() is None
    finally:
        kernels.library.cache_clear()


@pytest.mark.parametrize("library", ["compiled", "none"])
@pytest.mark.parametrize("dtype, weight_dtype", [(torch.bfloat16, torch.float16), (torch.float32, torch.float16),
                                                 (torch.float32, torch.bfloat16)], ids=["f16-bf16", "f16-f32",
                                                                                        "bf16-f32"])
def test_a_prompt_widens_a_weight_a_block_of_rows_at_a_time_with_the_same_products(dtype, weight_dtype, library,
                                                                                   monkeypatch, request):
    if library == "compiled":
        request.getfixturevalue("compiled")
    else:
        monkeypatch.setattr(kernels, "library", lambda: None)
    weight = torch.randn(50, 64).to(weight_dtype)
    x = torch.randn(20, 64).to(dtype)
    whole = kernels.widened_product(x, weight)
    monkeypatch.setattr(kernels, "SCRATCH_BYTES", dtype.itemsize * 12 * 64)  # blocks of 12 rows, the last of 2
    torch.testing.assert_close(kernels.widened_product(x, weight), whole, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(whole, F.linear(x, weight.to(dtype)), atol=0, rtol=0)


@pytest.mark.parametrize("gemv_rows", [kernels.MAX_GEMV_ROWS, 0], ids=["default", "matrix products only"])
@pytest.mark.parametrize("rows", [9, 300])
@pytest.mark.parametrize("weight_dtype", [*HALF, "int8", "int4"])
def test_widened_products_equal_f_linear_in_float32_at_odd_shapes(weight_dtype, rows, gemv_rows, monkeypatch):
    """A prompt in float32 against F.linear of the same weights in float32: 45 x 77 weights (odd rows, columns
    that fill no vector, tile or chunk), widened 12 rows at a time (the last block 9), with or without a bias."""

    monkeypatch.setattr(kernels, "MAX_GEMV_ROWS", gemv_rows)
    monkeypatch.setattr(kernels, "SCRATCH_BYTES", 4 * 12 * 77)
    torch.manual_seed(rows)
    full = torch.randn(45, 77) / 8
    if weight_dtype in SCHEMES:
        weight = QuantizedWeight(45, 77, SCHEMES[weight_dtype])
        weight.qweight, weight.scales = quantize(full, weight.scheme)
        exact = weight.dequantize(torch.float32)
    else:
        weight = full.to(weight_dtype)
        exact = weight.float()
    bias, x = (torch.randn(45) / 8).to(torch.bfloat16), torch.randn(2, rows, 77)
    for b in (None, bias):
        (y,) = kernels.products(x, [weight], [b])
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, F.linear(x, exact, None if b is None else b.float()), atol=1e-5, rtol=1e-5)


def test_scratch_buffer_made_in_inference_mode_is_reused_outside_it(monkeypatch):
    monkeypatch.setattr(kernels, "library", lambda: None)  # the PyTorch conversion, which writes the scratch in place
    monkeypatch.setattr(kernels, "_scratch", {})
    layer = kernels.Linear(torch.nn.Parameter(torch.randn(4096, 64).to(torch.float16)), None)
    x = torch.randn(20, 64, dtype=torch.float16)
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), first, atol=0, rtol=0)


def test_a_prompt_after_a_longer_one_reuses_the_cache(checkpoint, image):
    from test_model import PROMPT, load_ours

    model, processor = load_ours(checkpoint("v1_mqa"))
    with torch.no_grad():
        prefill(model, processor(["answer en " + "what is it? " * 5], [image]), 4)
        caches = [layer.self_attn.kv_cache.k_cache for layer in model.language_model.model.layers]
        prefill(model, processor([PROMPT], [image]), 4)
    assert all(a is layer.self_attn.kv_cache.k_cache for a, layer in zip(caches, model.language_model.model.layers))


@pytest.fixture
def broken_source(tmp_path, monkeypatch):
    """kernels built from a copy of the C files whose gemv.c has a syntax error, in a fresh cache."""
    for name in clib.C_FILES:
        (tmp_path / name).write_text((clib.SOURCES / name).read_text())
    source = tmp_path / "gemv.c"
    source.write_text(source.read_text() + "\nthis is not C;\n")
    monkeypatch.setattr(clib, "SOURCES", tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("PALIGEMMA_REQUIRE_KERNELS", raising=False)
    kernels.library.cache_clear()
    yield source
    kernels.library.cache_clear()


def test_kernels_that_do_not_build_are_a_note_with_the_compilers_first_error(broken_source, capsys):
    assert kernels.library() is None
    err = capsys.readouterr().err
    assert "note: the CPU kernels did not compile" in err and "error" in err.split("did not compile")[1]
    assert "slower" in err


def test_kernels_that_do_not_build_are_an_error_when_required(broken_source, monkeypatch):
    monkeypatch.setenv("PALIGEMMA_REQUIRE_KERNELS", "1")
    with pytest.raises(clib.KernelsUnavailable, match="did not compile"):
        kernels.library()


def test_the_command_line_fails_with_one_line_when_required_kernels_do_not_build(checkpoint, image, tmp_path):
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho 'gemv.c:1:1: error: this compiler is broken' >&2\nexit 1\n")
    compiler.chmod(0o755)
    photo = tmp_path / "photo.png"
    image.save(photo)
    env = {"CC": str(compiler), "XDG_CACHE_HOME": str(tmp_path / "cache"), "PALIGEMMA_REQUIRE_KERNELS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--model_path", str(checkpoint("v1_mqa")),
                             "--image_file_path", str(photo), "--dtype", "bfloat16"], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    assert lines[-1] == "error: the CPU kernels did not compile (gemv.c:1:1: error: this compiler is broken)"


@pytest.mark.skipif(os.environ.get("PALIGEMMA_MARCH") is not None, reason="this is the AVX2 run itself")
def test_the_avx2_build_passes_the_kernel_tests_too(tmp_path, compiled):
    """A CPU with AVX2 but no AVX-512 gets the other half of every #if in the C files: built for Haswell here, the
    kernel tests run against it as they run against this CPU's own build."""
    env = {**os.environ, "PALIGEMMA_MARCH": "haswell", "XDG_CACHE_HOME": str(tmp_path),
           "PALIGEMMA_REQUIRE_KERNELS": "1"}
    selection = "gemv or bfloat16 or gelu or rms_norm or attention or quantizer or dequantiz or product or widen"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", selection,
                             str(ROOT / "tests" / "test_kernels.py"), str(ROOT / "tests" / "test_quantization.py")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert list((tmp_path / "pytorch-paligemma").glob("kernels-*.so"))  # it did build its own library


@pytest.mark.parametrize("march", ["icelake-server", "alderlake"])  # AVX512-VNNI with VL; AVX-VNNI
def test_the_vnni_builds_compile_to_vnni_instructions(march, tmp_path, compiled):
    """quant.c's VNNI branches cannot run on a CPU without VNNI, but they must build: for a CPU that has them, every
    warning an error, into code that holds the VNNI dot products (the integers equal AVX2's, as the comments argue)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    out = tmp_path / "quant.s"
    subprocess.run([compiler, "-O3", f"-march={march}", "-fopenmp", "-Wall", "-Werror", "-S", "-o", str(out),
                    str(ROOT / "quant.c")], check=True, capture_output=True, timeout=120)
    assembly = out.read_text()
    assert "vpdpbusd" in assembly and "vpdpwssd" in assembly and "vpmaddubsw" not in assembly


@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@pytest.mark.parametrize("cols, vocab", [(257_216, 257_152), (8_199, 8_195), (40, 40), (20_000, 5)])
def test_the_logit_scan_gives_the_first_argmax_of_the_token_columns_and_log_softmax_of_all(dtype, cols, vocab,
                                                                                              compiled):
    torch.manual_seed(0)
    logits = (torch.randn(4, cols) * 5).to(dtype)
    logits[1, :3] = logits[1].max() + 1  # a tie: the first column wins, as torch.argmax
    logits[2, -1] = 1000  # a padding column above all: never chosen, but in the softmax's sum
    top, peak, logsum = kernels.scan_logits(logits, vocab)
    assert torch.equal(top, logits.float()[:, :vocab].argmax(-1)) and top[1] == 0
    exact = torch.log_softmax(logits.double(), -1)  # float32's log_softmax over 257k logits is 3e-5 off it
    torch.testing.assert_close((logits.float() - peak[:, None]) - logsum[:, None], exact.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_logit_scan_hands_a_row_that_is_not_finite_back(bad, compiled):
    logits = torch.zeros(3, 10_000, dtype=torch.float16)
    logits[2, 9_999] = bad  # a padding column, in the last piece's tail
    assert kernels.scan_logits(logits, 9_990) is None


@pytest.mark.parametrize("library", ["compiled", "PyTorch"])
def test_pick_gives_the_same_tokens_and_logprobs_with_or_without_the_compiled_scan(library, monkeypatch):
    torch.manual_seed(1)
    logits = (torch.randn(3, 9_000) * 4).half()
    if library == "PyTorch":
        monkeypatch.setattr(kernels, "library", lambda: None)
    tokens, logprobs = pick(logits, 0.0, 1.0, vocab=8_000)
    assert torch.equal(tokens, logits[:, :8_000].float().argmax(-1))
    exact = torch.log_softmax(logits.double(), -1).float()
    torch.testing.assert_close(logprobs.of(tokens[:, None])[:, 0], exact.gather(-1, tokens[:, None])[:, 0],
                               atol=1e-5, rtol=0)
    values, ids = logprobs.top(5, 8_000)
    assert torch.equal(ids[:, 0], tokens) and torch.equal(values[:, 0], logprobs.of(tokens[:, None])[:, 0])
    torch.testing.assert_close(values, exact.gather(-1, ids), atol=1e-5, rtol=0)


def test_top_logprobs_order_equal_logits_by_id_so_the_greedy_choice_comes_first():
    logits = torch.zeros(2, 40_000, dtype=torch.float16)
    logits[:, [9, 30_000, 7, 25_000, 8]] = torch.tensor([5.0, 5.0, 5.0, 4.0, 4.0], dtype=torch.float16)
    logits[1, 7] = 6.0
    tokens, logprobs = pick(logits, 0.0, 1.0, vocab=39_000)
    values, ids = logprobs.top(4, 39_000)
    assert tokens.tolist() == [7, 7]
    assert ids.tolist() == [[7, 9, 30_000, 8], [7, 9, 30_000, 8]]  # then 25_000: the k-th place's ties by id too
    assert torch.equal(values, logprobs.of(ids)) and bool((values[:, :-1] >= values[:, 1:]).all())
