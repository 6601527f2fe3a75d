"""Loading a PaliGemma checkpoint folder: config, safetensors shards streamed into the model, tokenizer.

The model is built on the meta device; every safetensors header is read and checked, and every tensor matched to
a parameter by name and shape, before any parameter memory is allocated. Then each tensor is copied piece by
piece, converted to the target dtype on the way, so that at no time does a whole shard, or a whole float32 copy of
a large tensor, sit in memory. Weights are only ever read from safetensors, never unpickled.
"""

import ctypes
import itertools
import json
import math
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tokenizer is read from the folder, never from a hub

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from kernels import library  # noqa: E402
from modeling_gemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration  # noqa: E402

hf_logging.set_verbosity_error()

PIECE_BYTES = 64 << 20  # what is converted from a shard at a time
MAP_IN_PLACE = True  # use tensors stored in the target dtype straight from the (privately) mapped files
MAX_HEADER_BYTES = 100 << 20  # the safetensors library refuses larger headers too
SAFETENSORS_DTYPES = {  # safetensors dtype -> (bytes per element, torch dtype for weights or None)
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16), "BF16": (2, torch.bfloat16),
    "I64": (8, None), "I32": (4, None), "I16": (2, None), "I8": (1, None), "U64": (8, None), "U32": (4, None),
    "U16": (2, None), "U8": (1, None), "BOOL": (1, None), "F8_E4M3": (1, None), "F8_E5M2": (1, None),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class LoadError(Exception):
    """A checkpoint folder, or a file in it, that cannot be used; the message names the file or tensor."""


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def log(msg: str, end: str = "\n"):
    print(msg, file=sys.stderr, end=end, flush=True)


# Key prefixes of the layouts transformers has written, longest first, mapped to this model's names (REFERENCE §2.2).
KEY_PREFIXES = [
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("lm_head.", "language_model.lm_head."),
]
# Stored but unused: the tied head (it is the embedding) and SigLIP's attention-pool head (PaliGemma has none).
HARMLESS_EXTRAS = ("language_model.lm_head.weight", "vision_tower.vision_model.head.")


def normalise_key(key: str) -> str:
    for old, new in KEY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


@dataclass
class TensorEntry:
    """Where one tensor lies in a shard."""

    file: Path
    key: str  # as stored in the file
    name: str  # this model's parameter name, once planned
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadError(f"{path}: {what} is missing") from None
    except OSError as e:
        raise LoadError(f"{path}: {what} cannot be read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path}: {what} is not a JSON object")
    return data


def load_config(model_path: str | Path) -> PaliGemmaConfig:
    folder = Path(model_path)
    if not folder.is_dir():
        raise LoadError(f"{folder}: model folder {'is a file, not a folder' if folder.exists() else 'does not exist'}")
    config_file = folder / "config.json"
    try:
        return PaliGemmaConfig.from_dict(read_json(config_file, "config.json"))
    except (TypeError, ValueError) as e:
        raise LoadError(f"{config_file}: {e}") from None


def read_safetensors_header(path: Path) -> list[TensorEntry]:
    """Parse and check a safetensors header without trusting it: sizes, dtypes, offsets inside the file, no overlap."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LoadError(f"{path}: too short to be a safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise LoadError(f"{path}: header length {n} runs past the end of the file ({size} bytes); "
                                "is the file truncated?")
            raw = f.read(n)
    except OSError as e:
        raise LoadError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise LoadError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path}: safetensors header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise LoadError(f"{path}: tensor {name!r} has no description in the header")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise LoadError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise LoadError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise LoadError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise LoadError(f"{path}: tensor {name!r} data [{begin}, {end}) lies outside the file's "
                            f"{data_size} data bytes; is the file truncated?")
        if end - begin != math.prod(shape) * SAFETENSORS_DTYPES[dtype][0]:
            raise LoadError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} of {dtype}")
        entries.append(TensorEntry(path, name, name, dtype, tuple(shape), data_start + begin, end - begin))
    entries.sort(key=lambda e: e.start)
    for a, b in zip(entries, entries[1:]):
        if b.start < a.start + a.nbytes:
            raise LoadError(f"{path}: tensors {a.key!r} and {b.key!r} overlap")
    return entries


def stop_tokens(folder: Path, config: PaliGemmaConfig) -> tuple[int, ...]:
    """The ids generation stops at: generation_config.json's eos_token_id (one id or a list, as transformers reads
    it; PaliGemma 2 fine-tunes may name <end_of_turn> too), else config.json's."""
    path = Path(folder) / "generation_config.json"
    eos = read_json(path, "generation_config.json").get("eos_token_id") if path.is_file() else None
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else [config.eos_token_id]
    if not ids or not all(type(i) is int and i >= 0 for i in ids):
        raise LoadError(f"{path}: eos_token_id must be a token id or a list of them, not {eos!r}")
    return tuple(ids)


