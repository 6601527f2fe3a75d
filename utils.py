"""`load_hf_model`: a PaliGemma checkpoint folder streamed into the model, beside its tokenizer.

The model is built on the meta device; every safetensors header is read and checked, and every tensor matched to
a parameter by name and shape (checkpoint.py), before any parameter memory is allocated. Then each tensor is
copied piece by piece, converted to the target dtype on the way, so that at no time does a whole shard, or a whole
float32 copy of a large tensor, sit in memory; a tensor the file already holds in the target dtype is used in place.
"""

import ctypes
import math
import mmap
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from paligemma import conversion, kernels, quantization
from paligemma.checkpoint import (
    HARMLESS_EXTRAS,
    LoadError,
    TensorEntry,
    check_tokenizer_files,
    default_dtype,
    find_shards,
    load_config,
    load_tokenizer,
    normalise_key,
    read_safetensors_header,
    warn_about_dtype,
)
from paligemma.console import gib, log, peak_rss_gib, progress
from paligemma.modeling_gemma import QUERY_CHUNK
from paligemma.modeling_paligemma import CACHE_STEP, PaliGemmaConfig, PaliGemmaForConditionalGeneration
from paligemma.quantization import QuantizedWeight

MAP_IN_PLACE = True  # use tensors stored in the target dtype straight from the (privately) mapped files


def plan_load(model: torch.nn.Module, shards: list[Path]) -> list[TensorEntry]:
    """Match every stored tensor to a parameter (or a quantized weight's buffer) by name and shape, or mark a full-
    precision weight to be quantized into its QuantizedWeight module; error on anything missing or unknown."""
    expected = {name: (tuple(p.shape), None) for name, p in model.named_parameters()}
    expected.update((name, (tuple(b.shape), b.dtype)) for name, b in model.named_buffers()
                    if name.endswith((".qweight", ".scales")))
    quantized = {name: m.shape for name, m in model.named_modules() if isinstance(m, QuantizedWeight)}
    plan, seen = [], {}
    for shard in shards:
        for entry in read_safetensors_header(shard):
            name = normalise_key(entry.key)
            if name in seen:
                raise LoadError(f"{shard}: tensor {entry.key!r} is stored twice (also in {seen[name].name})")
            seen[name] = shard
            if name not in expected and name not in quantized:
                if name.startswith(HARMLESS_EXTRAS):
                    continue
                raise LoadError(f"{shard}: unexpected tensor {entry.key!r}, which this model has no parameter for")
            shape, dtype = expected.get(name) or (quantized[name], None)
            if entry.shape != shape:
                raise LoadError(f"{shard}: tensor {entry.key!r} has shape {list(entry.shape)}, expected {list(shape)}")
            if dtype is not None and entry.torch_dtype != dtype:
                raise LoadError(f"{shard}: tensor {entry.key!r} has dtype {entry.dtype}, expected "
                                f"{str(dtype).removeprefix('torch.')}")
            if dtype is None and not (entry.torch_dtype and entry.torch_dtype.is_floating_point):
                raise LoadError(f"{shard}: tensor {entry.key!r} has dtype {entry.dtype}, not a floating-point one")
            entry.name, entry.quantize = name, name in quantized
            plan.append(entry)
    skipped = sorted(n for n in seen if n not in expected and n not in quantized)
    if skipped:
        log(f"warning: skipping {len(skipped)} unused stored tensors ({', '.join(skipped[:3])}"
            f"{', ...' if len(skipped) > 3 else ''})")
    missing = [n for n in expected if n not in seen and n.rpartition(".")[0] not in quantized]
    for name in quantized:  # stored in full precision, to quantize now, or stored quantized
        stored = (f"{name}.qweight" in seen) + (f"{name}.scales" in seen)
        if (name in seen) + (stored == 2) != 1:
            missing.append(name if stored == 0 else f"{name}.qweight and .scales, or {name} alone,")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LoadError(f"{shards[0].parent}: tensor {', '.join(missing[:3])}{more} missing from the checkpoint")
    return plan


