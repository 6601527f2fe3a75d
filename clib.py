"""gemv.c, quant.c and decode.c compiled for this CPU, loaded, and their functions declared: the one C library
that kernels.py and conversion.py (the loader's) call.

They are compiled once per machine with the system's C compiler (`-O3 -march=native -fopenmp`, or
`-march=$PALIGEMMA_MARCH`) into ~/.cache/pytorch-paligemma/, named by a hash of the sources, the CPU and the target,
and linked to the libgomp torch has loaded, so that their threads are torch's own.
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

from paligemma.console import UserError, log

SOURCES = Path(__file__).resolve().parent  # gemv.c, quant.c, decode.c and the simd.h they share
C_FILES = ("gemv.c", "quant.c", "decode.c", "simd.h")


def cpu_signature() -> bytes:
    """What -march=native compiles for: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))})).encode()
    except OSError:
        return platform.processor().encode()


class KernelsUnavailable(UserError):
    """gemv.c cannot be built or loaded here, and PALIGEMMA_REQUIRE_KERNELS=1 asks for it."""


@functools.cache
def library() -> ctypes.CDLL | None:
    """gemv.c compiled for this CPU (once, then cached), or None where it cannot be: then a note on stderr says
    why (the compiler's first error line, say), as decoding will be slower; with PALIGEMMA_REQUIRE_KERNELS=1 it is
    an error instead. PALIGEMMA_NO_KERNELS=1 turns the kernels off without a word."""
    if os.environ.get("PALIGEMMA_NO_KERNELS"):
        return None
    try:
        return build()
    except KernelsUnavailable as e:
        if os.environ.get("PALIGEMMA_REQUIRE_KERNELS"):
            raise
        log(f"note: {e}; using PyTorch's kernels instead (decoding is 1.5-2x slower)")
        return None


def build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise KernelsUnavailable("the CPU kernels cannot be built: no C compiler (cc or gcc) found")
    if platform.machine() not in ("x86_64", "AMD64"):
        raise KernelsUnavailable(f"the CPU kernels need an x86-64 CPU, not {platform.machine()}")
    source = b"".join((SOURCES / name).read_bytes() for name in C_FILES)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pytorch-paligemma"
    march = os.environ.get("PALIGEMMA_MARCH", "native")  # e.g. haswell: the AVX2 build, which the tests check too
    built = cache / f"kernels-{hashlib.sha256(source + cpu_signature() + march.encode()).hexdigest()[:16]}.so"
    try:
        if not built.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build aside, then move: never a half-written file
                out = Path(tmp) / "kernels.so"
                subprocess.run([compiler, "-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", "-o", str(out),
                                *(str(SOURCES / name) for name in C_FILES if name.endswith(".c"))], check=True,
                               capture_output=True, text=True, timeout=120)
                os.replace(out, built)
        lib = ctypes.CDLL(str(built))
    except subprocess.CalledProcessError as e:  # e.g. a CPU without AVX2 and F16C: the #error says so
        first = next((line for line in e.stderr.splitlines() if "error" in line), e.stderr.strip()[:200])
        raise KernelsUnavailable(f"the CPU kernels did not compile ({first.strip()})") from None
    except (OSError, subprocess.SubprocessError) as e:  # a read-only home, a compiler that hangs, ...
        raise KernelsUnavailable(f"the CPU kernels cannot be built ({type(e).__name__}: {e})") from None
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.gemv.argtypes = [i64, pointer, pointer, pointer, pointer, i64, i64, i32, i32, i32]
    lib.convert.argtypes = [pointer, i32, pointer, i32, i64]
    lib.gelu_tanh_mul.argtypes = [pointer, i64, pointer, i64, pointer, i64, i64, i32]
    lib.convert_shard.argtypes = [i32, pointer, i64, pointer]
    lib.convert_shard.restype = i64
    lib.nonfinite.argtypes = [pointer, i64, i32, i32]
    lib.nonfinite.restype = i64
    lib.scan_logits.argtypes = [pointer, i32, i64, i64, i64, pointer, pointer, pointer]
    lib.scan_logits.restype = i64
    lib.quantize_rows.argtypes = [pointer, i32, i64, i64, i32, i64, pointer, pointer]
    lib.quantize_rows.restype = i64
    lib.dequantize.argtypes = [pointer, pointer, pointer, i64, i64, i32, i64, i32]
    lib.gemv_quant.argtypes = [i64, pointer, pointer, pointer, pointer, pointer, i64, i64, i64, i32, i32, i32]
    lib.rms_norm.argtypes = [pointer, pointer, pointer, i64, i64, ctypes.c_float, i32, i32]
    lib.attend_one.argtypes = [pointer, pointer, pointer, pointer, pointer, *[i64] * 8, ctypes.c_float,
                               ctypes.c_float, i32]
    lib.decode_layers.argtypes = [i64, *[pointer] * 3, i64, *[pointer] * 5, i64, i64]
    lib.decode_layers.restype = i64
    lib.decode_product_seconds.restype = ctypes.c_double
    return lib
