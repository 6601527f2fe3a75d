"""The loader's work in C (gemv.c's convert_shard, quant.c's quantizer): converting or quantizing a safetensors
shard's tensors straight from the file into the model's parameters, and counting the values that are not finite.
utils.py calls these; without the compiled library it converts with PyTorch, PIECE_BYTES at a time."""

import ctypes

import torch

from paligemma.clib import library
from paligemma.kernels import KINDS
from paligemma.quantization import QuantizedWeight

PIECE_BYTES = 64 << 20  # what the loader quantizes (or converts, without the compiled kernels) at a time


class ConvertJob(ctypes.Structure):
    """One tensor for gemv.c's convert_shard: where it starts in the file, where it goes, how many, which dtypes;
    or, bits 8 or 4, the quantized weight it goes into (its tiles at dst, its scales, its columns and group)."""

    _fields_ = [("src_offset", ctypes.c_int64), ("dst", ctypes.c_void_p), ("n", ctypes.c_int64),
                ("src_kind", ctypes.c_int32), ("dst_kind", ctypes.c_int32), ("bits", ctypes.c_int32),
                ("cols", ctypes.c_int64), ("group", ctypes.c_int64), ("scales", ctypes.c_void_p)]


def convert_shard(fd: int, jobs: list[tuple[int, torch.dtype, torch.Tensor | QuantizedWeight]]
                  ) -> tuple[int, int] | None:
    """Convert (source offset, source dtype, destination) jobs from the safetensors shard open as fd into their
    destinations, or quantize them into a QuantizedWeight, in one call of gemv.c, which runs without Python's lock,
    reads the file a block at a time into a buffer that stays in the cache (nothing of it is mapped into the
    process), and checks that every converted or quantized value is finite. Returns (source bytes converted, -1, or
    the index j of the first job with a value that is not finite, or -2 - j where the file could not be read), or
    None where the library cannot take the jobs."""
    lib = library()
    kinds = [KINDS.get(dtype) for _, dtype, _ in jobs] + [
        KINDS.get(dest.dtype) for _, _, dest in jobs if not isinstance(dest, QuantizedWeight)]
    devices = {(dest.qweight if isinstance(dest, QuantizedWeight) else dest).device.type for _, _, dest in jobs}
    if lib is None or None in kinds or devices - {"cpu"}:
        return None

    def job(offset: int, dtype: torch.dtype, dest: torch.Tensor | QuantizedWeight) -> ConvertJob:
        if isinstance(dest, QuantizedWeight):
            rows, cols = dest.shape
            return ConvertJob(offset, dest.qweight.data_ptr(), rows * cols, KINDS[dtype], 0, dest.scheme.bits, cols,
                              dest.scheme.group, dest.scales.data_ptr())
        return ConvertJob(offset, dest.data_ptr(), dest.numel(), KINDS[dtype], KINDS[dest.dtype])

    table = (ConvertJob * len(jobs))(*(job(*j) for j in jobs))
    done = ctypes.c_int64(0)
    bad = lib.convert_shard(fd, table, len(jobs), ctypes.byref(done))
    return done.value, bad


def count_nonfinite(tensor: torch.Tensor, threads: int = 0) -> int:
    """How many values of a CPU tensor are NaN or infinite: gemv.c reads it with `threads` threads (0: all),
    without Python's lock; PyTorch where it cannot."""
    lib, kind = library(), KINDS.get(tensor.dtype)
    if lib is None or kind is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return int((~torch.isfinite(tensor)).sum())
    return lib.nonfinite(tensor.data_ptr(), tensor.numel(), kind, threads)


def quantize_rows(source: int, source_dtype: torch.dtype, rows: int, cols: int, qweight: torch.Tensor,
                  scales: torch.Tensor, scheme) -> int:
    """Quantize rows x cols values of source_dtype at the address source into qweight and scales (a
    QuantizedWeight's buffers, or views of whole tiles of them) with quant.c, without Python's lock; returns how many
    values or scales are not finite. The same code as the loader's (convert_shard), on memory. The library must be
    there (quantization.quantize is the reference in PyTorch)."""
    return library().quantize_rows(source, KINDS[source_dtype], rows, cols, scheme.bits, scheme.group,
                                   qweight.data_ptr(), scales.data_ptr())
