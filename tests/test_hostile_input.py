"""Broken folders, broken images and wrong flags end in one `error:` line on stderr, a non-zero exit, nothing on
stdout and no traceback, with the user's files untouched; valid oddities just work."""

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from conftest import ROOT, random_image
from test_loader import BROKEN_FOLDERS

from paligemma import inference, utils


def run(argv, capsys, monkeypatch) -> tuple[int, str, str]:
    """The command line in this process (the same code path as a subprocess, much faster): (status, out, err)."""
    monkeypatch.setattr(sys, "argv", ["inference.py", *map(str, argv)])
    try:
        inference.cli()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def fingerprint(path: Path) -> dict:
    """Content hash of every file under path (or of path itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def assert_clean_failure(code, out, err, *needles):
    assert code != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def cli_args(folder, image, *extra):
    return ["--model_path", folder, "--image_file_path", image, "--max_tokens_to_generate", 3, "--only_cpu", "True",
            *extra]


@pytest.mark.parametrize("case", BROKEN_FOLDERS)
def test_broken_model_folder_fails_cleanly_and_leaves_it_untouched(case, folder, photo, capsys, monkeypatch):
    breaks, _ = BROKEN_FOLDERS[case]
    breaks(folder)
    before = fingerprint(folder.parent)
    assert_clean_failure(*run(cli_args(folder, photo), capsys, monkeypatch))
    assert fingerprint(folder.parent) == before


def truncated_jpeg(path: Path):
    random_image(300, 200).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:2000])


def bomb_png(path: Path, width=30000, height=30000):
    """A valid PNG header declaring 900 megapixels, with almost no data behind it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


BROKEN_IMAGES = {
    "missing": (lambda p: None, "image file does not exist"),
    "not an image": (lambda p: p.write_text("just some text, not pixels"), "not an image pillow can read"),
    "truncated": (truncated_jpeg, "truncated or corrupt"),
    "decompression bomb": (bomb_png, "900 megapixels, above the limit of 100"),
}


@pytest.mark.parametrize("case", BROKEN_IMAGES)
def test_broken_image_fails_cleanly_naming_the_file(case, checkpoint, tmp_path, capsys, monkeypatch):
    path = tmp_path / "input.png"
    make, message = BROKEN_IMAGES[case]
    make(path)
    before = fingerprint(tmp_path)
    assert_clean_failure(*run(cli_args(checkpoint("v1_mqa"), path), capsys, monkeypatch), str(path), message)
    assert fingerprint(tmp_path) == before


def test_pixel_limit_can_be_raised_with_a_flag(checkpoint, tmp_path, capsys, monkeypatch):
    path = tmp_path / "wide.png"
    random_image(3000, 20).save(path)
    args = cli_args(checkpoint("v1_mqa"), path)
    assert_clean_failure(*run([*args, "--max_image_pixels", 50_000], capsys, monkeypatch), "--max_image_pixels")
    code, out, err = run([*args, "--max_image_pixels", 100_000], capsys, monkeypatch)
    assert code == 0, err


