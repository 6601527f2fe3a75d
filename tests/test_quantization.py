"""int8 and int4 weights: the scheme's round trip, the C kernels against a float32 reference on odd widths, a tiny
quantized model against transformers' float32, saved quantized folders, and hostile ones refused."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import random_image
from safetensors.torch import load_file, save_file
from test_hostile_input import run
from test_model import PROMPT, load_ours, reference_inputs, teacher_forced

from paligemma import conversion, kernels, quantization
from paligemma.checkpoint import LoadError, read_safetensors_header
from paligemma.generate import generate, prefill
from paligemma.quantization import QuantizedWeight, Scheme
from paligemma.utils import load_hf_model

SCHEMES = [Scheme(8, 128), Scheme(4, 128), Scheme(8, 32), Scheme(4, 32)]
SHAPES = [(13, 37), (8, 64), (5, 200), (33, 100), (4, 300)]  # columns that are not a multiple of 16 or 32 too


@pytest.fixture
def compiled():
    if kernels.library() is None:  # with PALIGEMMA_REQUIRE_KERNELS=1, library() has raised instead
        pytest.skip("no C compiler with AVX2 here: the PyTorch fallback is what runs")
    return kernels.library()


def weights(rows: int, cols: int, dtype=torch.float32, seed=0) -> torch.Tensor:
    torch.manual_seed(seed)
    w = torch.randn(rows, cols) * 0.05
    w[0, : min(cols, 40)] = 0  # a group of zeros: scale 0
    w[-1, 3] = 1.0  # an outlier
    return w.to(dtype)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantized_weights_are_within_half_a_step_of_the_originals(scheme, shape):
    w = weights(*shape)
    q, scales = quantization.quantize(w, scheme)
    back = quantization.dequantize(q, scales, scheme, shape)
    step = scales[:shape[0]].float().repeat_interleave(scheme.group, dim=1)[:, :shape[1]]
    assert back.shape == w.shape and ((back - w).abs() <= step / 2 * 1.001 + 1e-12).all()
    stored = quantization.untile(q)
    ints = stored.float() if scheme.bits == 8 else quantization.unpack_int4(stored, stored.shape[1] * 2).float()
    assert ints.abs().max() <= scheme.qmax
    assert (ints[shape[0]:] == 0).all() and (ints[:, shape[1]:] == 0).all()  # padding: zeros


def test_int8_tiles_interleave_four_rows_a_cache_line_at_a_time():
    w = (torch.arange(5 * 70).view(5, 70) % 200 - 100).float()
    w[:, ::32] = 127  # every group's largest value: scale 1, q = w
    q, scales = quantization.quantize(w, Scheme(8, 32))
    assert q.shape == (2, 4 * 128) and scales.shape == (8, 4)  # rows padded to 8, columns to 128
    assert torch.equal(q[0, 64:128].float(), w[1, :64])  # chunk 0 of row 1 after chunk 0 of row 0
    assert torch.equal(q[0, 256 + 64:256 + 70].float(), w[1, 64:])  # chunk 1 of row 1, then zeros
    assert not q[0, 256 + 70:256 + 128].any() and not q[1].view(2, 4, 64)[:, 1:].any()  # padded columns, rows
    assert torch.equal(q[1, :64].float(), w[4, :64])
    assert torch.equal(quantization.untile(q, torch.tensor([4, 1])).float()[:, :70], w[[4, 1]])


def test_int4_packing_puts_column_j_and_16_plus_j_in_one_byte():
    q = torch.arange(-7, 8).repeat(3)[:40].view(1, 40).to(torch.int8)
    packed = quantization.pack_int4(q)
    assert packed.shape == (1, 32)  # two blocks of 32 columns, the second padded
    assert packed[0, 0] == (q[0, 0] + 8) | ((q[0, 16] + 8) << 4)
    assert packed[0, 31] == 8 | (8 << 4)  # padding: zeros
    assert torch.equal(quantization.unpack_int4(packed, 40), q)


def c_quantized(w: torch.Tensor, scheme: Scheme) -> tuple[QuantizedWeight, int]:
    """w quantized by quant.c (into buffers full of junk, which it must overwrite), and its count of values or
    scales that are not finite."""
    target = QuantizedWeight(*w.shape, scheme)
    target.qweight.fill_(0x55), target.scales.fill_(3.0)
    return target, conversion.quantize_rows(w.data_ptr(), w.dtype, *w.shape, target.qweight, target.scales, scheme)


def assert_equal_to_the_reference(target: QuantizedWeight, w: torch.Tensor, scheme: Scheme):
    q, scales = quantization.quantize(w, scheme)
    assert torch.equal(target.qweight, q) and torch.equal(target.scales.view(torch.int16), scales.view(torch.int16))


@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", SCHEMES + [Scheme(8, 64), Scheme(4, 64)], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(1, 33), (7, 96), (7, 1000)])  # groups cut short by the last column
def test_the_c_quantizer_equals_the_reference_bit_for_bit(shape, scheme, source, compiled):
    w = weights(*shape, source)
    target, bad = c_quantized(w, scheme)
    assert bad == 0
    assert_equal_to_the_reference(target, w, scheme)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_the_c_quantizer_rounds_halves_to_even_as_the_reference(scheme, compiled):
    w = torch.arange(-2 * scheme.qmax, 2 * scheme.qmax + 1).float().repeat(3, 40)[:, :300] / 2
    w[:, ::scheme.group] = scheme.qmax  # every group's scale 1: w / scale is a half for every odd w * 2
    target, bad = c_quantized(w, scheme)
    assert bad == 0
    assert_equal_to_the_reference(target, w, scheme)
    assert w[0, 1] == -scheme.qmax + 0.5  # a half, rounded to its even neighbour (qmax is odd)
    assert quantization.dequantize(target.qweight, target.scales, scheme, w.shape)[0, 1] == -scheme.qmax + 1


@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_the_c_quantizer_counts_values_and_scales_that_are_not_finite(scheme, source, compiled):
    w = weights(7, 300)
    w[1, 5], w[2, 299], w[6, 40] = float("nan"), float("inf"), 1e38  # the last: too large for a float16 scale
    _, bad = c_quantized(w.to(source), scheme)
    assert bad == 2 + 2  # NaN and inf, and the scales of the groups of inf and 1e38


def convert_file(path: Path, destinations: dict) -> tuple[int, int]:
    """conversion.convert_shard over the named tensors of a safetensors file, into their destinations."""
    header = {e.key: e for e in read_safetensors_header(path)}
    with open(path, "rb") as f:
        return conversion.convert_shard(f.fileno(), [(header[k].start, header[k].torch_dtype, dest)
                                                  for k, dest in destinations.items()])


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_the_quantizer_reads_a_weight_of_many_blocks_from_the_file_as_the_reference(scheme, tmp_path, compiled):
    """convert_shard reads a weight about a megabyte of whole tiles at a time, each thread quantizing its own tiles,
    beside the tensors it converts in the same call; a value that is not finite names its job."""
    tensors = {"a": weights(301, 2000), "b": weights(9, 70, torch.bfloat16, seed=1), "c": weights(42, 300, seed=2)}
    save_file(tensors, tmp_path / "shard.safetensors")
    a, b, c = QuantizedWeight(301, 2000, scheme), QuantizedWeight(9, 70, scheme), torch.empty(42 * 300).half()
    done = convert_file(tmp_path / "shard.safetensors", {"a": a, "b": b, "c": c})
    assert done == (sum(t.nbytes for t in tensors.values()), -1)
    assert_equal_to_the_reference(a, tensors["a"], scheme)
    assert_equal_to_the_reference(b, tensors["b"], scheme)
    assert torch.equal(c, tensors["c"].view(-1).half())
    tensors["b"][8, 69] = float("nan")  # the last block's last value
    save_file(tensors, tmp_path / "nan.safetensors")
    assert convert_file(tmp_path / "nan.safetensors", {"c": c, "a": a, "b": b})[1] == 2


def quantized(shape, scheme, seed=0) -> QuantizedWeight:
    weight = QuantizedWeight(*shape, scheme)
    weight.qweight, weight.scales = quantization.quantize(weights(*shape, seed=seed), scheme)
    return weight


@pytest.mark.parametrize("scheme", SCHEMES + [Scheme(4, 64), Scheme(8, 96)], ids=str)  # groups a saved folder may have
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 6, 7, 9])
def test_gemv_equals_the_product_of_the_dequantized_weights_and_x_rounded_in_blocks(rows, shape, scheme,
                                                                                         compiled):
    weight = quantized(shape, scheme)
    x = torch.randn(rows, shape[1])
    x[0, : min(shape[1], 40)] = 0  # a block of zeros: scale 0
    (y,) = kernels.gemv_quantized([weight], x)
    expected = quantization.round_activations(x, scheme).double() @ weight.dequantize(torch.float32).double().T
    torch.testing.assert_close(y, expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=str)
def test_x_rounded_in_blocks_is_within_half_a_step_of_x(scheme):
    x = torch.randn(3, 70) * torch.logspace(-3, 3, 70)  # blocks of very different sizes
    seen = quantization.round_activations(x, scheme)
    step = F.pad(x, (0, 26)).view(3, -1, 32).abs().amax(-1).repeat_interleave(32, dim=1)[:, :70] / scheme.x_levels
    assert ((seen - x).abs() <= step / 2 * 1.001).all() and not torch.equal(seen, x)


@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=str)
def test_gemv_keeps_extreme_x_finite_and_a_non_finite_x_to_its_own_row(scheme, compiled):
    weight = quantized((9, 100), scheme)
    x = torch.randn(4, 100)
    x[0] *= 1e30  # large but finite: the block scales absorb it
    x[1, 3], x[2, 70] = float("nan"), float("inf")
    y = kernels.gemv_quantized([weight], x)[0]
    assert y[0].isfinite().all() and y[3].isfinite().all()
    assert not y[1].isfinite().any() and not y[2].isfinite().any()
    torch.testing.assert_close(y[0], (quantization.round_activations(x[:1], scheme).double()
                                      @ weight.dequantize(torch.float32).double().T)[0].float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=str)
def test_gemv_of_several_quantized_weights_equals_each_alone(scheme, compiled):
    group = [quantized((n, 96), scheme, seed=n) for n in (5, 40, 8, 17)]
    x = torch.randn(2, 96)
    for together, weight in zip(kernels.gemv_quantized(group, x), group):
        torch.testing.assert_close(together, kernels.gemv_quantized([weight], x)[0], atol=0, rtol=0)


@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantized_gemv_reads_and_writes_half_precision_as_one_rounding_of_the_float32_sums(scheme, dtype, compiled):
    group = [quantized((n, 77), scheme, seed=n) for n in (9, 33)]
    x = torch.randn(3, 77).to(dtype)
    for got, wide in zip(kernels.gemv_quantized(group, x, dtype), kernels.gemv_quantized(group, x.float())):
        assert got.dtype == dtype and torch.equal(got.view(torch.int16), wide.to(dtype).view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=str)
def test_dequantizing_to_a_prompts_dtype_equals_the_reference(scheme, dtype, compiled):
    weight = quantized((33, 100), scheme)
    expected = weight.dequantize(dtype)
    as_int = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(kernels.widened(weight, dtype).view(as_int), expected.view(as_int))


PATHS = {
    "default": {},
    "no compiled kernels": {"library": lambda: None},
    "matrix products only": {"MAX_GEMV_ROWS": 0},
    "a prompt's weights 20 rows at a time": {"SCRATCH_BYTES": 2 * 20 * 100},  # 48 rows: blocks of 20, 20 and 8
    "20 rows at a time, no compiled kernels": {"SCRATCH_BYTES": 2 * 20 * 100, "library": lambda: None},
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 40])
@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=str)
def test_every_product_path_equals_f_linear_of_the_dequantized_weights(scheme, rows, path, dtype, monkeypatch):
    for attribute, value in PATHS[path].items():
        monkeypatch.setattr(kernels, attribute, value)
    weight = quantized((48, 100), scheme)
    x = torch.randn(rows, 100).to(dtype)
    (y,) = kernels.products(x, [weight], [None])
    decode_kernel = rows <= kernels.MAX_GEMV_ROWS and kernels.library() is not None  # x rounded in blocks
    expected = F.linear(quantization.round_activations(x, scheme) if decode_kernel else x.float(),
                        weight.dequantize(torch.float32))
    assert y.dtype == dtype
    tolerance = 0.02 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.float(), expected, atol=tolerance, rtol=tolerance)


# A tiny quantized model against transformers' float32 model. The bound is relative to the logits' size (|logits|
# < 1 here): int8 (steps of 1/127 of each group's largest weight) within 0.1, int4 (steps of 1/7) within 1.0, both
# on the widths that leave every kernel a tail; measured 0.035-0.045 and 0.55-0.6.
BOUNDS = {"int8": 0.1, "int4": 1.0}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("name", ["v1_odd", "v2_odd"])
def test_a_tiny_quantized_model_stays_near_transformers_float32(name, scheme, path, checkpoint, reference, image,
                                                                monkeypatch):
    for attribute, value in PATHS[path].items():
        monkeypatch.setattr(kernels, attribute, value)
    ref, ref_processor = reference(name)
    model, tokenizer = load_hf_model(checkpoint(name), "cpu", torch.bfloat16, verbose=False, quantize=scheme)
    model = kernels.accelerate(model)
    processor = load_ours(checkpoint(name))[1]
    inputs = processor([PROMPT], [image])
    with torch.no_grad():
        expected = ref(**reference_inputs(ref_processor, image)).logits
        out = ref.generate(**reference_inputs(ref_processor, image), max_new_tokens=4, min_new_tokens=4,
                           do_sample=False, output_logits=True, return_dict_in_generate=True)
        torch.testing.assert_close(prefill(model, inputs, 0, all_logits=True).float(), expected, atol=BOUNDS[scheme],
                                   rtol=0)
        for step, (ours, theirs) in enumerate(zip(teacher_forced(model, inputs, out.sequences[:, -4:]), out.logits)):
            torch.testing.assert_close(ours.float(), theirs, atol=BOUNDS[scheme], rtol=0, msg=f"step {step}")


def test_int8_answers_greedily_as_float32_does_on_a_tiny_model(checkpoint, image):
    tokens = {}
    for scheme in (None, "int8"):
        model, tokenizer = load_hf_model(checkpoint("v1_mqa"), "cpu", torch.bfloat16, verbose=False,
                                         quantize=scheme)
        model = kernels.accelerate(model)
        processor = load_ours(checkpoint("v1_mqa"))[1]
        with torch.no_grad():
            tokens[scheme] = [int(t) for t, _ in generate(model, processor([PROMPT], [image]), 6)]
    assert tokens["int8"] == tokens[None]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_saved_quantized_folder_round_trips_bit_exactly_and_loads_in_place(scheme, checkpoint, tmp_path, capsys):
    model, _ = load_hf_model(checkpoint("v2_odd"), "cpu", torch.bfloat16, verbose=False, quantize=scheme)
    quantization.save_quantized(model, checkpoint("v2_odd"), tmp_path / "saved")
    again, _ = load_hf_model(tmp_path / "saved", "cpu")
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert again.quantization == quantization.SCHEMES[scheme]
    qweight = again.language_model.model.layers[0].mlp.up_proj.weight.qweight
    assert qweight.untyped_storage().nbytes() > qweight.nbytes  # a view into the mapped file: used in place
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    modes = {path.stat().st_mode & 0o777 for path in (tmp_path / "saved").iterdir()}
    assert len(modes) == 1  # the shards are as readable as the files beside them


@pytest.fixture
def saved(checkpoint, tmp_path):
    model, _ = load_hf_model(checkpoint("v1_mqa"), "cpu", torch.bfloat16, verbose=False, quantize="int4")
    quantization.save_quantized(model, checkpoint("v1_mqa"), tmp_path / "saved")
    return tmp_path / "saved"


def edit_config(folder: Path, **changes):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_tensor(folder: Path, part: str, change):
    """Rewrite the tensor whose key holds part with change(tensor), or drop it where change gives None."""
    shard = next(folder.glob("*.safetensors"))
    tensors = load_file(shard)
    key = next(k for k in tensors if part in k)
    tensors[key] = change(tensors[key])
    if tensors[key] is None:
        del tensors[key]
    save_file(tensors, shard)


HOSTILE = {
    "a newer format version": (lambda f: edit_config(f, format_version=2), "format_version 2; this tool reads"),
    "another tool's method": (lambda f: edit_config(f, quant_method="gptq"), "'gptq', not this tool's"),
    "3 bits": (lambda f: edit_config(f, bits=3), "needs bits 4 or 8"),
    "a group of 48": (lambda f: edit_config(f, group_size=48), "a multiple of 32"),
    "the other width asked for": (None, "holds int4 weights, not int8"),
    "qweight of the wrong dtype": (lambda f: edit_tensor(f, "layers.0.mlp.up_proj.weight.qweight",
                                                         lambda t: t.to(torch.int8)), "has dtype I8, expected uint8"),
    "qweight of the wrong shape": (lambda f: edit_tensor(f, "layers.1.self_attn.o_proj.weight.qweight",
                                                         lambda t: t[:, :-1].contiguous()), "has shape"),
    "scales that are not finite": (lambda f: edit_tensor(f, "layers.0.self_attn.q_proj.weight.scales",
                                                         lambda t: t.fill_(float("nan"))), "not finite"),
    "scales missing": (lambda f: edit_tensor(f, "layers.1.mlp.down_proj.weight.scales", lambda t: None),
                       "missing from the checkpoint"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_quantized_folder_is_refused_with_one_clear_line(case, saved):
    breaks, message = HOSTILE[case]
    if breaks is not None:
        breaks(saved)
    with pytest.raises(LoadError, match=message):
        load_hf_model(saved, "cpu", verbose=False, quantize="int8" if breaks is None else None)


def test_quantized_weights_refuse_cuda_before_any_work(checkpoint):
    with pytest.raises(LoadError, match="CPU only"):
        load_hf_model(checkpoint("v1_mqa"), "cuda", verbose=False, quantize="int8")


def test_a_weight_larger_than_a_piece_is_quantized_exactly(checkpoint, monkeypatch):
    """The compiled loader and PyTorch's, a few rows at a time, quantize alike."""
    whole, _ = load_hf_model(checkpoint("v1_mqa"), "cpu", torch.bfloat16, verbose=False, quantize="int4")
    monkeypatch.setattr(conversion, "PIECE_BYTES", 300)  # a few rows at a time
    monkeypatch.setattr(conversion, "library", lambda: None)
    pieces, _ = load_hf_model(checkpoint("v1_mqa"), "cpu", torch.bfloat16, verbose=False, quantize="int4")
    a, b = whole.state_dict(), pieces.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_command_line_saves_a_folder_that_answers_as_quantizing_at_load(checkpoint, tmp_path, capsys,
                                                                            monkeypatch):
    photo = tmp_path / "photo.png"
    random_image(40, 30).save(photo)
    args = ["--image_file_path", photo, "--max_tokens_to_generate", 6, "--output_format", "json", "--only_cpu", "True"]
    code, _, err = run(["--model_path", checkpoint("v2_gqa"), "--quantize", "int8", "--save_quantized",
                        tmp_path / "q8"], capsys, monkeypatch)
    assert code == 0 and "wrote" in err
    code, at_load, err = run(["--model_path", checkpoint("v2_gqa"), "--quantize", "int8", *args], capsys, monkeypatch)
    assert code == 0, err
    code, from_folder, err = run(["--model_path", tmp_path / "q8", *args], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(at_load)["token_ids"] == json.loads(from_folder)["token_ids"]
