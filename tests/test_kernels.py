"""The CPU kernels: half-precision matrix-vector products, float16 -> bfloat16 rounding, and their fallbacks."""

import pytest
import torch
import torch.nn.functional as F

import kernels

HALF = [torch.float16, torch.bfloat16]


@pytest.fixture
def compiled():
    if kernels.library() is None:
        pytest.skip("no C compiler with AVX2 here: the PyTorch fallback is what runs")
    return kernels.library()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(13, 37), (8, 16), (1, 5), (64, 2048), (1000, 72)])
@pytest.mark.parametrize("rows", [1, 3, 4, 6, 9])
def test_gemv_equals_the_float32_product_for_any_shape(dtype, shape, rows, compiled):
    torch.manual_seed(0)
    weight, x = torch.randn(shape).to(dtype), torch.randn(rows, shape[1])
    (y,) = kernels.gemv([weight], x)
    torch.testing.assert_close(y, x @ weight.float().T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", HALF)
def test_gemv_of_several_weights_equals_each_alone(dtype, compiled):
    torch.manual_seed(0)
    weights = [torch.randn(n, 96).to(dtype) for n in (5, 40, 8, 17)]
    x = torch.randn(2, 96)
    for together, weight in zip(kernels.gemv(weights, x), weights):
        torch.testing.assert_close(together, kernels.gemv([weight], x)[0], atol=0, rtol=0)


def test_float16_to_bfloat16_rounds_exactly_as_torch(compiled):
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)  # every float16 value there is
    values = bits.view(torch.float16)
    values = values[~values.isnan()]
    out = kernels.as_bfloat16([values[None]])[0]
    assert torch.equal(out.view(torch.int16), values.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_linears_equal_f_linear_within_half_precision(dtype, rows):
    torch.manual_seed(0)
    layers = [kernels.Linear(64, n, bias=bias).to(dtype) for n, bias in ((32, False), (48, True))]
    x = torch.randn(2, rows, 64).to(dtype)
    for got, layer in zip(kernels.linears(x, *layers), layers):
        expected = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
        assert got.dtype == dtype and got.shape == expected.shape
        torch.testing.assert_close(got.float(), expected, atol=0.05, rtol=0.02)


def test_weights_side_by_side_in_memory_are_multiplied_as_one():
    block = torch.randn(10, 8)
    assert torch.equal(kernels.side_by_side([block[:3], block[3:7], block[7:]]), block)
    assert kernels.side_by_side([block[:3], block[4:7]]) is None  # a gap
    assert kernels.side_by_side([block[:3], torch.randn(4, 8)]) is None  # another tensor


def test_float16_weights_prefill_in_bfloat16_on_the_cpu_only():
    assert kernels.prefill_dtype(torch.empty(1, dtype=torch.float16)) == torch.bfloat16
    assert kernels.prefill_dtype(torch.empty(1, dtype=torch.bfloat16)) == torch.bfloat16
    assert kernels.prefill_dtype(torch.empty(1, dtype=torch.float32)) == torch.float32
    assert kernels.prefill_dtype(torch.empty(1, dtype=torch.float16, device="meta")) == torch.float16


def test_library_is_built_once_into_the_cache_and_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels.library.cache_clear()
    try:
        lib = kernels.library()
        built = list((tmp_path / "pytorch-paligemma").glob("gemv-*.so"))
        assert (lib is None) == (built == [])
        monkeypatch.setenv("PALIGEMMA_NO_KERNELS", "1")
        kernels.library.cache_clear()
        assert kernels.library() is None
    finally:
        kernels.library.cache_clear()


def test_scratch_buffer_made_in_inference_mode_is_reused_outside_it(monkeypatch):
    monkeypatch.setattr(kernels, "library", lambda: None)  # the PyTorch conversion, which writes the scratch in place
    monkeypatch.setattr(kernels, "_scratch", {})
    layer = kernels.Linear(64, 4096, bias=False).to(torch.float16)  # bigger than any scratch an earlier test left
    x = torch.randn(20, 64, dtype=torch.float16)
    with torch.inference_mode():
        first = kernels.linears(x, layer)[0]
    with torch.no_grad():
        torch.testing.assert_close(kernels.linears(x, layer)[0], first, atol=0, rtol=0)
