"""Gemma's decoder with its decode step in one call of decode.c (`Decoder`, which kernels.accelerate puts in place
of modeling_gemma.GemmaModel), and each layer as decode.c takes it (`LayerSpec`)."""

import ctypes

import torch

from paligemma import modeling_gemma, modeling_siglip
from paligemma.clib import library
from paligemma.kernels import HALF, KINDS, MAX_GEMV_ROWS
from paligemma.quantization import QuantizedWeight


class LayerSpec(ctypes.Structure):
    """decode.c's Layer: a decoder layer's sizes, numerics, the addresses of its weights and of its KV cache."""

    _fields_ = [("kind", ctypes.c_int32), ("w_kind", ctypes.c_int32), ("norm_kind", ctypes.c_int32),
                ("bits", ctypes.c_int32), ("gemma2", ctypes.c_int32), ("sliding", ctypes.c_int32),
                ("hidden", ctypes.c_int64), ("inter", ctypes.c_int64), ("n_heads", ctypes.c_int64),
                ("n_kv", ctypes.c_int64), ("hd", ctypes.c_int64), ("group", ctypes.c_int64), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("cap", ctypes.c_float), ("norms", ctypes.c_void_p * 4),
                ("w", ctypes.c_void_p * 7), ("s", ctypes.c_void_p * 7), ("k_cache", ctypes.c_void_p),
                ("v_cache", ctypes.c_void_p), ("max_len", ctypes.c_int64), ("kv_b", ctypes.c_int64),
                ("kv_h", ctypes.c_int64)]


def layer_spec(layer: modeling_gemma.GemmaDecoderLayer, dtype: torch.dtype) -> LayerSpec | None:
    """A decoder layer as decode.c takes it for hidden states of dtype (its cache filled in at each step), or None
    where decode.c cannot run it: biases, another activation, weights of mixed dtypes or schemes."""
    attn, mlp = layer.self_attn, layer.mlp
    linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    weights = [linear.weight for linear in linears]
    norms = [layer.input_layernorm, layer.post_attention_layernorm] + (
        [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm] if layer.gemma2 else [])
    quantized = all(isinstance(w, QuantizedWeight) and w.scheme == weights[0].scheme for w in weights)
    plain = all(isinstance(w, torch.Tensor) and w.dtype == weights[0].dtype and w.is_contiguous() and
                w.device.type == "cpu" for w in weights) and weights[0].dtype in KINDS
    if dtype not in HALF or not (quantized or plain) or any(linear.bias is not None for linear in linears) or \
            not isinstance(mlp.act, modeling_siglip.GELUTanh) or norms[0].weight.dtype not in KINDS or \
            any(n.weight.dtype != norms[0].weight.dtype or not n.weight.is_contiguous() for n in norms):
        return None
    scheme = weights[0].scheme if quantized else None
    return LayerSpec(
        KINDS[dtype], 0 if quantized else KINDS[weights[0].dtype], KINDS[norms[0].weight.dtype],
        scheme.bits if quantized else 0, layer.gemma2, layer.sliding, attn.o_proj.weight.shape[0],
        mlp.down_proj.weight.shape[1], attn.n_heads, attn.n_kv, attn.head_dim, scheme.group if quantized else 0,
        layer.input_layernorm.eps, attn.attend.scale, attn.attend.softcap or 0.0,
        (ctypes.c_void_p * 4)(*(n.weight.data_ptr() for n in norms)),
        (ctypes.c_void_p * 7)(*((w.qweight if quantized else w).data_ptr() for w in weights)),
        (ctypes.c_void_p * 7)(*(w.scales.data_ptr() if quantized else None for w in weights)))


class Decoder(modeling_gemma.GemmaModel):
    """Gemma's decoder, whose decode step (up to MAX_GEMV_ROWS half-precision rows of one position, on the CPU) runs
    all its layers in one call of decode.c: norms, products, rotary angles, cache writes, attention, activations and
    residual adds, rounded where the modules round, so the same numbers as calling them one by one, without the
    hundred-odd PyTorch operations and Python calls a layer that cost more than their arithmetic. A prompt goes
    through the modules."""

    def specs(self, dtype: torch.dtype):
        """Every layer as decode.c takes it (a ctypes array, made once per dtype), or None where one cannot be."""
        made = self.__dict__.setdefault("_specs", {})
        if dtype not in made:
            specs = [layer_spec(layer, dtype) for layer in self.layers]
            made[dtype] = None if library() is None or None in specs else (LayerSpec * len(specs))(*specs)
        return made[dtype]

    def forward(self, x, positions, input_pos, mask, sliding_mask=None, last_only: bool = False,
                rows: slice = slice(None)) -> torch.Tensor:
        B, L, _ = x.shape
        specs = self.specs(x.dtype) if L == 1 and B <= MAX_GEMV_ROWS and x.device.type == "cpu" else None
        caches = [layer.self_attn.kv_cache for layer in self.layers]
        masks = [m for m in (mask, sliding_mask) if m is not None]
        if specs is None or any(c.k_cache.dtype != x.dtype or not c.k_cache.is_contiguous() or
                                not c.v_cache.is_contiguous() for c in caches) or \
                any(m.dtype != torch.bool or m.shape != masks[0].shape or m.shape[:3] != (B, 1, 1) for m in masks):
            return super().forward(x, positions, input_pos, mask, sliding_mask, last_only, rows)
        first = rows.start or 0
        for spec, cache in zip(specs, caches):  # this step's rows of the caches, which grow between prompts
            k_cache, v_cache = cache.k_cache, cache.v_cache
            spec.k_cache = k_cache.data_ptr() + first * k_cache.stride(0) * k_cache.element_size()
            spec.v_cache = v_cache.data_ptr() + first * v_cache.stride(0) * v_cache.element_size()
            spec.max_len, spec.kv_b, spec.kv_h = k_cache.shape[2], k_cache.stride(0), k_cache.stride(1)
        cos, sin = (t.expand(B, 1, 1, -1).contiguous() for t in self.rotary_emb(positions, x.dtype))  # (B, 1, 1, hd)
        pos = input_pos.to(torch.int64).reshape(-1).expand(B).contiguous()  # (1,) or (B, 1) -> (B,)
        mask, sliding = (m.contiguous() for m in (mask, masks[-1]))
        x, out = x.contiguous(), torch.empty_like(x)
        if library().decode_layers(len(specs), specs, x.data_ptr(), out.data_ptr(), B, cos.data_ptr(),
                                   sin.data_ptr(), pos.data_ptr(), mask.data_ptr(), sliding.data_ptr(),
                                   mask.shape[-1], mask.stride(0)):
            raise IndexError(f"cache positions {input_pos.tolist()} are outside the KV cache's {specs[0].max_len}")
        return self.norm(out)
