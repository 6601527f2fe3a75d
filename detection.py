"""PaliGemma's detection and segmentation answers: boxes, labels, scores, masks, and a picture of them.

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

Scores. Each object's score is the geometric mean of the probabilities of the <loc> and <seg> tokens that spelled
it, exp(mean log-probability), from the record's token_ids and logprobs (README.md says why this one). The objects
are matched to their tokens by order: the n-th <loc>/<seg> token of the text is the n-th such token id.

Masks: masks.py decodes the 16 codes of a segment, places the mask as big_vision's evaluator does, and encodes it.
"""

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from paligemma.console import log
from paligemma.masks import LOC_MAX, SEG_CODES, SEG_MAX, MaskDecoder, decode_masks, place_mask, rle_encode

MASK_ALPHA = 0.5  # opacity of a mask overlay where the mask is 1
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 200, 200),
           (240, 50, 230), (170, 110, 40), (128, 128, 0), (0, 0, 128)]

# One match per piece of an answer: a location token, a segmentation token, any other <tag>, a separator, or text.
_TOKEN_RE = re.compile(r"<loc(\d{4})>|<seg(\d{3})>|<[^<>]*>|;|[^<;]+|<")


def _pieces(text: str) -> list[tuple]:
    """The answer as (kind, value, raw) pieces: kind "loc" or "seg" (value: the token's number), "tag" (any other
    <tag>), ";", or "text" (value: the text)."""
    pieces = []
    for m in _TOKEN_RE.finditer(text):
        raw = m.group()
        if m.group(1) is not None:
            pieces.append(("loc", int(m.group(1)), raw))
        elif m.group(2) is not None:
            pieces.append(("seg", int(m.group(2)), raw))
        elif raw == ";":
            pieces.append((";", None, raw))
        elif len(raw) > 1 and raw[0] == "<":
            pieces.append(("tag", None, raw))
        else:
            pieces.append(("text", raw, raw))
    return pieces


def _chunks(text: str, warnings: list[str]) -> list[list[tuple]]:
    """Splits an answer into one list of (kind, value, raw, place) per object, at ' ; ' or where a new box begins;
    place counts the answer's <loc> and <seg> tokens from 0 (None for text)."""
    chunks, current, place = [], [], 0
    for kind, value, raw in _pieces(text):
        if kind == ";":
            chunks.append(current)
            current = []
            continue
        if kind == "tag":
            warnings.append(f"ignored unknown token {raw!r}")
            continue
        # A box that follows a label or codes starts a new object even when the model left out the ' ; '.
        if kind == "loc" and any(it[0] != "loc" and (it[0] != "text" or it[1].strip()) for it in current):
            chunks.append(current)
            current = []
        current.append((kind, value, raw, None if kind == "text" else place))
        place += kind != "text"
    chunks.append(current)
    return [c for c in chunks if any(it[0] != "text" or it[1].strip() for it in c)]


@dataclass
class Found:
    """One well-formed object of an answer: its label, its box as the four tokens spelled it, its mask codes, and
    which of the answer's <loc> and <seg> tokens spelled it."""

    label: str
    locs: list[int]  # y_min, x_min, y_max, x_max on the 0..1023 grid
    codes: list[int]  # the 16 mask codes of a segment, none for a detection
    places: list[int]  # of its <loc> and <seg> tokens, counted from the answer's first

    def box(self, width: int, height: int) -> list[float]:
        """[x0, y0, x1, y1] in pixels of a width x height image, rounded to 0.1."""
        y0, x0, y1, x1 = self.locs
        return [round(v / LOC_MAX * size, 1) for v, size in ((x0, width), (y0, height), (x1, width), (y1, height))]


def _parse(text: str, with_codes: bool) -> tuple[list[Found], list[str]]:
    """Checks each object against `<loc>x4 [<seg>x16] label`; a malformed one is skipped with a warning."""
    found, warnings = [], []
    for chunk in _chunks(text, warnings):
        shown = "".join(it[2] for it in chunk).strip()
        shown = shown if len(shown) <= 60 else shown[:57] + "..."  # 16 seg tokens alone are 128 characters
        items = [it for it in chunk if it[0] != "text" or it[1].strip()]  # whitespace between tokens is harmless
        n_loc = next((i for i, it in enumerate(items) if it[0] != "loc"), len(items))
        locs = [it[1] for it in items[:n_loc]]
        n_seg = next((i for i, it in enumerate(items[n_loc:]) if it[0] != "seg"), len(items) - n_loc)
        segs = [it[1] for it in items[n_loc:n_loc + n_seg]]
        rest = items[n_loc + n_seg:]
        stray = [it[2] for it in rest if it[0] != "text"]
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
        label = " ".join("".join(it[1] for it in rest).split())
        if not label:
            warnings.append(f"{shown!r} has no label")
        codes = segs if with_codes else []
        found.append(Found(label, locs, codes, [it[3] for it in items[:n_loc + len(codes)]]))
    return found, warnings


