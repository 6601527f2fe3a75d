"""Write a full-size PaliGemma checkpoint folder with random weights, laid out like a Hugging Face hub download.

For benchmarking loading and generation on a machine that cannot download the real (gated) weights. The folder
holds config.json and generation_config.json as published (docs/NUMERICS.md §1), safetensors shards split like
transformers' `save_pretrained(max_shard_size="5GB")` with model.safetensors.index.json, keys in the published
layout (docs/NUMERICS.md §2: `vision_tower.vision_model.*`, `multi_modal_projector.linear.*`,
`language_model.model.*`, no lm_head), float32 for PaliGemma 1 and bfloat16 for PaliGemma 2, and a stand-in
tokenizer with the real id layout and size (257153 ids: specials, "\\n" = 108, byte fallback, ~255k BPE pieces,
<loc>/<seg> at 256000.., <image> = 257152) plus the processor files. Shards are streamed to disk in 64 MiB
pieces, so memory stays well under 1 GiB.

Usage:
    python benchmarks/make_checkpoint.py                      # paligemma-3b-pt-224 -> ~/.cache/paligemma-bench/
    python benchmarks/make_checkpoint.py --variant paligemma2-10b-pt-448 --out /data/pg2-10b-448
    python benchmarks/make_checkpoint.py --variant paligemma2-28b-pt-896 --dry-run   # print the shard plan only
    python benchmarks/make_checkpoint.py --num-layers 1 --max_shard_size 500MB --out /tmp/pg-1layer  # quick check
"""

import argparse
import json
import math
import os
import random
import re
import string
import struct
import sys
import time
import zlib
from functools import partial
from pathlib import Path

import torch

ROWS, IMAGE_TOKEN, PATCH, VISION_LAYERS = 257216, 257152, 14, 27  # embedding rows, <image> id
D_VISION, I_VISION = 1152, 4304
CHUNK_BYTES = 64 * 2**20
WORDS = """caption describe answer question detect segment ocr en fr de es it the a an of and to in on at is are was
what where who which how many much why doing there this that with for from by as or not no yes one two three some
cat dog man woman people person child car bus bike road street building house room table chair bed water tree sky
grass image picture photo text sign left right top bottom front back color red blue green white black yellow"""
# family: model_type, hidden, intermediate, layers, heads, kv heads, head_dim, query_pre_attn_scalar
# (docs/NUMERICS.md §1)
TEXT = {
    "paligemma-3b": ("gemma", 2048, 16384, 18, 8, 1, 256, None),
    "paligemma2-3b": ("gemma2", 2304, 9216, 26, 8, 4, 256, 256),
    "paligemma2-10b": ("gemma2", 3584, 14336, 42, 16, 8, 256, 256),
    "paligemma2-28b": ("gemma2", 4608, 36864, 46, 32, 16, 128, 144),
}
log = partial(print, file=sys.stderr, flush=True)
PARAMS = {  # unique parameters, lm_head tied
    "paligemma-3b-pt-224": 2_923_466_480, "paligemma-3b-pt-448": 2_924_351_216, "paligemma-3b-pt-896": 2_927_890_160,
    "paligemma2-3b-pt-224": 3_032_242_416, "paligemma2-3b-pt-448": 3_033_127_152,
    "paligemma2-3b-pt-896": 3_036_666_096, "paligemma2-10b-pt-224": 9_662_638_832,
    "paligemma2-10b-pt-448": 9_663_523_568, "paligemma2-10b-pt-896": 9_667_062_512,
    "paligemma2-28b-pt-224": 27_650_487_024, "paligemma2-28b-pt-448": 27_651_371_760,
    "paligemma2-28b-pt-896": 27_654_910_704,
}


