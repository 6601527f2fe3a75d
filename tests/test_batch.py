"""Batches (left-padded, exact per row), results files that survive an interruption, detections drawn, streaming."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, random_image
from PIL import Image
from test_detection import loc, seg
from test_hostile_input import run
from test_masks import vivid_vae_arrays
from test_model import load_ours

from paligemma import batch, detection, masks
from paligemma.checkpoint import load_tokenizer
from paligemma.console import UserError
from paligemma.generate import TextStream, generate

PROMPTS = ["caption en", "answer en what colour is the cup on the wooden table?", "detect cat ; dog"]


@pytest.fixture
def images():
    return [random_image(40 + 9 * i, 31 + 5 * i, seed=i) for i in range(len(PROMPTS))]


def greedy_rows(model, inputs, n):
    """Each row's greedy tokens up to and including <eos>."""
    with torch.no_grad():
        steps = torch.stack([t for t, _ in generate(model, inputs, n)], dim=1).tolist()
    return [row[:row.index(1) + 1] if 1 in row else row for row in steps]


@pytest.mark.parametrize("name", ["v1_mqa", "v2_gqa"])
def test_left_padded_batch_equals_each_input_alone_and_transformers_padded_generate(name, checkpoint, reference,
                                                                                     images):
    model, processor = load_ours(checkpoint(name))
    inputs = processor(PROMPTS, images)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == len(PROMPTS)  # three prompt lengths
    together = greedy_rows(model, inputs, 12)
    alone = [greedy_rows(model, processor([p], [i]), 12)[0] for p, i in zip(PROMPTS, images)]
    assert together == alone
    ref, ref_processor = reference(name)
    padded = ref_processor(images=images, text=PROMPTS, padding="longest", return_tensors="pt")
    padded.pop("labels")
    with torch.no_grad():
        out = ref.generate(**padded, max_new_tokens=12, do_sample=False)[:, padded["input_ids"].shape[1]:].tolist()
    assert together == [row[:row.index(1) + 1] if 1 in row else row for row in out]


@pytest.fixture
def prompts_file(tmp_path, images):
    for i, image in enumerate(images):
        image.save(tmp_path / f"image{i}.png")
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"image": f"image{i}.png", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def batch_args(checkpoint, prompts_file, *extra):
    return ["--model_path", checkpoint("v1_mqa"), "--prompts_file", prompts_file, "--max_tokens_to_generate", 5,
            "--dtype", "float32", "--only_cpu", "True", *extra]


def test_batch_writes_one_line_per_input_in_order_whatever_the_batch_size(checkpoint, prompts_file, capsys,
                                                                          monkeypatch):
    outputs = []
    for size in (1, 2, 3):
        code, out, err = run(batch_args(checkpoint, prompts_file, "--batch_size", size), capsys, monkeypatch)
        assert code == 0, err
        outputs.append([json.loads(line) for line in out.splitlines()])
    assert [r["index"] for r in outputs[0]] == [0, 1, 2]
    assert [r["prompt"] for r in outputs[0]] == PROMPTS
    assert [[r["token_ids"] for r in o] for o in outputs[1:]] == [[r["token_ids"] for r in outputs[0]]] * 2


def test_a_broken_input_gets_an_error_record_and_the_others_their_answers(checkpoint, prompts_file, capsys,
                                                                          monkeypatch):
    (prompts_file.parent / "image1.png").write_text("not an image")
    code, out, err = run(batch_args(checkpoint, prompts_file, "--batch_size", 2), capsys, monkeypatch)
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and "1 of 3 inputs failed" in err.splitlines()[-1]
    assert "not an image" in records[1]["error"] and "token_ids" in records[0] and "token_ids" in records[2]