BAD_FLAGS = {
    "negative token budget": (["--max_tokens_to_generate", -1], "--max_tokens_to_generate"),
    "fractional token budget": (["--max_tokens_to_generate", 2.5], "--max_tokens_to_generate"),
    "top_p zero": (["--top_p", 0], "--top_p must be a number in (0, 1]"),
    "top_p above one": (["--top_p", 1.5], "--top_p"),
    "negative temperature": (["--temperature", -0.5], "--temperature must be 0 (greedy) or a number from 0.001 to"),
    "infinite temperature": (["--temperature", "inf"], "--temperature must be 0 (greedy) or a number from 0.001 to"),
    "temperature not a number": (["--temperature", "nan"], "--temperature must be 0 (greedy) or a number from 0.001"),
    "temperature below the range": (["--temperature", 1e-45], "--temperature must be 0 (greedy) or a number from"),
    "temperature above the range": (["--temperature", 1e308], "--temperature must be 0 (greedy) or a number from"),
    "seed of 2**64": (["--seed", 2**64], "--seed must be a whole number from 0 to 2**64 - 1"),
    "negative seed": (["--seed=-1"], "--seed must be a whole number from 0 to 2**64 - 1"),
    "unknown dtype": (["--dtype", "float64"], "--dtype must be one of float16, bfloat16, float32"),
    "unknown output format": (["--output_format", "xml"], "--output_format"),
    "not a boolean": (["--do_sample", "maybe"], "--do_sample must be True or False"),
    "unknown flag": (["--temprature", 0.5], "unknown flag --temprature"),
    "seed not a number": (["--seed", "abc"], "--seed must be a whole number"),
    "min_score above one": (["--min_score", 1.5], "--min_score must be a number in [0, 1]"),
    "min_score not a number": (["--min_score", "high"], "--min_score must be a number in [0, 1]"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flag_fails_cleanly_naming_the_flag(case, checkpoint, photo, capsys, monkeypatch):
    extra, message = BAD_FLAGS[case]
    assert_clean_failure(*run(cli_args(checkpoint("v1_mqa"), photo, *extra), capsys, monkeypatch), message)


@pytest.mark.parametrize("extra", [["--temperature", 0.001], ["--temperature", 1000], ["--seed", 0],
                                   ["--seed", 2**64 - 1]], ids=["lowest temperature", "highest temperature",
                                                                "seed 0", "seed 2**64 - 1"])
def test_the_ends_of_the_temperature_and_seed_ranges_sample(extra, checkpoint, photo, capsys, monkeypatch):
    args = cli_args(checkpoint("v1_mqa"), photo, "--do_sample", "True", "--output_format", "json", *extra)
    code, out, err = run(args, capsys, monkeypatch)
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) == 3


def test_a_token_budget_beyond_the_positions_is_refused_naming_this_prompts_limit(checkpoint, photo, capsys,
                                                                                 monkeypatch, no_loading):
    # The tiny model has 8192 positions; "caption en" with its image is 4 + 1 + 3 + 1 = 9 tokens, so 8183 can follow.
    args = cli_args(checkpoint("v1_mqa"), photo, "--max_tokens_to_generate", 8184)
    assert_clean_failure(*run(args, capsys, monkeypatch), "--max_tokens_to_generate 8184 does not fit",
                         "the prompt takes 9 of the model's 8192 positions (4 of them the image's)",
                         "at most 8183 tokens can follow")
    assert_clean_failure(*run([*args[:-2], "--max_tokens_to_generate", 10**12], capsys, monkeypatch),
                         "at most 8183 tokens can follow")


def test_a_token_budget_that_no_prompt_leaves_room_for_is_refused_in_a_batch(checkpoint, photo, capsys, monkeypatch,
                                                                            no_loading):
    args = ["--model_path", checkpoint("v1_mqa"), "--image_file_path", photo.parent, "--max_tokens_to_generate",
            8187]
    assert_clean_failure(*run(args, capsys, monkeypatch), "the shortest prompt takes 6 of the model's 8192",
                         "at most 8186 tokens can follow")


def test_with_stderr_closed_the_answer_still_reaches_stdout_and_the_run_succeeds(checkpoint, photo, capsys,
                                                                                monkeypatch):
    args = cli_args(checkpoint("v1_mqa"), photo)
    without = subprocess.run([sys.executable, str(ROOT / "inference.py"), *map(str, args)], stdout=subprocess.PIPE,
                             text=True, timeout=300, preexec_fn=lambda: os.close(2))
    code, out, err = run(args, capsys, monkeypatch)
    assert code == 0 and out, err
    assert (without.returncode, without.stdout) == (0, out)


def test_missing_model_path_fails_cleanly(photo, capsys, monkeypatch):
    assert_clean_failure(*run(["--image_file_path", photo], capsys, monkeypatch), "--model_path is required")


def test_prompt_longer_than_the_model_positions_fails_cleanly(checkpoint, photo, capsys, monkeypatch):
    prompt = "a " * 9000  # the tiny model has 8192 positions
    assert_clean_failure(*run(cli_args(checkpoint("v1_mqa"), photo, "--prompt", prompt), capsys, monkeypatch),
                         "more than the model's 8192 positions")


def test_too_little_memory_is_refused_before_loading_unless_told_to_try(checkpoint, photo, capsys, monkeypatch):
    monkeypatch.setattr(utils, "available_memory", lambda device: 1000)
    args = cli_args(checkpoint("v1_mqa"), photo)
    assert_clean_failure(*run(args, capsys, monkeypatch), "GiB is available", "--ignore_memory_check")
    code, _, err = run([*args, "--ignore_memory_check", "True"], capsys, monkeypatch)
    assert code == 0, err


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_any_image_mode_just_works(mode, checkpoint, tmp_path, capsys, monkeypatch):
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    random_image(33, 21, mode=mode).save(path)
    code, out, err = run(cli_args(checkpoint("v1_mqa"), path, "--output_format", "json"), capsys, monkeypatch)
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) == 3


