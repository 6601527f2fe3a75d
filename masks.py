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
scaled to [-1, 1]) but goes beyond it.

Placement follows that evaluator (big_vision/evaluators/proj/paligemma/transfers/segmentation.py, the code that
scored the published segmentation results): the box's pixel edges are int(t / 1023 * side), truncated; a box whose
edges meet or cross (x1 <= x0 or y1 <= y0) has no mask; the raw float output is resized into the box with PIL's
bilinear filter, and pixels > 0 are the object. Google's demo instead maps the output to [0, 1] with x * 0.5 + 0.5,
clips, resizes and keeps > 0.5: the clip moves the mask's edges wherever the raw output passes -1 or 1.

A placed mask is written as COCO's run-length encoding, compressed, exactly as pycocotools' `mask.encode` writes it
(the tests compare the two): {"size": [height, width], "counts": "..."}, where counts are the lengths of the runs of
0s and 1s down the columns, starting with a run of 0s, in pycocotools' text form (maskApi.c, rleToString).
"""

import zipfile

import numpy as np
import torch
from PIL import Image
from torch import nn

from paligemma.console import UserError

LOC_MAX = 1023  # <loc0000>..<loc1023>
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
    """(N, 16) codes in 0..127 -> (N, 64, 64) float32 raw decoder outputs on the CPU; > 0 is inside the object."""
    codes = torch.as_tensor(codes, dtype=torch.long)
    if codes.ndim != 2 or codes.shape[1] != SEG_CODES:
        raise ValueError(f"codes must have shape (N, {SEG_CODES}), got {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() > SEG_MAX):
        raise ValueError(f"codes must lie in 0..{SEG_MAX}, got {codes.min().item()}..{codes.max().item()}")
    return decoder(codes.to(decoder._vq_vae._embedding.device)).float().cpu()


def pixel_box(locs: list[int], width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel edges x0, y0, x1, y1 of the box y_min, x_min, y_max, x_max (0..1023), truncated as big_vision's
    evaluator computes them: int(t / 1023 * side)."""
    y0, x0, y1, x1 = locs
    return int(x0 / LOC_MAX * width), int(y0 / LOC_MAX * height), int(x1 / LOC_MAX * width), int(y1 / LOC_MAX * height)


def place_mask(raw64, locs: list[int], width: int, height: int) -> np.ndarray:
    """A (height, width) bool mask: the raw 64x64 output resized bilinearly into the box's pixel_box and kept where
    > 0, as big_vision's evaluator places it; all False for a box that truncates to nothing."""
    canvas = np.zeros((height, width), bool)
    x0, y0, x1, y1 = pixel_box(locs, width, height)
    if x1 > x0 and y1 > y0:  # t <= 1023, so the box never leaves the image
        raw = np.asarray(raw64, dtype=np.float32)
        canvas[y0:y1, x0:x1] = np.asarray(Image.fromarray(raw).resize((x1 - x0, y1 - y0), Image.BILINEAR)) > 0
    return canvas


def rle_encode(mask: np.ndarray) -> dict:
    """COCO's compressed run-length encoding of a (height, width) bool mask: {"size": [h, w], "counts": str}."""
    height, width = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")  # down the columns, as COCO counts
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    counts = ([0] if flat.size and flat[0] else []) + np.diff(bounds).tolist()  # the first run is of 0s
    return {"size": [height, width], "counts": _compress(counts)}


def rle_decode(rle: dict) -> np.ndarray:
    """The (height, width) bool mask of a COCO run-length encoding, compressed (str or bytes counts) or not (a list)."""
    height, width = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, bytes):  # as pycocotools' own encode returns it
        counts = counts.decode("ascii")
    counts = _decompress(counts) if isinstance(counts, str) else list(counts)
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    if flat.size != height * width:
        raise ValueError(f"the runs cover {flat.size} pixels, not {height} x {width}")
    return flat.reshape((height, width), order="F")


def _compress(counts: list[int]) -> str:
    """pycocotools' text form of run lengths: from the fourth on, each as its difference to the one two before; each
    in 5-bit groups, low first, with 0x20 set on all but the last group, and 48 added to make a character."""
    out = []
    for i, x in enumerate(counts):
        x -= counts[i - 2] if i > 2 else 0
        more = True
        while more:
            group, x = x & 0x1F, x >> 5
            more = x != -1 if group & 0x10 else x != 0  # 0x10: the sign of what is left
            out.append(chr(group + (0x20 if more else 0) + 48))
    return "".join(out)


def _decompress(text: str) -> list[int]:
    """The run lengths of pycocotools' text form (maskApi.c, rleFrString)."""
    counts, x, shift = [], 0, 0
    for char in text:
        group = ord(char) - 48
        x |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            continue
        if group & 0x10:  # a negative difference: extend the sign
            x |= -1 << shift
        counts.append(x + (counts[-2] if len(counts) > 2 else 0))
        x, shift = 0, 0
    return counts
