"""The processor against transformers' PaliGemmaProcessor (PIL backend): token ids, masks and pixel values."""

import pytest
import torch
from conftest import random_image

from paligemma.checkpoint import load_tokenizer
from paligemma.processing_paligemma import PaliGemmaProcessor


@pytest.fixture(scope="module")
def processors(checkpoint, reference):
    _, theirs = reference("v1_mqa")
    ours = PaliGemmaProcessor.from_folder(checkpoint("v1_mqa"), load_tokenizer(checkpoint("v1_mqa")), 28, 4)
    return ours, theirs


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "P+transparency", "LA", "CMYK"])
@pytest.mark.parametrize("size", [(51, 37), (13, 99), (1, 1), (640, 3)])
def test_pixel_values_equal_transformers_for_every_image_mode(mode, size, processors):
    ours, theirs = processors
    if mode == "LA":
        image = random_image(*size, mode="RGBA").convert("LA")
    else:
        image = random_image(*size, mode=mode.removesuffix("+transparency"))
    if mode == "P+transparency":
        image.info["transparency"] = 7
    expected = theirs(images=image, text="caption en", return_tensors="pt")["pixel_values"]
    assert torch.equal(ours(["caption en"], [image])["pixel_values"], expected)


@pytest.mark.parametrize("prompt", ["caption en", "", "answer en où est le chat ? 猫", "detect cat ; dog",
                                    "<image>caption en", "segment <loc0001><seg012> x", "  two  spaces\n"])
def test_input_ids_equal_transformers_for_any_prompt(prompt, processors, image):
    ours, theirs = processors
    expected = theirs(images=image, text=prompt, return_tensors="pt")
    got = ours([prompt], [image])
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(got[key], expected[key]), key


def test_location_and_segment_tokens_are_single_tokens(processors, image):
    ours, _ = processors
    ids = ours(["<loc0512><seg127>"], [image])["input_ids"][0].tolist()
    tokens = ours.tokenizer.convert_ids_to_tokens(ids)
    assert "<loc0512>" in tokens and "<seg127>" in tokens


def test_batch_is_left_padded_like_transformers(processors):
    ours, theirs = processors
    prompts = ["caption en", "answer en what colour is the cat on the left?"]
    images = [random_image(30, 40, seed=1), random_image(90, 20, seed=2)]
    expected = theirs(images=images, text=prompts, padding="longest", return_tensors="pt")
    got = ours(prompts, images)
    for key in ("input_ids", "attention_mask", "token_type_ids", "pixel_values"):
        assert torch.equal(got[key], expected[key]), key
    assert got["attention_mask"][0, 0] == 0 and got["input_ids"][0, 0] == 0  # pads on the left, id 0
