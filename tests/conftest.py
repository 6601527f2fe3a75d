import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")  # before Ray is imported, as inference.py does
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
warnings.filterwarnings("ignore", message=".*PaliGemmaProcessor.*")

import tiny  # noqa: E402

ODD = dict(heads=3, kv_heads=1, hidden_size=54, intermediate_size=100, head_dim=14, vocab_size=1531,
           vision_overrides=dict(hidden_size=36, intermediate_size=76, num_attention_heads=4))
# Tiny checkpoints: each attention variant, each key layout, both decoders.
CHECKPOINTS = {
    "v1_mqa": dict(version=1, kv_heads=1, layout="published"),
    "v1_gqa": dict(version=1, kv_heads=2, layout="transformers5"),
    "v1_mha": dict(version=1, kv_heads=4, layout="model_prefix"),
    "v2_gqa": dict(version=2, kv_heads=2, layout="published"),
    # 448-style: 16 image tokens, more than the sliding window of 6, so the prefix must override the window.
    "v2_448style": dict(version=2, kv_heads=2, layout="transformers5", image_size=56),
    # 28b-style: the attention scale comes from query_pre_attn_scalar (here 24), not from head_dim (16).
    "v2_28bstyle": dict(version=2, kv_heads=1, layout="model_prefix", query_pre_attn_scalar=24),
    # Widths that are multiples of neither 8 nor 16, so that every kernel's row and column tails run.
    "v1_odd": dict(version=1, **ODD),
    "v2_odd": dict(version=2, query_pre_attn_scalar=14, **ODD),
}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> folder of that tiny checkpoint, built once per session; treat it as read-only."""
    built = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = tmp_path_factory.mktemp(name)
            tiny.build_checkpoint(built[name], **CHECKPOINTS[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def reference(checkpoint):
    """reference(name) -> (transformers model in float32 with eager attention, its processor)."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = tiny.load_reference(checkpoint(name))
        return loaded[name]

    return get


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "CMYK": 4, "P": 1}[mode]
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.frombytes(mode, (width, height), pixels.tobytes())
    if mode == "P":
        image.putpalette(np.random.RandomState(seed + 1).randint(0, 256, 768, dtype=np.uint8).tobytes())
    return image


@pytest.fixture
def folder(checkpoint, tmp_path):
    """A private copy of the tiny v1 checkpoint that a test may break."""
    return Path(shutil.copytree(checkpoint("v1_mqa"), tmp_path / "ckpt"))


@pytest.fixture
def photo(tmp_path):
    """A small photo on disk."""
    path = tmp_path / "photo.jpg"
    random_image(40, 30).save(path)
    return path


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the command line starts loading weights: the input was already known to be wrong."""
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded although the input was already known to be wrong")

    monkeypatch.setattr("paligemma.generate.load_hf_model", refuse)


@pytest.fixture
def image():
    return random_image(51, 37)