def test_folder_and_glob_give_their_images_in_sorted_order(tmp_path, images):
    for i, image in enumerate(images):
        image.save(tmp_path / f"b{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    by_folder = batch.gather(str(tmp_path), None, "caption en")
    by_glob = batch.gather(str(tmp_path / "b*.png"), None, "caption en")
    assert [Path(i.path).name for i in by_folder] == [Path(i.path).name for i in by_glob] == ["b0.png", "b1.png",
                                                                                                  "b2.png"]
    assert batch.gather(str(tmp_path / "b0.png"), None, "caption en") is None  # one file: not a batch


@pytest.mark.parametrize("line, message", [("{oops", ":1: not a JSON object"), ('{"prompt": "x"}', ":1: expected"),
                                           ("[1, 2]", ":1: expected")])
def test_a_prompts_file_line_that_names_no_input_is_an_item_whose_problem_names_the_line(line, message, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    [item] = batch.gather("unused", str(path), "caption en")
    assert message in item.problem and (item.line, item.path, item.text) == (1, None, line)


def test_a_prompts_file_without_prompts_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(UserError, match="no prompts in the file"):
        batch.gather("unused", str(path), "caption en")


def test_entries_of_a_folder_that_cannot_be_read_get_error_records_and_the_others_answers(checkpoint, tmp_path,
                                                                                          images, capsys,
                                                                                          monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    images[0].save(folder / "a.png")
    images[1].save(folder / "f.png")
    (folder / "b-loop.png").symlink_to(folder / "b-loop.png")
    (folder / "c-dangling.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(folder / "d-pipe.png")
    images[2].save(folder / "e-denied.png")
    real_open = Image.open

    def open_as_another_user(path, *args, **kwargs):  # root reads any file: a user without permission cannot
        if Path(path).name == "e-denied.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("processing_paligemma.Image.open", open_as_another_user)
    code, out, err = run(["--model_path", checkpoint("v1_mqa"), "--image_file_path", folder, "--output_format",
                          "json", "--max_tokens_to_generate", 2, "--batch_size", 2], capsys, monkeypatch)
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and "4 of 6 inputs failed" in err.splitlines()[-1]
    assert [Path(r["image"]).name for r in records] == ["a.png", "b-loop.png", "gone.png", "d-pipe.png",
                                                        "e-denied.png", "f.png"]
    assert "token_ids" in records[0] and "token_ids" in records[5]
    for record, kind in zip(records[1:5], ["is a symlink loop", "is a dangling symlink", "is a pipe",
                                           "cannot be read (Permission denied)"]):
        assert kind in record["error"], record


def test_prompts_file_lines_that_cannot_be_answered_get_records_with_their_line_and_a_rerun_skips_them(
        checkpoint, prompts_file, tmp_path, capsys, monkeypatch):
    good = prompts_file.read_text().splitlines()
    lines = [good[0], "{oops", json.dumps({"image": "image1.png", "prompt": "<image> one <image> two"}), "",
             json.dumps({"image": "image1.png", "prompt": "a " * 9000}), json.dumps({"prompt": "no image"}), good[2]]
    prompts_file.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out.jsonl"
    code, out, err = run(batch_args(checkpoint, prompts_file, "--output", output, "--batch_size", 2, "--annotate",
                                    tmp_path / "pictures"), capsys, monkeypatch)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert code == 1 and "4 of 6 inputs failed" in err.splitlines()[-1]
    assert [r["line"] for r in records] == [1, 2, 3, 5, 6, 7]
    assert "token_ids" in records[0] and "token_ids" in records[5]
    assert f"{prompts_file}:2: not a JSON object" in records[1]["error"] and records[1]["input"] == "{oops"
    assert "has 2 <image> tokens" in records[2]["error"]
    assert "more than the model's 8192 positions" in records[3]["error"]
    assert f"{prompts_file}:6: expected" in records[4]["error"] and records[4]["image"] is None
    before = output.read_bytes()
    code, out, err = run(batch_args(checkpoint, prompts_file, "--output", output), capsys, monkeypatch)
    assert code == 0 and "resuming: 6 inputs already done" in err and output.read_bytes() == before


def test_annotate_never_overwrites_the_input_image(checkpoint, tmp_path, capsys, monkeypatch):
    path = tmp_path / "photo.png"
    random_image(40, 30).save(path)
    before = path.read_bytes()
    code, out, err = run(["--model_path", checkpoint("v1_mqa"), "--image_file_path", path, "--annotate", path],
                         capsys, monkeypatch)
    assert code == 1 and "is an input image; it is never overwritten" in err
    assert path.read_bytes() == before


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """A mask decoder with random weights in big_vision's vae-oid.npz layout, whose masks cover about half the box."""
    npz = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
    np.savez(npz, **vivid_vae_arrays())
    return masks.load_vae(npz)


def test_detect_answer_gives_pixel_boxes_and_an_annotated_copy(vae, tmp_path):
    image = random_image(300, 200)
    record = {"text": loc(100, 200, 500, 800) + " cat ; " + loc(600, 100, 900, 300) + " dog"}
    out = detection.describe(dict(record), image, "detect cat ; dog", picture=str(tmp_path / "annotated.png"),
                             vae=vae)
    assert [d["label"] for d in out["detections"]] == ["cat", "dog"]
    assert out["detections"][0]["box"] == [58.7, 19.6, 234.6, 97.8]  # x by 300/1023, y by 200/1023
    drawn = Image.open(tmp_path / "annotated.png")
    assert drawn.size == image.size and drawn.tobytes() != image.tobytes()


def test_segment_answer_gives_codes_its_mask_in_run_lengths_and_draws_it(vae, tmp_path):
    image = Image.new("RGB", (128, 96), (255, 255, 255))
    record = {"text": loc(0, 0, 1023, 1023) + seg(*range(16)) + " cup ; " + loc(5, 5, 5, 900) + seg(*[9] * 16)}
    out = detection.describe(dict(record), image, "segment cup", picture=str(tmp_path / "masks.png"), vae=vae)
    cup, flat = out["segments"]
    inside = masks.place_mask(masks.decode_masks(vae, [list(range(16))])[0], [0, 0, 1023, 1023], 128, 96)
    assert cup["label"] == "cup" and cup["box"] == [0.0, 0.0, 128.0, 96.0] and cup["codes"] == list(range(16))
    assert np.array_equal(masks.rle_decode(cup["mask"]), inside) and cup["area"] == inside.sum()
    assert cup["mask"]["size"] == [96, 128] and isinstance(cup["mask"]["counts"], str)
    assert flat["area"] == 0 and not masks.rle_decode(flat["mask"]).any()  # y_min == y_max: no mask
    changed = (np.asarray(Image.open(tmp_path / "masks.png")) != 255).any(-1)
    assert 0.2 < inside.mean() < 0.8  # below the label, the translucent overlay is exactly the mask:
    assert np.array_equal(changed[20:-5, 5:-5], inside[20:-5, 5:-5])
    assert "mask" not in detection.describe(dict(record), image, "segment cup")["segments"][0]


def test_streamed_text_is_the_answer_with_no_character_split_across_byte_tokens(checkpoint):
    tokenizer = load_tokenizer(checkpoint("v1_mqa"))
    ids = tokenizer.convert_tokens_to_ids(["c", "a", "t", "▁", "<0xC3>", "<0xA9>", "!"])  # "cat é!"
    pieces = TextStream(tokenizer)
    shown = [pieces.add(ids[:n]) for n in range(1, len(ids) + 1)]
    assert shown[4] == ""  # after the first byte of "é": nothing yet, rather than a broken character
    assert "".join(shown) == "cat é!" and pieces.close(tokenizer.decode(ids)) == ""


def test_stream_flag_prints_the_same_answer(checkpoint, tmp_path):
    image = tmp_path / "photo.png"
    random_image(40, 30).save(image)
    args = [sys.executable, str(ROOT / "inference.py"), "--model_path", str(checkpoint("v2_gqa")), "--image_file_path",
            str(image), "--max_tokens_to_generate", "12", "--dtype", "float32"]
    plain, streamed = (subprocess.run(args + ["--stream", flag], capture_output=True, text=True) for flag in
                       ("False", "True"))
    assert plain.returncode == 0 and streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout
