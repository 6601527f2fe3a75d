"""PaliGemma's detection and segmentation answers: boxes, labels, 64x64 masks, and a picture of them.

`detect cat ; dog` is answered as `<loc0123><loc0045><loc0789><loc0901> cat ; <loc0010>... dog`: per object four
location tokens y_min, x_min, y_max, x_max on a 0..1023 grid, then the label; objects separated by ` ; `.
`segment cat` puts 16 codes `<seg000>..<seg127>` between the box and the label (Google's demo shows
`<loc..>x4 <seg..>x16 wall ; <loc..>x4 <seg..>x16 car`); the RefCOCO transfer answers have no label at all.

Coordinates. The processor resizes the image to the model's square without keeping the aspect ratio, so the grid
maps linearly onto the original image: x = x_tok / 1023 * width, y = y_tok / 1023 * height. We divide by 1023 as
big_vision, the authors' training code, does: its RefCOCO preprocessing writes round(v * 1023) for v in [0, 1]
(google-research/big_vision, big_vision/pp/proj/paligemma/segmentation.py) and its evaluator reads the tokens back
as t / 1023 (big_vision/evaluators/proj/paligemma/transfers/segmentation.py), so <loc1023> is the far edge. Google's
demo Space and Keras notebooks divide by 1024; the two differ by less than 0.1% of the side. Boxes are returned as
[x0, y0, x1, y1] in original-image pixels, floats rounded to 1 decimal.

Masks. The 16 codes index the codebook of a small VQ-VAE (the architecture of Ning et al. 2023, "All in Tokens",
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

import re
import zipfile

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from console import UserError, log

LOC_MAX = 1023  # <loc0000>..<loc1023>
SEG_MAX = 127  # <seg000>..<seg127>
SEG_CODES = 16  # codes per mask, a 4x4 grid
MASK_ALPHA = 0.5  # opacity of a mask overlay where the mask is 1
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 200, 200),
           (240, 50, 230), (170, 110, 40), (128, 128, 0), (0, 0, 128)]

# One match per piece of an answer: a location token, a segmentation token, any other <tag>, a separator, or text.
_TOKEN_RE = re.compile(r"<loc(\d{4})>|<seg(\d{3})>|<[^<>]*>|;|[^<;]+|<")


def _chunks(text: str, warnings: list[str]) -> list[list[tuple]]:
    """Splits an answer into one list of (kind, value, raw) per object, at ' ; ' or where a new box begins."""
    chunks, current = [], []
    for m in _TOKEN_RE.finditer(text):
        raw = m.group()
        if m.group(1) is not None:
            item = ("loc", int(m.group(1)), raw)
        elif m.group(2) is not None:
            item = ("seg", int(m.group(2)), raw)
        elif raw == ";":
            chunks.append(current)
            current = []
            continue
        elif len(raw) > 1 and raw[0] == "<":
            warnings.append(f"ignored unknown token {raw!r}")
            continue
        else:
            item = ("text", raw, raw)
        # A box that follows a label or codes starts a new object even when the model left out the ' ; '.
        if item[0] == "loc" and any(kind != "loc" and (kind != "text" or value.strip()) for kind, value, _ in current):
            chunks.append(current)
            current = []
        current.append(item)
    chunks.append(current)
    return [c for c in chunks if any(kind != "text" or value.strip() for kind, value, _ in c)]


def _parse(text: str, width: int, height: int, with_codes: bool) -> tuple[list[dict], list[str]]:
    """Checks each object against `<loc>x4 [<seg>x16] label`; a malformed one is skipped with a warning."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    objects, warnings = [], []
    for chunk in _chunks(text, warnings):
        shown = "".join(raw for _, _, raw in chunk).strip()
        shown = shown if len(shown) <= 60 else shown[:57] + "..."  # 16 seg tokens alone are 128 characters
        items = [it for it in chunk if it[0] != "text" or it[1].strip()]  # whitespace between tokens is harmless
        n_loc = next((i for i, it in enumerate(items) if it[0] != "loc"), len(items))
        locs = [value for _, value, _ in items[:n_loc]]
        n_seg = next((i for i, it in enumerate(items[n_loc:]) if it[0] != "seg"), len(items) - n_loc)
        segs = [value for _, value, _ in items[n_loc:n_loc + n_seg]]
        rest = items[n_loc + n_seg:]
        stray = [raw for kind, _, raw in rest if kind != "text"]
        problem = None
        if len(locs) != 4:
            problem = f"expected 4 location tokens, found {len(locs)}"
        elif max(locs) > LOC_MAX:
            problem = f"location token <loc{max(locs):04d}> is outside 0..{LOC_MAX}"
        elif stray:
            problem = f"unexpected {stray[0]} after the label"
        elif with_codes and len(segs) != SEG_CODES:
            problem = f"expected {SEG_CODES} segmentation tokens, found {len(segs)}"
        elif with_codes and max(segs) > SEG_MAX:
            problem = f"segmentation token <seg{max(segs):03d}> is outside 0..{SEG_MAX}"
        elif locs[2] < locs[0] or locs[3] < locs[1]:
            problem = "the box's maximum is below its minimum"  # big_vision's evaluator counts these as invalid
        if problem:
            warnings.append(f"skipped {shown!r}: {problem}")
            continue
        label = " ".join("".join(value for _, value, _ in rest).split())
        if not label:
            warnings.append(f"{shown!r} has no label")
        y0, x0, y1, x1 = locs
        box = [round(v / LOC_MAX * size, 1) for v, size in ((x0, width), (y0, height), (x1, width), (y1, height))]
        objects.append({"label": label, "box": box, "codes": segs} if with_codes else {"label": label, "box": box})
    return objects, warnings