def find_shards(folder: Path) -> list[Path]:
    """The safetensors files of the checkpoint, from the index if there is one."""
    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = read_json(index_file, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LoadError(f"{index_file}: has no valid weight_map")
        shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        for shard in shards:
            if shard.parent != folder or not shard.is_file():
                raise LoadError(f"{shard}: shard named by {index_file.name} is missing")
        return shards
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise LoadError(f"{folder}: only pickle weights ({', '.join(pickles)}); they can run arbitrary code and are "
                        "never loaded; convert them to safetensors")
    raise LoadError(f"{folder}: no weights (model.safetensors or model.safetensors.index.json)")


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
            if SAFETENSORS_DTYPES[entry.dtype][1] is None:
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


def allocate(shapes: list[torch.Size], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Uninitialised tensors; on the CPU, consecutive views of one block, so that weights registered side by side
    (q, k, v; gate, up) lie side by side in memory and kernels.linears can multiply them as one matrix."""
    if device.type != "cpu":
        return [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
    align = 64 // dtype.itemsize  # elements; every tensor starts on a cache line
    sizes = [-(-math.prod(shape) // align) * align for shape in shapes]
    block = torch.empty(sum(sizes), dtype=dtype)
    starts = itertools.accumulate(sizes, initial=0)
    return [block[start:start + math.prod(shape)].view(shape) for start, shape in zip(starts, shapes)]


def materialise(model: torch.nn.Module, plan: list[TensorEntry], dtype: torch.dtype,
                device: torch.device) -> tuple[list[TensorEntry], list[mmap.mmap]]:
    """Give every parameter memory in the target dtype. On the CPU, a tensor the file already holds in that dtype
    becomes a view straight into the shard's mapping: no copy, and the page cache is the weights (a 10B model in
    bfloat16 then fits beside its own files). Every other parameter gets fresh memory for the loader to fill.
    Returns the entries still to be copied, and the mapping of each shard that parameters use in place."""
    params = dict(model.named_parameters())  # a tied parameter is listed once
    views, mappings = {}, {}
    for file in dict.fromkeys(e.file for e in plan) if device.type == "cpu" and MAP_IN_PLACE else []:
        in_place = [e for e in plan if e.file == file and SAFETENSORS_DTYPES[e.dtype][1] == dtype
                    and e.start % dtype.itemsize == 0]
        if in_place:
            with open(file, "rb") as f:
                mappings[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: never writes the file
            flat = torch.frombuffer(mappings[file], dtype=torch.uint8)  # keeps the mapping alive with the parameters
            views.update((e.name, flat[e.start:e.start + e.nbytes].view(dtype).view(e.shape)) for e in in_place)
    to_fill = [name for name in params if name not in views]
    views.update(zip(to_fill, allocate([params[name].shape for name in to_fill], dtype, device)))
    for name, data in views.items():
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(data, requires_grad=False))
    model.reset_buffers()  # ties the head to the new embedding, computes RoPE frequencies
    return [e for e in plan if e.name in to_fill], mappings


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


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f}" if nbytes >= 2**27 else f"{nbytes / 2**30:.5f}"


class Progress:
    """Weights loaded so far, on stderr: a line per shard, redrawn in place in between on a terminal."""

    def __init__(self, total: int, n_shards: int):
        self.total, self.n_shards, self.done, self.shards_done = total, n_shards, 0, 0
        self.tty, self.last_draw = sys.stderr.isatty(), 0.0

    def draw(self, end: str):
        log(f"{chr(13) if self.tty else ''}loading weights: {gib(self.done)} / {gib(self.total)} GiB, "
            f"{self.shards_done}/{self.n_shards} shards", end=end)

    def add(self, nbytes: int):
        self.done += nbytes
        if self.tty and time.monotonic() - self.last_draw > 0.2:
            self.last_draw = time.monotonic()
            self.draw(end="")

    def shard_done(self):
        self.shards_done += 1
        self.draw(end="\n")


def stream_tensors(model: torch.nn.Module, plan: list[TensorEntry], to_copy: list[TensorEntry],
                   in_place: dict[Path, mmap.mmap], progress: Progress | None = None):
    """Shard by shard: read in the parameters used in place, and copy each other tensor into its parameter,
    PIECE_BYTES at a time, converting to the parameter's dtype.

    Each piece is converted straight from the mapped shard (one pass over the bytes), then unmapped again: the page
    cache keeps the file, but the pages do not pile up in this process's memory. On the CPU the compiled kernel
    converts a whole shard in one call, without Python's lock (see load_hf_model).
    """
    params = dict(model.named_parameters())
    for file in dict.fromkeys(e.file for e in plan):
        if file in in_place:
            populate(in_place[file])
            if progress:
                progress.add(sum(e.nbytes for e in plan if e.file == file and e not in to_copy))
        entries = [e for e in to_copy if e.file == file]
        if entries:
            with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
                for entry in entries:
                    if entry.start + entry.nbytes > len(mapped):
                        raise LoadError(f"{file}: ended early while reading tensor {entry.key!r}")
                dests = [params[e.name].data.view(-1) for e in entries]
                if not convert_shard(mapped, entries, dests, progress):
                    for entry, dest in zip(entries, dests):
                        copy_tensor(mapped, entry, dest, progress)
        if progress:
            progress.shard_done()


KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # as gemv.c's convert_shard numbers them


class ConvertJob(ctypes.Structure):
    _fields_ = [("src_offset", ctypes.c_int64), ("dst", ctypes.c_void_p), ("n", ctypes.c_int64),
                ("src_kind", ctypes.c_int32), ("dst_kind", ctypes.c_int32)]


def convert_shard(mapped: mmap.mmap, entries: list[TensorEntry], dests: list[torch.Tensor], progress) -> bool:
    """The whole shard through gemv.c's convert_shard, if it can take it (CPU, 32- and 16-bit floats)."""
    lib = library()
    kinds = [(KINDS.get(SAFETENSORS_DTYPES[e.dtype][1]), KINDS.get(d.dtype)) for e, d in zip(entries, dests)]
    if lib is None or not mapped or any(d.device.type != "cpu" or None in k for d, k in zip(dests, kinds)):
        return False
    jobs = (ConvertJob * len(entries))(*(ConvertJob(e.start, d.data_ptr(), d.numel(), *k)
                                         for e, d, k in zip(entries, dests, kinds)))
    done, base = ctypes.c_int64(0), ctypes.c_char.from_buffer(mapped)
    try:
        lib.convert_shard(ctypes.addressof(base), jobs, len(entries), PIECE_BYTES, ctypes.byref(done))
    finally:
        del base  # the mapping can only be closed once nothing points into it
    if progress:
        progress.add(done.value)
    return True


def copy_tensor(mapped: mmap.mmap, entry: TensorEntry, dest: torch.Tensor, progress: Progress | None):
    itemsize, dtype = SAFETENSORS_DTYPES[entry.dtype]
    per_piece = PIECE_BYTES // itemsize
    for first in range(0, dest.numel(), per_piece):
        count = min(per_piece, dest.numel() - first)
        offset = entry.start + first * itemsize
        piece = torch.frombuffer(mapped, dtype=dtype, count=count, offset=offset)
        dest[first:first + count].copy_(piece)
        del piece  # the mapping can only be closed once no tensor views it
        page = offset - offset % mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, page, offset + count * itemsize - page)
        if progress:
            progress.add(count * itemsize)


