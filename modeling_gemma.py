"""Gemma and Gemma 2 decoders, the linear projector, and PaliGemma that joins them to the SigLIP tower.

Module and parameter names mirror the published checkpoint keys (`language_model.model.*`,
`multi_modal_projector.linear.*`, `vision_tower.vision_model.*`), and every rounding point follows
../shared/REFERENCE.md §3, so that float32 logits match transformers' eager attention.
"""

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from kernels import Linear, linears
from modeling_siglip import ACTIVATIONS, SiglipVisionConfig, SiglipVisionModel, embedding

# Class defaults of transformers' GemmaConfig / Gemma2Config for keys a config.json may omit (REFERENCE.md §1.3).
GEMMA_DEFAULTS = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=16)
GEMMA2_DEFAULTS = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, query_pre_attn_scalar=256, sliding_window=4096,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
# What PaliGemmaConfig builds when config.json has no text_config / vision_config at all.
PALIGEMMA_TEXT_DEFAULTS = dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18, intermediate_size=16384,
                               num_attention_heads=8, num_key_value_heads=1, vocab_size=257152)
PALIGEMMA_VISION_DEFAULTS = dict(intermediate_size=4096, hidden_size=1152, patch_size=14, image_size=224,
                                 num_hidden_layers=27, num_attention_heads=16, vision_use_head=False)


@dataclass
class GemmaConfig:
    """Shape and numerics of the text decoder; the Gemma 2 fields stay None for Gemma 1."""

    model_type: str = "gemma"
    vocab_size: int = 256000  # embedding rows; PaliGemma pads its 257153 tokens to 257216
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16  # 1 = multi-query (PaliGemma 1), fewer than heads = grouped-query
    head_dim: int = 256
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    query_pre_attn_scalar: float | None = None  # Gemma 2 scales scores by this**-0.5 instead of head_dim**-0.5
    attn_logit_softcapping: float | None = None  # Gemma 2: scores = cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None  # Gemma 2: layers marked "sliding_attention" see this many keys back
    layer_types: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> "GemmaConfig":
        model_type = d.get("model_type", "gemma")
        if model_type not in ("gemma", "gemma2"):
            raise ValueError(f"text_config.model_type {model_type!r} is not supported (gemma or gemma2)")
        kw = dict(GEMMA2_DEFAULTS if model_type == "gemma2" else GEMMA_DEFAULTS)
        names = {f.name for f in fields(cls)} - {"rope_theta", "hidden_act"}
        kw.update({k: v for k, v in d.items() if k in names and v is not None})
        # Gemma 2 reads `hidden_activation`; Gemma 1 reads `hidden_act` and, like transformers, takes a legacy
        # "gelu" to mean the tanh approximation.
        act = d.get("hidden_activation" if model_type == "gemma2" else "hidden_act") or "gelu_pytorch_tanh"
        kw["hidden_act"] = "gelu_pytorch_tanh" if act == "gelu" and model_type == "gemma" else act
        # transformers 5 writes `rope_parameters`, 4.x writes `rope_theta` (and `rope_scaling`, null here).
        rope = d.get("rope_parameters") or {"rope_theta": d.get("rope_theta", 10000.0), "rope_type": "default"}
        if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
            raise ValueError("text_config: only the default RoPE is supported")
        kw["rope_theta"] = float(rope.get("rope_theta", 10000.0))
        if model_type == "gemma2" and not kw.get("layer_types"):
            kw["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                 for i in range(kw["num_hidden_layers"])]
        return cls(**kw)

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"text_config activation {self.hidden_act!r} is not supported")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("text_config.num_attention_heads must be a multiple of num_key_value_heads")
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("text_config.layer_types must name one type per layer")
        if set(self.layer_types) - {"sliding_attention", "full_attention"}:
            raise ValueError(f"text_config.layer_types has unknown types: {sorted(set(self.layer_types))}")

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    def window(self, layer_idx: int) -> int | None:
        sliding = self.layer_types and self.layer_types[layer_idx] == "sliding_attention"
        return self.sliding_window if sliding else None


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
            if isinstance(d.get(name), int):
                setattr(config, name, d[name])
        if isinstance(d.get("image_token_id"), int):
            config.image_token_index = d["image_token_id"]
        if config.projection_dim != config.text_config.hidden_size:
            raise ValueError(f"projection_dim {config.projection_dim} differs from the text hidden size "
                             f"{config.text_config.hidden_size}")
        return config

    @property
    def num_image_tokens(self) -> int:
        return self.vision_config.num_patches