def parse_detections(text: str, width: int, height: int) -> tuple[list[dict], list[str]]:
    """Objects {"label", "box": [x0, y0, x1, y1] in pixels} of a `detect` answer, and warnings for skipped parts."""
    return _parse(text, width, height, with_codes=False)


def parse_segments(text: str, width: int, height: int) -> tuple[list[dict], list[str]]:
    """Objects {"label", "box", "codes": 16 ints} of a `segment` answer, and warnings for skipped parts."""
    return _parse(text, width, height, with_codes=True)


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


def _draw_label(draw: ImageDraw.ImageDraw, font, label: str, colour, x0: float, y0: float, size: tuple[int, int]):
    """Draws label on a filled background above (x0, y0), or just below it at the top edge, inside the image."""
    try:
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    except UnicodeEncodeError:  # pillow without FreeType has a Latin-1 bitmap font only
        label = label.encode("latin-1", "replace").decode("latin-1")
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    pad = 2
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(x0, 0), max(size[0] - w, 0))
    y = min(max(y0 - h if y0 - h >= 0 else y0, 0), max(size[1] - h, 0))
    draw.rectangle([x, y, x + w - 1, y + h - 1], fill=colour)
    dark = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] < 140
    draw.text((x + pad - left, y + pad - top), label, fill=(255, 255, 255) if dark else (0, 0, 0), font=font)


def annotate(image: Image.Image, detections: list[dict], masks=None) -> Image.Image:
    """An RGB copy of image with each box, its label and (masks: one (height, width) mask or None per object,
    e.g. from mask_to_image) a translucent overlay in the object's colour; the input image is never modified."""
    out = image.convert("RGB")  # always a new image
    width, height = out.size
    if masks is not None:
        if len(masks) != len(detections):
            raise ValueError(f"got {len(masks)} masks for {len(detections)} detections")
        pixels = np.asarray(out, dtype=np.float32)  # (H, W, 3)
        for i, mask in enumerate(masks):
            if mask is None:
                continue
            mask = torch.as_tensor(mask, dtype=torch.float32).detach().cpu().numpy()
            if mask.shape != (height, width):
                raise ValueError(f"mask {i} has shape {mask.shape}, expected {(height, width)}; see mask_to_image")
            alpha = MASK_ALPHA * np.clip(mask, 0, 1)[..., None]  # (H, W, 1)
            pixels = pixels * (1 - alpha) + np.array(PALETTE[i % len(PALETTE)], np.float32) * alpha
        out = Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    line = max(1, round(min(width, height) / 200))
    for i, det in enumerate(detections):
        colour = PALETTE[i % len(PALETTE)]
        x0, y0, x1, y1 = det["box"]
        x0, x1 = sorted((min(max(x0, 0), width - 1), min(max(x1, 0), width - 1)))  # pixels are 0..width-1
        y0, y1 = sorted((min(max(y0, 0), height - 1), min(max(y1, 0), height - 1)))
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
        if det.get("label"):
            _draw_label(draw, font, det["label"], colour, x0, y0, (width, height))
    return out


def describe(record: dict, image: Image.Image, prompt: str, picture: str | None, vae: MaskDecoder | None) -> dict:
    """The answer's record with its detections or segments parsed (a `detect` or `segment` prompt), and the
    annotated picture written to the path `picture` when given (masks decoded with vae when given)."""
    task = prompt.strip().split(" ", 1)[0]
    if task not in ("detect", "segment"):
        return record
    objects, warnings = (parse_detections if task == "detect" else parse_segments)(record["text"], *image.size)
    for warning in warnings:
        log(f"warning: {warning}")
    record = {**record, "detections" if task == "detect" else "segments": objects}
    if picture is not None:
        masks = None
        if task == "segment" and vae is not None and objects:
            masks64 = decode_masks(vae, [o["codes"] for o in objects])
            masks = [mask_to_image(m, o["box"], *image.size) for m, o in zip(masks64, objects)]
        annotate(image, objects, masks).save(picture)
    return record
