"""Parsing detect/segment answers, the vae-oid.npz mask decoder, and the annotated picture."""

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from console import UserError
from detection import annotate, parse_detections, parse_segments
from masks import decode_masks, load_vae, mask_to_image


def loc(*values: int) -> str:
    return "".join(f"<loc{v:04d}>" for v in values)


def seg(*values: int) -> str:
    return "".join(f"<seg{v:03d}>" for v in values)


# ---------------------------------------------------------------------------------------------------- detections


def test_loc_grid_maps_onto_a_non_square_image():
    # <loc1023> is the far edge (big_vision reads tokens as t / 1023); x scales by the width, y by the height.
    text = loc(0, 0, 1023, 1023) + " cat ; " + loc(512, 256, 1023, 767) + " dog"
    objects, warnings = parse_detections(text, 640, 480)
    assert warnings == []
    assert objects == [
        {"label": "cat", "box": [0.0, 0.0, 640.0, 480.0]},
        {"label": "dog", "box": [160.2, 240.2, 479.8, 480.0]},  # 256/1023*640, 512/1023*480, 767/1023*640
    ]


def test_several_objects_keep_their_order_and_multi_word_labels():
    text = loc(10, 20, 30, 40) + " traffic light ; " + loc(50, 60, 70, 80) + " dog ; " + loc(90, 100, 110, 120) + " cat"
    objects, warnings = parse_detections(text, 1023, 1023)
    assert warnings == []
    assert [o["label"] for o in objects] == ["traffic light", "dog", "cat"]
    assert objects[1]["box"] == [60.0, 50.0, 80.0, 70.0]  # [x0, y0, x1, y1] from y_min, x_min, y_max, x_max


def test_objects_split_even_without_the_separator():
    objects, warnings = parse_detections(loc(1, 2, 3, 4) + " cat " + loc(5, 6, 7, 8) + " dog", 1023, 1023)
    assert [o["label"] for o in objects] == ["cat", "dog"] and warnings == []


def test_missing_label_keeps_the_box_with_an_empty_label_and_a_warning():
    objects, warnings = parse_detections(loc(100, 100, 200, 200) + " ; " + loc(1, 2, 3, 4) + " cat", 1023, 1023)
    assert objects[0] == {"label": "", "box": [100.0, 100.0, 200.0, 200.0]}
    assert objects[1]["label"] == "cat"
    assert len(warnings) == 1 and "no label" in warnings[0]


def test_three_location_tokens_are_skipped_with_a_warning():
    objects, warnings = parse_detections(loc(1, 2, 3) + " cat ; " + loc(5, 6, 7, 8) + " dog", 1023, 1023)
    assert [o["label"] for o in objects] == ["dog"]
    assert len(warnings) == 1 and "expected 4 location tokens, found 3" in warnings[0]


def test_garbage_between_location_tokens_is_skipped_with_a_warning():
    objects, warnings = parse_detections(loc(10) + "xx" + loc(20, 30, 40) + " cat ; " + loc(5, 6, 7, 8) + " dog", 9, 9)
    assert [o["label"] for o in objects] == ["dog"]
    assert warnings and all("skipped" in w for w in warnings)


def test_out_of_range_location_token_is_skipped_with_a_warning():
    objects, warnings = parse_detections("<loc9999>" + loc(0, 1, 2) + " cat ; " + loc(5, 6, 7, 8) + " dog", 9, 9)
    assert [o["label"] for o in objects] == ["dog"]
    assert len(warnings) == 1 and "<loc9999>" in warnings[0] and "outside" in warnings[0]


def test_inverted_box_is_skipped_with_a_warning():
    objects, warnings = parse_detections(loc(500, 100, 200, 200) + " cat", 640, 480)
    assert objects == [] and len(warnings) == 1 and "below its minimum" in warnings[0]