class GemmaRMSNorm(nn.Module):
    """RMSNorm that stores the offset w and scales by (1 + w), all in float32 with one rounding at the end."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class GemmaRotaryEmbedding(nn.Module):
    """Rotary position angles; inv_freq stays float32 whatever the model dtype (REFERENCE.md §3.4)."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.head_dim, self.theta = config.head_dim, config.rope_theta
        self.register_buffer("inv_freq", torch.empty(self.head_dim // 2), persistent=False)
        if not self.inv_freq.is_meta:  # on the meta device it is computed by reset_buffers, once materialised
            self.reset_buffers(self.inv_freq.device)

    def reset_buffers(self, device):
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        self.inv_freq = 1.0 / (self.theta**exponents)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # (B, L, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, hd): halves, not interleaved
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, T, hd) -> (B, nkv * n_rep, T, hd); kv head j serves query heads j*n_rep .. j*n_rep + n_rep - 1."""
    if n_rep == 1:
        return x
    B, n_kv, T, hd = x.shape
    return x[:, :, None].expand(B, n_kv, n_rep, T, hd).reshape(B, n_kv * n_rep, T, hd)


class KVCache(nn.Module):
    """Keys (after RoPE) and values of one layer, preallocated and written in place at the step's positions."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, L, hd) from cache position start; returns the keys and values to attend over."""
        if isinstance(start, int):  # a prompt: the filled part of the cache
            end = start + k.shape[2]
            self.k_cache[:, :, start:end] = k
            self.v_cache[:, :, start:end] = v
            return self.k_cache[:, :, :end].to(k.dtype), self.v_cache[:, :, :end].to(v.dtype)  # (B, nkv, end, hd)
        # A decode step at a tensor position: the whole cache, masked, so shapes never change and the step can be
        # compiled and captured as a CUDA graph.
        self.k_cache.index_copy_(2, start, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, start, v.to(self.v_cache.dtype))
        return self.k_cache.to(k.dtype), self.v_cache.to(v.dtype)  # (B, nkv, T, hd)


class GemmaAttention(nn.Module):
    """Grouped-query attention with RoPE; Gemma 2 adds a tanh soft-cap on the scores."""

    def __init__(self, config: GemmaConfig, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.softcap = config.attn_logit_softcapping
        bias, hidden = config.attention_bias, config.hidden_size
        self.q_proj = Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, hidden, bias=bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask: torch.Tensor, start, last_only: bool = False) -> torch.Tensor:
        """(B, L, hidden) -> (B, L, hidden), or (B, 1, hidden) for the last position alone with last_only (whose
        keys and values are still computed and cached for every position)."""
        B, L, _ = x.shape
        if last_only:
            q, (k, v) = self.q_proj(x[:, -1:]), linears(x, self.k_proj, self.v_proj)
            cos_q, sin_q, mask = cos[:, :, -1:], sin[:, :, -1:], mask[:, :, -1:]
        else:
            (q, k, v), cos_q, sin_q = linears(x, self.q_proj, self.k_proj, self.v_proj), cos, sin
        q = q.view(B, -1, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, Lq, hd)
        k = k.view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, L, hd)
        v = v.view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos_q, sin_q), apply_rope(k, cos, sin)
        k, v = self.kv_cache.update(start, k, v)  # (B, nkv, T, hd), T = start + L
        y = attend(q, k, v, mask, self.scale, self.softcap)  # (B, nh, Lq, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, q.shape[2], -1))  # (B, Lq, hidden)


