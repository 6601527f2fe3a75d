"""The masks of `segment` answers: big_vision's VQ-VAE decoder turns the 16 codes of an object into a 64x64 mask.

The 16 codes index the codebook of a small VQ-VAE (the architecture of Ning et al. 2023, "All in Tokens",
arXiv 2301.02229) that big_vision publishes as `vae-oid.npz`. The file holds the PyTorch model's state dict, so
the names and shapes below are torch's (Conv2d weight: out, in, kh, kw; ConvTranspose2d weight: in, out, kh, kw);
`MaskDecoder` uses the same names, so loading needs no renaming:

    _vq_vae._embedding           (128, 512)        codebook: 128 codes of 512 numbers
    decoder.0.weight / .bias     (128, 512, 1, 1)  Conv2d 1x1, then ReLU (decoder.1)
    decoder.{2,3}.net.0 w / b    (128, 128, 3, 3)  residual block: Conv 3x3, ReLU, Conv 3x3, ReLU, Conv 1x1, + input
    decoder.{2,3}.net.2 w / b    (128, 128, 3, 3)
    decoder.{2,3}.net.4 w / b    (128, 128, 1, 1)
    decoder.4.weight / .bias     (128, 128, 4, 4)  ConvTranspose2d stride 2 padding 1, then ReLU: 4 -> 8
    decoder.6.weight / .bias     (128, 64, 4, 4)   same, 8 -> 16
    decoder.8.weight / .bias     (64, 32, 4, 4)    same, 16 -> 32
    decoder.10.weight / .bias    (32, 16, 4, 4)    same, 32 -> 64
    decoder.12.weight / .bias    (1, 16, 1, 1)     Conv2d 1x1 to one channel, no activation
    (every bias has the layer's output channels; the encoder.* arrays in the file are not needed here)

big_vision's Flax decoder (get_reconstruct_masks in its segmentation evaluator) is this network: its ConvTranspose
with padding 2 and transpose_kernel=True on the (2, 3, 1, 0)-transposed weight is torch's padding 1. Code i sits at
row i // 4, column i % 4 of the 4x4 grid. The raw output is nominally in [-1, 1] (the VAE was trained on masks
scaled to [-1, 1]; big_vision's evaluator keeps pixels > 0); `decode_masks` maps it to [0, 1] with x * 0.5 + 0.5
and a clip, as Google's demo does, so 0.5 is that threshold.
"""

import zipfile

import numpy as np
import torch
from PIL import Image
from torch import nn

from console import UserError

SEG_MAX = 127  # <seg000>..<seg127>
SEG_CODES = 16  # codes per mask, a 4x4 grid


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(conv3x3(x))))), the mask decoder's residual block."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class Codebook(nn.Module):
    """Holds the VQ-VAE codebook under the name the npz gives it (`_vq_vae._embedding`)."""

    def __init__(self, codes: int, dim: int):
        super().__init__()
        self.register_buffer("_embedding", torch.zeros(codes, dim))


class MaskDecoder(nn.Module):
    """The decoder half of big_vision's mask VQ-VAE: 16 codes -> one 64x64 mask, raw values about [-1, 1]."""

    def __init__(self, codes: int = SEG_MAX + 1, code_dim: int = 512, dim: int = 128):
        super().__init__()
        self._vq_vae = Codebook(codes, code_dim)
        up = []
        for c_in, c_out in ((dim, dim), (dim, dim // 2), (dim // 2, dim // 4), (dim // 4, dim // 8)):
            up += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]  # doubles height and width
        self.decoder = nn.Sequential(nn.Conv2d(code_dim, dim, 1), nn.ReLU(), ResBlock(dim), ResBlock(dim), *up,
                                     nn.Conv2d(dim // 8, 1, 1))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self._vq_vae._embedding[codes]  # (N, 16, 512)
        x = x.view(-1, 4, 4, x.shape[-1]).permute(0, 3, 1, 2)  # (N, 512, 4, 4): code i at row i // 4, column i % 4
        return self.decoder(x)[:, 0]  # (N, 64, 64)


def load_vae(path) -> MaskDecoder:
    """Reads big_vision's vae-oid.npz (arrays only, never unpickled) into a MaskDecoder; UserError names an array."""
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile) as e:  # a pickle, or not a numpy file at all
        raise UserError(f"{path}: not an .npz archive of arrays ({e})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: holds a single array, expected an .npz archive of arrays")
    arrays = {}
    with data:
        for name in data.files:  # read every member, so that anything pickled is refused, used or not
            try:
                arrays[name] = data[name]
            except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
                raise UserError(f"{path}: array {name!r} cannot be read without unpickling ({e})") from None
    decoder = MaskDecoder()
    state = {}
    for name, expected in decoder.state_dict().items():
        array = arrays.get(name)
        if array is None:
            raise UserError(f"{path}: missing array {name!r} of shape {tuple(expected.shape)}")
        if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
            raise UserError(f"{path}: array {name!r} is not an array of floats")
        if array.shape != tuple(expected.shape):
            raise UserError(f"{path}: array {name!r} has shape {array.shape}, expected {tuple(expected.shape)}")
        state[name] = torch.from_numpy(array.astype(np.float32))
    decoder.load_state_dict(state)
    return decoder.eval()


@torch.no_grad()
def decode_masks(decoder: MaskDecoder, codes) -> torch.Tensor:
    """(N, 16) codes in 0..127 -> (N, 64, 64) float32 masks in [0, 1] on the CPU; > 0.5 is inside the object."""
    codes = torch.as_tensor(codes, dtype=torch.long)
    if codes.ndim != 2 or codes.shape[1] != SEG_CODES:
        raise ValueError(f"codes must have shape (N, {SEG_CODES}), got {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() > SEG_MAX):
        raise ValueError(f"codes must lie in 0..{SEG_MAX}, got {codes.min().item()}..{codes.max().item()}")
    raw = decoder(codes.to(decoder._vq_vae._embedding.device))  # (N, 64, 64), about [-1, 1]
    return (raw.float() * 0.5 + 0.5).clamp(0, 1).cpu()


def mask_to_image(mask64, box, width: int, height: int) -> torch.Tensor:
    """A (height, width) float canvas, zero outside box ([x0, y0, x1, y1] pixels), the mask resized into the box."""
    canvas = np.zeros((height, width), np.float32)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    if x1 > x0 and y1 > y0:
        mask = torch.as_tensor(mask64, dtype=torch.float32).detach().cpu().numpy()
        # Bilinear on the float mask, as big_vision's evaluator resizes it into the box.
        resized = np.asarray(Image.fromarray(mask).resize((x1 - x0, y1 - y0), Image.BILINEAR))
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)  # the box's part in the image
        if cx1 > cx0 and cy1 > cy0:
            canvas[cy0:cy1, cx0:cx1] = resized[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return torch.from_numpy(canvas)
