"""Weight-only int8 and int4 quantization: the scheme, its reference in PyTorch, the modules that hold quantized
weights, and `prepare(model, scheme)`, which swaps them into a model on the meta device before its weights load.

What is quantized: every linear layer of the Gemma decoder and its token embedding, which is also the output head
(tied): the weights a decode step reads. The vision tower, the projector and the norms keep the model's half
precision. Each weight row is cut into groups of `group` columns; a group's integers share one float16 scale, its
largest |w| divided by 127 (int8) or 7 (int4), and q = round(w / scale). quant.c holds the same arithmetic in C
(bit for bit: the tests compare the two) and the layout, the same in memory and in saved files:
- Rows are padded with zeros to a multiple of 4, columns to a chunk of 64 bytes: 64 columns for int8, 128 for int4.
- int8: one signed byte a weight. int4: two a byte, in blocks of 32 columns: byte j of a block holds its column j in
  the low nibble and column 16 + j in the high one, each as q + 8.
- `qweight` (padded rows / 4, 4 * row bytes) int8 or uint8: each group of 4 rows is a tile whose rows are
  interleaved a 64-byte chunk at a time (chunk 0 of rows 0-3, then chunk 1 of rows 0-3, ...), so that a pass over
  4 rows reads one straight line of memory.
- `scales` float16 (padded rows, ceil(padded columns / group)); padding has scale 0.
"""

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from paligemma import modeling_siglip
from paligemma.checkpoint import LoadError, read_json
from paligemma.console import UserError

TILE, CHUNK = 4, 64  # rows a tile interleaves; bytes of a row a tile holds at a time