QUERY_CHUNK = 512  # queries per pass where the scores are materialised: 16 heads x 512 x 4.1k keys in float32 = 134 MB


def attend(q, k, v, mask: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """softmax(q k^T * scale [soft-capped], masked) v for (B, nh, L, hd) queries and (B, nkv, T, hd) keys/values."""
    B, n_heads, L, hd = q.shape
    n_kv, T = k.shape[1], k.shape[2]
    if softcap is None and L > 1:  # a fused kernel keeps the L x T scores of a long prompt out of memory
        group = n_heads // n_kv
        return F.scaled_dot_product_attention(q, repeat_kv(k, group), repeat_kv(v, group), attn_mask=mask, scale=scale)
    if L > QUERY_CHUNK:  # e.g. 4096 image tokens at 896 px: the scores of a chunk of queries at a time
        return torch.cat([attend(q[:, :, i:i + QUERY_CHUNK], k, v, mask[:, :, i:i + QUERY_CHUNK], scale, softcap)
                          for i in range(0, L, QUERY_CHUNK)], dim=2)
    # Otherwise the query heads that share a kv head are laid side by side: no copies of the cache for the heads,
    # and the small products are taken in float32, which CPUs do several times faster than half-precision ones.
    q = q.reshape(B, n_kv, -1, hd).float()  # (B, nkv, group * L, hd)
    scores = torch.matmul(q, k.float().transpose(2, 3)) * scale  # (B, nkv, group * L, T)
    if softcap is not None:  # the cap sits between the product and the mask, which no fused kernel offers
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(B, n_kv, -1, L, T).masked_fill(~mask[:, :, None], torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1).view(B, n_kv, -1, T)
    return torch.matmul(probs, v.float()).to(v.dtype).view(B, n_heads, L, hd)


class GemmaMLP(nn.Module):
    """GeGLU feed-forward: down(act(gate(x)) * up(x)), no biases."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linears(x, self.gate_proj, self.up_proj)
        return self.down_proj(self.act(gate, up))  # act(gate) * up


class GemmaDecoderLayer(nn.Module):
    """Gemma: pre-norm residual blocks. Gemma 2: each block's output is normed again before the residual add."""

    def __init__(self, config: GemmaConfig, layer_idx: int):
        super().__init__()
        self.window = config.window(layer_idx)
        self.gemma2 = config.is_gemma2
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = GemmaAttention(config, layer_idx)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GemmaMLP(config)
        if self.gemma2:
            self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, masks: dict, start, last_only: bool = False) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, masks[self.window], start, last_only)
        x = x[:, -h.shape[1]:]  # (B, 1, hidden) with last_only
        if not self.gemma2:  # Gemma 1's "post_attention_layernorm" is the norm in front of the MLP
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    """Token embeddings (scaled by sqrt(hidden)), the decoder layers and the final norm."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = GemmaRotaryEmbedding(config)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, L, H)
        # sqrt(hidden) is held in float32 and rounded to the model dtype, as transformers does (REFERENCE.md §3.2)
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32).to(x.dtype)

    def forward(self, x, positions, masks: dict, start, last_only: bool = False) -> torch.Tensor:
        """Final hidden states (B, L, hidden); with last_only just the last position's (B, 1, hidden), which lets the
        last layer skip its queries, attention output and MLP for every other position."""
        cos, sin = self.rotary_emb(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, masks, start, last_only and i == len(self.layers) - 1)
        return self.norm(x)


class GemmaForCausalLM(nn.Module):
    """The decoder plus the output head, which is the embedding matrix itself (tied, unscaled)."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        self.lm_head.weight = self.model.embed_tokens.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)  # (B, L, vocab), in the model dtype
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class PaliGemmaMultiModalProjector(nn.Module):
    """One linear layer from SigLIP width to the decoder's width."""

    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.linear = Linear(config.vision_config.hidden_size, config.projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def attention_masks(config: GemmaConfig, key_valid, prefix, queries: torch.Tensor, n_keys: int) -> dict:
    """Boolean masks (B, 1, len(queries), n_keys), True where query q may read key k, one per window size.

    big_vision's prefix-LM rule over absolute cache positions: a key is readable if it is not padding and either
    causal (k <= q, and k > q - window in sliding layers) or both q and k lie in the prefix (image, <bos>, prompt,
    "\n"), where attention is bidirectional and overrides the window (REFERENCE.md §3.7). For a 2-token prefix
    and 2 generated tokens (P = prefix, G = generated), full layers get:
          k: P P G G
        q=P  1 1 0 0
        q=P  1 1 0 0
        q=G  1 1 1 0
        q=G  1 1 1 1
    key_valid, prefix: (B, T) booleans over cache positions; queries: the queries' cache positions, a tensor, so
    that a decode step (one query, n_keys = the whole cache) keeps the same shapes from token to token.
    """
    q = queries[:, None]
    k = torch.arange(n_keys, device=key_valid.device)[None, :]
    both_prefix = prefix[:, queries, None] & prefix[:, None, :n_keys]  # (B, Lq, Lk)
    valid = key_valid[:, None, :n_keys]
    windows = {None} | {config.window(i) for i in range(config.num_hidden_layers)}
    masks = {}
    for w in windows:
        causal = (k <= q) if w is None else (k <= q) & (k > q - w)
        masks[w] = (valid & (causal | both_prefix))[:, None]
    return masks


class PaliGemmaForConditionalGeneration(nn.Module):
    """SigLIP features, projected, fill the <image> slots of the prompt; the Gemma decoder does the rest."""

    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionModel(config.vision_config)
        self.multi_modal_projector = PaliGemmaMultiModalProjector(config)
        self.language_model = GemmaForCausalLM(config.text_config)

    def reset_buffers(self):
        """Tie the head again and compute the non-persistent buffers afresh, after materialising from meta."""
        self.language_model.tie_weights()
        self.language_model.model.rotary_emb.reset_buffers(self.language_model.lm_head.weight.device)

    def setup_caches(self, batch_size: int, max_len: int):
        text, w = self.config.text_config, self.language_model.model.embed_tokens.weight
        for layer in self.language_model.model.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, max_len, text.num_key_value_heads, text.head_dim,
                                               w.dtype, w.device)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Token embeddings, in dtype, with the projected image features written into the <image> slots."""
        lm = self.language_model.model
        slots = input_ids == self.config.image_token_index
        ids = input_ids.masked_fill(slots, 0) if self.config.image_token_index >= lm.config.vocab_size else input_ids
        x = lm.embed(ids).to(dtype)  # (B, L, H)
        if pixel_values is None:
            return x
        features = self.multi_modal_projector(self.vision_tower(pixel_values.to(dtype))).to(dtype)  # (B, N, H)
        if int(slots.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(f"the prompt has {int(slots.sum())} <image> tokens for "
                             f"{features.shape[0] * features.shape[1]} image features")
        return x.masked_scatter(slots[..., None], features)

    def forward(self, input_ids, positions, masks: dict, start, pixel_values=None, last_only=False, dtype=None):
        """Logits (B, L or 1, vocab) for tokens written to the cache from position start (an int for a prompt, a
        one-element tensor for a decode step; see KVCache.update), computed in dtype (the weights' by default;
        kernels.prefill_dtype explains when another one is faster)."""
        x = self.embed(input_ids, pixel_values, dtype or self.language_model.lm_head.weight.dtype)
        return self.language_model.logits(self.language_model.model(x, positions, masks, start, last_only))
