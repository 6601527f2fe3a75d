"""Gemma and Gemma 2 decoders, as PaliGemma uses them, with a preallocated KV cache.

Plain PyTorch. Module and parameter names mirror the checkpoint keys under `language_model.model.`, and every
rounding point follows docs/NUMERICS.md §3, so that float32 logits match transformers' eager attention. The masks
come from the caller (modeling_paligemma.py builds PaliGemma's prefix-LM masks); every module computes in the dtype
of the hidden states it is given.
"""

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from paligemma.modeling_siglip import ACTIVATIONS, Fused, embedding, positive_ints

# Class defaults of transformers' GemmaConfig / Gemma2Config for keys a config.json may omit (docs/NUMERICS.md §1).
GEMMA_DEFAULTS = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=16)
GEMMA2_DEFAULTS = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, query_pre_attn_scalar=256, sliding_window=4096,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
GEMMA2_ONLY = ("query_pre_attn_scalar", "sliding_window", "final_logit_softcapping", "attn_logit_softcapping")


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
        if model_type == "gemma":  # Gemma 1 has no attention soft-cap, window or query scalar, whatever the file says
            names -= {"query_pre_attn_scalar", "sliding_window", "attn_logit_softcapping"}
        kw.update({k: v for k, v in d.items() if k in names and (v is not None or k != "layer_types")})
        # Gemma 2 reads `hidden_activation`; Gemma 1 reads `hidden_act` and, like transformers, takes a legacy
        # "gelu" to mean the tanh approximation.
        act = d.get("hidden_activation" if model_type == "gemma2" else "hidden_act") or "gelu_pytorch_tanh"
        kw["hidden_act"] = "gelu_pytorch_tanh" if act == "gelu" and model_type == "gemma" else act
        # transformers 5 writes `rope_parameters`, 4.x writes `rope_theta` (and `rope_scaling`, null here).
        rope = d.get("rope_parameters") or {"rope_theta": d.get("rope_theta", 10000.0), "rope_type": "default"}
        if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
            raise ValueError("text_config: only the default RoPE is supported")
        kw["rope_theta"] = rope.get("rope_theta", 10000.0)
        if model_type == "gemma2" and not kw.get("layer_types"):
            layers = kw["num_hidden_layers"]
            kw["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                 for i in range(layers if type(layers) is int and layers > 0 else 0)]
        return cls(**kw)

    def __post_init__(self):
        positive_ints("text_config", self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "head_dim",
                                            "max_position_embeddings"))
        for name in ("rms_norm_eps", "rope_theta", *GEMMA2_ONLY):
            value = getattr(self, name)
            if value is not None and (type(value) not in (int, float) or not value > 0):
                raise ValueError(f"text_config.{name} must be a number above 0, not {value!r}")
        if self.sliding_window is not None and type(self.sliding_window) is not int:
            raise ValueError(f"text_config.sliding_window must be a whole number, not {self.sliding_window!r}")
        if self.is_gemma2 and self.sliding_window is None and "sliding_attention" in self.layer_types:
            raise ValueError("text_config.sliding_window is null, but layer_types has sliding layers")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"text_config activation {self.hidden_act!r} is not supported")
        if self.head_dim % 2:
            raise ValueError("text_config.head_dim must be even (rotary embeddings rotate pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("text_config.num_attention_heads must be a multiple of num_key_value_heads")
        if not isinstance(self.layer_types, list) or self.layer_types and len(self.layer_types) != \
                self.num_hidden_layers:
            raise ValueError("text_config.layer_types must name one type per layer")
        if set(self.layer_types) - {"sliding_attention", "full_attention"}:
            raise ValueError(f"text_config.layer_types has unknown types: {sorted(map(str, self.layer_types))}")

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    def window(self, layer_idx: int) -> int | None:
        sliding = self.layer_types and self.layer_types[layer_idx] == "sliding_attention"
        return self.sliding_window if sliding else None


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
    """Rotary position angles; inv_freq stays float32 whatever the model dtype (docs/NUMERICS.md §3.4)."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.head_dim, self.theta = config.head_dim, config.rope_theta
        self.register_buffer("inv_freq", torch.empty(self.head_dim // 2), persistent=False)
        if not self.inv_freq.is_meta:  # on the meta device it is computed by reset_buffers, once materialised
            self.reset_buffers(self.inv_freq.device)

    def reset_buffers(self, device: torch.device):
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
    """Keys (after RoPE) and values of one layer, for up to max_batch rows and max_len positions, written in place."""

    def __init__(self, max_batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, L, hd) into cache rows `rows` at positions input_pos: (L,) shared by every row, or
        (B, L) each row's own; returns those rows' whole cache."""
        k_out, v_out = self.k_cache[rows], self.v_cache[rows]
        if input_pos.dim() == 1:
            k_out.index_copy_(2, input_pos, k.to(k_out.dtype))
            v_out.index_copy_(2, input_pos, v.to(v_out.dtype))
        else:  # indices on dims 0 and 2 around a slice: the indexed shape is (B, L, nkv, hd)
            batch = torch.arange(k.shape[0], device=k.device)[:, None]
            k_out[batch, :, input_pos] = k.transpose(1, 2).to(k_out.dtype)
            v_out[batch, :, input_pos] = v.transpose(1, 2).to(v_out.dtype)
        return k_out, v_out  # (B, nkv, T, hd)

    def keep(self, old: "KVCache"):
        """Copy what a smaller cache held into this one, at the same rows and positions."""
        for new, held in ((self.k_cache, old.k_cache), (self.v_cache, old.v_cache)):
            new[:held.shape[0], :, :held.shape[2]] = held


QUERY_CHUNK = 512  # queries per pass where the scores are materialised: 16 heads x 512 x 4.1k keys in float32 = 134 MB


def attend(q, k, v, mask: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """softmax(q k^T * scale [soft-capped], masked) v for (B, nh, L, hd) queries and (B, nkv, T, hd) keys/values;
    mask (B, 1, L, T) is True where a query may read a key."""
    B, n_heads, L, hd = q.shape
    n_kv, T = k.shape[1], k.shape[2]
    if softcap is None and L > 1:  # a fused kernel keeps the L x T scores of a long prompt out of memory
        group = n_heads // n_kv
        return F.scaled_dot_product_attention(q, repeat_kv(k, group), repeat_kv(v, group), attn_mask=mask, scale=scale)
    if L > QUERY_CHUNK:  # e.g. 4096 image tokens at 896 px: the scores of a chunk of queries at a time
        return torch.cat([attend(q[:, :, i:i + QUERY_CHUNK], k, v, mask[:, :, i:i + QUERY_CHUNK], scale, softcap)
                          for i in range(0, L, QUERY_CHUNK)], dim=2)
    # Otherwise the query heads that share a kv head are laid side by side: no copies of the cache for the heads,
    # and the scores and softmax are taken in float32 (docs/NUMERICS.md §3.6), rounded once at the end.
    q = q.reshape(B, n_kv, -1, hd).float()  # (B, nkv, group * L, hd)
    scores = torch.matmul(q, k.float().transpose(2, 3)) * scale  # (B, nkv, group * L, T)
    if softcap is not None:  # the cap sits between the product and the mask, which no fused kernel offers
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(B, n_kv, -1, L, T).masked_fill(~mask[:, :, None], torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1).view(B, n_kv, -1, T)
    return torch.matmul(probs, v.float()).to(v.dtype).view(B, n_heads, L, hd)


class Attend(nn.Module):
    """`attend` over cached keys and values, converted to the queries' dtype; a module, so that the CPU fast path
    can swap in its one-pass decode step."""

    def __init__(self, scale: float, softcap: float | None):
        super().__init__()
        self.scale, self.softcap = scale, softcap

    def forward(self, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        return attend(q, k.to(q.dtype), v.to(q.dtype), mask, self.scale, self.softcap)


class GemmaAttention(nn.Module):
    """Grouped-query attention with RoPE over the KV cache; Gemma 2 adds a tanh soft-cap on the scores."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.attend = Attend((config.query_pre_attn_scalar or config.head_dim) ** -0.5, config.attn_logit_softcapping)
        bias, hidden = config.attention_bias, config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=bias)
        self.qkv = Fused(self.q_proj, self.k_proj, self.v_proj)
        self.kv_cache: KVCache | None = None  # set by PaliGemmaForConditionalGeneration.setup_caches

    def forward(self, x, cos, sin, input_pos: torch.Tensor, mask: torch.Tensor, last_only: bool = False,
                rows: slice = slice(None)):
        """(B, L, hidden) -> (B, L, hidden); with last_only just the last position's (B, 1, hidden), while the keys
        and values of every position are still cached (in cache rows `rows`). The keys attended are the cache's
        first mask.shape[-1]."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, L, hd)
        k = k.view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, L, hd)
        v = v.view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        if last_only:
            q, cos_q, sin_q, mask = q[:, :, -1:], cos[:, :, -1:], sin[:, :, -1:], mask[:, :, -1:]
        else:
            cos_q, sin_q = cos, sin
        q, k = apply_rope(q, cos_q, sin_q), apply_rope(k, cos, sin)
        k, v = self.kv_cache.update(input_pos, k, v, rows)
        T = mask.shape[-1]
        y = self.attend(q, k[:, :, :T], v[:, :, :T], mask)  # (B, nh, Lq, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, q.shape[2], -1))  # (B, Lq, hidden)


class GemmaMLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)), no biases."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up = Fused(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(self.act(gate, up))


