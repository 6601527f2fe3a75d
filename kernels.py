"""The CPU fast path: the C kernels (built and declared in clib.py) behind PyTorch modules, and
`accelerate(model)`, which swaps those in.

What shapes it (measured figures in README.md):
- A decode step multiplies a single row by every weight matrix, at the speed weights stream from memory. PyTorch's
  half-precision matrix-vector kernels widen weights too slowly for that on many CPUs; gemv.c's widen them in
  registers, sum in float32 and split rows across torch's own OpenMP threads (the libgomp torch has loaded).
- Around them a decode step runs Gemma's norms, rotary angles, cache writes, attention and residual adds: some
  hundred small PyTorch operations and Python calls a layer, whose dispatch costs more than their arithmetic (and
  runs on caches the weights have just swept). decode.c runs a decode step's whole decoder in one call (`Decoder`,
  decoder.py), rounding where the modules round.
- A prompt multiplies hundreds of rows, which is arithmetic-bound, so it computes in the dtype this CPU multiplies
  fastest (`prompt_dtype`): bfloat16 where it has bfloat16 dot products (AVX512-BF16, AMX), float32 elsewhere,
  where torch emulates both half precisions 3-5x slower than float32. The token embeddings of a prompt come out in
  that dtype, the vision tower and attention follow them, and each product widens its half-precision or quantized
  weight into a scratch buffer, 16 MiB at a time, never the whole model. A decode step stays in the model's dtype.

`accelerate(model)` is the one explicit step after loading that turns the plain model of modeling_*.py into this:
each `nn.Linear` becomes a `Linear`, each `Fused` group (q, k, v; gate, up) a `Fused` that reads all its weights
in one pass, each tanh GELU, Gemma RMSNorm and decode attention the one-pass C version, a float16 token embedding
an `Embedding` that picks the dtype a forward computes in, and the Gemma decoder a `Decoder`. The weights are the
model's own parameters, shared, whether they were copied or are used in place from the checkpoint's files.

The C files are compiled once per machine (clib.py). Without a compiler the swapped modules use PyTorch's own
operations (the same results within half precision, and, for quantized weights, within the rounding of x that
the C decode products do); with PALIGEMMA_NO_KERNELS=1 `accelerate` leaves the plain
model as it is.
"""

import ctypes
import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from paligemma import modeling_gemma, modeling_siglip
from paligemma.clib import library
from paligemma.quantization import CHUNK, TILE, QuantEmbedding, QuantizedWeight, QuantLinear

HALF = (torch.float16, torch.bfloat16)
MAX_GEMV_ROWS = 16  # rows of x up to which streaming the weights beats a matrix-matrix product
KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # as gemv.c's convert_shard numbers them


# oneDNN's ISA caps below the first with bfloat16 dot products (ONEDNN_MAX_CPU_ISA, as oneDNN spells them)
ONEDNN_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


@functools.cache
def prompt_dtype() -> torch.dtype:
    """The dtype a prompt's products compute in on this CPU: bfloat16 where torch multiplies it with the CPU's own
    bfloat16 instructions (AVX512-BF16 or AMX, which oneDNN uses, and torch's kernels run at AVX-512), float32
    elsewhere. Decided once per process from what torch reports, so ATEN_CPU_CAPABILITY=avx2 or
    ONEDNN_MAX_CPU_ISA=AVX2 make it float32 on any CPU, as on the AVX2 laptops most users have."""
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", bool)() or getattr(torch.cpu, "_is_amx_tile_supported",
                                                                                bool)()
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ONEDNN_WITHOUT_BF16
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    return torch.bfloat16 if native and avx512 and not capped else torch.float32


def is_prompt(shape: torch.Size) -> bool:
    """Whether rows of this shape (all but the last dimension of x, or token ids) are a prompt, which computes in
    prompt_dtype() by matrix products: more than one position, or more rows than a decode step streams. By positions,
    not only rows, so that a row of a batch computes as it would alone."""
    return math.prod(shape) > MAX_GEMV_ROWS or (len(shape) > 1 and shape[-1] > 1)