def test_a_4000_by_3000_photo_just_works(checkpoint, tmp_path, capsys, monkeypatch):
    path = tmp_path / "big.jpg"
    random_image(400, 300).resize((4000, 3000)).save(path)
    code, out, err = run(cli_args(checkpoint("v1_mqa"), path, "--output_format", "json"), capsys, monkeypatch)
    assert code == 0, err


@pytest.mark.parametrize("prompt", ["", "décris l'image en 日本語 🐱", "1e3", "[cat]", "None"])
def test_empty_unicode_and_literal_looking_prompts_are_taken_as_typed(prompt, checkpoint, photo, capsys, monkeypatch):
    captured = {}
    real_processor = inference.PaliGemmaProcessor.__call__

    def spy(self, prompts, images):
        captured["prompt"] = prompts[0]
        return real_processor(self, prompts, images)

    monkeypatch.setattr(inference.PaliGemmaProcessor, "__call__", spy)
    code, out, err = run(cli_args(checkpoint("v1_mqa"), photo, "--prompt", prompt), capsys, monkeypatch)
    assert code == 0, err
    assert captured["prompt"] == prompt


def test_temperature_zero_with_sampling_means_greedy_and_says_so(checkpoint, photo, capsys, monkeypatch):
    args = cli_args(checkpoint("v1_mqa"), photo, "--output_format", "json")
    _, greedy, _ = run(args, capsys, monkeypatch)
    code, sampled, err = run([*args, "--do_sample", "True", "--temperature", 0], capsys, monkeypatch)
    assert code == 0 and json.loads(sampled)["token_ids"] == json.loads(greedy)["token_ids"]
    assert "--temperature 0 means greedy" in err


def test_zero_token_budget_prints_nothing_and_succeeds(checkpoint, photo, capsys, monkeypatch):
    code, out, err = run([*cli_args(checkpoint("v1_mqa"), photo)[:4], "--max_tokens_to_generate", 0], capsys,
                         monkeypatch)
    assert (code, out) == (0, "")


def test_without_cuda_the_cpu_is_used_with_a_note(checkpoint, photo, capsys, monkeypatch):
    monkeypatch.setattr(inference.torch.cuda, "is_available", lambda: False)
    args = ["--model_path", checkpoint("v1_mqa"), "--image_file_path", photo, "--only_cpu", "False",
            "--max_tokens_to_generate", 2]
    code, out, err = run(args, capsys, monkeypatch)
    assert code == 0 and out
    assert "CUDA is not available; running on the CPU" in err


def test_never_touches_the_network(checkpoint, photo):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", HF_HOME=str(photo.parent / "hf"))
    result = subprocess.run([sys.executable, str(ROOT / "inference.py"), *map(str, cli_args(checkpoint("v1_mqa"),
                             photo))], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert not (photo.parent / "hf").exists()  # nothing cached, nothing fetched


@pytest.mark.parametrize("extra, message", [
    (["--annotate", "/nowhere/boxes.png"], "the folder it goes in does not exist"),
    (["--annotate", "{tmp}/boxes.xyz"], "ending in a type pillow can write"),
    (["--annotate", "{tmp}/boxes.xbm"], "ending in a type pillow can write"),  # pillow reads XBM, cannot write it
    (["--vae_path", "{tmp}/vae-oid.npz"], "{tmp}/vae-oid.npz: the --vae_path file does not exist"),
    (["--vae_path", "{tmp}"], "the --vae_path file is a folder, not a file"),
    (["--annotate", "{tmp}/same.jsonl", "--output", "{tmp}/same.jsonl"], "--annotate and --output are the same"),
    (["--output", "{tmp}"], "is a folder, not a file"),
    (["--output", "/dev/full"], "/dev/full is a device, not a file"),
    (["--prompt", "<image> one <image> two"], "has 2 <image> tokens"),
    (["--output", "/nowhere/out.jsonl"], "the folder it goes in does not exist"),
    (["--batch_size", 0], "--batch_size must be a whole number >= 1"),
    (["--image_file_path", "{tmp}/*.webp"], "no images there"),
])
def test_bad_output_paths_fail_before_any_work(extra, message, checkpoint, photo, tmp_path, capsys, monkeypatch,
                                              no_loading):
    extra = [str(e).replace("{tmp}", str(tmp_path)) if isinstance(e, str) else e for e in extra]
    args = ["--model_path", checkpoint("v1_mqa"), "--image_file_path", photo, *extra]
    assert_clean_failure(*run(args, capsys, monkeypatch), message.replace("{tmp}", str(tmp_path)))


def test_config_that_is_a_folder_fails_cleanly(folder, photo, capsys, monkeypatch):
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    assert_clean_failure(*run(cli_args(folder, photo), capsys, monkeypatch), "config.json is a folder, not a file")
