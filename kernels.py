"""`linears`: F.linear, made fast on the CPU for float16 and bfloat16 weights.

Two facts about CPUs shape it (measured figures in README.md):
- A decode step multiplies a single row by every weight matrix, so it runs at the speed weights stream from
  memory. PyTorch's half-precision matrix-vector kernels widen weights to float32 too slowly for that on many CPUs;
  gemv.c's do it in registers and accumulate in float32, split by weight rows across torch's own OpenMP threads
  (the library is linked to the libgomp torch has loaded, so the two never compete for cores).
- A prefill multiplies hundreds of rows, which is arithmetic-bound, and many CPUs multiply bfloat16 several times
  faster than float16 (some have no float16 arithmetic at all). So float16 weights are rounded to bfloat16, a
  matrix at a time into a scratch buffer, and the product is taken in bfloat16; the result is float16 again.

gemv.c is compiled once per machine with the system's C compiler (`-O3 -march=native -fopenmp`) into
~/.cache/pytorch-paligemma/. Without a compiler, or with PALIGEMMA_NO_KERNELS=1, everything falls back to PyTorch.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SOURCE = Path(__file__).resolve().with_name("gemv.c")
HALF = (torch.float16, torch.bfloat16)
MAX_GEMV_ROWS = 16  # rows of x up to which streaming the weights beats a matrix-matrix product


def cpu_signature() -> bytes:
    """What -march=native compiles for: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))})).encode()
    except OSError:
        return platform.processor().encode()


@functools.cache
def library() -> ctypes.CDLL | None:
    """gemv.c compiled for this CPU (once, then cached), or None where it cannot be."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if os.environ.get("PALIGEMMA_NO_KERNELS") or compiler is None or platform.machine() not in ("x86_64", "AMD64"):
        return None
    source = SOURCE.read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pytorch-paligemma"
    built = cache / f"gemv-{hashlib.sha256(source + cpu_signature()).hexdigest()[:16]}.so"
    try:
        if not built.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build aside, then move: never a half-written file
                out = Path(tmp) / "gemv.so"
                subprocess.run([compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", str(out),
                                str(SOURCE)], check=True, capture_output=True, timeout=120)
                os.replace(out, built)
        lib = ctypes.CDLL(str(built))
    except (OSError, subprocess.SubprocessError):  # no AVX2 / F16C, a broken compiler, a read-only home, ...
        return None
    lib.gemv.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    lib.f16_to_bf16.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64]
    lib.convert_shard.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    lib.gelu_tanh_mul.argtypes = [ctypes.c_void_p, ctypes.c_int64] * 2 + [ctypes.c_void_p] + [ctypes.c_int64] * 2 + [
        ctypes.c_int]
    return lib


def gemv(weights: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """(M, K) float32 x times each (N_i, K) half-precision weight transposed -> [(M, N_i) float32], in one pass."""
    m, k = x.shape
    ys = [torch.empty(m, w.shape[0]) for w in weights]
    n, pointers = len(weights), ctypes.c_void_p * len(weights)
    library().gemv(n, pointers(*(w.data_ptr() for w in weights)), pointers(*(y.data_ptr() for y in ys)),
                   (ctypes.c_int64 * n)(*(w.shape[0] for w in weights)), x.data_ptr(), m, k,
                   int(weights[0].dtype == torch.bfloat16))
    return ys


_scratch: dict[str, torch.Tensor] = {}


def as_bfloat16(weights: list[torch.Tensor]) -> torch.Tensor:
    """The float16 weights rounded to bfloat16 and stacked by rows, in a scratch buffer the next call overwrites."""
    n = sum(w.numel() for w in weights)
    if _scratch.get("buffer") is None or _scratch["buffer"].numel() < n:
        with torch.inference_mode(False):  # a normal tensor, writable in and out of inference mode alike
            _scratch["buffer"] = torch.empty(n, dtype=torch.bfloat16)
    out = _scratch["buffer"][:n].view(-1, weights[0].shape[1])
    lib, row = library(), 0
    for w in weights:
        dest = out[row:row + w.shape[0]]
        if lib is None:
            dest.copy_(w)
        else:
            lib.f16_to_bf16(w.data_ptr(), dest.data_ptr(), w.numel())
        row += w.shape[0]
    return out


def prefill_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a forward over many tokens computes in: bfloat16 for float16 weights on the CPU, so that neither
    the products nor the conversions around them run at float16 speed; otherwise the weights' own."""
    return torch.bfloat16 if weight.device.type == "cpu" and weight.dtype == torch.float16 else weight.dtype


