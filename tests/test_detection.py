"""Parsing detect/segment answers, and the annotated picture."""

import numpy as np
import pytest
import torch
from PIL import Image

from paligemma.detection import annotate, parse_detections, parse_segments
from paligemma.masks import place_mask


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


# ---------------------------------------------------------------------------------------------------- pictures


def test_annotated_png_keeps_the_size_changes_the_box_and_leaves_far_pixels_alone(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8))
    detections = [{"label": "cat", "box": [40.0, 50.0, 90.0, 100.0]}, {"label": "", "box": [0.0, 0.0, 20.0, 15.0]}]
    masks = [place_mask(np.ones((64, 64)), [427, 205, 853, 461], 200, 120), None]  # pixels 40, 50, 90, 100
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
    with pytest.raises(ValueError, match="place_mask"):
        annotate(Image.new("RGB", (64, 48)), [{"label": "x", "box": [0, 0, 10, 10]}], [torch.ones(64, 64)])


def test_the_score_is_drawn_beside_the_label():
    image = Image.new("RGB", (120, 80), (255, 255, 255))
    box = [10.0, 30.0, 100.0, 70.0]
    scored = annotate(image, [{"label": "cat", "score": 0.8712, "box": box}])
    assert scored.tobytes() == annotate(image, [{"label": "cat 0.87", "box": box}]).tobytes()
    assert scored.tobytes() != annotate(image, [{"label": "cat", "box": box}]).tobytes()
    assert annotate(image, [{"label": "", "score": 0.5, "box": box}]).tobytes() == annotate(
        image, [{"label": "0.50", "box": box}]).tobytes()
