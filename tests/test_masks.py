"""The vae-oid.npz mask decoder, and placing its masks into the image as big_vision's evaluator does."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from pycocotools import mask as coco_mask

from paligemma.console import UserError
from paligemma.masks import decode_masks, load_vae, pixel_box, place_mask, rle_decode, rle_encode

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


def vivid_vae_arrays() -> dict[str, np.ndarray]:
    """big_vision_vae_arrays with the last layer rescaled so that raw masks reach beyond -1 and 1 and are > 0 on about
    half their grid, as a trained decoder's are (the random network's own outputs all lie near zero)."""
    arrays = big_vision_vae_arrays()
    median = np.median(flax_reference(arrays, np.arange(16)[None]))
    arrays["decoder.12.weight"] = arrays["decoder.12.weight"] * 40
    arrays["decoder.12.bias"] = (arrays["decoder.12.bias"] - median) * 40
    return arrays


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
    np.savez(path, **big_vision_vae_arrays())
    return path


def test_random_vae_in_big_vision_layout_decodes_to_64x64_float32_masks(vae_path):
    codes = torch.tensor([list(range(16)), [127] * 16, [0] * 16])
    masks = decode_masks(load_vae(vae_path), codes)
    assert masks.shape == (3, 64, 64) and masks.dtype == torch.float32
    assert decode_masks(load_vae(vae_path), torch.zeros(0, 16, dtype=torch.long)).shape == (0, 64, 64)


def test_decoder_equals_big_vision_flax_decoder_restated_in_numpy(vae_path):
    codes = np.random.default_rng(1).integers(0, 128, (2, 16))
    expected = flax_reference(big_vision_vae_arrays(), codes)
    raw = decode_masks(load_vae(vae_path), codes).double().numpy()  # the raw output, never clipped
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


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


# ---------------------------------------------------------------------------------------------------- placement


def evaluator_placement(raw64: np.ndarray, tokens, width: int, height: int) -> np.ndarray:
    """big_vision's evaluator restated from its definition (segmentation.py, Evaluator.run): the box tokens over
    1023, times the side, truncated by int(); no mask when x2 <= x1 or y2 <= y1; the raw float32 mask resized to
    (x2 - x1, y2 - y1) with PIL's bilinear filter; pixels > 0.0 are the object."""
    y1, x1, y2, x2 = np.asarray(tokens) / 1023
    y1, x1, y2, x2 = map(int, (y1 * height, x1 * width, y2 * height, x2 * width))
    full = np.zeros((height, width), bool)
    if x2 <= x1 or y2 <= y1:
        return full
    mi = np.asarray(Image.fromarray(raw64.astype(np.float32)).resize([x2 - x1, y2 - y1], resample=Image.BILINEAR))
    full[y1:y2, x1:x2] = mi > 0.0
    return full


def placement_cases(n: int = 80):
    """(raw 64x64 mask reaching +-3, tokens, width, height): boxes from the whole image down to 0-2 pixels."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:64, 0:64] / 63
    sizes = [(37, 23), (640, 480), (1023, 1023), (5, 3), (1000, 7)]
    for i in range(n):
        blob = 3 - 8 * ((yy - rng.uniform(0.2, 0.8)) ** 2 + (xx - rng.uniform(0.2, 0.8)) ** 2)
        raw = (blob + rng.normal(0, 0.7, (64, 64))).astype(np.float32)
        y0, x0 = rng.integers(0, 1000, 2)
        span = rng.integers(0, 4, 2) if i % 2 else rng.integers(0, 1024, 2)  # half the boxes only a few tokens wide
        yield raw, [y0, x0, min(y0 + span[0], 1023), min(x0 + span[1], 1023)], *sizes[i % len(sizes)]


def test_masks_are_placed_exactly_as_big_vision_evaluator_places_them():
    widths, clipped_differs = set(), False
    for raw, tokens, width, height in placement_cases():
        expected = evaluator_placement(raw, tokens, width, height)
        assert np.array_equal(place_mask(raw, tokens, width, height), expected), (tokens, width, height)
        x0, _, x1, _ = pixel_box(tokens, width, height)
        widths.add(max(x1 - x0, 0))
        # Google's demo clips x * 0.5 + 0.5 to [0, 1] before resizing: the cases must tell the two apart.
        clipped = evaluator_placement(np.clip(raw * 0.5 + 0.5, 0, 1) - 0.5, tokens, width, height)
        clipped_differs |= not np.array_equal(clipped, expected)
    assert {0, 1, 2} <= widths and clipped_differs


def test_box_edges_are_truncated_not_rounded():
    # 100 / 1023 * 100 = 9.78: the evaluator's int() gives 9 columns where rounding would give 10.
    mask = place_mask(np.ones((64, 64)), [0, 0, 1023, 100], 100, 50)
    assert pixel_box([0, 0, 1023, 100], 100, 50) == (0, 0, 9, 50)
    assert mask[:, :9].all() and mask.sum() == 9 * 50


def test_a_box_that_truncates_to_nothing_has_no_mask():
    raw = np.ones((64, 64))
    assert not place_mask(raw, [100, 200, 100, 300], 640, 480).any()  # y_min == y_max: the evaluator's invalid box
    assert not place_mask(raw, [100, 200, 300, 201], 640, 480).any()  # 200 and 201 both truncate to pixel 125
    assert place_mask(raw, [100, 200, 300, 202], 640, 480).sum() == 140 - 46  # one column, 125, rows 46..139


# ---------------------------------------------------------------------------------------------------- run lengths


masks_to_encode = st.tuples(st.integers(1, 40), st.integers(1, 40)).flatmap(
    lambda shape: arrays(bool, shape, elements=st.booleans()))


@settings(max_examples=300, deadline=None)
@given(mask=masks_to_encode)
def test_run_lengths_decode_to_the_mask_and_equal_pycocotools_encoding(mask):
    rle = rle_encode(mask)
    assert np.array_equal(rle_decode(rle), mask)
    theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert rle == {"size": list(theirs["size"]), "counts": theirs["counts"].decode("ascii")}
    assert np.array_equal(coco_mask.decode(rle), mask) and coco_mask.area(rle) == mask.sum()


def test_long_runs_and_full_or_empty_masks_round_trip_through_pycocotools():
    big = np.zeros((1000, 1500), bool)
    big[100:900, 200:1300] = True  # runs of 800 and more, differences far beyond one 5-bit group
    rng = np.random.default_rng(3)
    for mask in (big, ~big, np.zeros((37, 23), bool), np.ones((37, 23), bool), rng.random((480, 640)) < 0.3):
        rle = rle_encode(mask)
        assert rle["counts"] == coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")
        assert np.array_equal(rle_decode(rle), mask) and np.array_equal(coco_mask.decode(rle), mask)


def test_uncompressed_and_bytes_counts_decode_too():
    mask = np.array([[0, 1, 1], [0, 1, 0]], bool)  # down the columns: 0 0 1 1 1 0
    assert rle_decode({"size": [2, 3], "counts": [2, 3, 1]}).tolist() == mask.tolist()
    assert rle_decode({"size": [2, 3], "counts": rle_encode(mask)["counts"].encode()}).tolist() == mask.tolist()
    with pytest.raises(ValueError, match="cover 5 pixels"):
        rle_decode({"size": [2, 3], "counts": [2, 3]})
