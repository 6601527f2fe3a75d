"""Prompt building, tokenisation and image preprocessing, exactly as transformers' PaliGemmaProcessor (PIL backend).

docs/NUMERICS.md §4: the prompt becomes `<image>` * n_image_tokens + `<bos>` + prompt + `\\n`, tokenised without added
special tokens; the image is converted to RGB, resized to a square with bicubic resampling (aspect ratio not
kept), scaled to [0, 1] and normalised with mean = std = 0.5 to [-1, 1]; transparent pixels become white.
"""

import contextlib
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from paligemma.checkpoint import LoadError, load_tokenizer, read_json, tokenizer_vocab
from paligemma.console import UserError, is_number, kind_of, require_file

IMAGE_TOKEN = "<image>"
# Location and segmentation codewords: already in the vocabulary, added so that each one is matched whole.
EXTRA_TOKENS = [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


DEFAULT_MAX_PIXELS = 100_000_000  # 10000 x 10000; a 4000 x 3000 photo is 12 million
_PILLOW_LIMIT = threading.Lock()


@contextlib.contextmanager
def without_pillow_limit():
    """Pillow's own pixel limit lifted for one open (which reads only the header): load_image applies its own,
    with a message that names the flag. Restored afterwards, so that other users of pillow keep theirs."""
    with _PILLOW_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file; UserError naming the file for anything that is not a usable image."""
    path = Path(path)
    require_file(path, "image file")
    return decode_image(path, path, max_pixels)


def decode_image(source: Path | BinaryIO, path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image from a file or bytes (a server's upload), named path in every UserError; its
    size is checked from the header, before any pixel is decoded."""
    try:
        with without_pillow_limit():
            image = Image.open(source)
    except Image.UnidentifiedImageError as e:  # pillow's own words name a file, or an object in memory
        raise UserError(f"{path}: not an image pillow can read" + (f" ({e})" if isinstance(source, Path) else "")) \
            from None
    except OSError as e:  # permission denied, say
        raise UserError(f"{path}: image file cannot be read ({e.strerror or e})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise UserError(f"{path}: image is {width}x{height} = {width * height / 1e6:.0f} megapixels, above the limit "
                         f"of {max_pixels / 1e6:.0f} (a decompression bomb?); raise it with --max_image_pixels")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: image is truncated or corrupt ({e})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparency is composited onto white first, as transformers does."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    image = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")


def max_prompt_length(prompt: str, image_seq_length: int) -> int:
    """An upper bound on the tokens of a prompt with its image, known without the tokenizer: no token covers less
    than a byte of the text (byte fallback spells a character as its bytes), plus <bos>, the closing "\n" and a
    leading "▁" that some tokenizers add."""
    return image_seq_length + len(prompt.replace(IMAGE_TOKEN, "").encode("utf-8")) + 3


def read_image_settings(folder: str | Path) -> dict:
    """The image mean, std, rescale factor and resampling a checkpoint folder stores (transformers 4 or 5 file),
    checked; LoadError names the file."""
    settings, path = {}, None
    for name in PROCESSOR_FILES:
        if kind_of(Path(folder) / name) != "nothing":  # read_json names anything that is not a file
            path = Path(folder) / name
            data = read_json(path, name)
            settings = data.get("image_processor", data)
            break
    if not isinstance(settings, dict):
        raise LoadError(f"{path}: image_processor is not a JSON object")
    kwargs = {k: settings[k] for k in ("image_mean", "image_std", "rescale_factor", "resample")
              if settings.get(k) is not None}
    for key in ("image_mean", "image_std"):
        value = kwargs.get(key, [0.5] * 3)
        if not (isinstance(value, list) and len(value) == 3 and all(is_number(v) and v for v in value)):
            raise LoadError(f"{path}: {key} must be 3 non-zero numbers, not {value!r}")
    if not is_number(kwargs.get("rescale_factor", 1)) or kwargs.get("resample", 3) not in range(6):
        raise LoadError(f"{path}: rescale_factor or resample is not valid")
    return kwargs