def materialise(model: torch.nn.Module, plan: list[TensorEntry], dtype: torch.dtype,
                device: torch.device) -> list[TensorEntry]:
    """Give every parameter and quantized buffer memory: parameters in the target dtype, quantized buffers in their
    own. On the CPU, a tensor the file already holds in that dtype becomes a view straight into the shard's mapping:
    no copy, and the page cache is the weights (a 10B model in bfloat16 then fits beside its own files). Everything
    else gets fresh memory for the loader to fill. Returns the entries still to be copied or quantized."""
    targets = {name: (p.shape, dtype) for name, p in model.named_parameters()}  # a tied parameter is listed once
    targets.update((name, (b.shape, b.dtype)) for name, b in model.named_buffers()
                   if name.endswith((".qweight", ".scales")))
    views = {}
    for file in dict.fromkeys(e.file for e in plan) if device.type == "cpu" and MAP_IN_PLACE else []:
        in_place = [e for e in plan if e.file == file and not e.quantize and e.torch_dtype == targets[e.name][1]
                    and e.start % e.torch_dtype.itemsize == 0]
        if in_place:
            with open(file, "rb") as f:
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: never writes the file
            flat = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive with the parameters
            views.update((e.name, flat[e.start:e.start + e.nbytes].view(e.torch_dtype).view(e.shape))
                         for e in in_place)
    for name, (shape, target_dtype) in targets.items():
        data = views.get(name)
        if data is None:
            data = torch.empty(shape, dtype=target_dtype, device=device)
            if device.type == "cpu":
                huge_pages(data)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, data if isinstance(module, QuantizedWeight) else torch.nn.Parameter(data, False))
    model.reset_buffers()  # ties the head to the new embedding, computes RoPE frequencies, allocates empty caches
    return [e for e in plan if e.name not in views]


def stream_tensors(model: torch.nn.Module, plan: list[TensorEntry], to_copy: list[TensorEntry], bar=None,
                   stop: threading.Event | None = None):
    """Shard by shard: read in the tensors used in place, copy each other tensor into its parameter, converting to
    its dtype, and quantize each weight that is to be. Every value is checked to be finite. Once stop is set, no
    further shard is begun.

    On the CPU the compiled kernel converts and quantizes a whole shard in one call, without Python's lock (see
    load_hf_model), reading it a block at a time into a buffer: nothing of the file is mapped, and the page cache
    keeps it. Without the compiled kernel, PyTorch converts and quantizes conversion.PIECE_BYTES at a time straight from
    the mapped shard, each piece unmapped again, so that its pages do not pile up in this process's memory either.
    """
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    modules = dict(model.named_modules())
    copied = {e.name for e in to_copy}  # a set: comparing entries one by one costs a second on a full checkpoint
    for file in dict.fromkeys(e.file for e in plan):
        if stop is not None and stop.is_set():
            return
        for entry in (e for e in plan if e.file == file and e.name not in copied):  # in place: map in, then check
            populate(tensors[entry.name])
            # One thread: the other core loads the tokenizer meanwhile (load_hf_model), so the check costs no time.
            if entry.torch_dtype.is_floating_point and conversion.count_nonfinite(tensors[entry.name], threads=1):
                raise not_finite(entry, entry.torch_dtype)
            if bar is not None:
                bar.update(entry.nbytes)
        entries = [e for e in to_copy if e.file == file]
        if not entries:
            continue
        with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
            for entry in entries:
                if entry.start + entry.nbytes > len(mapped):
                    raise LoadError(f"{file}: ended early while reading tensor {entry.key!r}")
            dests = [modules[e.name] if e.quantize else tensors[e.name].data.view(-1) for e in entries]
            jobs = [(e.start, e.torch_dtype, d) for e, d in zip(entries, dests)]
            converted = conversion.convert_shard(f.fileno(), jobs)
            if converted is None:
                for entry, dest in zip(entries, dests):
                    (quantize_tensor if entry.quantize else copy_tensor)(mapped, entry, dest, bar)
                continue
            done, bad = converted
            if bad <= -2:
                raise LoadError(f"{file}: cannot be read while converting tensor {entries[-2 - bad].key!r} (did the "
                                "file change, or the disk fail?)")
            if bad >= 0:
                raise not_finite(entries[bad], dests[bad].scheme.name if entries[bad].quantize else dests[bad].dtype)
            if bar is not None:
                bar.update(done)