def side_by_side(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The weights as one (sum of rows, cols) matrix, if they already lie one after another in memory."""
    first = weights[0]
    for a, b in zip(weights, weights[1:]):
        if b.data_ptr() != a.data_ptr() + a.nbytes or b.shape[1] != first.shape[1] or (
                b.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
    return first.as_strided((sum(w.shape[0] for w in weights), first.shape[1]), (first.shape[1], 1))


def linears(x: torch.Tensor, *layers: nn.Linear) -> list[torch.Tensor]:
    """[layer(x) for layer in layers], multiplying x by all their weights together where that is faster on the
    CPU; the results are in the dtype of x, and match F.linear's up to the order of float32 additions."""
    ys = None if torch.compiler.is_compiling() or x.device.type != "cpu" else cpu_products(x, layers)
    if ys is None:
        return [F.linear(x, layer.weight, layer.bias) for layer in layers]
    return [(y if layer.bias is None else y + layer.bias.to(y.dtype)).to(x.dtype).view(*x.shape[:-1], -1)
            for y, layer in zip(ys, layers)]


def cpu_products(x: torch.Tensor, layers) -> list[torch.Tensor] | None:
    """x (rows flattened) times each layer's weight, without biases, by the fastest CPU path; None: plain F.linear."""
    weights = [layer.weight for layer in layers]
    if len({w.dtype for w in weights}) > 1 or weights[0].dtype not in HALF or not all(w.is_contiguous()
                                                                                       for w in weights):
        return None
    rows = x.numel() // x.shape[-1]
    if rows <= MAX_GEMV_ROWS and library() is not None:
        return gemv(weights, x.reshape(rows, -1).float().contiguous())  # accumulated in float32, rounded once
    if weights[0].dtype == torch.float16:
        y = F.linear(x.reshape(rows, -1).to(torch.bfloat16), as_bfloat16(weights))
    elif len(weights) > 1 and (stacked := side_by_side(weights)) is not None:  # one product instead of several
        y = F.linear(x.reshape(rows, -1), stacked)
    else:
        return None
    return y.split([w.shape[0] for w in weights], dim=-1)


def gelu_tanh(x: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """F.gelu(x, approximate="tanh"), times up if given: in one pass on the CPU for half-precision tensors."""
    lib, cols, rows = None, x.shape[-1], []
    if not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype in HALF:  # a compiler fuses it itself
        lib = library()
        try:
            rows = [t.view(-1, cols) for t in (x, x if up is None else up)]  # row-strided views, e.g. of a split
        except RuntimeError:
            pass
    if lib is None or not rows or any(t.stride(1) != 1 or t.dtype != x.dtype or t.shape != rows[0].shape
                                      for t in rows):
        y = F.gelu(x, approximate="tanh")
        return y if up is None else y * up
    out = torch.empty(x.shape, dtype=x.dtype)
    lib.gelu_tanh_mul(rows[0].data_ptr(), rows[0].stride(0), None if up is None else rows[1].data_ptr(),
                      rows[1].stride(0), out.data_ptr(), rows[0].shape[0], cols, int(x.dtype == torch.bfloat16))
    return out


class Linear(nn.Linear):
    """nn.Linear that multiplies through `linears`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linears(x, self)[0]