@dataclass(frozen=True)
class Scheme:
    """How weights are quantized: integer width and the columns that share a scale."""

    bits: int
    group: int  # a multiple of 32, so that an int4 block never straddles two groups

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 7

    @property
    def x_levels(self) -> int:
        """A decode step rounds x to int8 for int4 weights, to int16 for int8 weights (quant.c's gemv_quant)."""
        return 127 if self.bits == 4 else 32767

    def padded_cols(self, cols: int) -> int:
        chunk = CHUNK * 8 // self.bits
        return math.ceil(cols / chunk) * chunk

    def groups(self, cols: int) -> int:
        return math.ceil(self.padded_cols(cols) / self.group)

    def shapes(self, rows: int, cols: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The stored shapes of a (rows, cols) weight's qweight and scales."""
        tiles = math.ceil(rows / TILE)
        return (tiles, TILE * self.padded_cols(cols) * self.bits // 8), (tiles * TILE, self.groups(cols))


# Groups of 32 columns: int8 over groups of 128 moved logits 3.5 times as far as bfloat16 does on a model with outlier
# input channels, over groups of 32 1.9 times (README, "Quantized weights"); the scales cost 2 bytes per 32 weights.
SCHEMES = {"int8": Scheme(8, 32), "int4": Scheme(4, 32)}


def quantize(weight: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) weights -> (qweight, scales) in the layout above: the reference the C quantizer matches."""
    rows, cols = weight.shape
    padded_rows = math.ceil(rows / TILE) * TILE
    padded = F.pad(weight.float(), (0, scheme.groups(cols) * scheme.group - cols, 0, padded_rows - rows))
    groups = padded.view(padded_rows, -1, scheme.group)
    scales = (groups.abs().amax(-1) / scheme.qmax).to(torch.float16)
    s = scales.float()[..., None]
    q = torch.where(s == 0, 0.0, torch.round(groups / s)).clamp(-scheme.qmax, scheme.qmax)
    q = q.view(padded_rows, -1)[:, :scheme.padded_cols(cols)].to(torch.int8)
    return tile(q if scheme.bits == 8 else pack_int4(q)), scales


def tile(rows: torch.Tensor) -> torch.Tensor:
    """(padded rows, row bytes) -> (padded rows / 4, 4 * row bytes): each 4 rows interleaved a chunk at a time."""
    n, width = rows.shape
    return rows.view(n // TILE, TILE, width // CHUNK, CHUNK).transpose(1, 2).reshape(n // TILE, TILE * width)


def untile(qweight: torch.Tensor, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """The inverse of tile: the stored bytes of the given rows (all by default), (rows, row bytes)."""
    tiles, width = qweight.shape
    chunks = qweight.view(tiles, width // (TILE * CHUNK), TILE, CHUNK)
    if isinstance(rows, slice):
        return chunks.transpose(1, 2).reshape(tiles * TILE, -1)[rows]
    return chunks[rows // TILE, :, rows % TILE].reshape(len(rows), -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(rows, cols) integers in [-7, 7] -> (rows, ceil(cols / 32) * 16) uint8, two a byte, as q + 8."""
    rows, cols = q.shape
    u = F.pad(q.to(torch.uint8) + 8, (0, math.ceil(cols / 32) * 32 - cols), value=8).view(rows, -1, 2, 16)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).view(rows, -1)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of pack_int4: (rows, cols) int8."""
    rows = packed.shape[0]
    blocks = packed.view(rows, -1, 16)
    both = torch.stack((blocks & 15, blocks >> 4), dim=2)  # (rows, blocks, 2, 16): columns j, then 16 + j
    return (both.view(rows, -1)[:, :cols].to(torch.int8) - 8)


def round_activations(x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """(rows, cols) x as a decode step's integer products see it (quant.c's gemv_quant): each row's blocks of 32
    columns rounded with one float32 scale, the block's largest |x| / scheme.x_levels (ties to even); q * scale."""
    rows, cols = x.shape
    blocks = F.pad(x.float(), (0, -cols % 32)).view(rows, -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / scheme.x_levels
    q = torch.where(d == 0, 0.0, torch.round(blocks / d)).clamp(-scheme.x_levels, scheme.x_levels)
    return (q * d).view(rows, -1)[:, :cols]


def values(stored: torch.Tensor, scales: torch.Tensor, scheme: Scheme, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of stored bytes (untiled) and their scales -> (rows, cols) weights: q * scale in float32, rounded to
    dtype once."""
    q = stored[:, :cols] if scheme.bits == 8 else unpack_int4(stored, cols)
    s = scales.float().repeat_interleave(scheme.group, dim=-1)[:, :cols]
    return (q.float() * s).to(dtype)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, scheme: Scheme, shape: tuple[int, int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (rows, cols) weights of shape back from the layout above."""
    rows, cols = shape
    return values(untile(qweight)[:rows], scales[:rows], scheme, cols, dtype)


class QuantizedWeight(nn.Module):
    """A (rows, cols) weight matrix held as integers with a float16 scale per group of columns."""

    def __init__(self, rows: int, cols: int, scheme: Scheme):
        super().__init__()
        self.shape, self.scheme = (rows, cols), scheme
        qtype = torch.int8 if scheme.bits == 8 else torch.uint8
        qshape, sshape = scheme.shapes(rows, cols)
        self.register_buffer("qweight", torch.empty(qshape, dtype=qtype))
        self.register_buffer("scales", torch.empty(sshape, dtype=torch.float16))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.scheme, self.shape, dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The rows ids (any shape) dequantized: (*ids.shape, cols)."""
        flat = ids.reshape(-1)
        out = values(untile(self.qweight, flat), self.scales[flat], self.scheme, self.shape[1], dtype)
        return out.view(*ids.shape, self.shape[1])


class QuantLinear(nn.Module):
    """A linear layer over a quantized weight, dequantized for each product (the plain reference path)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class QuantEmbedding(nn.Module):
    """Token embeddings from a quantized table, in the dtype the model's other weights are in."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self.weight, self.dtype = weight, dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(input_ids, self.dtype)


def quantized_layers(model: nn.Module):
    """(parent, name, module) of every decoder linear layer, the ones a scheme quantizes."""
    for layer in model.language_model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, module in parent.named_children():
                if isinstance(module, nn.Linear):
                    yield parent, name, module


def prepare(model: nn.Module, scheme: Scheme, dtype: torch.dtype) -> nn.Module:
    """Swap quantized modules into a model built on the meta device, before its weights load: every decoder linear
    layer, and the token embedding, which the output head shares. Returns the model."""
    swapped = {}
    for parent, name, linear in list(quantized_layers(model)):
        weight = QuantizedWeight(linear.out_features, linear.in_features, scheme)
        swapped[linear] = QuantLinear(weight, linear.bias)
        setattr(parent, name, swapped[linear])
    lm = model.language_model
    table = lm.model.embed_tokens.weight
    lm.model.embed_tokens = QuantEmbedding(QuantizedWeight(*table.shape, scheme), dtype)
    lm.lm_head = QuantLinear(lm.model.embed_tokens.weight)
    for fused in model.modules():  # the q/k/v and gate/up groups now read the quantized layers
        if isinstance(fused, modeling_siglip.Fused):
            fused.layers = tuple(swapped.get(layer, layer) for layer in fused.layers)
    model.quantization = scheme
    return model


QUANT_METHOD, FORMAT_VERSION = "pytorch-paligemma", 1  # config.json's quantization_config of a saved folder


def read_scheme(folder: Path) -> Scheme | None:
    """The scheme a saved quantized folder's config.json names under quantization_config, checked (one clear line
    for anything this tool cannot read); None for a checkpoint in full precision."""
    path = Path(folder) / "config.json"
    data = read_json(path, "config.json").get("quantization_config")
    if data is None:
        return None
    if not isinstance(data, dict) or data.get("quant_method") != QUANT_METHOD:
        method = data.get("quant_method") if isinstance(data, dict) else data
        raise LoadError(f"{path}: quantization_config is {method!r}, not this tool's {QUANT_METHOD!r}: only folders "
                        "written by --save_quantized load quantized")
    if data.get("format_version") != FORMAT_VERSION:
        raise LoadError(f"{path}: quantization format_version {data.get('format_version')!r}; this tool reads "
                        f"version {FORMAT_VERSION}")
    bits, group = data.get("bits"), data.get("group_size")
    if bits not in (4, 8) or type(group) is not int or group < 32 or group % 32 or data.get("scale_dtype") != "float16":
        raise LoadError(f"{path}: quantization_config needs bits 4 or 8, a group_size that is a multiple of 32 and "
                        f"scale_dtype float16, not {bits!r}, {group!r}, {data.get('scale_dtype')!r}")
    return Scheme(bits, group)


def save_quantized(model: nn.Module, source: Path, out: Path, shard_bytes: int = 5 * 10**9):
    """Write a loaded quantized model as a checkpoint folder that loads in place: config.json with a
    quantization_config, the tokenizer, processor and generation files copied from source, and safetensors shards
    of its tensors (parameters in their dtype, each quantized weight as `<name>.qweight` and `<name>.scales`).
    Written beside out, then renamed, so that out is either absent or whole."""
    from safetensors.torch import save_file

    scheme = model.quantization
    out = Path(out)
    if out.exists():
        raise UserError(f"--save_quantized {out} already exists; name a new folder")
    tensors = {name: t.detach() for name, t in model.state_dict(keep_vars=True).items()}  # persistent ones only
    tensors.pop("language_model.lm_head.weight.qweight", None)  # the head is the embedding (tied): stored once
    tensors.pop("language_model.lm_head.weight.scales", None)
    work = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        config = read_json(Path(source) / "config.json", "config.json")
        config["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
                                         "bits": scheme.bits, "group_size": scheme.group, "scale_dtype": "float16"}
        (work / "config.json").write_text(json.dumps(config, indent=2))
        for name in COPIED_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, work / name)
        shards, size = [[]], 0
        for name, tensor in tensors.items():
            if size and size + tensor.nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += tensor.nbytes
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        mode = (work / "config.json").stat().st_mode & 0o777  # what the umask gives a new file
        for names, file in zip(shards, files):
            save_file({n: tensors[n].contiguous() for n in names}, work / file, metadata={"format": "pt"})
            os.chmod(work / file, mode)  # safetensors writes 0600: other users (a Ray worker, say) could not read
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {n: file for names, file in zip(shards, files) for n in names}}
        (work / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                "special_tokens_map.json", "preprocessor_config.json", "processor_config.json")
