"""What a PaliGemma checkpoint folder holds, read and checked without trusting it: config.json,
generation_config.json, the shard index, every safetensors header, the key names, and the tokenizer.

Nothing here allocates weights: utils.py streams them once everything below has been checked. Weights are only
ever read from safetensors, never unpickled.
"""

import gc
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from paligemma.console import UserError, kind_of, log, require_file
from paligemma.modeling_paligemma import PaliGemmaConfig

MAX_HEADER_BYTES = 100 << 20  # the safetensors library refuses larger headers too
SAFETENSORS_DTYPES = {  # safetensors dtype -> (bytes per element, torch dtype for weights or None)
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16), "BF16": (2, torch.bfloat16),
    "I64": (8, None), "I32": (4, None), "I16": (2, None), "I8": (1, torch.int8), "U64": (8, None), "U32": (4, None),
    "U16": (2, None), "U8": (1, torch.uint8), "BOOL": (1, None), "F8_E4M3": (1, None), "F8_E5M2": (1, None),
}  # int8 and uint8 hold quantized weights (quantization.py)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
TOKENIZER_SETTINGS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")  # JSON read beside them

# Key prefixes of the layouts transformers has written, longest first, mapped to this model's names
# (docs/NUMERICS.md §2).
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


class LoadError(UserError):
    """A checkpoint folder, or a file in it, that cannot be used; the message names the file or tensor."""


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
    quantize: bool = False  # a full-precision weight to quantize into the QuantizedWeight module `name`

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return SAFETENSORS_DTYPES[self.dtype][1]


def read_json(path: Path, what: str) -> dict:
    if kind_of(path) not in ("a file", "nothing"):
        raise LoadError(f"{path}: {what} is {kind_of(path)}, not a file")
    try:
        text = path.read_bytes().decode("utf-8")  # read_text's newline scan costs a 17 MB tokenizer.json 0.15 s
        gc.disable()  # parsing makes no cycles: the collector's passes over a tokenizer's 500k new objects cost 1/3
        try:
            data = json.loads(text)
        finally:
            gc.enable()
    except FileNotFoundError:
        raise LoadError(f"{path}: {what} is missing") from None
    except OSError as e:
        raise LoadError(f"{path}: {what} cannot be read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path}: {what} is not a JSON object")
    return data


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?", re.ASCII)  # org/name, maybe @revision


def model_folder(model_path: str) -> Path:
    """--model_path as a folder: a folder as given, or a Hub id (org/name, @branch, @tag or @commit) found in the
    local Hugging Face cache as huggingface_hub resolves it offline (refs/<revision> names the snapshot). Nothing is
    ever downloaded."""
    path = Path(model_path)
    if kind_of(path) != "nothing" or not HUB_ID.fullmatch(model_path):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    repo_id, _, revision = model_path.partition("@")
    cache = hub_cache()
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):  # not cached, or no Hub id after all (a mistyped path)
        get = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
        raise LoadError(f"{model_path} is neither a folder nor in the Hugging Face cache {cache}; download it with: "
                        f"{get} (huggingface-cli download with huggingface_hub before 1.0)") from None


def hub_cache() -> Path:
    """The Hugging Face cache by huggingface_hub's rules, read now (its own constants are read once, at import)."""
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.environ.get("HF_HUB_CACHE") or Path(home, "hub")).expanduser()


def load_config(model_path: str | Path) -> PaliGemmaConfig:
    folder = Path(model_path)
    kind = kind_of(folder)
    if kind != "a folder":
        raise LoadError(f"{folder}: model folder "
                        + ("does not exist" if kind == "nothing" else f"is {kind}, not a folder"))
    config_file = folder / "config.json"
    try:
        return PaliGemmaConfig.from_dict(read_json(config_file, "config.json"))
    except (TypeError, ValueError) as e:
        raise LoadError(f"{config_file}: {e}") from None


def stop_tokens(folder: Path, config: PaliGemmaConfig) -> tuple[int, ...]:
    """The ids generation stops at: generation_config.json's eos_token_id (one id or a list, as transformers reads
    it; PaliGemma 2 fine-tunes may name <end_of_turn> too), else config.json's."""
    path = Path(folder) / "generation_config.json"
    eos = read_json(path, "generation_config.json").get("eos_token_id") if kind_of(path) != "nothing" else None
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else [config.eos_token_id]
    if not ids or not all(type(i) is int and i >= 0 for i in ids):
        raise LoadError(f"{path}: eos_token_id must be a token id or a list of them, not {eos!r}")
    return tuple(ids)


def read_safetensors_header(path: Path) -> list[TensorEntry]:
    """Parse and check a safetensors header without trusting it: sizes, dtypes, offsets inside the file, no overlap."""
    if kind_of(path) != "a file":
        raise LoadError(f"{path}: shard is {kind_of(path)}, not a file")
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


