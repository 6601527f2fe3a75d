"""The package as users install and call it: a wheel built from this folder, installed into a fresh virtual
environment, run from another folder; Hub ids found in a Hugging Face cache laid out as the real one; and the Python
API (paligemma.load), whose records are the command line's."""

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tiny
from conftest import ROOT, random_image
from PIL import Image
from test_hostile_input import run

from paligemma.checkpoint import LoadError, model_folder

COMMIT_MAIN, COMMIT_V2 = "0123456789abcdef0123456789abcdef01234567", "89abcdef0123456789abcdef0123456789abcdef"


def cli(command: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, command)), capture_output=True, text=True, cwd=cwd, timeout=300)


def answer(done: subprocess.CompletedProcess | tuple[int, str, str]) -> dict:
    """The JSON record, less its timings, of a command line run in a subprocess or in this process (run)."""
    code, out, err = (done.returncode, done.stdout, done.stderr) if hasattr(done, "returncode") else done
    assert code == 0, err
    record = json.loads(out)
    del record["timings"]
    return record


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint("v1_mqa")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "photo.png"
    random_image(48, 40, seed=9).save(path)
    return path


def test_the_wheel_holds_one_package_and_its_commands_answer_as_the_clone_from_another_folder(
        folder, image, tmp_path, capsys, monkeypatch):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert all(n.startswith(("paligemma/", "pytorch_paligemma-")) for n in names), names  # nothing else on top
    assert {"paligemma/__init__.py", "paligemma/inference.py", "paligemma/gemv.c", "paligemma/simd.h",
            "paligemma/web/index.html", "paligemma/test_images/cat.jpg"} <= set(names)
    assert "paligemma/paligemma.py" not in names and not any(n.startswith("paligemma/tests/") for n in names)

    venv = tmp_path / "venv"  # torch and the rest come from this Python's packages, not from the network
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    installed = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = cli([venv / "bin" / "python", "-c", "import paligemma.inference as m; print(m.__file__)"], cwd=elsewhere)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr  # the installed copy, not the clone
    for command in ("paligemma", "paligemma-server"):
        helped = cli([venv / "bin" / command, "--help"], cwd=elsewhere)
        assert helped.returncode == 0 and "MODEL_PATH" in helped.stdout + helped.stderr, helped.stderr
    args = ("--model_path", folder, "--image_file_path", image, "--prompt", "detect cat", "--max_tokens_to_generate",
            8, "--output_format", "json")
    assert answer(cli([venv / "bin" / "paligemma", *args], cwd=elsewhere)) == answer(
        run(args, capsys, monkeypatch))


def test_hub_ids_resolve_offline_to_their_revisions_snapshot_and_a_missing_one_says_how_to_get_it(
        folder, image, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "hub"
    main = tiny.hub_cache(folder, cache, COMMIT_MAIN)
    v2 = tiny.hub_cache(folder, cache, COMMIT_V2, revision="v2")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert model_folder("google/paligemma-tiny") == main
    assert model_folder("google/paligemma-tiny@v2") == v2
    assert model_folder(f"google/paligemma-tiny@{COMMIT_V2}") == v2
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # HF_HOME/hub
    assert model_folder("google/paligemma-tiny") == main
    assert model_folder(str(folder)) == folder  # a folder is a folder, whatever its name looks like
    for missing, command in (("google/paligemma-3b-mix-224", "hf download google/paligemma-3b-mix-224"),
                             ("google/paligemma-tiny@v3", "hf download google/paligemma-tiny --revision v3")):
        with pytest.raises(LoadError, match=f"download it with: {command} "):
            model_folder(missing)

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # offline by itself
    args = ("--image_file_path", image, "--prompt", "caption en", "--max_tokens_to_generate", 6, "--output_format",
            "json")
    assert answer(run(("--model_path", "google/paligemma-tiny@v2", *args), capsys, monkeypatch)) == answer(
        run(("--model_path", folder, *args), capsys, monkeypatch))
    code, out, err = run(("--model_path", "google/paligemma-3b-mix-224", *args), capsys, monkeypatch)
    assert code == 1 and out == "" and err.count("\n") == 1 and "hf download google/paligemma-3b-mix-224" in err, err


def test_the_api_answers_streams_and_batches_the_command_lines_records(folder, image, capsys, monkeypatch):
    import paligemma

    model = paligemma.load(folder, batch_size=2)
    for prompt in ("detect cat", "caption en"):
        expected = answer(run(("--model_path", folder, "--image_file_path", image, "--prompt", prompt,
                               "--max_tokens_to_generate", 8, "--output_format", "json"), capsys, monkeypatch))
        for given in (image, str(image), image.read_bytes(), Image.open(image)):
            got = model.answer(given, prompt, max_tokens=8)
            assert set(got.pop("timings")) >= {"first_token_s", "decode_s", "decode_tokens"} and got == expected
        pieces = list(iter_with_return(model.stream(image, prompt, max_tokens=8)))
        assert "".join(pieces[:-1]) == expected["text"] and {**pieces[-1], "timings": None} == {
            **expected, "timings": None}
    sampled = answer(run(("--model_path", folder, "--image_file_path", image, "--max_tokens_to_generate", 8,
                          "--output_format", "json", "--do_sample", "True", "--temperature", 1.5, "--seed", 3),
                         capsys, monkeypatch))
    got = model.answer(image, max_tokens=8, temperature=1.5, top_p=0.9, seed=3)
    assert got["token_ids"] == sampled["token_ids"]  # the command line's --top_p 0.9 by default
    other = random_image(30, 50, seed=4)
    batch = model.answer_batch([image, other, image], ["caption en", "detect cat", "detect cat"], max_tokens=8)
    alone = [model.answer(i, p, max_tokens=8) for i, p in ((image, "caption en"), (other, "detect cat"),
                                                          (image, "detect cat"))]
    for together, apart in zip(batch, alone):  # rows padded together: the same tokens, logprobs within float16's
        assert together["token_ids"] == apart["token_ids"] and together["text"] == apart["text"]
        assert together["logprobs"] == pytest.approx(apart["logprobs"], abs=0.02)
    buffer = io.BytesIO(b"not an image")
    with pytest.raises(paligemma.api.UserError, match="not an image"):
        model.answer(buffer.getvalue())


def iter_with_return(generator):
    """A generator's items, then its return value."""
    value = yield from generator
    yield value
