"""What users take from detect and segment answers: a score per object (greedy and sampled), --min_score, and the
COCO results file; on tiny checkpoints whose answers are forced token by token through the real sampler."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_detection import loc
from test_hostile_input import run
from test_masks import vivid_vae_arrays
from test_model import load_ours

from paligemma import coco, detection, generate, masks
from paligemma.checkpoint import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint("v1_mqa"))


def ids_of(tokenizer, *tokens: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(tokens))


def locs(*values: int) -> list[str]:
    return [f"<loc{v:04d}>" for v in values]


def segs(*values: int) -> list[str]:
    return [f"<seg{v:03d}>" for v in values]


REAL_PREFILL, REAL_PICK = generate.prefill, generate.pick


def force(monkeypatch, *rows):
    """Generation picks these tokens, per row of a batch and step by step, in place of the real sampler's choice,
    whose logprobs (the model's own) it keeps. A callable picks an id from the step's logprobs."""
    step = 0

    def prefill(*args, **kwargs):  # a new generation starts at the first token again
        nonlocal step
        step = 0
        return REAL_PREFILL(*args, **kwargs)

    def pick(logits, *args, **kwargs):
        nonlocal step
        tokens, logprobs = REAL_PICK(logits, *args, **kwargs)
        tokens = tokens.clone()
        for r, row in enumerate(rows):
            choice = row[min(step, len(row) - 1)]
            tokens[r] = choice(torch.log_softmax(logits[r].float(), -1)) if callable(choice) else choice
        step += 1
        return tokens, logprobs

    monkeypatch.setattr(generate, "prefill", prefill)
    monkeypatch.setattr(generate, "pick", pick)


# ---------------------------------------------------------------------------------------------------- scores


def record_of(tokenizer, tokens: list[str], logprobs: list[float]) -> dict:
    ids = ids_of(tokenizer, *tokens)
    return {"text": tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids, "logprobs": logprobs}


def test_score_is_the_geometric_mean_of_the_probabilities_of_the_tokens_that_spelled_the_object(tokenizer):
    tokens = locs(10, 20, 30, 40) + ["▁cat", "▁;", "▁"] + locs(50, 60, 70, 80) + ["▁dog", "<eos>"]
    logprobs = [-0.1, -0.2, -0.3, -0.4, -9.0, -9.0, -9.0, -1.0, -2.0, -3.0, -4.0, -9.0, -9.0]  # text: never counted
    out = detection.describe(record_of(tokenizer, tokens, logprobs), random_image(50, 40), "detect cat ; dog",
                             tokenizer=tokenizer)
    assert [d["label"] for d in out["detections"]] == ["cat", "dog"]
    assert out["detections"][0]["score"] == pytest.approx(math.exp(-0.25))
    assert out["detections"][1]["score"] == pytest.approx(math.exp(-2.5))


def test_segment_score_counts_its_four_loc_and_sixteen_seg_tokens(tokenizer):
    tokens = locs(0, 0, 1023, 1023) + segs(*range(16)) + ["▁cat", "<eos>"]
    logprobs = [-2.0] * 4 + [-0.5] * 16 + [-9.0, -9.0]
    out = detection.describe(record_of(tokenizer, tokens, logprobs), random_image(50, 40), "segment cat",
                             tokenizer=tokenizer)
    assert out["segments"][0]["score"] == pytest.approx(math.exp((4 * -2.0 + 16 * -0.5) / 20))


def test_a_skipped_malformed_object_does_not_shift_the_scores_after_it(tokenizer):
    tokens = locs(1, 2, 3) + ["▁cat", "▁;", "▁"] + locs(50, 60, 70, 80) + ["▁dog"]  # three locations: skipped
    logprobs = [-5.0, -5.0, -5.0, -9.0, -9.0, -9.0, -0.1, -0.1, -0.1, -0.1, -9.0]
    out = detection.describe(record_of(tokenizer, tokens, logprobs), random_image(50, 40), "detect dog",
                             tokenizer=tokenizer)
    assert len(out["detections"]) == 1 and out["detections"][0]["score"] == pytest.approx(math.exp(-0.1))


def test_a_loc_spelled_out_of_text_pieces_leaves_no_score_and_says_so(tokenizer, capsys):
    tokens = list("<loc0001>") + locs(2, 3, 4) + ["▁cat"]  # the text shows four <loc>, the tokens hold three
    out = detection.describe(record_of(tokenizer, tokens, [-1.0] * len(tokens)), random_image(50, 40), "detect cat",
                             tokenizer=tokenizer)
    assert out["detections"][0]["score"] is None
    assert "no object has a score" in capsys.readouterr().err


def test_without_token_ids_objects_have_no_score(tokenizer):
    out = detection.describe({"text": loc(1, 2, 3, 4) + " cat"}, random_image(50, 40), "detect cat",
                             tokenizer=tokenizer)
    assert out["detections"] == [{"label": "cat", "score": None, "box": [0.1, 0.0, 0.2, 0.1]}]


def nth_likeliest_box(tokenizer, n: int) -> list:
    """Four pickers of the n-th likeliest <loc> token (0: the likeliest) from a step's logprobs, the minimums among
    <loc0000>..<loc0511> and the maximums among <loc0512>..<loc1023>, so that the box is always valid."""
    def pick(first):
        return lambda logprobs: first + logprobs[first:first + 512].argsort(descending=True)[n].item()

    low, high = (tokenizer.convert_tokens_to_ids(f"<loc{v:04d}>") for v in (0, 512))
    return [pick(low), pick(low), pick(high), pick(high)]


def test_scores_rank_a_box_the_model_is_sure_of_above_one_it_is_not(checkpoint, monkeypatch):
    model, processor = load_ours(checkpoint("v1_mqa"))
    with torch.no_grad():  # every logit 30 times larger: a model as sure of its tokens as a trained one
        norm = model.language_model.model.norm.weight
        norm.copy_(30 * (1 + norm) - 1)
    tokenizer = processor.tokenizer
    session = generate.Session(model, tokenizer, processor, stop_ids=(1,))
    image, tail = random_image(51, 37), ids_of(tokenizer, "▁cat", "<eos>")
    sure, tenth, last = (nth_likeliest_box(tokenizer, n) for n in (0, 9, 511))
    answers = {"sure": sure, "10th": tenth, "one edge absurd": sure[:2] + last[2:3] + sure[3:], "unsure": last}
    found = {}
    for name, picks in answers.items():
        force(monkeypatch, picks + tail)
        [(ids, logprobs)] = session.answer(processor(["detect cat"], [image]), 6)
        record = {"text": tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids, "logprobs": logprobs}
        found[name] = detection.describe(record, image, "detect cat", tokenizer=tokenizer)["detections"][0]["score"]
        assert found[name] == pytest.approx(math.exp(sum(logprobs[:4]) / 4))
    assert found["sure"] > found["10th"] > found["one edge absurd"] > found["unsure"]


def cli(checkpoint, image, prompt, *extra):
    return ["--model_path", checkpoint("v1_mqa"), "--image_file_path", image, "--prompt", prompt, "--dtype",
            "float32", "--only_cpu", "True", "--max_tokens_to_generate", 48, "--output_format", "json", *extra]


def test_greedy_and_sampled_answers_both_score_their_objects(checkpoint, tokenizer, tmp_path, capsys, monkeypatch):
    random_image(51, 37).save(tmp_path / "photo.png")
    force(monkeypatch, ids_of(tokenizer, *locs(100, 200, 300, 400), "▁cat", "<eos>"))
    records = []
    for sampling in ([], ["--do_sample", "True", "--temperature", 1.5, "--top_p", 0.5, "--seed", 3]):
        code, out, err = run(cli(checkpoint, tmp_path / "photo.png", "detect cat", *sampling), capsys, monkeypatch)
        assert code == 0, err
        records.append(json.loads(out))
    for record in records:
        [cat] = record["detections"]
        assert cat["label"] == "cat" and cat["score"] == pytest.approx(math.exp(sum(record["logprobs"][:4]) / 4))
    # The logprobs are the model's own, before temperature and top-p: the same tokens score the same either way.
    assert records[0]["detections"] == records[1]["detections"]


# ---------------------------------------------------------------------------------------------------- --min_score


def test_min_score_drops_objects_below_it_from_the_record_and_the_picture(tokenizer, tmp_path):
    tokens = locs(10, 20, 300, 400) + ["▁cat", "▁;", "▁"] + locs(500, 600, 700, 800) + ["▁dog"]
    record = record_of(tokenizer, tokens, [-0.25] * 4 + [-9.0] * 3 + [-2.5] * 4 + [-9.0])  # 0.78 and 0.08
    image = random_image(80, 60)
    kept = detection.describe(record, image, "detect cat ; dog", tokenizer=tokenizer, picture=str(tmp_path / "a.png"),
                              min_score=0.5)["detections"]
    assert [d["label"] for d in kept] == ["cat"]
    with Image.open(tmp_path / "a.png") as drawn:
        assert drawn.tobytes() == detection.annotate(image, kept).tobytes()
    everything = detection.describe(record, image, "detect cat ; dog", tokenizer=tokenizer)["detections"]
    assert [d["label"] for d in everything] == ["cat", "dog"]
    exactly = detection.describe(record, image, "detect", tokenizer=tokenizer, min_score=everything[1]["score"])
    assert len(exactly["detections"]) == 2  # a score equal to --min_score is kept


def test_min_score_drops_objects_whose_score_is_unknown(tokenizer):
    record = {"text": loc(1, 2, 3, 4) + " cat"}  # no token ids: no score
    image = random_image(50, 40)
    assert len(detection.describe(record, image, "detect cat", tokenizer=tokenizer)["detections"]) == 1
    assert detection.describe(record, image, "detect cat", tokenizer=tokenizer, min_score=0.01)["detections"] == []


def test_min_score_flag_filters_segments_and_their_masks(checkpoint, tokenizer, tmp_path, capsys, monkeypatch):
    random_image(64, 48).save(tmp_path / "photo.png")
    np.savez(tmp_path / "vae.npz", **vivid_vae_arrays())
    sure, last = nth_likeliest_box(tokenizer, 0), nth_likeliest_box(tokenizer, 511)
    codes = ids_of(tokenizer, *segs(*range(16)))
    force(monkeypatch, sure + codes + ids_of(tokenizer, "▁cat", "▁;", "▁") + last + codes + ids_of(tokenizer, "<eos>"))
    args = cli(checkpoint, tmp_path / "photo.png", "segment cat", "--vae_path", tmp_path / "vae.npz")
    code, out, err = run(args, capsys, monkeypatch)
    both = json.loads(out)["segments"]
    assert code == 0 and len(both) == 2 and both[0]["score"] > both[1]["score"], err
    middle = (both[0]["score"] + both[1]["score"]) / 2
    code, out, err = run([*args, "--min_score", middle, "--annotate", tmp_path / "kept.png"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["segments"] == both[:1], err
    with Image.open(tmp_path / "photo.png") as image, Image.open(tmp_path / "kept.png") as drawn:
        expected = detection.annotate(image, both[:1], [masks.rle_decode(both[0]["mask"])])
        assert drawn.tobytes() == expected.tobytes()


# ---------------------------------------------------------------------------------------------------- COCO results


@pytest.fixture
def batch_results(checkpoint, tokenizer, tmp_path, capsys, monkeypatch):
    """A batch run's results file: boxes for one image, a segment with its mask for another, a caption, and an
    image that cannot be read; the answers forced, their logprobs the tiny model's own."""
    names = ["000000000007.png", "000000000011.png", "000000000012.png", "000000000013.png"]
    for name, size in zip(names[:3], [(64, 48), (40, 30), (30, 30)]):
        random_image(*size).save(tmp_path / name)
    (tmp_path / names[3]).write_text("not an image")
    prompts = ["detect cat ; dog", "segment cat", "caption en", "detect cat"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"image": n, "prompt": p}) + "\n"
                                                    for n, p in zip(names, prompts)))
    np.savez(tmp_path / "vae.npz", **vivid_vae_arrays())
    force(monkeypatch, ids_of(tokenizer, *locs(100, 200, 500, 600), "▁cat", "▁;", "▁", *locs(0, 0, 1023, 512), "▁dog",
                              "<eos>"),
          ids_of(tokenizer, *locs(0, 0, 1023, 1023), *segs(*range(16)), "▁cat", "<eos>"),
          ids_of(tokenizer, "▁a", "<eos>"))
    code, out, err = run(["--model_path", checkpoint("v1_mqa"), "--prompts_file", tmp_path / "prompts.jsonl",
                          "--batch_size", 4, "--vae_path", tmp_path / "vae.npz", "--output", tmp_path / "answers.jsonl",
                          "--dtype", "float32", "--only_cpu", "True", "--max_tokens_to_generate", 24], capsys,
                         monkeypatch)
    assert code == 1 and "1 of 4 inputs failed" in err  # the image that is not one
    return tmp_path / "answers.jsonl"


