"""PaliGemma: SigLIP features, projected by one linear layer, fill the <image> slots of a Gemma prompt.

Plain PyTorch. Names mirror the checkpoint keys (`vision_tower.*`, `multi_modal_projector.linear.*`,
`language_model.*`). Besides joining the towers, this file owns the generation state that outlives one call: the
KV caches and, per row, which cache positions hold real tokens, which belong to the bidirectional prefix, and the
offset from cache positions to RoPE positions. They are allocated once by `setup_caches` and only ever grown, so
that a decode step sees the same tensors, of the same shapes, from one prompt to the next.
"""

from dataclasses import dataclass

import torch
from torch import nn

from paligemma.modeling_gemma import GemmaConfig, GemmaForCausalLM, KVCache
from paligemma.modeling_siglip import SiglipVisionConfig, SiglipVisionModel

# What PaliGemmaConfig builds when config.json has no text_config / vision_config at all.
PALIGEMMA_TEXT_DEFAULTS = dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18, intermediate_size=16384,
                               num_attention_heads=8, num_key_value_heads=1, vocab_size=257152)
PALIGEMMA_VISION_DEFAULTS = dict(intermediate_size=4096, hidden_size=1152, patch_size=14, image_size=224,
                                 num_hidden_layers=27, num_attention_heads=16, vision_use_head=False)
CACHE_STEP = 256  # cache lengths are rounded up to a multiple of this, so that most prompts reuse the cache


@dataclass
class PaliGemmaConfig:
    """The two towers, and the token id whose slots receive the image features."""

    text_config: GemmaConfig
    vision_config: SiglipVisionConfig
    image_token_index: int = 256000
    projection_dim: int = 2048
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 1

    @classmethod
    def from_dict(cls, d: dict) -> "PaliGemmaConfig":
        if d.get("model_type") != "paligemma":
            raise ValueError(f"model_type is {d.get('model_type')!r}, not 'paligemma'")
        text = d.get("text_config") or PALIGEMMA_TEXT_DEFAULTS
        vision = d.get("vision_config") or PALIGEMMA_VISION_DEFAULTS
        if not isinstance(text, dict) or not isinstance(vision, dict):
            raise ValueError("text_config and vision_config must be JSON objects")
        config = cls(GemmaConfig.from_dict(text), SiglipVisionConfig.from_dict(vision))
        for name in ("image_token_index", "projection_dim", "pad_token_id", "bos_token_id", "eos_token_id"):
            if d.get(name) is not None:
                setattr(config, name, d[name])
        if d.get("image_token_id") is not None:
            config.image_token_index = d["image_token_id"]
        for name in ("image_token_index", "projection_dim", "pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(config, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")
        if config.projection_dim != config.text_config.hidden_size:
            raise ValueError(f"projection_dim {config.projection_dim} differs from the text hidden size "
                             f"{config.text_config.hidden_size}")
        return config

    @property
    def num_image_tokens(self) -> int:
        return self.vision_config.num_patches