def parse_size(text):
    """Bytes from "5GB", "500MB", "100KB" (powers of ten, like huggingface_hub) or a plain number."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)?\s*", text.upper())  # no match: argparse reports it
    return int(float(m[1]) * 10 ** {None: 0, "KB": 3, "MB": 6, "GB": 9, "TB": 12}[m[2]])


def build_config(variant, num_layers=None):
    """config.json as published (docs/NUMERICS.md §1); `num_layers` shrinks both towers for quick checks."""
    family, size = variant.rsplit("-pt-", 1)
    size = int(size)
    mtype, hidden, inter, layers, heads, kv, head_dim, scalar = TEXT[family]
    tokens = (size // PATCH) ** 2
    vision = {"hidden_size": D_VISION, "intermediate_size": I_VISION, "model_type": "siglip_vision_model",
              "num_attention_heads": 16, "num_hidden_layers": num_layers or VISION_LAYERS,
              "num_image_tokens": tokens, "patch_size": PATCH, "projection_dim": hidden, "vision_use_head": False}
    if size != 224:
        vision["image_size"] = size
    text = {"hidden_size": hidden, "intermediate_size": inter, "model_type": mtype,
            "num_hidden_layers": num_layers or layers, "num_image_tokens": tokens, "num_key_value_heads": kv,
            "vocab_size": ROWS}
    top = {"architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
           "hidden_size": 2048, "image_token_index": IMAGE_TOKEN, "model_type": "paligemma", "pad_token_id": 0,
           "projection_dim": hidden, "text_config": text, "vision_config": vision}
    if mtype == "gemma":
        vision["projector_hidden_act"] = "gelu_fast"
        text.update(num_attention_heads=heads, torch_dtype="float32")
        return {**top, "ignore_index": -100, "torch_dtype": "float32", "vocab_size": ROWS}
    vision.update(num_positions=tokens, torch_dtype="bfloat16")
    text.update(architectures=["Gemma2ForCausalLM"], attn_logit_softcapping=50.0, cache_implementation="hybrid",
                eos_token_id=[1, 107], final_logit_softcapping=30.0, hidden_act="gelu_pytorch_tanh",
                hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=scalar, sliding_window=4096,
                torch_dtype="bfloat16")
    if heads != 8 or head_dim != 256:  # the 3b file leaves these to Gemma2Config's defaults (8, 256)
        text.update(num_attention_heads=heads, head_dim=head_dim)
    return {**top, "_vocab_size": IMAGE_TOKEN, "num_hidden_layers": text["num_hidden_layers"],
            "torch_dtype": "bfloat16"}


def tensor_plan(config):
    """(key, shape, init) for every stored tensor, in the order of transformers' state_dict()."""
    vc, tc = config["vision_config"], config["text_config"]
    hidden, inter = tc["hidden_size"], tc["intermediate_size"]
    heads, head_dim = tc.get("num_attention_heads", 8), tc.get("head_dim", 256)
    vp, lp, d = "vision_tower.vision_model.", "language_model.model.", D_VISION
    plan = []

    def linear(name, out, inp, bias=True):
        plan.append((name + ".weight", (out, inp), "normal"))
        if bias:
            plan.append((name + ".bias", (out,), "zeros"))

    def layer_norm(name):
        plan.extend([(name + ".weight", (d,), "ones"), (name + ".bias", (d,), "zeros")])

    plan += [(vp + "embeddings.patch_embedding.weight", (d, 3, PATCH, PATCH), "normal"),
             (vp + "embeddings.patch_embedding.bias", (d,), "zeros"),
             (vp + "embeddings.position_embedding.weight", (vc["num_image_tokens"], d), "normal")]
    for i in range(vc["num_hidden_layers"]):
        p = f"{vp}encoder.layers.{i}."
        layer_norm(p + "layer_norm1")
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            linear(p + "self_attn." + proj, d, d)
        layer_norm(p + "layer_norm2")
        linear(p + "mlp.fc1", I_VISION, d)
        linear(p + "mlp.fc2", d, I_VISION)
    layer_norm(vp + "post_layernorm")
    linear("multi_modal_projector.linear", hidden, d)
    plan.append((lp + "embed_tokens.weight", (ROWS, hidden), "normal"))
    norms = ["input_layernorm", "post_attention_layernorm"]
    if tc["model_type"] == "gemma2":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(tc["num_hidden_layers"]):
        p = f"{lp}layers.{i}."
        q, kv = heads * head_dim, tc["num_key_value_heads"] * head_dim
        for name, out, inp in [("self_attn.q_proj", q, hidden), ("self_attn.k_proj", kv, hidden),
                               ("self_attn.v_proj", kv, hidden), ("self_attn.o_proj", hidden, q),
                               ("mlp.gate_proj", inter, hidden), ("mlp.up_proj", inter, hidden),
                               ("mlp.down_proj", hidden, inter)]:
            linear(p + name, out, inp, bias=False)
        plan += [(p + n + ".weight", (hidden,), "normal") for n in norms]  # RMSNorm offsets w, used as 1 + w
    plan.append((lp + "norm.weight", (hidden,), "normal"))
    return plan


