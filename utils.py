"""`load_hf_model`: a PaliGemma checkpoint folder streamed into the model, beside its tokenizer.

The model is built on the meta device; every safetensors header is read and checked, and every tensor matched to
a parameter by name and shape (checkpoint.py), before any parameter memory is allocated. Then each tensor is
copied piece by piece, converted to the target dtype on the way, so that at no time does a whole shard, or a whole
float32 copy of a large tensor, sit in memory; a tensor the file already holds in the target dtype is used in place.
"""

import ctypes
import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import kernels
from checkpoint import (
    HARMLESS_EXTRAS,
    LoadError,
    TensorEntry,
    check_tokenizer_files,
    find_shards,
    load_config,
    load_tokenizer,
    normalise_key,
    read_safetensors_header,
)
from console import gib, log, peak_rss_gib, progress
from modeling_paligemma import PaliGemmaForConditionalGeneration

MAP_IN_PLACE = True  # use tensors stored in the target dtype straight from the (privately) mapped files
WORKING_MEMORY = 1 << 29  # read buffer, activations and KV cache of one answer, beyond the weights


def plan_load(model: torch.nn.Module, shards: list[Path]) -> list[TensorEntry]:
    """Match every stored tensor to a parameter by name and shape; error on anything missing or unknown."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    plan, seen = [], {}
    for shard in shards:
        for entry in read_safetensors_header(shard):
            name = normalise_key(entry.key)
            if name in seen:
                raise LoadError(f"{shard}: tensor {entry.key!r} is stored twice (also in {seen[name].name})")
            seen[name] = shard
            if name not in expected:
                if name.startswith(HARMLESS_EXTRAS):
                    continue
                raise LoadError(f"{shard}: unexpected tensor {entry.key!r}, which this model has no parameter for")
            if entry.shape != expected[name]:
                raise LoadError(f"{shard}: tensor {entry.key!r} has shape {list(entry.shape)}, "
                                f"expected {list(expected[name])}")
            if entry.torch_dtype is None:
                raise LoadError(f"{shard}: tensor {entry.key!r} has dtype {entry.dtype}, not a floating-point one")
            entry.name = name
            plan.append(entry)
    skipped = sorted(n for n in seen if n not in expected)
    if skipped:
        log(f"warning: skipping {len(skipped)} unused stored tensors ({', '.join(skipped[:3])}"
            f"{', ...' if len(skipped) > 3 else ''})")
    missing = [n for n in expected if n not in seen]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LoadError(f"{shards[0].parent}: tensor {', '.join(missing[:3])}{more} missing from the checkpoint")
    return plan


def materialise(model: torch.nn.Module, plan: list[TensorEntry], dtype: torch.dtype,
                device: torch.device) -> tuple[list[TensorEntry], dict[Path, mmap.mmap]]:
    """Give every parameter memory in the target dtype. On the CPU, a tensor the file already holds in that dtype
    becomes a view straight into the shard's mapping: no copy, and the page cache is the weights (a 10B model in
    bfloat16 then fits beside its own files). Every other parameter gets fresh memory for the loader to fill.
    Returns the entries still to be copied, and the mapping of each shard that parameters use in place."""
    params = dict(model.named_parameters())  # a tied parameter is listed once
    views, mappings = {}, {}
    for file in dict.fromkeys(e.file for e in plan) if device.type == "cpu" and MAP_IN_PLACE else []:
        in_place = [e for e in plan if e.file == file and e.torch_dtype == dtype and e.start % dtype.itemsize == 0]
        if in_place:
            with open(file, "rb") as f:
                mappings[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: never writes the file
            flat = torch.frombuffer(mappings[file], dtype=torch.uint8)  # keeps the mapping alive with the parameters
            views.update((e.name, flat[e.start:e.start + e.nbytes].view(dtype).view(e.shape)) for e in in_place)
    for name, p in params.items():
        data = views.get(name)
        if data is None:
            data = torch.empty(p.shape, dtype=dtype, device=device)
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(data, requires_grad=False))
    model.reset_buffers()  # ties the head to the new embedding, computes RoPE frequencies, allocates empty caches
    return [e for e in plan if e.name not in views], mappings


def populate(mapped: mmap.mmap):
    """Read mapped weights in now (from the page cache, or the disk) rather than at the first token."""
    libc = ctypes.CDLL(None, use_errno=True)
    address = ctypes.c_char.from_buffer(mapped)
    try:  # MADV_POPULATE_READ (Linux 5.14) maps every page; older kernels get MADV_WILLNEED's read-ahead
        for advice in (22, mmap.MADV_WILLNEED):
            if libc.madvise(ctypes.c_void_p(ctypes.addressof(address)), ctypes.c_size_t(len(mapped)), advice) == 0:
                break
    finally:
        del address  # the mapping can only be closed once nothing points into it


def stream_tensors(model: torch.nn.Module, plan: list[TensorEntry], to_copy: list[TensorEntry],
                   in_place: dict[Path, mmap.mmap], bar=None):
    """Shard by shard: read in the parameters used in place, and copy each other tensor into its parameter,
    kernels.PIECE_BYTES at a time, converting to the parameter's dtype.

    Each piece is converted straight from the mapped shard (one pass over the bytes), then unmapped again: the page
    cache keeps the file, but the pages do not pile up in this process's memory. On the CPU the compiled kernel
    converts a whole shard in one call, without Python's lock (see load_hf_model).
    """
    params = dict(model.named_parameters())
    for file in dict.fromkeys(e.file for e in plan):
        if file in in_place:
            populate(in_place[file])
            if bar is not None:
                bar.update(sum(e.nbytes for e in plan if e.file == file and e not in to_copy))
        entries = [e for e in to_copy if e.file == file]
        if entries:
            with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
                for entry in entries:
                    if entry.start + entry.nbytes > len(mapped):
                        raise LoadError(f"{file}: ended early while reading tensor {entry.key!r}")
                dests = [params[e.name].data.view(-1) for e in entries]
                done = kernels.convert_shard(mapped, [(e.start, e.torch_dtype, d) for e, d in zip(entries, dests)])
                if done is not None and bar is not None:
                    bar.update(done)
                if done is None:
                    for entry, dest in zip(entries, dests):
                        copy_tensor(mapped, entry, dest, bar)


def copy_tensor(mapped: mmap.mmap, entry: TensorEntry, dest: torch.Tensor, bar=None):
    """One tensor from a mapped shard into dest, converted by PyTorch, a piece at a time."""
    itemsize = entry.torch_dtype.itemsize
    per_piece = kernels.PIECE_BYTES // itemsize
    for first in range(0, dest.numel(), per_piece):
        count = min(per_piece, dest.numel() - first)
        offset = entry.start + first * itemsize
        piece = torch.frombuffer(mapped, dtype=entry.torch_dtype, count=count, offset=offset)
        dest[first:first + count].copy_(piece)
        del piece  # the mapping can only be closed once no tensor views it
        page = offset - offset % mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, page, offset + count * itemsize - page)
        if bar is not None:
            bar.update(count * itemsize)


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on the device (Linux MemAvailable for the CPU), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(needed: int, device: torch.device):
    available = available_memory(device)
    if available is not None and needed > available:
        raise LoadError(f"loading needs about {needed / 2**30:.1f} GiB on {device} but only {available / 2**30:.1f} "
                        "GiB is available; free some memory, choose a smaller --dtype, or pass "
                        "--ignore_memory_check True to try anyway")


def load_hf_model(model_path: str | Path, device: str | torch.device, dtype: torch.dtype = torch.float16,
                  verbose: bool = True, memory_check: bool = True, tokenizer=None):
    """Build PaliGemma on the meta device and stream the folder's safetensors into it, while the folder's tokenizer
    loads beside it (unless one already loaded from the folder is passed in); returns (model, tokenizer). The model
    is the plain one: kernels.accelerate makes it fast on the CPU.

    Everything is checked before any parameter memory is allocated: the config, every shard's header, every
    tensor's name and shape, that there are tokenizer files, and (unless memory_check is False) that the weights
    fit in memory.
    """
    start = time.perf_counter()
    folder, device = Path(model_path), torch.device(device)
    config = load_config(folder)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    shards = find_shards(folder)
    plan = plan_load(model, shards)
    check_tokenizer_files(folder)
    if memory_check:
        weights = sum(p.numel() for p in model.parameters()) * dtype.itemsize
        check_memory(weights + WORKING_MEMORY, device)
    to_copy, in_place = materialise(model, plan, dtype, device)
    bar = progress(sum(e.nbytes for e in plan), "loading weights", "B", unit_scale=True, unit_divisor=1024,
                   disable=not verbose)
    with torch.no_grad(), bar, ThreadPoolExecutor(1) as background:
        # The tokenizer (about a second of Python) is read while the weights stream, which runs without the GIL.
        streaming = background.submit(stream_tensors, model, plan, to_copy, in_place, bar)
        try:
            tokenizer = tokenizer or load_tokenizer(folder)
        finally:
            failure = streaming.exception()  # waits for the weights, whatever happened to the tokenizer
        if failure:
            raise failure
    model.eval().requires_grad_(False)
    if verbose:
        n = sum(p.numel() for p in model.parameters())
        used_in_place = sum(e.nbytes for e in plan) - sum(e.nbytes for e in to_copy)
        log(f"loaded {n:,} parameters as {str(dtype).removeprefix('torch.')} on {device} in "
            f"{time.perf_counter() - start:.1f} s, peak memory {peak_rss_gib():.2f} GiB"
            + (f" ({gib(used_in_place)} GiB used in place from the files)" if used_in_place else ""))
    return model, tokenizer