def find_shards(folder: Path) -> list[Path]:
    """The safetensors files of the checkpoint, from the index if there is one."""
    index_file = folder / "model.safetensors.index.json"
    if kind_of(index_file) != "nothing":
        weight_map = read_json(index_file, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LoadError(f"{index_file}: has no valid weight_map")
        if not weight_map:
            raise LoadError(f"{index_file}: weight_map names no tensors")
        shards = []
        for name in dict.fromkeys(weight_map.values()):
            shard = folder / name
            if Path(name).name != name:  # the name, not its target: a hub cache links every file into blobs/
                raise LoadError(f"{index_file}: shard {name!r} lies outside the checkpoint folder; shards are read "
                                "from the folder itself only")
            kind = kind_of(shard)
            if kind != "a file":
                raise LoadError(f"{shard}: shard named by {index_file.name} "
                                f"{'is missing' if kind == 'nothing' else f'is {kind}, not a file'}")
            shards.append(shard)
        return shards
    single = folder / "model.safetensors"
    if kind_of(single) != "nothing":
        require_file(single, "the weights")
        return [single]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)  # never opened
    if pickles:
        raise LoadError(f"{folder}: only pickle weights ({', '.join(pickles)}); they can run arbitrary code and are "
                        "never loaded; convert them to safetensors")
    raise LoadError(f"{folder}: no weights (model.safetensors or model.safetensors.index.json)")


def check_tokenizer_files(folder: Path) -> dict[str, dict]:
    """That the folder has a tokenizer, and that its files are files; returns the JSON settings files beside it
    (tokenizer_config.json, ...) that are there, read and checked."""
    present = [folder / name for name in TOKENIZER_FILES if kind_of(folder / name) != "nothing"]
    if not present:
        raise LoadError(f"{folder}: no tokenizer files ({' or '.join(TOKENIZER_FILES)})")
    for path in present:
        if kind_of(path) != "a file":
            raise LoadError(f"{path}: tokenizer file is {kind_of(path)}, not a file")
    return {name: read_json(folder / name, name) for name in TOKENIZER_SETTINGS if kind_of(folder / name) != "nothing"}


def tokenizer_vocab(folder: Path) -> dict[str, int] | None:
    """Every token of the folder's tokenizer and its id, read from tokenizer.json and tokenizer_config.json without
    building the tokenizer (which takes seconds, and is built while the weights stream); None for a folder whose
    tokenizer is tokenizer.model alone. LoadError names a file that is broken or is not a tokenizer."""
    settings = check_tokenizer_files(folder)
    path = folder / "tokenizer.json"
    if kind_of(path) == "nothing":
        return None
    data = read_json(path, "tokenizer.json")
    model = data.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, list):  # a Unigram model: [piece, score] pairs, each piece's id its place
        vocab = {pair[0] if isinstance(pair, list) and pair else None: i for i, pair in enumerate(vocab)}
    added = data.get("added_tokens", [])
    if not (isinstance(vocab, dict) and vocab and isinstance(added, list) and all(isinstance(t, dict) for t in added)):
        raise LoadError(f"{path}: is not a tokenizer (it has no model vocabulary)")
    config_path = folder / "tokenizer_config.json"
    decoder = settings.get(config_path.name, {}).get("added_tokens_decoder", {})
    if not (isinstance(decoder, dict) and all(isinstance(t, dict) for t in decoder.values())):
        raise LoadError(f"{config_path}: added_tokens_decoder is not a JSON object of tokens")
    tokens = {**vocab, **{t.get("content"): t.get("id") for t in added}}
    decoded = {t.get("content"): int(i) if i.isdigit() else i for i, t in decoder.items()}
    for where, pairs in ((path, tokens), (config_path, decoded)):  # types tested a set at a time: 257k tokens
        if pairs and not (set(map(type, pairs)) == {str} and set(map(type, pairs.values())) == {int}
                          and min(pairs.values()) >= 0):
            token, i = next((t, i) for t, i in pairs.items() if not (type(t) is str and type(i) is int and i >= 0))
            raise LoadError(f"{where}: is not a tokenizer's ({token!r} with id {i!r} is not a token and its id)")
    tokens.update(decoded)
    return tokens


def stored_dtype(shards: list[Path]) -> torch.dtype:
    """The floating-point dtype that holds most of the checkpoint's bytes."""
    totals = {}
    for shard in shards:
        for entry in read_safetensors_header(shard):
            if entry.torch_dtype is not None and entry.torch_dtype.is_floating_point:
                totals[entry.torch_dtype] = totals.get(entry.torch_dtype, 0) + entry.nbytes
    return max(totals, key=totals.get) if totals else torch.float32


def default_dtype(config: PaliGemmaConfig, shards: list[Path]) -> torch.dtype:
    """The dtype to run a checkpoint in when none is asked for: the half precision it is stored in (used in place,
    no copy), else float16 for PaliGemma 1 and bfloat16 for PaliGemma 2, whose Gemma 2 decoder was trained in
    bfloat16 and can overflow float16."""
    stored = stored_dtype(shards)
    if stored in (torch.float16, torch.bfloat16):
        return stored
    return torch.bfloat16 if config.text_config.is_gemma2 else torch.float16


def warn_about_dtype(config: PaliGemmaConfig, dtype: torch.dtype):
    if dtype == torch.float16 and config.text_config.is_gemma2:
        log("warning: PaliGemma 2's Gemma 2 decoder was trained in bfloat16 and can overflow float16; "
            "if the run stops on values that are not finite, use --dtype bfloat16")


def load_tokenizer(folder: Path):
    """The folder's own tokenizer, through transformers, never from a hub."""
    from transformers import AutoTokenizer

    check_tokenizer_files(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # the tokenizer libraries raise many kinds of errors for a broken file
        raise LoadError(f"{folder}: the tokenizer cannot be loaded ({type(e).__name__}: {e})") from None
