"""Tiny random PaliGemma checkpoints built by transformers itself, offline.

`build_checkpoint(path, ...)` writes a folder laid out like a hub download: config.json, generation_config.json,
several safetensors shards with model.safetensors.index.json, tokenizer and processor files.
"""

import hashlib
import json
import os
import string
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

IMAGE_SIZE, PATCH = 28, 14  # 4 image tokens


def build_tokenizer(paligemma: bool = True):
    """A Gemma-style BPE tokenizer with the real id layout in small: specials, bytes, text, <loc>, <seg>, <image>;
    or, with paligemma False, the plain Gemma tokenizer in small: without <loc>, <seg> and <image>."""
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import AddedToken

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    chars = ["▁", "\n"] + list(string.ascii_letters + string.digits + string.punctuation)
    merge_pairs = [("▁", "c"), ("▁", "a"), ("▁", "e"), ("▁", "d"), ("e", "n"), ("▁", "en"), ("a", "t"), ("c", "at"),
                   ("▁", "cat"), ("o", "g"), ("d", "og"), ("▁", "dog"), ("i", "n"), ("t", "i"), ("o", "n"),
                   ("ti", "on"), ("a", "p"), ("c", "ap"), ("cap", "tion"), ("▁", "th"), ("t", "h"), ("e", "r"),
                   ("a", "n"), ("an", "s"), ("w", "er"), ("ans", "wer"), ("e", "t"), ("e", "c"), ("ec", "t"),
                   ("d", "et"), ("det", "ect")]
    merged = []
    for a, b in merge_pairs:
        if a + b not in merged:
            merged.append(a + b)
    vocab_list = pieces + chars + [m for m in merged if m not in chars]
    if paligemma:
        vocab_list += [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    merges = [(a, b) for a, b in merge_pairs if a in vocab and b in vocab and a + b in vocab]
    tok = GemmaTokenizer(vocab=vocab, merges=merges)
    if paligemma:
        tok.add_special_tokens({"additional_special_tokens": [AddedToken("<image>", normalized=False, special=True)]})
    return tok


def hub_cache(folder: Path, cache: Path, commit: str = "0123456789abcdef0123456789abcdef01234567",
              revision: str = "main") -> Path:
    """The files of a checkpoint folder laid out as huggingface_hub caches a download (models--org--name/ with
    blobs/<sha256>, refs/<revision> and snapshots/<commit>/ of relative symlinks into blobs/); returns the snapshot.
    Called again with another commit and revision, it adds that revision beside the first."""
    repo = Path(cache) / "models--google--paligemma-tiny"
    snapshot = repo / "snapshots" / commit
    for path in (repo / "blobs", repo / "refs", snapshot):
        path.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    for file in sorted(Path(folder).iterdir()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        if not (repo / "blobs" / blob).exists():
            (repo / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


def build_processor():
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = (IMAGE_SIZE // PATCH) ** 2
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=build_tokenizer())


def build_model(version: int = 1, kv_heads: int = 1, heads: int = 4, seed: int = 0, image_size: int = IMAGE_SIZE,
                vision_overrides: dict | None = None, **text_overrides):
    """A random PaliGemma (version 1: Gemma decoder, 2: Gemma 2) perturbed so that every term of the forward matters."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    tokens = len(build_tokenizer())
    rows = (tokens + 1 + 63) // 64 * 64
    text = dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16, vocab_size=rows)
    if version == 2:  # sliding, full, sliding; a window smaller than the prompt, so that the prefix overrides it
        text.update(model_type="gemma2", num_hidden_layers=3, query_pre_attn_scalar=16, sliding_window=6,
                    final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    text.update(text_overrides)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=image_size, patch_size=PATCH, vision_use_head=False)
    vision.update(vision_overrides or {})
    config = PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=tokens - 1,
                             vocab_size=text["vocab_size"], projection_dim=text["hidden_size"], pad_token_id=0,
                             bos_token_id=2, eos_token_id=1)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.5)
            else:
                p.mul_(1 + 0.5 * torch.rand_like(p))
                if "language_model" in name and "embed" not in name:
                    p.mul_(6.0)  # large enough that greedy outputs vary from token to token
    return model


# Where each layout puts the vision tower, the projector and the language model (docs/NUMERICS.md §2).
LAYOUTS = {
    "published": {"vision_tower.": "vision_tower.vision_model."},
    "transformers5": {},
    "model_prefix": {"vision_tower.": "model.vision_tower.vision_model.",
                     "multi_modal_projector.": "model.multi_modal_projector.",
                     "language_model.model.": "model.language_model."},
}


def script(model, answer: list[str]):
    """Make a version-1 model answer the tokens `answer` (then <eos>) to every prompt, greedily. Each layer's output
    projections are zeroed, so the last position's state is its own token's embedding e, and the logits are
    E D e / rms(e) with D the final norm's scale, +1 on dimensions x, -1 on dimensions z. Token k of the chain
    "\n", *answer, <eos> embeds as 40 (x_k + b_k x_k+1 + sqrt(1 + b_k^2) z_k), b_k = 1 + k / 2: from token k the
    next scores 1600 b_k, the one before 1600 b_k-1 (less), itself 0 (the z part cancels it), any other about 0.
    The tokens must all differ; 30 at most fit the 64 dimensions."""
    tokenizer = build_tokenizer()
    chain = tokenizer.convert_tokens_to_ids(["\n", *answer, "<eos>"])
    if len(set(chain)) != len(chain) or tokenizer.unk_token_id in chain:
        raise ValueError(f"{answer} are not distinct tokens of the vocabulary")
    language = model.model.language_model
    x, z = range(len(chain) + 1), range(len(chain) + 1, 2 * len(chain) + 1)
    with torch.no_grad():
        for layer in language.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        language.norm.weight.zero_()  # Gemma scales by 1 + weight
        language.norm.weight[list(z)] = -2.0
        embed = language.embed_tokens.weight
        for k, token in enumerate(chain):
            b = 1 + k / 2
            embed[token] = 0.0
            embed[token, [x[k], x[k + 1], z[k]]] = 40 * torch.tensor([1.0, b, (1 + b * b) ** 0.5])
    return model


def build_checkpoint(path, version: int = 1, kv_heads: int = 1, heads: int = 4, layout: str = "published",
                     seed: int = 0, max_shard_size: str = "100KB", image_size: int = IMAGE_SIZE,
                     dtype: torch.dtype = torch.float32, vision_overrides: dict | None = None,
                     answer: list[str] | None = None, **text_overrides):
    """Save a tiny model as a hub folder in one of the three key layouts, its weights in dtype (with answer, a list of
    tokens: one that always gives that answer, see script); returns the transformers model (in float32)."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # its bars would land in the stderr of whichever test builds the checkpoint
    path = Path(path)
    model = build_model(version, kv_heads, heads, seed, image_size, vision_overrides, **text_overrides)
    if answer is not None:
        script(model, answer)
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    model.float()
    processor = build_processor()
    processor.image_processor.size = {"height": image_size, "width": image_size}
    processor.image_processor.image_seq_length = processor.image_seq_length = (image_size // PATCH) ** 2
    processor.save_pretrained(path)
    rename_keys(path, LAYOUTS[layout])
    if layout == "model_prefix":  # that era stored the tied head as well
        add_tensor(path, "lm_head.weight", model.model.language_model.embed_tokens.weight.detach().clone())
    return model


def rename_keys(path: Path, prefixes: dict):
    """Rewrite every shard (and the index, if any) with new key prefixes; a transformers 5 save is the start."""
    def rename(key):
        for old, new in prefixes.items():
            if key.startswith(old):
                return new + key[len(old):]
        return key

    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    names = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    for shard in names:
        tensors = load_file(path / shard)
        save_file({rename(k): v.contiguous() for k, v in tensors.items()}, path / shard, metadata={"format": "pt"})
    if index:
        index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
        index_file.write_text(json.dumps(index, indent=2))


def add_tensor(path: Path, name: str, tensor: torch.Tensor, shard: str | None = None):
    """Append one tensor to a shard (the last one by default) and to the index."""
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = shard or sorted(set(index["weight_map"].values()))[-1]
    tensors = load_file(path / shard)
    tensors[name] = tensor.contiguous()
    save_file(tensors, path / shard, metadata={"format": "pt"})
    index["weight_map"][name] = shard
    index_file.write_text(json.dumps(index, indent=2))


def load_reference(path, dtype=torch.float32):
    """transformers' model and processor from the folder, eager attention everywhere (the reference)."""
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="eager",
                                                              local_files_only=True).eval()
    return model, processor
