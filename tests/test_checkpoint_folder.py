"""Checkpoint folders as users have them: a Hugging Face cache snapshot of symlinks into blobs/ loads like a plain
folder, a link that ends anywhere but a file is named for what it ends at, and the tokenizer is checked against the
model, from its files, before any weight loads."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from conftest import CHECKPOINTS, ROOT
from test_hostile_input import assert_clean_failure, cli_args, run

from paligemma import utils
from paligemma.checkpoint import LoadError


def json_answer(folder, photo, capsys, monkeypatch, *extra) -> dict:
    code, out, err = run(cli_args(folder, photo, "--output_format", "json", *extra), capsys, monkeypatch)
    assert code == 0, err
    return json.loads(out)


def test_the_cli_answers_from_a_hub_cache_snapshot_as_from_the_plain_folder(checkpoint, photo, tmp_path, capsys,
                                                                          monkeypatch):
    snapshot = tiny.hub_cache(checkpoint("v1_mqa"), tmp_path / "hub")
    assert all(p.is_symlink() for p in snapshot.iterdir())
    result = subprocess.run([sys.executable, str(ROOT / "inference.py"), *map(str, cli_args(
        snapshot, photo, "--output_format", "json"))], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    plain = json_answer(checkpoint("v1_mqa"), photo, capsys, monkeypatch)
    assert json.loads(result.stdout)["token_ids"] == plain["token_ids"] and len(plain["token_ids"]) == 3


def test_a_bfloat16_snapshot_is_used_in_place_from_its_blobs(tmp_path, capsys):
    folder = tmp_path / "bf16"
    tiny.build_checkpoint(folder, dtype=torch.bfloat16, **CHECKPOINTS["v2_gqa"])
    snapshot = tiny.hub_cache(folder, tmp_path / "hub")
    linked, _ = utils.load_hf_model(snapshot, "cpu")
    assert "used in place from the files" in capsys.readouterr().err
    plain, _ = utils.load_hf_model(folder, "cpu", verbose=False)
    for (name, a), b in zip(linked.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name


LINK_ENDS = {  # what a snapshot's link is made to end at, and what the error calls it
    "a pipe": (lambda target: os.mkfifo(target), "is a pipe, not a file"),
    "nothing": (lambda target: None, "is a dangling symlink, not a file"),
    "itself": (lambda target: target.symlink_to(target), "is a symlink loop, not a file"),
}
LINKED_FILES = ["model-00001-of-00007.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json", "special_tokens_map.json", "model.safetensors.index.json"]


@pytest.mark.parametrize("end", LINK_ENDS)
@pytest.mark.parametrize("name", LINKED_FILES)
def test_a_snapshot_link_that_ends_at_no_file_is_refused_naming_the_file_and_what_it_ends_at(name, end, checkpoint,
                                                                                            photo, tmp_path, capsys,
                                                                                            monkeypatch):
    snapshot = tiny.hub_cache(checkpoint("v1_mqa"), tmp_path / "hub")
    make, message = LINK_ENDS[end]
    target = tmp_path / "elsewhere" / name
    target.parent.mkdir()
    make(target)
    (snapshot / name).unlink(missing_ok=True)
    (snapshot / name).symlink_to(target)
    assert_clean_failure(*run(cli_args(snapshot, photo), capsys, monkeypatch), f"{snapshot / name}", message)


def rewrite_json(path: Path, edit):
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def rows(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]


def image_id(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["image_token_index"]


def one_token_too_many(folder: Path):
    """Added tokens up to one id more than the embedding has rows."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    first = max(t["id"] for t in tokenizer["added_tokens"]) + 1
    tokenizer["added_tokens"] += [{"id": i, "content": f"<extra{i}>", "special": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "single_word": False}
                                  for i in range(first, rows(folder) + 1)]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))