def check_tokenizer_files(folder: Path):
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise LoadError(f"{folder}: no tokenizer files ({' or '.join(TOKENIZER_FILES)})")


def load_tokenizer(folder: Path):
    check_tokenizer_files(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # the tokenizer libraries raise many kinds of errors for a broken file
        raise LoadError(f"{folder}: the tokenizer cannot be loaded ({type(e).__name__}: {e})") from None


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


WORKING_MEMORY = 1 << 29  # read buffer, activations and KV cache of one answer, beyond the weights


def check_memory(needed: int, device: torch.device):
    available = available_memory(device)
    if available is not None and needed > available:
        raise LoadError(f"loading needs about {needed / 2**30:.1f} GiB on {device} but only {available / 2**30:.1f} "
                        "GiB is available; free some memory, choose a smaller --dtype, or pass "
                        "--ignore_memory_check True to try anyway")


def load_hf_model(model_path: str | Path, device: str | torch.device, dtype: torch.dtype = torch.float16,
                  verbose: bool = True, memory_check: bool = True, tokenizer=None):
    """Build PaliGemma on the meta device and stream the folder's safetensors into it; returns (model, tokenizer).

    Everything is checked before any parameter memory is allocated: the config, every shard's header, every
    tensor's name and shape, the tokenizer (unless one already loaded from the folder is passed in), and (unless
    memory_check is False) that the weights fit in memory.
    """
    start = time.perf_counter()
    folder, device = Path(model_path), torch.device(device)
    config = load_config(folder)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    shards = find_shards(folder)
    plan = plan_load(model, shards)
    if tokenizer is None:
        check_tokenizer_files(folder)
    if memory_check:
        weights = sum(p.numel() for p in model.parameters()) * dtype.itemsize
        check_memory(weights + WORKING_MEMORY, device)
    to_copy, in_place = materialise(model, plan, dtype, device)
    progress = Progress(sum(e.nbytes for e in plan), len(shards)) if verbose else None
    with torch.no_grad(), ThreadPoolExecutor(1) as background:
        # The tokenizer (about a second of Python) is read while the weights stream, which runs without the GIL.
        streaming = background.submit(stream_tensors, model, plan, to_copy, in_place, progress)
        try:
            tokenizer = tokenizer or load_tokenizer(folder)
        finally:
            failure = streaming.exception()  # waits for the weights, whatever happened to the tokenizer
        if failure:
            raise failure
    model.eval().requires_grad_(False)
    if verbose:
        n = sum(p.numel() for p in model.parameters())
        in_place = sum(e.nbytes for e in plan) - sum(e.nbytes for e in to_copy)
        log(f"loaded {n:,} parameters as {str(dtype).removeprefix('torch.')} on {device} in "
            f"{time.perf_counter() - start:.1f} s, peak memory {peak_rss_gib():.2f} GiB"
            + (f" ({gib(in_place)} GiB used in place from the files)" if in_place else ""))
    return model, tokenizer


def peak_rss_gib() -> float:
    """The process's peak resident set (VmHWM), in GiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
