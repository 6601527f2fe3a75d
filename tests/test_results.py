"""The results file of a batch run: only ever ours, locked while written, resumed by what each input is, never a
line lost, doubled or left invalid; and the inputs a batch is made of."""

import fcntl
import json
import os
import shutil

import pytest
from conftest import random_image
from test_hostile_input import run

from paligemma import batch, results, utils
from paligemma.results import MARKER

PROMPTS = ["caption en", "answer en what is it?", "detect cat"]


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        random_image(30 + 7 * i, 25, seed=i).save(folder / f"p{i}.png")
    return folder


@pytest.fixture
def prompts_file(photos):
    path = photos / "prompts.jsonl"
    path.write_text("".join(json.dumps({"image": f"p{i}.png", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def args(checkpoint, *extra):
    return ["--model_path", checkpoint("v1_mqa"), "--max_tokens_to_generate", 3, "--dtype", "float32",
            "--only_cpu", "True", *extra]


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def answered(path) -> list[tuple]:
    return sorted((r["image"], r["prompt"], tuple(r.get("token_ids", []))) for r in records(path))


def test_every_record_is_marked_and_names_its_image_by_its_resolved_path(checkpoint, photos, tmp_path, capsys,
                                                                         monkeypatch):
    output = tmp_path / "out.jsonl"
    monkeypatch.chdir(photos)
    assert run(args(checkpoint, "--image_file_path", ".", "--output", output), capsys, monkeypatch)[0] == 0
    got = records(output)
    assert [r[MARKER] for r in got] == [1, 1, 1]
    assert [r["image"] for r in got] == [str((photos / f"p{i}.png").resolve()) for i in range(3)]


def test_interrupted_run_resumes_with_each_input_exactly_once(checkpoint, prompts_file, tmp_path, capsys,
                                                              monkeypatch):
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    assert run(args(checkpoint, "--prompts_file", prompts_file, "--output", whole), capsys, monkeypatch)[0] == 0
    real_write, writes = results.ResultsFile.write, []

    def write_then_stop(self, batch_records):
        real_write(self, batch_records)
        writes.append(batch_records)
        if len(writes) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(results.ResultsFile, "write", write_then_stop)
    code, _, _ = run(args(checkpoint, "--prompts_file", prompts_file, "--output", resumed), capsys, monkeypatch)
    assert code == 130 and len(records(resumed)) == 2
    monkeypatch.setattr(results.ResultsFile, "write", real_write)
    code, _, err = run(args(checkpoint, "--prompts_file", prompts_file, "--output", resumed), capsys, monkeypatch)
    assert code == 0 and "resuming: 2 inputs already done" in err
    assert answered(resumed) == answered(whole)


def test_adding_reordering_or_renaming_inputs_never_answers_one_twice(checkpoint, photos, prompts_file, tmp_path,
                                                                       capsys, monkeypatch):
    output = tmp_path / "out.jsonl"
    assert run(args(checkpoint, "--prompts_file", prompts_file, "--output", output), capsys, monkeypatch)[0] == 0
    lines = prompts_file.read_text().splitlines()
    random_image(20, 20, seed=9).save(photos / "new.png")
    reordered = tmp_path / "again.jsonl"  # another file, other relative paths, another order, one more input
    reordered.write_text("\n".join([json.dumps({"image": "photos/new.png", "prompt": "caption en"})] + [
        json.dumps({"image": "photos/" + json.loads(line)["image"], "prompt": json.loads(line)["prompt"]})
        for line in reversed(lines)]) + "\n")
    link = tmp_path / "linked"
    link.symlink_to(photos)
    code, _, err = run(args(checkpoint, "--prompts_file", reordered, "--output", output), capsys, monkeypatch)
    assert code == 0 and "resuming: 3 inputs already done" in err
    code, _, err = run(args(checkpoint, "--image_file_path", link, "--prompt", "caption en", "--output", output),
                       capsys, monkeypatch)  # p0.png and new.png with "caption en" are done, by another path
    assert code == 0 and "resuming: 2 inputs already done" in err
    keys = [(r["image"], r["prompt"]) for r in records(output)]
    assert len(keys) == len(set(keys)) == 6


def test_torn_last_line_is_redone_by_a_run_that_writes(checkpoint, prompts_file, tmp_path, capsys, monkeypatch):
    output = tmp_path / "out.jsonl"
    assert run(args(checkpoint, "--prompts_file", prompts_file, "--output", output), capsys, monkeypatch)[0] == 0
    lines = output.read_text().splitlines(keepends=True)
    output.write_text("".join(lines[:2]) + lines[2][:30])  # killed in the middle of the last write
    assert run(args(checkpoint, "--prompts_file", prompts_file, "--output", output), capsys, monkeypatch)[0] == 0
    assert output.read_text() == "".join(lines)


def test_a_run_that_fails_before_writing_leaves_a_torn_file_as_it_was(checkpoint, prompts_file, tmp_path, capsys,
                                                                      monkeypatch):
    output = tmp_path / "out.jsonl"
    assert run(args(checkpoint, "--prompts_file", prompts_file, "--output", output), capsys, monkeypatch)[0] == 0
    torn = output.read_text()[:-20]
    output.write_text(torn)
    monkeypatch.setattr(utils, "available_memory", lambda device: 1000)  # the run stops before answering anything
    assert run(args(checkpoint, "--prompts_file", prompts_file, "--output", output), capsys, monkeypatch)[0] == 1
    assert output.read_text() == torn


FOREIGN = {
    "a note without a final newline": "my notes",
    "minified JSON": '{"a": [1, 2], "b": {"c": 3}}',
    "JSON lines of another tool": '{"image": "a.png", "prompt": "caption en", "text": "x"}\n',
    "a record and then a note": '{"pytorch_paligemma": 1, "image": "/a.png", "prompt": "p"}\nmy notes\n',
    "not UTF-8": "\xff\xfe".encode("latin-1").decode("latin-1"),
}


@pytest.mark.parametrize("case", FOREIGN)
def test_an_output_file_that_is_not_ours_is_refused_untouched_before_loading(case, checkpoint, prompts_file,
                                                                              tmp_path, capsys, monkeypatch,
                                                                              no_loading):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(FOREIGN[case].encode("latin-1" if case == "not UTF-8" else "utf-8"))
    before = notes.read_bytes()
    code, out, err = run(args(checkpoint, "--prompts_file", prompts_file, "--output", notes), capsys, monkeypatch)
    assert code == 1 and out == "" and "is not a record of this tool" in err
    assert notes.read_bytes() == before


def test_blank_lines_and_a_byte_order_mark_are_tolerated(checkpoint, prompts_file, tmp_path, capsys, monkeypatch):
    output = tmp_path / "out.jsonl"
    assert run(args(checkpoint, "--prompts_file", prompts_file, "--output", output), capsys, monkeypatch)[0] == 0
    lines = output.read_text().splitlines(keepends=True)
    output.write_bytes(b"\xef\xbb\xbf" + "".join(lines[:1] + ["\n", "   \n"] + lines[1:2]).encode())
    prompts_file.write_bytes(b"\xef\xbb\xbf\n" + prompts_file.read_bytes() + b"\n\n")
    code, _, err = run(args(checkpoint, "--prompts_file", prompts_file, "--output", output), capsys, monkeypatch)
    assert code == 0 and "resuming: 2 inputs already done" in err
    assert len(records(output)) == 3


@pytest.mark.parametrize("ending", [b"\n", b"   ", b"\n\t \n  "], ids=["blank line", "blanks", "blank lines"])
def test_blank_lines_an_editor_leaves_at_the_end_are_ignored_and_answers_follow_them(ending, checkpoint, photos,
                                                                                     prompts_file, tmp_path, capsys,
                                                                                     monkeypatch):
    output = tmp_path / "out.jsonl"
    prompts_file.write_text(prompts_file.read_text().splitlines(keepends=True)[0])
    assert run(args(checkpoint, "--prompts_file", prompts_file, "--output", output), capsys, monkeypatch)[0] == 0
    output.write_bytes(output.read_bytes() + ending)
    prompts_file.write_text(prompts_file.read_text() + json.dumps({"image": "p1.png", "prompt": "caption en"}) + "\n")
    code, _, err = run(args(checkpoint, "--prompts_file", prompts_file, "--output", output), capsys, monkeypatch)
    assert code == 0 and "resuming: 1 inputs already done" in err, err
    assert [r["index"] for r in records(output)] == [0, 1]


def test_a_line_that_is_not_json_refuses_the_results_file_naming_the_line(checkpoint, prompts_file, tmp_path,
                                                                          capsys, monkeypatch, no_loading):
    output = tmp_path / "out.jsonl"
    output.write_text('{"pytorch_paligemma": 1, "image": "/a.png", "prompt": "p"}\n\n{oops\n')
    code, out, err = run(args(checkpoint, "--prompts_file", prompts_file, "--output", output), capsys, monkeypatch)
    assert code == 1 and out == "" and "line 3 is not a record of this tool" in err


def test_output_through_a_symlink_appends_to_its_target(checkpoint, prompts_file, tmp_path, capsys, monkeypatch):
    target, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    target.write_text("")
    link.symlink_to(target)
    (tmp_path / "link.jsonl.tmp").write_text("mine")
    assert run(args(checkpoint, "--prompts_file", prompts_file, "--output", link), capsys, monkeypatch)[0] == 0
    assert link.is_symlink() and len(records(target)) == 3
    assert (tmp_path / "link.jsonl.tmp").read_text() == "mine"


def test_a_second_run_on_a_locked_output_fails_with_one_line(checkpoint, prompts_file, tmp_path, capsys,
                                                             monkeypatch, no_loading):
    output = tmp_path / "out.jsonl"
    output.write_text("")
    with open(output) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another run writing it
        code, out, err = run(args(checkpoint, "--prompts_file", prompts_file, "--output", output), capsys,
                             monkeypatch)
    assert code == 1 and out == "" and "is being written by another run" in err.strip().splitlines()[-1]
    assert output.read_text() == ""


def test_a_run_that_writes_nothing_leaves_no_new_file(checkpoint, prompts_file, tmp_path, capsys, monkeypatch):
    output = tmp_path / "new.jsonl"
    monkeypatch.setattr(utils, "available_memory", lambda device: 1000)
    assert run(args(checkpoint, "--prompts_file", prompts_file, "--output", output), capsys, monkeypatch)[0] == 1
    assert not output.exists()


def test_file_names_that_are_not_utf8_give_valid_utf8_records_that_resume(checkpoint, photos, tmp_path, capsys,
                                                                          monkeypatch):
    odd = os.fsdecode(bytes(photos / "p0.png").replace(b"p0", b"p\xff\xfe0"))
    shutil.copy(photos / "p0.png", odd)
    output = tmp_path / "out.jsonl"
    for expected in (0, 4):
        code, _, err = run(args(checkpoint, "--image_file_path", photos, "--output", output), capsys, monkeypatch)
        assert code == 0 and (expected == 0 or f"resuming: {expected} inputs already done" in err)
    text = output.read_bytes().decode("utf-8")  # strict: raises on anything that is not UTF-8
    assert "p\\\\xff\\\\xfe0.png" in text and len(records(output)) == 4


def test_every_json_line_on_stdout_is_valid_utf8(checkpoint, photos, capsys, monkeypatch):
    shutil.copy(photos / "p1.png", os.fsdecode(bytes(photos / "p1.png").replace(b"p1", b"q\xff")))
    code, out, _ = run(args(checkpoint, "--image_file_path", photos), capsys, monkeypatch)
    assert code == 0 and len([json.loads(line) for line in out.encode("utf-8").decode("utf-8").splitlines()]) == 4


def test_a_file_named_like_a_glob_is_that_file(tmp_path, photos):
    (photos / "p1.png").rename(photos / "photo1.png")
    shutil.copy(photos / "p2.png", photos / "photo[1].png")
    assert batch.gather(str(photos / "photo[1].png"), None, "caption en") is None  # one image: that file
    assert [i.path for i in batch.gather(str(photos / "photo[1].png").replace("[1]", "[12]"), None, "x")] == [
        str(photos / "photo1.png")]  # an actual glob


def test_an_empty_image_path_is_refused(checkpoint, capsys, monkeypatch, no_loading):
    code, out, err = run(args(checkpoint, "--image_file_path", ""), capsys, monkeypatch)
    assert code == 1 and "--image_file_path is empty" in err


def test_an_annotate_path_that_is_a_hard_link_to_the_input_is_refused(checkpoint, photos, capsys, monkeypatch,
                                                                      no_loading):
    image = photos / "p0.png"
    os.link(image, photos / "copy.png")
    before = image.read_bytes()
    code, _, err = run(args(checkpoint, "--image_file_path", image, "--annotate", photos / "copy.png"), capsys,
                       monkeypatch)
    assert code == 1 and "is an input image" in err and image.read_bytes() == before


def test_an_annotated_picture_that_would_overwrite_an_input_gets_an_error_record(checkpoint, photos, tmp_path, capsys,
                                                                                  monkeypatch):
    pictures = tmp_path / "boxes"
    pictures.mkdir()
    os.link(photos / "p1.png", pictures / "00001-p1.png")  # where input 1's picture would be written
    before = (photos / "p1.png").read_bytes()
    code, out, err = run(args(checkpoint, "--image_file_path", photos, "--prompt", "detect cat", "--annotate",
                              pictures), capsys, monkeypatch)
    got = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and "is an input image" in got[1]["error"] and "error" not in got[0]
    assert (photos / "p1.png").read_bytes() == before