class PaliGemmaMultiModalProjector(nn.Module):
    """One linear layer from SigLIP width to the decoder's width."""

    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.linear = nn.Linear(config.vision_config.hidden_size, config.projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def prefix_lm_masks(key_valid: torch.Tensor, prefix: torch.Tensor, input_pos: torch.Tensor,
                    window: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Boolean masks (B, 1, L, T), True where the query at cache position input_pos[i] may read key k < T: one for
    full layers and, given a window, one for sliding layers.

    big_vision's prefix-LM rule over cache positions (docs/NUMERICS.md §3.7): a key is readable if it is a real
    token and either causal (k <= q, and k > q - window in sliding layers) or both q and k lie in the prefix (image,
    <bos>, prompt, "\\n"), where attention is bidirectional and overrides the window. For a 2-token prefix and 2
    generated tokens (P = prefix, G = generated), full layers get:
          k: P P G G
        q=P  1 1 0 0
        q=P  1 1 0 0
        q=G  1 1 1 0
        q=G  1 1 1 1
    key_valid, prefix: (B, T) booleans over cache positions; input_pos: the queries' cache positions, (L,) shared by
    every row or (B, L) each row's own.
    """
    input_pos = input_pos.expand(key_valid.shape[0], -1)  # (B, L)
    q = input_pos[:, :, None]  # (B, L, 1)
    k = torch.arange(key_valid.shape[1], device=key_valid.device)[None, None, :]
    both_prefix = prefix.gather(1, input_pos)[:, :, None] & prefix[:, None, :]  # (B, L, T)
    valid = key_valid[:, None, :]

    def mask(causal):
        return (valid & (causal | both_prefix))[:, None]

    return mask(k <= q), None if window is None else mask((k <= q) & (k > q - window))


class PaliGemmaForConditionalGeneration(nn.Module):
    """SigLIP features, projected, fill the <image> slots of the prompt; the Gemma decoder does the rest."""

    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionModel(config.vision_config)
        self.multi_modal_projector = PaliGemmaMultiModalProjector(config)
        self.language_model = GemmaForCausalLM(config.text_config)
        text = config.text_config
        self.window = next((text.window(i) for i in range(text.num_hidden_layers) if text.window(i)), None)
        self.allocate_caches(0, CACHE_STEP)

    def reset_buffers(self):
        """Tie the head again and compute the non-persistent buffers afresh, after materialising from meta."""
        self.language_model.tie_weights()
        self.language_model.model.rotary_emb.reset_buffers(self.language_model.model.norm.weight.device)
        self.allocate_caches(0, CACHE_STEP)

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        """Make room for max_batch_size rows of max_seq_length positions. The caches only ever grow (lengths
        rounded up to CACHE_STEP), keeping what they hold, so that later prompts of other lengths reuse them and
        rows that are decoding (a server's) go on as they were."""
        batch, length = self.key_valid.shape
        if max_batch_size > batch or max_seq_length > length:
            rounded = -(-max_seq_length // CACHE_STEP) * CACHE_STEP
            self.allocate_caches(max(batch, max_batch_size), max(length, rounded))

    def allocate_caches(self, batch: int, length: int):
        """Caches and bookkeeping for batch rows of length positions, beside the weights; what the old ones held is
        copied into them."""
        text, norm = self.config.text_config, self.language_model.model.norm.weight
        old = {name: getattr(self, name, None) for name in ("key_valid", "prefix", "rope_offset")}
        for name, shape, dtype in (("key_valid", (batch, length), torch.bool), ("prefix", (batch, length), torch.bool),
                                   ("rope_offset", (batch,), torch.long)):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=norm.device), persistent=False)
            if old[name] is not None and old[name].device == norm.device:
                getattr(self, name)[tuple(slice(n) for n in old[name].shape)] = old[name]
        for layer in self.language_model.model.layers:
            cache = layer.self_attn.kv_cache
            layer.self_attn.kv_cache = KVCache(batch, length, text.num_key_value_heads, text.head_dim, norm.dtype,
                                               norm.device)
            if cache is not None and cache.k_cache.device == norm.device and cache.k_cache.dtype == norm.dtype:
                layer.self_attn.kv_cache.keep(cache)

    def move_row(self, source: int, target: int):
        """Move a row's caches and bookkeeping to another row (a server closing the gap a finished row left)."""
        for name in ("key_valid", "prefix", "rope_offset"):
            getattr(self, name)[target] = getattr(self, name)[source]
        for layer in self.language_model.model.layers:
            for cache in (layer.self_attn.kv_cache.k_cache, layer.self_attn.kv_cache.v_cache):
                cache[target] = cache[source]

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the projected image features written into the <image> slots."""
        lm = self.language_model.model
        slots = input_ids == self.config.image_token_index
        ids = input_ids.masked_fill(slots, 0) if self.config.image_token_index >= lm.config.vocab_size else input_ids
        x = lm.embed(ids)  # (B, L, H)
        if pixel_values is None:
            return x
        # The tower computes in the dtype of the text embeddings that its features join.
        features = self.multi_modal_projector(self.vision_tower(pixel_values.to(x.dtype))).to(x.dtype)  # (B, N, H)
        if int(slots.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(f"the prompt has {int(slots.sum())} <image> tokens for "
                             f"{features.shape[0] * features.shape[1]} image features")
        return x.masked_scatter(slots[..., None], features)

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                last_only: bool = False, first_row: int = 0) -> torch.Tensor:
        """Logits (B, L, vocab), or (B, 1, vocab) for the last position with last_only, of input_ids (B, L)
        written to cache rows first_row .. first_row + B at positions input_pos: (L,) shared by every row, or (B, L),
        each row its own (a server's rows, which joined at different times).

        A prompt (attention_mask given; left padding is 0 there) starts every row afresh at position 0 and
        attends over itself. A decode step (no attention_mask) attends over the whole cache, masked, so that its
        shapes never change from token to token.
        """
        B, L = input_ids.shape
        rows = slice(first_row, first_row + B)
        per_row = input_pos.expand(B, L)  # (B, L)
        key_valid, prefix, rope_offset = self.key_valid[rows], self.prefix[rows], self.rope_offset[rows]
        if attention_mask is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            key_valid[:] = False
            prefix[:] = False
            key_valid[:, :L] = attention_mask.bool()
            prefix[:, :L] = types == 0  # 0: image, <bos>, prompt and "\n"; 1: a suffix
            # RoPE positions count real tokens from 1 (docs/NUMERICS.md §3.3): cache position + 1 - left padding
            rope_offset[:] = attention_mask.sum(-1) - L + 1
            n_keys = L
        else:
            key_valid.scatter_(1, per_row, True)
            n_keys = key_valid.shape[1]
        positions = per_row + rope_offset[:, None]  # (B, L)
        mask, sliding = prefix_lm_masks(key_valid[:, :n_keys], prefix[:, :n_keys], per_row, self.window)
        x = self.embed(input_ids, pixel_values)
        h = self.language_model.model(x, positions, input_pos, mask, sliding, last_only, rows)
        return self.language_model.logits(h)