def gemv(weights: list[torch.Tensor], x: torch.Tensor, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """(M, K) x times each (N_i, K) weight (float32 or half precision) transposed -> [(M, N_i)] in dtype, in one
    pass: float32 sums, rounded once to dtype, each row of x summed alone (its result never depends on M)."""
    m, k = x.shape
    ys = [torch.empty(m, w.shape[0], dtype=dtype) for w in weights]
    n, pointers = len(weights), ctypes.c_void_p * len(weights)
    library().gemv(n, pointers(*(w.data_ptr() for w in weights)), pointers(*(y.data_ptr() for y in ys)),
                   (ctypes.c_int64 * n)(*(w.shape[0] for w in weights)), x.data_ptr(), m, k,
                   KINDS[weights[0].dtype], KINDS[x.dtype], KINDS[dtype])
    return ys


def gemv_quantized(weights: list[QuantizedWeight], x: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """(M, K) x times each quantized (N_i, K) weight transposed -> [(M, N_i)] in dtype, in one pass: float32 sums,
    rounded once to dtype."""
    m, k = x.shape
    ys = [torch.empty(m, w.shape[0], dtype=dtype) for w in weights]
    n, pointers, scheme = len(weights), ctypes.c_void_p * len(weights), weights[0].scheme
    library().gemv_quant(n, pointers(*(w.qweight.data_ptr() for w in weights)),
                         pointers(*(w.scales.data_ptr() for w in weights)), pointers(*(y.data_ptr() for y in ys)),
                         (ctypes.c_int64 * n)(*(w.shape[0] for w in weights)), x.data_ptr(), m, k, scheme.group,
                         scheme.bits, KINDS[x.dtype], KINDS[dtype])
    return ys


def scan_logits(logits: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(B, V) logits on the CPU -> each row's first column of its largest value among columns :vocab (B,), and over
    all V columns its largest value and log(sum exp(logits - largest)) in float32 (B,), in one pass of gemv.c; None
    where a row holds a value that is not finite, or there is no compiled library (PyTorch's path then runs)."""
    B, V = logits.shape
    if logits.device.type != "cpu" or logits.dtype not in KINDS or not 0 < vocab <= V or (lib := library()) is None:
        return None
    logits = logits.contiguous()
    top, peak, logsum = torch.empty(B, dtype=torch.int64), torch.empty(B), torch.empty(B)
    if lib.scan_logits(logits.data_ptr(), KINDS[logits.dtype], B, V, vocab, top.data_ptr(), peak.data_ptr(),
                       logsum.data_ptr()):
        return None
    return top, peak, logsum


_scratch: dict[str, torch.Tensor] = {}
# A prompt's products widen this much of a weight at a time: a piece that stays in the last-level cache for the
# product that reads it next (16 MiB pieces ran 4-15% faster than 64 MiB ones, and than float32 weights, here).
SCRATCH_BYTES = 16 << 20


def widened(weight: torch.Tensor | QuantizedWeight, dtype: torch.dtype, first: int = 0,
            count: int | None = None) -> torch.Tensor:
    """Rows first .. first + count of a half-precision or quantized weight in dtype (float32 or bfloat16, rounded
    exactly as .to(dtype)), in a scratch buffer that the next call overwrites: a copy of part of one matrix at a
    time, never of the model. A quantized weight's first row is a multiple of its tiles' 4."""
    count = weight.shape[0] - first if count is None else count
    cols = weight.shape[1]
    n = count * cols
    if _scratch.get("buffer") is None or _scratch["buffer"].numel() < n * dtype.itemsize:
        with torch.inference_mode(False):  # a normal tensor, writable in and out of inference mode alike
            _scratch["buffer"] = torch.empty(n * dtype.itemsize, dtype=torch.uint8)
    out = _scratch["buffer"][:n * dtype.itemsize].view(dtype).view(count, cols)
    lib, quantized = library(), isinstance(weight, QuantizedWeight)
    if lib is None:
        out.copy_(weight.rows(torch.arange(first, first + count), dtype) if quantized
                  else weight[first:first + count])
    elif quantized:
        dequantize_rows(weight, first, count, out)
    else:
        lib.convert(weight[first:].data_ptr(), KINDS[weight.dtype], out.data_ptr(), KINDS[dtype], n)
    return out


def dequantize_rows(weight: QuantizedWeight, first: int, count: int, out: torch.Tensor):
    """Rows first .. first + count of a quantized weight (with contiguous tiles and scales) into out (count, cols), of
    a dtype in KINDS, by quant.c: any one row, or rows from a multiple of TILE. Row r of a tile is the tile's row 0
    shifted by r % TILE chunks."""
    q = weight.qweight.data_ptr() + first // TILE * weight.qweight.stride(0) + first % TILE * CHUNK
    library().dequantize(q, weight.scales[first].data_ptr(), out.data_ptr(), count, weight.shape[1],
                         weight.scheme.bits, weight.scheme.group, KINDS[out.dtype])


def widened_product(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """F.linear(x, weight in the dtype of x) for float32 or bfloat16 x, widening SCRATCH_BYTES of the weight at a
    time: a PaliGemma 2 28B gate projection alone is 680 MB in float32."""
    rows, cols = weight.shape
    step = max(TILE, SCRATCH_BYTES // (x.dtype.itemsize * cols) // TILE * TILE)
    if step >= rows:
        return F.linear(x, widened(weight, x.dtype))
    return torch.cat([F.linear(x, widened(weight, x.dtype, first, min(step, rows - first)))
                      for first in range(0, rows, step)], dim=-1)


def products(x: torch.Tensor, weights: list, biases: list) -> list[torch.Tensor]:
    """[F.linear(x, w, b) for each weight (float32, half precision or quantized)], by the fastest CPU path, in the
    dtype of x (which may differ from the weights'); equal to F.linear with the dequantized weights up to the order
    of float32 additions and half-precision rounding, and for gemv_quantized up to x's rounding in blocks
    (quantization.round_activations). Which path runs where (the one table of it):
    - a decode step (not is_prompt: up to MAX_GEMV_ROWS rows of one position): gemv / gemv_quantized (one pass
      over the weights, float32 sums); without the compiled kernels, F.linear in the weights' dtype, or of the
      weights dequantized to x's dtype;
    - a prompt: widened_product in x's dtype where the weights are quantized or of another dtype, or x is float16
      (float32 or bfloat16; float16 x in prompt_dtype()), else F.linear.
    """
    rows, prompt = x.numel() // x.shape[-1], is_prompt(x.shape[:-1])
    flat = x.reshape(rows, -1)
    quantized = isinstance(weights[0], QuantizedWeight)
    streamable = quantized or weights[0].dtype in KINDS and all(
        w.is_contiguous() and w.dtype == weights[0].dtype for w in weights)
    if not prompt and library() is not None and x.dtype in KINDS and streamable:
        dtype = x.dtype if all(b is None for b in biases) else torch.float32  # float32 sums, one rounding
        ys = (gemv_quantized if quantized else gemv)(weights, flat.contiguous(), dtype)
    elif prompt and (quantized or weights[0].dtype != flat.dtype or flat.dtype == torch.float16):
        dtype = flat.dtype if flat.dtype in (torch.float32, torch.bfloat16) else prompt_dtype()
        ys = [widened_product(flat.to(dtype), w) for w in weights]
    elif quantized:  # a few rows without the compiled kernels: dequantize, then multiply
        ys = [F.linear(flat, w.dequantize(flat.dtype)) for w in weights]
    else:
        ys = [F.linear(flat.to(w.dtype), w) for w in weights]
    return [(y if b is None else y + b.to(y.dtype)).to(x.dtype).view(*x.shape[:-1], -1) for y, b in zip(ys, biases)]


class Linear(nn.Module):
    """A linear layer over a half-precision or quantized weight, multiplied by `products`."""

    def __init__(self, weight: nn.Parameter | QuantizedWeight, bias: nn.Parameter | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return products(x, [self.weight], [self.bias])[0]


class Fused(nn.Module):
    """Linear layers that read the same input, multiplied in one pass over all their weights; returns each output.
    Holds the layers' own parameters (not a concatenated copy), so weights used in place from a file fuse too."""

    def __init__(self, weights: list, biases: list):
        super().__init__()
        self.weights, self.biases = list(weights), list(biases)  # lists: registered once, where the layers are

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(products(x, self.weights, self.biases))


class GELUTanh(modeling_siglip.GELUTanh):
    """gelu_tanh(x) [* up] in one pass of gemv.c for CPU tensors (half precision, or a prompt's float32); PyTorch's
    otherwise."""

    def forward(self, x: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        lib, cols, rows = library() if x.dtype in KINDS and x.device.type == "cpu" else None, x.shape[-1], []
        if lib is not None:
            try:
                rows = [t.view(-1, cols) for t in (x, x if up is None else up)]  # row-strided views, e.g. of a split
            except RuntimeError:
                pass
        if not rows or any(t.stride(1) != 1 or t.dtype != x.dtype or t.shape != rows[0].shape for t in rows):
            return super().forward(x, up)
        out = torch.empty(x.shape, dtype=x.dtype)
        lib.gelu_tanh_mul(rows[0].data_ptr(), rows[0].stride(0), None if up is None else rows[1].data_ptr(),
                          rows[1].stride(0), out.data_ptr(), rows[0].shape[0], cols, KINDS[x.dtype])
        return out


class RMSNorm(modeling_gemma.GemmaRMSNorm):
    """Gemma's RMSNorm over the same weight, in one pass of decode.c for x on the CPU (half precision, or a
    prompt's float32)."""

    def __init__(self, weight: nn.Parameter, eps: float):
        nn.Module.__init__(self)  # not GemmaRMSNorm's, which would make a weight of its own
        self.weight, self.eps = weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = library() if x.dtype in KINDS and x.device.type == "cpu" and x.is_contiguous() else None
        if lib is None or self.weight.dtype not in KINDS or not self.weight.is_contiguous():
            return super().forward(x)
        out = torch.empty_like(x)
        lib.rms_norm(x.data_ptr(), self.weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1],
                     self.eps, KINDS[x.dtype], KINDS[self.weight.dtype])
        return out


class Attend(modeling_gemma.Attend):
    """A decode step's attention (one query position) over a half-precision KV cache in one pass of decode.c;
    everything else, PyTorch's."""

    def forward(self, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        B, n_heads, L, hd = q.shape
        lib = library() if L == 1 and q.dtype in HALF and q.device.type == "cpu" else None
        if lib is None or k.dtype != q.dtype or v.dtype != q.dtype or k.stride() != v.stride() or \
                k.stride()[2:] != (hd, 1) or mask.dtype != torch.bool or mask.shape != (B, 1, 1, k.shape[2]):
            return super().forward(q, k, v, mask)
        q, mask, out = q.contiguous(), mask.contiguous(), torch.empty_like(q, memory_format=torch.contiguous_format)
        lib.attend_one(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(), B, n_heads,
                       k.shape[1], k.shape[2], hd, k.stride(0), k.stride(1), mask.shape[-1], self.scale,
                       self.softcap or 0.0, KINDS[q.dtype])
        return out


class Embedding(nn.Module):
    """Token embeddings from a half-precision (or quantized) table, in `prompt_dtype()` for a prompt: everything
    after them then computes in the dtype this CPU multiplies fastest. A decode step (a few rows) stays in the
    model's own dtype."""

    def __init__(self, weight: nn.Parameter | QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self.weight, self.dtype = weight, dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        dtype = prompt_dtype() if is_prompt(input_ids.shape) else self.dtype
        if isinstance(self.weight, QuantizedWeight):
            return quantized_rows(self.weight, input_ids, dtype)
        return F.embedding(input_ids, self.weight).to(dtype)


def quantized_rows(weight: QuantizedWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight.rows(ids, dtype), the same numbers; a decode step's few tokens by dequantize_rows, one call each
    instead of PyTorch's dozen operations (0.5 ms a step)."""
    flat = ids.reshape(-1).tolist()
    if library() is None or len(flat) > MAX_GEMV_ROWS or dtype not in KINDS or not weight.qweight.is_contiguous() \
            or not weight.scales.is_contiguous() or not all(0 <= r < weight.shape[0] for r in flat):
        return weight.rows(ids, dtype)
    out = torch.empty(len(flat), weight.shape[1], dtype=dtype)
    for i, r in enumerate(flat):
        dequantize_rows(weight, r, 1, out[i])
    return out.view(*ids.shape, weight.shape[1])


def fast_module(name: str, module: nn.Module) -> nn.Module | None:
    """The CPU-fast replacement of a half-precision (or quantized) model's module, or None to keep it."""
    if isinstance(module, modeling_siglip.Fused):
        return Fused([layer.weight for layer in module.layers], [layer.bias for layer in module.layers])
    if isinstance(module, (nn.Linear, QuantLinear)):
        return Linear(module.weight, module.bias)
    if isinstance(module, modeling_siglip.GELUTanh):
        return GELUTanh()
    if isinstance(module, modeling_gemma.GemmaRMSNorm):
        return RMSNorm(module.weight, module.eps)
    if type(module) is modeling_gemma.GemmaModel:  # the same module, its decode step one call (decoder.py, which
        from paligemma.decoder import Decoder  # builds on this file); its children are swapped in their turn

        module.__class__ = Decoder
        return module
    if isinstance(module, modeling_gemma.Attend):
        return Attend(module.scale, module.softcap)
    if isinstance(module, QuantEmbedding) and module.dtype in HALF:
        return Embedding(module.weight, module.dtype)
    if name == "embed_tokens" and isinstance(module, nn.Embedding) and module.weight.dtype in HALF:
        return Embedding(module.weight, module.weight.dtype)
    return None


def accelerate(model: nn.Module) -> nn.Module:
    """Swap the CPU-fast modules into a loaded model, in place, and return it. A model on the CPU gains; a float32
    one too, whose decode step then sums each row alone (gemv), so that a row's numbers never depend on the rows
    beside it in a server's batch. A model on another device, and every model under PALIGEMMA_NO_KERNELS=1, is
    returned as it is."""
    params = list(model.parameters())
    if os.environ.get("PALIGEMMA_NO_KERNELS") or not all(p.dtype in KINDS and p.device.type == "cpu" for p in params):
        return model
    return swap_modules(model)


def swap_modules(model: nn.Module) -> nn.Module:
    """accelerate's swap without its policy: works for any dtype (in float32 the swapped modules compute exactly
    what the plain ones do, which the tests use to check the wiring)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            replacement = fast_module(name, child)
            if replacement is not None:
                setattr(parent, name, replacement)
    return model
