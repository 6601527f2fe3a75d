"""SigLIP vision tower, as PaliGemma uses it: patch embedding, pre-LN transformer encoder, final LayerNorm, no head.

Plain PyTorch. Module and parameter names mirror the checkpoint keys under `vision_tower.vision_model.`, and the
arithmetic follows docs/NUMERICS.md §3 step by step. The tower computes in the dtype of the pixel values it is
given, so its small parameters (convolution, positions, norms) are cast to that dtype where they are used.

Also home to three small building blocks the Gemma decoder shares: `Fused`, the GELU activations and `embedding`.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


class Fused(nn.Module):
    """Linear layers that read the same input (q, k, v; gate, up), applied together: returns each one's output.

    The layers stay registered where the checkpoint names them; this only groups them, so that
    kernels.accelerate can swap in a module that multiplies all their weights in one pass.
    """

    def __init__(self, *layers: nn.Linear):
        super().__init__()
        self.layers = layers  # a tuple, so that the parameters are not registered a second time here

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(layer(x) for layer in self.layers)


class GELUTanh(nn.Module):
    """gelu(x) with the tanh approximation, times `up` when given (the gated activation of Gemma's MLP)."""

    def forward(self, x: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        y = F.gelu(x, approximate="tanh")
        return y if up is None else y * up


class GELU(nn.Module):
    """The exact (erf) gelu(x), times `up` when given."""

    def forward(self, x: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        y = F.gelu(x)
        return y if up is None else y * up


ACTIVATIONS = {"gelu_pytorch_tanh": GELUTanh, "gelu": GELU}  # by the name config.json gives


def embedding(rows: int, dim: int) -> nn.Embedding:
    """An nn.Embedding without the random init (its weights always come from the checkpoint): the first normal_ on
    the meta device costs torch almost a second."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


def positive_ints(section: str, config, names: tuple[str, ...]):
    """Refuse a size that is not a whole number above zero, naming the field: a config.json can say anything."""
    for name in names:
        value = getattr(config, name)
        if type(value) is not int or value <= 0:
            raise ValueError(f"{section}.{name} must be a whole number above 0, not {value!r}")


@dataclass
class SiglipVisionConfig:
    """Shape of the vision tower; defaults are transformers' `SiglipVisionConfig` ones (docs/NUMERICS.md §1)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    vision_use_head: bool = True  # the class default; PaliGemma never uses the head, so it is never built

    @classmethod
    def from_dict(cls, d: dict) -> "SiglipVisionConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})  # an explicit null is refused below

    def __post_init__(self):
        positive_ints("vision_config", self, ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_channels", "image_size", "patch_size"))
        if type(self.layer_norm_eps) not in (int, float) or not self.layer_norm_eps > 0:
            raise ValueError(f"vision_config.layer_norm_eps must be a number above 0, not {self.layer_norm_eps!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act {self.hidden_act!r} is not supported")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("vision_config.hidden_size must be a multiple of num_attention_heads")
        if self.patch_size > self.image_size:
            raise ValueError("vision_config.patch_size must not exceed image_size")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm in the dtype of its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class SiglipVisionEmbeddings(nn.Module):
    """Non-overlapping patches projected by a strided convolution, plus a learned position per patch."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        conv, dtype = self.patch_embedding, pixel_values.dtype
        x = F.conv2d(pixel_values, conv.weight.to(dtype), conv.bias.to(dtype), stride=conv.stride)  # (B, D, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        return x + self.position_embedding.weight.to(dtype)  # positions are simply 0..N-1


class SiglipAttention(nn.Module):
    """Full bidirectional multi-head self-attention with biased projections."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.qkv = Fused(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = (t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2) for t in self.qkv(x))  # (B, nh, N, hd)
        # No mask: every patch sees every patch. The fused kernel keeps the N x N scores out of memory,
        # which matters at 896 px (4096 patches).
        y = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)  # (B, nh, N, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, D))


class SiglipMLP(nn.Module):
    """Two biased linear layers around a GELU."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    """The stack of encoder layers."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    """Embeddings, encoder and the final LayerNorm; the output is one feature vector per patch."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))  # (B, N, D)


class SiglipVisionModel(nn.Module):
    """Wrapper that gives the checkpoint's `vision_model.` level of names."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = SiglipVisionTransformer(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)
