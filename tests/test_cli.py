"""The command line end to end, in a subprocess, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, random_image


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "inference.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "odd.png"
    random_image(45, 67, seed=3).save(path)
    return path


def transformers_greedy(reference, name, image_file, prompt, max_new_tokens):
    """transformers' greedy answer, told as the command line is never to produce the ids that name no token (the
    embedding's padding rows), and the log-probabilities of its tokens under the model's own logits."""
    from PIL import Image

    model, processor = reference(name)
    inputs = processor(images=Image.open(image_file), text=prompt, return_tensors="pt")
    inputs.pop("labels")
    padding = list(range(len(processor.tokenizer), model.config.text_config.vocab_size))
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, suppress_tokens=padding)
    ids = out.sequences[0, inputs["input_ids"].shape[1]:]
    logprobs = [torch.log_softmax(s[0].float(), -1)[i].item() for s, i in zip(out.logits, ids)]
    return ids.tolist(), processor.decode(ids, skip_special_tokens=True), logprobs


@pytest.mark.parametrize("name", ["v1_mqa", "v2_gqa"])
def test_json_output_matches_transformers_greedy_generate(name, checkpoint, reference, image_file):
    ids, text, logprobs = transformers_greedy(reference, name, image_file, "answer en what is it?", 16)
    result = run_cli("--model_path", checkpoint(name), "--prompt", "answer en what is it?", "--image_file_path",
                     image_file, "--max_tokens_to_generate", 16, "--dtype", "float32", "--output_format", "json",
                     "--do_sample", "False", "--only_cpu", "True")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    answer = json.loads(lines[0])
    assert answer["token_ids"] == ids
    assert answer["text"] == text
    assert answer["logprobs"] == pytest.approx(logprobs, abs=1e-4)


def test_text_output_is_the_answer_alone_with_progress_on_stderr(checkpoint, reference, image_file):
    _, text, _ = transformers_greedy(reference, "v1_gqa", image_file, "caption en", 10)
    result = run_cli("--model_path", checkpoint("v1_gqa"), "--image_file_path", image_file,
                     "--max_tokens_to_generate", 10, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert result.stdout == text + "\n"
    assert "loading weights" in result.stderr and "loaded" in result.stderr


def test_launch_inference_sh_answers_as_the_command_line_given_the_same_settings(checkpoint, image_file):
    settings = {"MODEL_PATH": checkpoint("v1_mqa"), "PROMPT": "answer en what?", "IMAGE_FILE_PATH": image_file,
                "MAX_TOKENS_TO_GENERATE": 5, "DO_SAMPLE": "True", "TEMPERATURE": 1.3, "TOP_P": 0.97, "SEED": 11,
                "ONLY_CPU": "True", "QUANTIZE": "int8", "OUTPUT_FORMAT": "json", "PYTHON": sys.executable}
    script = subprocess.run(["bash", str(ROOT / "launch_inference.sh")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **{k: str(v) for k, v in settings.items()}})
    assert script.returncode == 0, script.stderr
    assert "int8 in the decoder" in script.stderr
    direct = run_cli("--model_path", checkpoint("v1_mqa"), "--prompt", "answer en what?", "--image_file_path",
                     image_file, "--max_tokens_to_generate", 5, "--do_sample", "True", "--temperature", 1.3,
                     "--top_p", 0.97, "--seed", 11, "--only_cpu", "True", "--quantize", "int8",
                     "--output_format", "json")
    assert direct.returncode == 0, direct.stderr
    assert json.loads(script.stdout)["token_ids"] == json.loads(direct.stdout)["token_ids"]


def test_sampling_with_a_seed_is_reproducible(checkpoint, image_file):
    args = ["--model_path", checkpoint("v1_mqa"), "--image_file_path", image_file, "--do_sample", "True",
            "--temperature", 1.5, "--top_p", 0.95, "--seed", 7, "--output_format", "json"]
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    answers = [json.loads(r.stdout) for r in (first, second, run_cli(*args[:-3], 8, "--output_format", "json"))]
    assert answers[0]["token_ids"] == answers[1]["token_ids"] and answers[0]["text"] == answers[1]["text"]
    assert answers[2]["token_ids"] != answers[0]["token_ids"]


def test_missing_model_folder_fails_with_one_line_and_no_traceback(tmp_path, image_file):
    result = run_cli("--model_path", tmp_path / "nowhere", "--image_file_path", image_file)
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: model folder does not exist"]


def test_generation_stops_at_any_stop_token_generation_config_names(checkpoint, reference, image_file, tmp_path):
    import shutil

    folder = Path(shutil.copytree(checkpoint("v2_gqa"), tmp_path / "ckpt"))
    free, _, _ = transformers_greedy(reference, "v2_gqa", image_file, "caption en", 12)
    stop = free[5]  # PaliGemma 2 configs name <eos> and <end_of_turn>; here <eos> and a token greedy reaches
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, stop],
                                                                "pad_token_id": 0}))
    result = run_cli("--model_path", folder, "--image_file_path", image_file, "--max_tokens_to_generate", 12,
                     "--dtype", "float32", "--output_format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["token_ids"] == free[:free.index(stop) + 1]