def coco_annotations() -> dict:
    images = [{"id": i, "file_name": f"{i:012d}.png", "width": w, "height": h}
              for i, w, h in [(7, 64, 48), (11, 40, 30), (12, 30, 30)]]
    categories = [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]
    truth = [{"id": 1, "image_id": 7, "category_id": 17, "bbox": [12.0, 5.0, 24.0, 19.0], "area": 456.0,
              "segmentation": [[12.0, 5.0, 36.0, 5.0, 36.0, 24.0, 12.0, 24.0]], "iscrowd": 0}]
    return {"images": images, "categories": categories, "annotations": truth}


def test_coco_results_of_a_batch_run_hold_every_scored_object(batch_results):
    records = coco.read_records(batch_results)
    entries = coco.coco_results(records)
    cat, dog, cup = (records[0]["detections"] + records[1]["segments"])
    assert [(e["image_id"], e["category"]) for e in entries] == [(7, "cat"), (7, "dog"), (11, "cat")]
    x0, y0, x1, y1 = cat["box"]
    assert entries[0]["bbox"] == [x0, y0, round(x1 - x0, 1), round(y1 - y0, 1)] and entries[0]["score"] == cat["score"]
    assert "segmentation" not in entries[1] and entries[2]["segmentation"] == cup["mask"]
    assert masks.rle_decode(cup["mask"]).shape == (30, 40) and cup["area"] > 0