BROKEN_TOKENIZERS = {
    "tokenizer.json not JSON": (lambda f: (f / "tokenizer.json").write_text('{"model": '),
                                "tokenizer.json: tokenizer.json is not valid JSON"),
    "tokenizer.json not a tokenizer": (lambda f: (f / "tokenizer.json").write_text('{"version": "1.0"}'),
                                       "tokenizer.json: is not a tokenizer (it has no model vocabulary)"),
    "a token id that is no number": (lambda f: rewrite_json(f / "tokenizer.json", lambda t: {
        **t, "added_tokens": [{"id": "seven", "content": "<x>"}]}), "'<x>' with id 'seven' is not a token"),
    "tokenizer_config.json broken": (lambda f: (f / "tokenizer_config.json").write_text("{,"),
                                     "tokenizer_config.json: tokenizer_config.json is not valid JSON"),
    "more tokens than embedding rows": (one_token_too_many, "the tokenizer has {rows + 1} ids, more than the {rows} "
                                                            "rows of the model's embedding"),
    "config names another <image> id": (lambda f: rewrite_json(f / "config.json", lambda c: {
        **c, "image_token_index": c["image_token_index"] - 1}),
        "gives <image> id {image}, but config.json's image_token_index is {image - 1}"),
}


@pytest.mark.parametrize("case", BROKEN_TOKENIZERS)
def test_a_tokenizer_that_does_not_fit_the_model_is_refused_before_loading(case, folder, photo, capsys, monkeypatch,
                                                                          no_loading):
    breaks, message = BROKEN_TOKENIZERS[case]
    sizes = {"rows": rows(folder), "image": image_id(folder)}
    breaks(folder)
    message = message.replace("{rows + 1}", str(sizes["rows"] + 1)).replace("{image - 1}", str(sizes["image"] - 1))
    assert_clean_failure(*run(cli_args(folder, photo), capsys, monkeypatch), message.format(**sizes))


def plain_gemma_tokenizer(folder: Path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    tiny.build_tokenizer(paligemma=False).save_pretrained(folder)


def test_a_plain_gemma_tokenizer_gets_paligemmas_ids_and_answers_as_transformers_with_the_checkpoints_own(
        folder, checkpoint, reference, photo, capsys, monkeypatch):
    """PaliGemma's tokenizer is Gemma's with <loc>, <seg> and <image> after it. A plain one that lines up with the
    model gets those ids from the processor, in that order, so answers and boxes are the checkpoint's own;
    transformers' processor would put <image> first (id 388 here) and fail on the model."""
    from PIL import Image

    plain_gemma_tokenizer(folder)
    assert "<image>" not in json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    ours = json_answer(folder, photo, capsys, monkeypatch, "--prompt", "detect cat", "--max_tokens_to_generate", 8)
    assert ours == {**json_answer(checkpoint("v1_mqa"), photo, capsys, monkeypatch, "--prompt", "detect cat",
                                  "--max_tokens_to_generate", 8), "timings": ours["timings"]}
    model, processor = reference("v1_mqa")
    inputs = processor(images=Image.open(photo), text="detect cat", return_tensors="pt")
    inputs.pop("labels", None)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert ours["token_ids"] == expected.tolist()[:len(ours["token_ids"])]


def test_the_real_plain_gemma_tokenizer_beside_tiny_weights_is_refused_naming_both_sizes(folder, photo, capsys,
                                                                                       monkeypatch, no_loading):
    real = os.environ.get("PALIGEMMA_TEST_TOKENIZER")
    if not real:
        pytest.skip("PALIGEMMA_TEST_TOKENIZER names no tokenizer.json of Gemma's (.ci/run fetches one)")
    shutil.copyfile(real, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").unlink()
    assert_clean_failure(*run(cli_args(folder, photo), capsys, monkeypatch),
                         "the tokenizer has 257153 ids (1153 of them added for PaliGemma's <image>, <loc> and <seg>)",
                         f"more than the {rows(folder)} rows")


def test_a_tokenizer_that_fails_to_build_stops_the_weights_streaming(checkpoint, monkeypatch):
    stopped = {}
    real_stream = utils.stream_tensors

    def stream(model, plan, to_copy, bar, stop):
        stopped["in time"] = stop.wait(timeout=30)
        return real_stream(model, plan, to_copy, bar, stop)

    def broken(folder):
        raise LoadError(f"{folder}: the tokenizer cannot be loaded (a test)")

    monkeypatch.setattr(utils, "stream_tensors", stream)
    monkeypatch.setattr(utils, "load_tokenizer", broken)
    with pytest.raises(LoadError, match="the tokenizer cannot be loaded"):
        utils.load_hf_model(checkpoint("v1_mqa"), "cpu", torch.float32, verbose=False)
    assert stopped == {"in time": True}