def check_tokenizer(folder: Path, config):
    """LoadError, before any weight loads, unless the folder's tokenizer, once PaliGemmaProcessor has added what it
    lacks, gives `<image>` the id that the model (a PaliGemmaConfig) fills with image features, and has no more ids
    than the embedding has rows. Its ids come from its files (checkpoint.tokenizer_vocab), so that building it still
    overlaps the weights' loading; a folder with tokenizer.model alone has it built now, and returned.

    A plain Gemma tokenizer passes where it lines up with the model: the processor adds the `<loc>` and `<seg>`
    tokens in order, then `<image>`, after its last id, which is how PaliGemma's own tokenizer extends Gemma's."""
    vocab, tokenizer = tokenizer_vocab(folder), None
    if vocab is None:
        tokenizer = load_tokenizer(folder)
        vocab = tokenizer.get_vocab()
    size, rows = max(vocab.values()) + 1, config.text_config.vocab_size
    missing = [token for token in [*EXTRA_TOKENS, IMAGE_TOKEN] if token not in vocab]
    image_id = vocab.get(IMAGE_TOKEN, size + len(missing) - 1)
    added = f" ({len(missing)} of them added for PaliGemma's <image>, <loc> and <seg>)" if missing else ""
    if size + len(missing) > rows:
        raise LoadError(f"{folder}: the tokenizer has {size + len(missing)} ids{added}, more than the {rows} rows of "
                        "the model's embedding (text_config.vocab_size): it is not this checkpoint's tokenizer")
    if image_id != config.image_token_index:
        has = f"lacks PaliGemma's {IMAGE_TOKEN} token, and would give it" if IMAGE_TOKEN in missing else "gives"
        raise LoadError(f"{folder}: the tokenizer {has} {IMAGE_TOKEN} id {image_id}, but config.json's "
                        f"image_token_index is {config.image_token_index}: it is not this checkpoint's tokenizer")
    return tokenizer


class PaliGemmaProcessor:
    """Turns prompts and PIL images into left-padded `input_ids`, masks and `pixel_values`."""

    def __init__(self, tokenizer, image_size: int, image_seq_length: int, image_mean=(0.5, 0.5, 0.5),
                 image_std=(0.5, 0.5, 0.5), rescale_factor: float = 1 / 255, resample: int = Image.BICUBIC):
        self.tokenizer = tokenizer
        self.image_size, self.image_seq_length = image_size, image_seq_length
        self.image_mean = np.array(image_mean, dtype=np.float32)
        self.image_std = np.array(image_std, dtype=np.float32)
        self.rescale_factor, self.resample = rescale_factor, resample
        tokenizer.add_tokens(EXTRA_TOKENS)  # first: a bare Gemma tokenizer then gives them PaliGemma's ids 256000..
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})  # .. and <image> 257152
        tokenizer.add_bos_token = False  # the prompt spells out its one <bos>
        tokenizer.add_eos_token = False
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @classmethod
    def from_folder(cls, folder: str | Path, tokenizer, image_size: int, image_seq_length: int):
        """The processor a checkpoint folder describes; the model fixes the image size and its token count."""
        return cls(tokenizer, image_size, image_seq_length, **read_image_settings(folder))

    def build_prompt(self, prompt: str) -> str:
        """`<image>`s, then `<bos>`, the prompt and the `\\n` that ends the prefix (docs/NUMERICS.md §4)."""
        if IMAGE_TOKEN in prompt:  # the user placed the image token: <bos> goes after the last one
            end = prompt.rfind(IMAGE_TOKEN) + len(IMAGE_TOKEN)
            prompt = prompt[:end] + self.tokenizer.bos_token + prompt[end:] + "\n"
        else:
            prompt = IMAGE_TOKEN + self.tokenizer.bos_token + prompt + "\n"
        return prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.image_seq_length)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """(3, S, S) float32: RGB, bicubic resize to a square, rescale, normalise."""
        S = self.image_size
        pixels = np.asarray(to_rgb(image).resize((S, S), resample=self.resample))  # (S, S, 3) uint8
        x = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - self.image_mean) / self.image_std
        return torch.from_numpy(x).permute(2, 0, 1)

    def __call__(self, prompts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """A batch: `input_ids`, `attention_mask`, `token_type_ids` (B, L), left-padded; `pixel_values` (B, 3, S, S)."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        encoded = self.tokenizer([self.build_prompt(p) for p in prompts], padding="longest", padding_side="left",
                                 return_tensors="pt")
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": torch.zeros_like(input_ids),  # a prompt is all prefix; a suffix would be 1
            # stacked by NumPy: no torch work off the engine's thread in the server (engine.Engine.serve says why)
            "pixel_values": torch.from_numpy(np.stack([self.preprocess_image(image).numpy() for image in images])),
        }