def test_unknown_tokens_are_dropped_with_a_warning_and_the_object_kept():
    objects, warnings = parse_detections(loc(1, 2, 3, 4) + " cat<eos>", 1023, 1023)
    assert objects == [{"label": "cat", "box": [2.0, 1.0, 4.0, 3.0]}]
    assert warnings == ["ignored unknown token '<eos>'"]


@pytest.mark.parametrize("text", ["no objects here", "<loc0001", "; ;", "<loc12> x", "<seg001> cat", "\n"])
def test_malformed_answers_never_raise(text):
    objects, warnings = parse_detections(text, 10, 10)
    assert objects == []
    assert all(isinstance(w, str) for w in warnings)


def test_empty_answer_gives_nothing_and_no_warning():
    assert parse_detections("", 10, 10) == ([], [])


# ---------------------------------------------------------------------------------------------------- segments


def test_segments_give_box_label_and_16_codes():
    # The form Google's demo shows: a space after the box, the codes, then the label; objects joined by ' ; '.
    text = loc(0, 0, 930, 1012) + " " + seg(*range(16)) + " wall ; " + loc(722, 47, 895, 378) + seg(*range(100, 116))
    objects, warnings = parse_segments(text + " car", 1023, 2046)
    assert warnings == []
    assert objects == [
        {"label": "wall", "box": [0.0, 0.0, 1012.0, 1860.0], "codes": list(range(16))},
        {"label": "car", "box": [47.0, 1444.0, 378.0, 1790.0], "codes": list(range(100, 116))},
    ]


def test_segment_without_label_keeps_its_codes():
    objects, warnings = parse_segments(loc(1, 2, 3, 4) + seg(*[7] * 16), 1023, 1023)
    assert objects == [{"label": "", "box": [2.0, 1.0, 4.0, 3.0], "codes": [7] * 16}] and len(warnings) == 1


def test_segment_with_15_codes_or_a_code_outside_the_codebook_is_skipped():
    text = loc(1, 2, 3, 4) + seg(*[1] * 15) + " a ; " + loc(1, 2, 3, 4) + "<seg200>" + seg(*[1] * 15) + " b"
    objects, warnings = parse_segments(text + " ; " + loc(1, 2, 3, 4) + seg(*[5] * 16) + " c", 1023, 1023)
    assert [o["label"] for o in objects] == ["c"]
    assert "found 15" in warnings[0] and "<seg200>" in warnings[1] and len(warnings) == 2


def test_detections_read_the_boxes_of_a_segment_answer():
    objects, warnings = parse_detections(loc(1, 2, 3, 4) + " " + seg(*range(16)) + " cat", 1023, 1023)
    assert objects == [{"label": "cat", "box": [2.0, 1.0, 4.0, 3.0]}] and warnings == []


# ---------------------------------------------------------------------------------------------------- mask decoder


def big_vision_vae_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays with the names and shapes of big_vision's vae-oid.npz (torch layout), written out by hand."""
    shapes = {"_vq_vae._embedding": (128, 512), "decoder.0.weight": (128, 512, 1, 1), "decoder.0.bias": (128,)}
    for block in (2, 3):
        for layer, k in ((0, 3), (2, 3), (4, 1)):
            shapes[f"decoder.{block}.net.{layer}.weight"] = (128, 128, k, k)
            shapes[f"decoder.{block}.net.{layer}.bias"] = (128,)
    for layer, (c_in, c_out) in zip((4, 6, 8, 10), ((128, 128), (128, 64), (64, 32), (32, 16))):
        shapes[f"decoder.{layer}.weight"] = (c_in, c_out, 4, 4)  # ConvTranspose2d: (in, out, kh, kw)
        shapes[f"decoder.{layer}.bias"] = (c_out,)
    shapes["decoder.12.weight"], shapes["decoder.12.bias"] = (1, 16, 1, 1), (1,)
    shapes["encoder.0.weight"] = (16, 1, 4, 4)  # the file also holds the encoder, which decoding does not need
    rng = np.random.default_rng(seed)
    std = {name: 1 / np.sqrt(np.prod(s[1:])) if len(s) == 4 else 0.1 for name, s in shapes.items()}  # O(1) outputs
    std["_vq_vae._embedding"] = 1.0
    return {name: (rng.standard_normal(s) * std[name]).astype(np.float32) for name, s in shapes.items()}


