"""The right dtype by default, and values that are not finite stopped with one line instead of answered: in the
weights (checked while loading, in every loader path) and in the model's logits (checked at every step)."""

import json
import shutil
from pathlib import Path

import pytest
import tiny
import torch
from conftest import CHECKPOINTS, random_image
from safetensors.torch import load_file, save_file
from test_hostile_input import cli_args, run

from paligemma import kernels, utils
from paligemma.checkpoint import LoadError


def shard_with(folder: Path, part: str) -> tuple[Path, str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = next(k for k in index["weight_map"] if part in k)
    return folder / index["weight_map"][key], key


def set_value(folder: Path, part: str, value: float, dtype=None, everywhere: bool = False):
    """Put value into the first element (or every element) of the tensor whose key holds part (kept in the file's
    dtype unless given)."""
    path, key = shard_with(folder, part)
    tensors = load_file(path)
    tensor = tensors[key].clone().to(dtype or tensors[key].dtype)
    tensor.view(-1)[:None if everywhere else 1] = value
    tensors[key] = tensor
    save_file(tensors, path, metadata={"format": "pt"})
    return key


@pytest.fixture(scope="module")
def bfloat16_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    tiny.build_checkpoint(path, dtype=torch.bfloat16, **CHECKPOINTS["v2_gqa"])
    return path


LOADER_PATHS = {"compiled converter": {}, "torch converter": {"library": lambda: None}}


@pytest.mark.parametrize("path", LOADER_PATHS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused_naming_the_tensor(value, path, folder, monkeypatch):
    for attribute, replacement in LOADER_PATHS[path].items():
        monkeypatch.setattr(kernels, attribute, replacement)
    key = set_value(folder, "layers.1.mlp.up_proj", value)
    for dtype in (torch.float16, torch.float32):
        with pytest.raises(LoadError, match=f"{key}' has values that are not finite"):
            utils.load_hf_model(folder, "cpu", dtype, verbose=False)


@pytest.mark.parametrize("path", LOADER_PATHS)
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_weights_that_are_not_finite_are_refused_when_quantized_too(quantize, path, folder, monkeypatch):
    for attribute, replacement in LOADER_PATHS[path].items():
        monkeypatch.setattr(kernels, attribute, replacement)
    key = set_value(folder, "layers.1.mlp.up_proj", float("nan"))
    with pytest.raises(LoadError, match=f"{key}' has values that are not finite as {quantize}"):
        utils.load_hf_model(folder, "cpu", torch.float16, verbose=False, quantize=quantize)


@pytest.mark.parametrize("path", LOADER_PATHS)
def test_a_float32_weight_beyond_float16_range_is_refused_as_float16_and_loads_as_bfloat16(path, folder,
                                                                                           monkeypatch):
    for attribute, replacement in LOADER_PATHS[path].items():
        monkeypatch.setattr(kernels, attribute, replacement)
    key = set_value(folder, "layers.0.self_attn.o_proj", 1e6)
    with pytest.raises(LoadError, match=f"{key}' has values that are not finite as float16.*beyond float16's range"):
        utils.load_hf_model(folder, "cpu", torch.float16, verbose=False)
    model, _ = utils.load_hf_model(folder, "cpu", torch.bfloat16, verbose=False)
    assert model.language_model.model.layers[0].self_attn.o_proj.weight.view(-1)[0].item() == pytest.approx(1e6, 0.01)


def test_weights_used_in_place_are_checked_too(bfloat16_folder, tmp_path):
    folder = Path(shutil.copytree(bfloat16_folder, tmp_path / "ckpt"))
    key = set_value(folder, "layers.2.mlp.down_proj", float("nan"))
    with pytest.raises(LoadError, match=f"{key}' has values that are not finite as bfloat16"):
        utils.load_hf_model(folder, "cpu", torch.bfloat16, verbose=False)


def test_the_default_dtype_is_the_checkpoints_own_half_precision_used_in_place(bfloat16_folder, capsys):
    model, _ = utils.load_hf_model(bfloat16_folder, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert "used in place from the files" in capsys.readouterr().err


@pytest.mark.parametrize("name, expected", [("v1_mqa", torch.float16), ("v2_gqa", torch.bfloat16)])
def test_a_float32_checkpoint_defaults_to_float16_for_paligemma_1_and_bfloat16_for_paligemma_2(name, expected,
                                                                                              checkpoint):
    model, _ = utils.load_hf_model(checkpoint(name), "cpu", verbose=False)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_float16_on_a_gemma2_decoder_warns(checkpoint, capsys):
    utils.load_hf_model(checkpoint("v2_gqa"), "cpu", torch.float16)
    assert "trained in bfloat16 and can overflow float16" in capsys.readouterr().err


def test_logits_that_overflow_stop_the_run_naming_the_dtype_and_the_fix(folder, tmp_path, capsys, monkeypatch):
    # Finite in float16; the final norm then overflows it (a prompt in bfloat16 or float32 does not: the first decode
    # step does)
    set_value(folder, "language_model.model.norm", 60000.0, everywhere=True)
    photo = tmp_path / "photo.png"
    random_image(30, 20).save(photo)
    code, out, err = run(cli_args(folder, photo, "--dtype", "float16", "--output_format", "json"), capsys,
                         monkeypatch)
    last = err.strip().splitlines()[-1]  # after the loading lines: the failure comes while answering
    assert code == 1 and out == "" and "Traceback" not in err
    assert last.startswith("error: the model's values overflowed float16") and "--dtype (bfloat16" in last
    code, out, err = run(cli_args(folder, photo, "--dtype", "float32", "--output_format", "json"), capsys,
                         monkeypatch)
    assert code == 0 and "NaN" not in out and "Infinity" not in out