def test_coco_results_load_into_pycocotools_with_the_annotations_ids(batch_results, tmp_path, capsys):
    (tmp_path / "instances.json").write_text(json.dumps(coco_annotations()))
    coco.main([str(batch_results), str(tmp_path / "results.json"), "--annotations", str(tmp_path / "instances.json")])
    entries = json.loads((tmp_path / "results.json").read_text())
    assert [(e["image_id"], e["category_id"]) for e in entries] == [(7, 17), (7, 18), (11, 17)]
    truth = COCO(str(tmp_path / "instances.json"))
    for kind in ("bbox", "segm"):
        evaluation = COCOeval(truth, truth.loadRes(str(tmp_path / "results.json")), kind)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        assert evaluation.stats[1] > 0  # AP at IoU 0.5: the cat box found its ground truth by image and category
    assert "3 objects written" in capsys.readouterr().err


def test_coco_needs_annotations_for_images_not_named_by_number(tmp_path, capsys):
    record = {"pytorch_paligemma": 1, "index": 0, "image": "/photos/cat.jpg", "prompt": "detect cat", "text": "",
              "detections": [{"label": "cat", "score": 0.5, "box": [1.0, 2.0, 3.0, 4.0]}]}
    (tmp_path / "answers.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(SystemExit):
        coco.main([str(tmp_path / "answers.jsonl"), str(tmp_path / "out.json")])
    assert "its image_id must come from --annotations" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