def flax_reference(arrays: dict[str, np.ndarray], codes: np.ndarray) -> np.ndarray:
    """big_vision's Flax decoder restated in float64 numpy: NHWC, kernels moved by transpose (2, 3, 1, 0), each
    ConvTranspose as lax.conv_transpose(strides 2, padding (2, 2), transpose_kernel=True)."""
    a = {k: v.astype(np.float64) for k, v in arrays.items()}

    def correlate(x, kernel, bias, pad):  # x (N, H, W, C), kernel (kh, kw, C, O)
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        windows = sliding_window_view(x, kernel.shape[:2], axis=(1, 2))  # (N, H', W', C, kh, kw)
        return np.einsum("nhwcij,ijco->nhwo", windows, kernel, optimize=True) + bias

    def conv(x, name, pad):
        return correlate(x, a[name + ".weight"].transpose(2, 3, 1, 0), a[name + ".bias"], pad)

    def conv_transpose(x, name):
        kernel = a[name + ".weight"].transpose(2, 3, 1, 0)  # (kh, kw, out, in), as Flax holds it
        kernel = kernel[::-1, ::-1].transpose(0, 1, 3, 2)  # transpose_kernel: flip space, swap in and out
        n, h, w, c = x.shape
        dilated = np.zeros((n, 2 * h - 1, 2 * w - 1, c))
        dilated[:, ::2, ::2] = x  # the stride becomes a dilation of the input
        return correlate(dilated, kernel, a[name + ".bias"], 2)

    relu = lambda x: np.maximum(x, 0)  # noqa: E731
    x = a["_vq_vae._embedding"][codes.reshape(-1)].reshape(len(codes), 4, 4, -1)  # code i at row i // 4
    x = relu(conv(x, "decoder.0", 0))
    for block in ("decoder.2.net", "decoder.3.net"):
        y = relu(conv(x, block + ".0", 1))
        y = relu(conv(y, block + ".2", 1))
        x = x + conv(y, block + ".4", 0)
    for name in ("decoder.4", "decoder.6", "decoder.8", "decoder.10"):
        x = relu(conv_transpose(x, name))
    return conv(x, "decoder.12", 0)[..., 0]  # (N, 64, 64)


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
    np.savez(path, **big_vision_vae_arrays())
    return path


def test_random_vae_in_big_vision_layout_decodes_to_64x64_masks_in_unit_range(vae_path):
    codes = torch.tensor([list(range(16)), [127] * 16, [0] * 16])
    masks = decode_masks(load_vae(vae_path), codes)
    assert masks.shape == (3, 64, 64) and masks.dtype == torch.float32
    assert masks.min() >= 0 and masks.max() <= 1
    assert decode_masks(load_vae(vae_path), torch.zeros(0, 16, dtype=torch.long)).shape == (0, 64, 64)


def test_decoder_equals_big_vision_flax_decoder_restated_in_numpy(vae_path):
    codes = np.random.default_rng(1).integers(0, 128, (2, 16))
    decoder = load_vae(vae_path)
    with torch.no_grad():
        raw = decoder(torch.from_numpy(codes)).double().numpy()
    expected = flax_reference(big_vision_vae_arrays(), codes)
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # decode_masks maps the raw [-1, 1] output to [0, 1] as Google's demo does.
    np.testing.assert_allclose(decode_masks(decoder, codes).numpy(), np.clip(expected * 0.5 + 0.5, 0, 1), atol=1e-4)


def test_codes_outside_the_codebook_are_refused(vae_path):
    with pytest.raises(ValueError, match="0..127"):
        decode_masks(load_vae(vae_path), torch.full((1, 16), 128))
    with pytest.raises(ValueError, match="shape"):
        decode_masks(load_vae(vae_path), torch.zeros(1, 15, dtype=torch.long))