def quantize_tensor(mapped: mmap.mmap, entry: TensorEntry, weight: QuantizedWeight, bar=None):
    """A full-precision weight from a mapped shard quantized into weight by PyTorch, a piece of rows at a time, each
    piece's pages dropped from the process once done: never the whole weight in full precision."""
    rows, cols = entry.shape
    itemsize = entry.torch_dtype.itemsize
    tile = quantization.TILE  # pieces of whole tiles: the last one pads its tile
    per_piece = max(1, conversion.PIECE_BYTES // (cols * itemsize * tile)) * tile
    advise(mapped, mmap.MADV_WILLNEED, entry.start, min(per_piece, rows) * cols * itemsize)
    for first in range(0, rows, per_piece):
        count = min(per_piece, rows - first)
        offset = entry.start + first * cols * itemsize
        advise(mapped, mmap.MADV_WILLNEED, offset + count * cols * itemsize,  # the next piece, meanwhile
               min(per_piece, rows - first - count) * cols * itemsize)
        piece = torch.frombuffer(mapped, dtype=entry.torch_dtype, count=count * cols, offset=offset)
        bad = int(not torch.isfinite(piece).all())
        q, scales = quantization.quantize(piece.view(count, cols), weight.scheme)
        weight.qweight[first // tile:(first + count + tile - 1) // tile].copy_(q)
        weight.scales[first:first + (count + tile - 1) // tile * tile].copy_(scales)
        bad += int(not torch.isfinite(scales).all())
        del piece  # the mapping can only be closed once no tensor views it
        if bad:
            raise not_finite(entry, weight.scheme.name)
        advise(mapped, mmap.MADV_DONTNEED, offset, count * cols * itemsize)
        if bar is not None:
            bar.update(count * cols * itemsize)


LIBC = ctypes.CDLL(None, use_errno=True)


def advise(mapped: mmap.mmap, advice: int, start: int, length: int):
    """madvise bytes start .. start + length of a mapping (from the page that holds start; nothing if length is 0).
    MADV_DONTNEED drops pages already converted from the process; MADV_WILLNEED has the kernel read a range in now,
    in large requests, while the caller works on the range before it: a cold file read a page fault at a time came
    in at 5-12 MB/s where the disk gives 700 MB/s."""
    page = start - start % mmap.PAGESIZE
    if length > 0:
        mapped.madvise(advice, page, min(start + length, len(mapped)) - page)


HUGE_PAGE, MADV_HUGEPAGE = 2 << 20, 14


def huge_pages(tensor: torch.Tensor):
    """Ask for 2 MiB pages under a tensor not yet written: filling 5.8 GB of fresh memory then takes thousands of
    page faults instead of 1.4 million (the kernel's time was most of loading), and streaming the weights needs
    fewer TLB entries. Only where transparent huge pages are given on request; elsewhere nothing changes."""
    start = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (tensor.data_ptr() + tensor.nbytes) // HUGE_PAGE * HUGE_PAGE
    if end > start:
        LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE)


def populate(tensor: torch.Tensor):
    """Map a tensor used in place from a file in at once (MADV_POPULATE_READ, Linux 5.14; older kernels get
    MADV_WILLNEED's read-ahead): far faster than a page fault per page as it is first read."""
    start = tensor.data_ptr() - tensor.data_ptr() % mmap.PAGESIZE
    length = tensor.data_ptr() + tensor.nbytes - start
    for advice in (22, mmap.MADV_WILLNEED):
        if LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice) == 0:
            return


def not_finite(entry: TensorEntry, dtype: torch.dtype | str) -> LoadError:
    name = str(dtype).removeprefix("torch.")
    return LoadError(f"{entry.file}: tensor {entry.key!r} has values that are not finite as {name} (NaN or infinity "
                     f"in the file, or beyond {name}'s range); the checkpoint is damaged, or needs another --dtype")


def copy_tensor(mapped: mmap.mmap, entry: TensorEntry, dest: torch.Tensor, bar=None):
    """One tensor from a mapped shard into dest, converted and checked by PyTorch, a piece at a time."""
    itemsize = entry.torch_dtype.itemsize
    per_piece = conversion.PIECE_BYTES // itemsize
    for first in range(0, dest.numel(), per_piece):
        count = min(per_piece, dest.numel() - first)
        offset = entry.start + first * itemsize
        piece = torch.frombuffer(mapped, dtype=entry.torch_dtype, count=count, offset=offset)
        dest[first:first + count].copy_(piece)
        del piece  # the mapping can only be closed once no tensor views it
        if not torch.isfinite(dest[first:first + count]).all():
            raise not_finite(entry, dest.dtype)
        advise(mapped, mmap.MADV_DONTNEED, offset, count * itemsize)
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


def working_memory(config: PaliGemmaConfig, batch: int, length: int, dtype: torch.dtype) -> int:
    """Bytes beyond the weights that answering batch rows of up to length positions (prompt and answer) takes: the
    KV cache as allocated (rounded up to CACHE_STEP positions), the prompt's activations and attention scores in
    float32 at worst, the scratch buffer a prompt's products widen weights into, the logits, and 256 MiB for the
    libraries."""
    text, vision = config.text_config, config.vision_config
    length = -(-length // CACHE_STEP) * CACHE_STEP
    cache = 2 * text.num_hidden_layers * batch * text.num_key_value_heads * length * text.head_dim * dtype.itemsize
    rows = batch * length
    activations = 4 * rows * (3 * text.intermediate_size + 6 * text.hidden_size)
    scores = 4 * batch * text.num_attention_heads * min(length, QUERY_CHUNK) * length
    patches = batch * vision.num_patches
    vision_tower = 4 * patches * (3 * vision.intermediate_size + 6 * vision.hidden_size)
    scratch = min(kernels.SCRATCH_BYTES, 4 * text.hidden_size * max(text.intermediate_size, text.vocab_size))
    logits = 4 * 4 * batch * text.vocab_size
    return cache + activations + scores + vision_tower + scratch + logits + (256 << 20)


def check_memory(needed: int, device: torch.device):
    available = available_memory(device)
    if available is not None and needed > available:
        raise LoadError(f"loading and answering need about {needed / 2**30:.1f} GiB on {device} but only "
                        f"{available / 2**30:.1f} GiB is available; free some memory, choose a smaller --dtype or "
                        "--batch_size, or pass --ignore_memory_check True to try anyway")


def load_hf_model(model_path: str | Path, device: str | torch.device, dtype: torch.dtype | None = None,
                  verbose: bool = True, memory_check: bool = True, tokenizer=None, batch: int = 1, length: int = 512,
                  quantize: str | None = None):
    """Build PaliGemma on the meta device and stream the folder's safetensors into it, while the folder's tokenizer
    loads beside it (unless one already loaded from the folder is passed in); returns (model, tokenizer). The model
    is the plain one: kernels.accelerate makes it fast on the CPU. dtype None is the checkpoint's own
    (checkpoint.default_dtype). quantize "int8" or "int4" quantizes the decoder's weights while they stream
    (quantization.py); a folder saved quantized loads quantized, in place.

    Everything is checked before any parameter memory is allocated: the config, every shard's header, every
    tensor's name and shape, that there are tokenizer files, and (unless memory_check is False) that the weights
    and the working memory of answering `batch` rows of `length` positions fit in memory.
    """
    start = time.perf_counter()
    folder, device = Path(model_path), torch.device(device)
    config, saved = load_config(folder), quantization.read_scheme(folder)
    if quantize and saved and quantize != saved.name:
        raise LoadError(f"{folder}: holds {saved.name} weights, not {quantize}")
    scheme = saved or quantization.SCHEMES.get(quantize)
    if scheme and device.type != "cpu":
        raise LoadError("quantized weights run on the CPU only for now: pass --only_cpu True, or load a checkpoint "
                        "in full precision")
    shards = find_shards(folder)
    dtype = dtype or default_dtype(config, shards)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
        if scheme:
            quantization.prepare(model, scheme, dtype)
    plan = plan_load(model, shards)
    check_tokenizer_files(folder)
    if verbose:
        warn_about_dtype(config, dtype)
    if memory_check:
        weights = sum(p.numel() for p in model.parameters()) * dtype.itemsize + sum(
            b.numel() * b.element_size() for name, b in model.named_buffers() if name.endswith((".qweight", ".scales")))
        check_memory(weights + working_memory(config, batch, length, dtype), device)
    to_copy = materialise(model, plan, dtype, device)
    bar = progress(sum(e.nbytes for e in plan), "loading weights", "B", unit_scale=True, unit_divisor=1024,
                   disable=not verbose)
    with torch.no_grad(), bar, ThreadPoolExecutor(1) as background:
        # The tokenizer (about a second of Python) is read while the weights stream, which runs without the GIL.
        stop, streaming = threading.Event(), None
        try:
            # Ctrl-C is held while the thread starts: inside submit it would leave a thread the executor does not
            # know of, streaming on while the interpreter exits (a C++ abort); here it stops the weights.
            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                streaming = background.submit(stream_tensors, model, plan, to_copy, bar, stop)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
            tokenizer = tokenizer or load_tokenizer(folder)
        except BaseException:
            stop.set()  # the weights are of no use without it
            raise
        finally:  # waits for the weights, whatever happened to the tokenizer
            failure = streaming.exception() if streaming is not None else None
        if failure:
            raise failure
    model.eval().requires_grad_(False)
    if verbose:
        n = sum(p.numel() for p in model.parameters()) + sum(
            math.prod(m.shape) for m in model.modules() if isinstance(m, QuantizedWeight))
        used_in_place = sum(e.nbytes for e in plan) - sum(e.nbytes for e in to_copy)
        log(f"loaded {n:,} parameters as {str(dtype).removeprefix('torch.')}"
            + (f" ({scheme.name} in the decoder)" if scheme else "") + f" on {device} in "
            f"{time.perf_counter() - start:.1f} s, peak memory {peak_rss_gib():.2f} GiB"
            + (f" ({gib(used_in_place)} GiB used in place from the files)" if used_in_place else ""))
    return model, tokenizer
