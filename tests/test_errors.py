"""Errors that say what is wrong, early: special files named for what they are (and never a hang), flags without a
value, shards outside the checkpoint, a memory check that counts what answering takes, stdout that cannot be
written, ctrl-C at any moment, and user errors told apart from bugs."""

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_hostile_input import assert_clean_failure, cli_args, run

from paligemma import checkpoint as checkpoint_files
from paligemma import utils
from paligemma.checkpoint import LoadError
from paligemma.modeling_paligemma import PaliGemmaConfig


def run_subprocess(argv, timeout=120, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "inference.py"), *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, **kwargs)


def fifo(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


SPECIAL_INPUTS = {  # what the path is made into, which flag gets it, what the error must call it
    "a pipe as the image": (lambda p: fifo(p / "x.png"), "--image_file_path", "is a pipe, not a file"),
    "a device as the image": (lambda p: Path("/dev/zero"), "--image_file_path", "/dev/zero: image file is a device"),
    "a pipe as the prompts file": (lambda p: fifo(p / "q.jsonl"), "--prompts_file", "prompts file is a pipe"),
    "a device as the prompts file": (lambda p: Path("/dev/zero"), "--prompts_file", "prompts file is a device"),
    "a pipe as the output": (lambda p: fifo(p / "o.jsonl"), "--output", "is a pipe, not a file"),
    "a folder as the annotated picture": (lambda p: p, "--annotate", "is a folder, not a file"),
}


@pytest.mark.parametrize("case", SPECIAL_INPUTS)
def test_a_special_file_is_named_for_what_it_is_and_never_hangs(case, checkpoint, photo, tmp_path):
    make, flag, message = SPECIAL_INPUTS[case]
    args = cli_args(checkpoint("v1_mqa"), photo)
    args += [flag, make(tmp_path)] if flag != "--image_file_path" else []
    if flag == "--image_file_path":
        args[3] = make(tmp_path)
    result = run_subprocess(args, timeout=60)  # a hang fails the test here
    assert_clean_failure(result.returncode, result.stdout, result.stderr, message)


CHECKPOINT_FILES = {
    "config.json": "config.json is a pipe, not a file",
    "tokenizer.json": "tokenizer file is a pipe, not a file",
    "model.safetensors.index.json": "the shard index is a pipe, not a file",
    "model-00001-of-00007.safetensors": "shard named by model.safetensors.index.json is a pipe, not a file",
    "generation_config.json": "generation_config.json is a pipe, not a file",
}


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_pipe_in_the_checkpoint_folder_is_named_and_never_hangs(name, folder, photo):
    fifo(folder / name)
    result = run_subprocess(cli_args(folder, photo), timeout=60)
    assert_clean_failure(result.returncode, result.stdout, result.stderr, CHECKPOINT_FILES[name])


@pytest.mark.parametrize("name", ["../elsewhere.safetensors", "/tmp/elsewhere.safetensors", "sub/../../x.safetensors"])
def test_a_shard_outside_the_checkpoint_folder_is_never_read(name, folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match="lies outside the checkpoint folder"):
        checkpoint_files.find_shards(folder)


def test_an_index_that_names_no_tensors_is_refused(folder):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(LoadError, match="weight_map names no tensors"):
        checkpoint_files.find_shards(folder)


@pytest.mark.parametrize("argv, flag", [
    (["--prompt", "--max_tokens_to_generate", "5"], "--prompt"),
    (["--max_tokens_to_generate"], "--max_tokens_to_generate"),
    (["--output", "--batch_size=2"], "--output"),
])
def test_a_flag_without_a_value_is_refused_naming_it(argv, flag, checkpoint, photo, capsys, monkeypatch, no_loading):
    code, out, err = run(["--model_path", checkpoint("v1_mqa"), "--image_file_path", photo, *argv], capsys,
                         monkeypatch)
    assert_clean_failure(code, out, err, f"{flag} needs a value")


def test_a_value_that_starts_with_dashes_is_taken_after_an_equals_sign(checkpoint, photo, capsys, monkeypatch):
    code, out, err = run(cli_args(checkpoint("v1_mqa"), photo, "--prompt=--max_tokens_to_generate"), capsys,
                         monkeypatch)
    assert code == 0, err


def test_the_memory_check_counts_the_cache_and_activations_not_only_the_weights(checkpoint, photo, capsys,
                                                                              monkeypatch):
    model, _ = utils.load_hf_model(checkpoint("v1_mqa"), "cpu", torch.float16, verbose=False)
    weights = sum(p.numel() for p in model.parameters()) * 2
    monkeypatch.setattr(utils, "available_memory", lambda device: weights + (64 << 20))
    assert_clean_failure(*run(cli_args(checkpoint("v1_mqa"), photo, "--dtype", "float16"), capsys, monkeypatch),
                         "GiB is available")


def test_working_memory_grows_with_the_batch_and_the_length_and_counts_a_28b_896_cache():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from make_checkpoint import build_config  # the published config's shapes

    config = PaliGemmaConfig.from_dict(build_config("paligemma2-28b-pt-896"))
    one = utils.working_memory(config, 1, 4096 + 260, torch.bfloat16)
    cache = 2 * 46 * 16 * 4608 * 128 * 2  # layers x (keys, values) x kv heads x positions (rounded) x head_dim
    assert one > cache > 1.5 * 2**30
    assert utils.working_memory(config, 4, 4096 + 260, torch.bfloat16) > 3 * one / 2
    longer = utils.working_memory(config, 1, 4096 + 260 + 2048, torch.bfloat16)
    assert longer - one >= 2 * 46 * 16 * 2048 * 128 * 2  # at least the cache of 2048 more positions


def test_stdout_that_cannot_be_written_is_an_error(checkpoint, photo):
    for output_format in ("text", "json"):
        result = subprocess.run(f'"{sys.executable}" "{ROOT / "inference.py"}" --model_path "{checkpoint("v1_mqa")}" '
                                f'--image_file_path "{photo}" --max_tokens_to_generate 3 --output_format '
                                f"{output_format} >&-", shell=True, capture_output=True, text=True, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and lines[-1].startswith("error: cannot write the answer to stdout"), lines
        assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


def stderr_until(process, marker: bytes, seconds: float = 120) -> bytes:
    """What the process writes on stderr until marker appears (or it exits, or the seconds pass)."""
    seen, deadline = b"", time.monotonic() + seconds
    while marker not in seen and time.monotonic() < deadline:
        if select.select([process.stderr], [], [], deadline - time.monotonic())[0]:
            chunk = os.read(process.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
    return seen


@pytest.mark.parametrize("moment", ["while importing", "as loading starts", "while answering"])
def test_ctrl_c_at_any_moment_exits_130_with_one_line(moment, checkpoint, photo):
    # The photo's greedy answer runs thousands of tokens, seconds, without a stop token: the answer is still
    # being written when the signal comes, on any machine.
    process = subprocess.Popen([sys.executable, str(ROOT / "inference.py"), *map(str, cli_args(
        checkpoint("v1_mqa"), photo, "--max_tokens_to_generate", 8000))], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    if moment == "while importing":
        time.sleep(0.3)
        seen = b""
    else:
        seen = stderr_until(process, b"loading weights" if moment == "as loading starts" else b"\nloaded ")
    assert process.poll() is None, seen
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    err = (seen + err).decode()
    assert process.returncode == 130 and out == b"", err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err


def test_a_bug_is_told_apart_from_a_user_error_and_debug_shows_its_traceback(checkpoint, photo, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("an internal mistake")

    monkeypatch.setattr("paligemma.generate.load_hf_model", broken)
    code, out, err = run(cli_args(checkpoint("v1_mqa"), photo), capsys, monkeypatch)
    assert_clean_failure(code, out, err, "unexpected ValueError: an internal mistake", "PALIGEMMA_DEBUG=1")
    monkeypatch.setenv("PALIGEMMA_DEBUG", "1")
    code, out, err = run(cli_args(checkpoint("v1_mqa"), photo), capsys, monkeypatch)
    assert code == 1 and "Traceback" in err and "an internal mistake" in err.strip().splitlines()[-1]


def test_debug_shows_the_traceback_of_a_user_error_too(tmp_path, photo, capsys, monkeypatch):
    monkeypatch.setenv("PALIGEMMA_DEBUG", "1")
    code, out, err = run(["--model_path", tmp_path / "nowhere", "--image_file_path", photo], capsys, monkeypatch)
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("flag, name", [("--output", "out.jsonl"), ("--annotate", "boxes.png")])
def test_a_folder_that_cannot_be_written_is_refused_before_loading(flag, name, checkpoint, photo, tmp_path, capsys,
                                                                   monkeypatch, no_loading):
    folder = tmp_path / "read-only"
    folder.mkdir()
    monkeypatch.setattr("inference.os.access", lambda path, mode: Path(path) != folder)  # as root, chmod is ignored
    code, out, err = run(cli_args(checkpoint("v1_mqa"), photo, flag, folder / name), capsys, monkeypatch)
    assert_clean_failure(code, out, err, f"{flag} {folder / name}: its folder is not writable")