def shard_plan(plan, itemsize, max_size):
    """Split like huggingface_hub's split_state_dict_into_shards_factory: walk in order, start a new shard when the
    next tensor would tip the current one over max_size; a tensor bigger than max_size gets a shard of its own."""
    shards, current, current_size = [], [], 0
    for entry in plan:
        size = math.prod(entry[1]) * itemsize
        if size > max_size:
            shards.append([entry])
            continue
        if current_size + size > max_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(entry)
        current_size += size
    shards = shards + [current] if current else shards
    if len(shards) == 1:
        return {"model.safetensors": shards[0]}
    return {f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors": s for k, s in enumerate(shards)}


def shard_header(entries, dtype_tag, itemsize):
    """The safetensors header the library would write: tensors sorted by name, data_offsets back to back,
    compact JSON padded with spaces to a multiple of 8 bytes, behind its little-endian u64 length."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, _ in sorted(entries):
        nbytes = math.prod(shape) * itemsize
        header[key] = {"dtype": dtype_tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def write_tensor(f, key, shape, init, dtype, seed, buf, heavy_tails=False):
    """Stream one tensor in CHUNK_BYTES pieces: N(0, 0.02) from a generator seeded by (seed, key), or 0 / 1. With
    heavy_tails, a decoder linear weight has 4 of its input channels (columns) scaled by 20 to 50, the outliers
    trained language models have."""
    numel, done = math.prod(shape), 0
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{key}".encode()))  # the CPU generator keeps 32 bits
    outliers = heavy_tails and ".layers." in key and key.endswith("_proj.weight") and key.startswith("language_model")
    if outliers:
        columns = torch.randperm(shape[1], generator=gen)[:4]
        factors = 20 + 30 * torch.rand(4, generator=gen)
    while done < numel:
        x = buf[: min(buf.numel(), numel - done)]  # whole rows: the chunk is a multiple of every width here
        x = x.normal_(0.0, 0.02, generator=gen) if init == "normal" else x.fill_(float(init == "ones"))
        if outliers:
            x.view(-1, shape[1])[:, columns] *= factors
        x = x.to(dtype)
        f.write((x.view(torch.int16) if dtype == torch.bfloat16 else x).numpy().data)
        done += x.numel()


def bpe(word, ranks):
    """The pieces BPE makes of `word`: merge the adjacent pair of lowest rank until none is left."""
    parts = list(word)
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(parts, parts[1:])))
        if rank == math.inf:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_tokenizer(seed):
    """Gemma-style BPE stand-in with the real id layout: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4, "\\n" 108,
    runs of newlines / spaces, bytes <0x00>.. at 217 (as in Gemma), characters, then random BPE pieces up to 255999,
    <loc0000>.. = 256000, <seg000>.. = 257024, <image> = 257152 (added special token)."""
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import AddedToken

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<2mass>", "[@BOS@]"] + [f"<unused{i}>" for i in range(99)]
    pieces += ["<start_of_turn>", "<end_of_turn>"] + ["\n" * n for n in range(1, 32)] + ["▁" * n for n in range(2, 32)]
    pieces += [f"<unused{i}>" for i in range(99, 147)] + [f"<0x{i:02X}>" for i in range(256)]
    assert pieces.index("\n") == 108 and pieces.index("<0x00>") == 217
    ranges = [(0xC0, 0x250), (0x391, 0x3CA), (0x410, 0x450), (0x4E00, 0x6000)]  # Latin, Greek, Cyrillic, CJK
    unicode = [chr(c) for lo, hi in ranges for c in range(lo, hi)]
    pieces += ["▁"] + list(string.ascii_letters + string.digits + string.punctuation) + unicode
    merges = [("\n" * (n - 1), "\n") for n in range(2, 32)] + [("▁" * (n - 1), "▁") for n in range(2, 32)]
    vocab = {p: i for i, p in enumerate(pieces)}
    ranks = {pair: r for r, pair in enumerate(merges)}
    for form in [w for word in WORDS.split() for w in (word, "▁" + word)]:  # whole common words first, so that
        parts = bpe(form, ranks)  # prompts take a realistic handful of ids: join what BPE gives so far, in order
        while len(parts) > 1:
            ranks[parts[0], parts[1]] = len(merges)
            merges.append((parts[0], parts[1]))
            parts[:2] = [parts[0] + parts[1]]
            vocab[parts[0]] = len(pieces)
            pieces.append(parts[0])
    letters = "eeeeeeeeeeeettttttttaaaaaaaoooooooiiiiiiinnnnnnnsssssshhhhhhrrrrrrddddlllluuucccmmmwwffggyyppbbvkjxqz"
    starts = [p for p in pieces if p == "▁" or len(p) == 1 and p.isascii()]
    rng, text = random.Random(seed), list(starts)
    while len(pieces) < 256000:  # each new piece = an earlier piece + a letter or a short piece: one merge each
        left = rng.choice(text)
        right = rng.choice(letters) if rng.random() < 0.75 else rng.choice(text[:20000])
        new = left + right
        if "▁" in right or len(new) > 14 or new in vocab:
            continue
        vocab[new] = len(pieces)
        pieces.append(new)
        merges.append((left, right))
        text.append(new)
    for name in [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]:
        vocab[name] = len(vocab)
    tok = GemmaTokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<image>", normalized=False, special=True)]})
    return tok


def save_processor(out, size, seed):
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    image_processor.image_seq_length = (size // PATCH) ** 2
    PaliGemmaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(seed)).save_pretrained(out)


def is_complete(out, files, sizes):
    """True when every JSON file matches, every shard has its exact size and the tokenizer files exist."""
    extra = ["tokenizer.json", "tokenizer_config.json", "processor_config.json"]
    return (all((out / n).is_file() and (out / n).read_text() == text for n, text in files.items())
            and all((out / n).is_file() and (out / n).stat().st_size == s for n, s in sizes.items())
            and all((out / n).is_file() for n in extra))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="paligemma-3b-pt-224", choices=list(PARAMS))
    ap.add_argument("--out", type=Path, help="output folder (default ~/.cache/paligemma-bench/VARIANT)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max_shard_size", "--max-shard-size", type=parse_size, default="5GB",
                    help='bytes or e.g. "5GB" (default, like save_pretrained), "500MB"')
    ap.add_argument("--num-layers", type=int, help="only this many vision and text layers (a quick, smaller check)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the folder already holds the checkpoint")
    ap.add_argument("--dry-run", action="store_true", help="print the shard plan and exit")
    ap.add_argument("--heavy_tails", action="store_true", help="scale 4 input channels of every decoder linear "
                    "weight by 20-50, as trained models have outliers (for the quantization accuracy table)")
    args = ap.parse_args(argv)
    suffix = (f"-{args.num_layers}layers" if args.num_layers else "") + ("-heavy-tails" if args.heavy_tails else "")
    out = (args.out or Path.home() / ".cache" / "paligemma-bench" / (args.variant + suffix)).expanduser()

    config = build_config(args.variant, args.num_layers)
    plan = tensor_plan(config)
    params = sum(math.prod(shape) for _, shape, _ in plan)
    if not args.num_layers:
        assert params == PARAMS[args.variant], (params, PARAMS[args.variant])
    dtype = torch.float32 if config["torch_dtype"] == "float32" else torch.bfloat16
    tag, itemsize = ("F32", 4) if dtype == torch.float32 else ("BF16", 2)
    shards = shard_plan(plan, itemsize, args.max_shard_size)
    headers = {name: shard_header(entries, tag, itemsize) for name, entries in shards.items()}
    sizes = {name: len(h) + n for name, (h, n) in headers.items()}
    total = sum(n for _, n in headers.values())
    files = {"config.json": config, "generation_config.json": {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}}
    if dtype == torch.bfloat16:  # PaliGemma 2
        files["generation_config.json"]["cache_implementation"] = "hybrid"
    if len(shards) > 1:
        files["model.safetensors.index.json"] = {"metadata": {"total_size": total}, "weight_map": {
            key: name for name, entries in shards.items() for key, _, _ in entries}}
    files = {name: json.dumps(obj, indent=2, sort_keys=True) + "\n" for name, obj in files.items()}  # as transformers
    for name, entries in shards.items():
        log(f"{name}: {len(entries)} tensors, {sizes[name]:,} bytes ({entries[0][0]} .. {entries[-1][0]})")
    log(f"{args.variant}: {len(plan)} tensors, {params:,} parameters, {total:,} bytes of {tag} -> {out}")
    if args.dry_run:
        return
    if not args.force and is_complete(out, files, sizes):
        log(f"{out} already holds a complete {args.variant} checkpoint (--force rebuilds it)")
        print(f"parameters: {params:,}")
        return

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # written last: its presence marks a finished build
    for stale in out.glob("model*.safetensors*"):
        if stale.name not in sizes:
            stale.unlink()
    log("tokenizer and processor ...")
    save_processor(out, int(args.variant.rsplit("-", 1)[1]), args.seed)
    log(f"  done in {time.time() - start:.0f} s")
    buf = torch.empty(CHUNK_BYTES // itemsize)
    written = 0
    for name, entries in shards.items():
        header, nbytes = headers[name]
        with open(out / name, "wb") as f:
            f.write(header)
            for key, shape, init in sorted(entries):
                write_tensor(f, key, shape, init, dtype, args.seed, buf, args.heavy_tails)
        written += nbytes
        t = time.time() - start
        log(f"  {name}: {written / 1e9:.2f} / {total / 1e9:.2f} GB, {t:.0f} s, {written / 1e6 / t:.0f} MB/s")
    for name, text in sorted(files.items(), key=lambda kv: kv[0] == "config.json"):
        (out / name).write_text(text)
    assert is_complete(out, files, sizes)
    log(f"wrote {out} in {time.time() - start:.0f} s")
    print(f"parameters: {params:,}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