def _check_size(width: int, height: int):
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")


def parse_detections(text: str, width: int, height: int) -> tuple[list[dict], list[str]]:
    """Objects {"label", "box": [x0, y0, x1, y1] in pixels} of a `detect` answer, and warnings for skipped parts."""
    _check_size(width, height)
    found, warnings = _parse(text, with_codes=False)
    return [{"label": f.label, "box": f.box(width, height)} for f in found], warnings


def parse_segments(text: str, width: int, height: int) -> tuple[list[dict], list[str]]:
    """Objects {"label", "box", "codes": 16 ints} of a `segment` answer, and warnings for skipped parts."""
    _check_size(width, height)
    found, warnings = _parse(text, with_codes=True)
    return [{"label": f.label, "box": f.box(width, height), "codes": f.codes} for f in found], warnings


def _scores(found: list[Found], record: dict, tokenizer, warnings: list[str]) -> list[float | None]:
    """Each object's score, the geometric mean of the probabilities of the <loc> and <seg> tokens that spelled it
    (exp of their mean log-probability), from the record's token_ids and logprobs; None for every object when they
    are missing or do not spell the <loc> and <seg> tokens of the text (then with a warning)."""
    ids, logprobs = record.get("token_ids"), record.get("logprobs")
    if tokenizer is None or ids is None or logprobs is None:
        return [None] * len(found)
    spelled = []  # ((kind, number), logprob) of each generated <loc> and <seg> token
    for token, logprob in zip(tokenizer.convert_ids_to_tokens(ids), logprobs):
        pieces = _pieces(token)
        if len(pieces) == 1 and pieces[0][0] in ("loc", "seg"):
            spelled.append((pieces[0][:2], logprob))
    in_text = [(kind, value) for kind, value, _ in _pieces(record["text"]) if kind in ("loc", "seg")]
    if [token for token, _ in spelled] != in_text:  # e.g. a <loc> spelled out of text pieces: no single token
        warnings.append("the answer's <loc> and <seg> tokens differ from its text, so no object has a score")
        return [None] * len(found)
    return [math.exp(sum(spelled[p][1] for p in f.places) / len(f.places)) for f in found]


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
    """An RGB copy of image with each box, its label and score (to 2 decimals) and (masks: one (height, width) mask
    or None per object, e.g. from masks.place_mask) a translucent overlay in the object's colour; the input image is
    never modified."""
    out = image.convert("RGB")  # always a new image
    width, height = out.size
    if masks is not None:
        if len(masks) != len(detections):
            raise ValueError(f"got {len(masks)} masks for {len(detections)} detections")
        pixels = np.asarray(out, dtype=np.float32)  # (H, W, 3)
        for i, mask in enumerate(masks):
            if mask is None:
                continue
            mask = np.asarray(mask, dtype=np.float32)
            if mask.shape != (height, width):
                raise ValueError(f"mask {i} has shape {mask.shape}, expected {(height, width)}; see place_mask")
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
        caption = det.get("label") or ""
        if det.get("score") is not None:
            caption = f"{caption} {det['score']:.2f}".strip()
        if caption:
            _draw_label(draw, font, caption, colour, x0, y0, (width, height))
    return out


def describe(record: dict, image: Image.Image, prompt: str, *, tokenizer=None, picture: str | None = None,
             vae: MaskDecoder | None = None, min_score: float = 0.0) -> dict:
    """The answer's record with its detections or segments parsed (a `detect` or `segment` prompt), each with a
    score (from token_ids and logprobs, read with tokenizer), those below min_score left out (and, when it is above
    0, those without a score); with vae, each segment's mask in the image's pixels (COCO run-length encoding) and its
    area; and the annotated picture written to the path `picture` when given."""
    task = prompt.strip().split(" ", 1)[0]
    if task not in ("detect", "segment"):
        return record
    width, height = image.size
    found, warnings = _parse(record["text"], with_codes=task == "segment")
    kept = [(f, score) for f, score in zip(found, _scores(found, record, tokenizer, warnings))
            if min_score == 0 or score is not None and score >= min_score]  # an unknown score cannot reach it
    for warning in warnings:
        log(f"warning: {warning}")
    objects = []
    for f, score in kept:
        objects.append({"label": f.label, "score": score, "box": f.box(width, height)})
        if f.codes:
            objects[-1]["codes"] = f.codes
    masks = None
    if task == "segment" and vae is not None:
        raws = decode_masks(vae, [f.codes for f, _ in kept]) if kept else []
        masks = [place_mask(raw, f.locs, width, height) for raw, (f, _) in zip(raws, kept)]
        for obj, mask in zip(objects, masks):
            obj.update(mask=rle_encode(mask), area=int(mask.sum()))
    if picture is not None:
        annotate(image, objects, masks).save(picture)
    return {**record, "detections" if task == "detect" else "segments": objects}