def test_wrongly_shaped_array_is_named_in_the_error(tmp_path):
    arrays = big_vision_vae_arrays()
    arrays["decoder.6.weight"] = arrays["decoder.6.weight"][:, :32]
    np.savez(tmp_path / "bad.npz", **arrays)
    expected = r"'decoder\.6\.weight' has shape \(128, 32, 4, 4\), expected \(128, 64, 4, 4\)"
    with pytest.raises(UserError, match=expected):
        load_vae(tmp_path / "bad.npz")


def test_missing_array_is_named_in_the_error(tmp_path):
    arrays = big_vision_vae_arrays()
    del arrays["_vq_vae._embedding"]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=r"missing array '_vq_vae\._embedding'"):
        load_vae(tmp_path / "bad.npz")


class Touch:
    """Unpickling this creates a file: proof that nothing was unpickled when the file stays absent."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_npz_holding_a_pickled_object_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    arrays = big_vision_vae_arrays()
    np.savez(tmp_path / "evil.npz", **arrays, extra=np.array([Touch(marker)], dtype=object))
    with pytest.raises(UserError, match="'extra' cannot be read without unpickling"):
        load_vae(tmp_path / "evil.npz")
    assert not marker.exists()


def test_single_array_or_pickle_file_is_refused(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros(3, np.float32))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    for name in ("one.npy", "junk.npz"):
        with pytest.raises(UserError, match="npz archive"):
            load_vae(tmp_path / name)


# ---------------------------------------------------------------------------------------------------- pictures


def test_mask_is_resized_into_its_box_on_a_full_size_canvas():
    canvas = mask_to_image(torch.ones(64, 64), [10.0, 20.0, 30.0, 25.0], 50, 40)
    assert canvas.shape == (40, 50)
    assert canvas[20:25, 10:30].eq(1).all() and canvas.sum() == 20 * 5
    assert mask_to_image(torch.ones(64, 64), [5, 5, 5, 9], 50, 40).sum() == 0  # an empty box gives an empty mask


def test_annotated_png_keeps_the_size_changes_the_box_and_leaves_far_pixels_alone(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8))
    detections = [{"label": "cat", "box": [40.0, 50.0, 90.0, 100.0]}, {"label": "", "box": [0.0, 0.0, 20.0, 15.0]}]
    masks = [mask_to_image(torch.ones(64, 64), detections[0]["box"], 200, 120), None]
    annotate(image, detections, masks).save(tmp_path / "out.png")
    with Image.open(tmp_path / "out.png") as reopened:
        assert reopened.size == image.size and reopened.mode == "RGB"
        out, before = np.asarray(reopened).astype(int), np.asarray(image).astype(int)
    assert (out[60:95, 50:85] != before[60:95, 50:85]).any(axis=-1).all()  # the mask covers the box's inside
    assert (out[50:101, 40] != before[50:101, 40]).any()  # the box's left edge
    assert (out[:50, 120:] == before[:50, 120:]).all() and (out[105:, :] == before[105:, :]).all()


def test_annotate_never_modifies_the_input_image():
    image = Image.new("RGBA", (64, 48), (10, 20, 30, 255))
    pixels = image.tobytes()
    out = annotate(image, [{"label": "a long label near the top edge", "box": [2.0, 0.0, 60.0, 40.0]}],
                   [torch.ones(48, 64)])
    assert out is not image and out.mode == "RGB" and out.size == (64, 48)
    assert image.mode == "RGBA" and image.tobytes() == pixels
    assert np.asarray(out)[0:5].std() > 0  # the label sits inside the image when the box touches the top


def test_mask_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="mask_to_image"):
        annotate(Image.new("RGB", (64, 48)), [{"label": "x", "box": [0, 0, 10, 10]}], [torch.ones(64, 64)])