class GemmaDecoderLayer(nn.Module):
    """Gemma: pre-norm residual blocks. Gemma 2: each block's output is normed again before the residual add."""

    def __init__(self, config: GemmaConfig, layer_idx: int):
        super().__init__()
        self.sliding = config.window(layer_idx) is not None
        self.gemma2 = config.is_gemma2
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = GemmaAttention(config)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GemmaMLP(config)
        if self.gemma2:
            self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, input_pos, mask, last_only: bool = False, rows: slice = slice(None)):
        h = self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, last_only, rows)
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
        # sqrt(hidden) is held in float32 and rounded to the hidden states' dtype, as transformers does (§3.2)
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32).to(x.dtype)

    def forward(self, x, positions, input_pos, mask, sliding_mask=None, last_only: bool = False,
                rows: slice = slice(None)) -> torch.Tensor:
        """Final hidden states (B, L, hidden) of x (B, L, hidden) at RoPE positions (B, L) and cache positions
        input_pos ((L,) or (B, L)) of cache rows `rows`; sliding layers read sliding_mask. With last_only just the
        last position's (B, 1, hidden), which lets the last layer skip its queries, attention output and MLP for
        every other position."""
        cos, sin = self.rotary_emb(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, input_pos, sliding_mask if layer.sliding else mask,
                      last_only and i == len(self.layers) - 1, rows)
        return self.norm(x)


class GemmaForCausalLM(nn.Module):
    """The decoder plus the output head, which is the embedding matrix itself (tied, unscaled)."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        self.lm_head.weight = self.model.embed_tokens.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)  # (B, L, vocab), in the hidden states' dtype
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
