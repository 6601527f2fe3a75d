"""The streaming safetensors loader: exact values in every layout and dtype, a named error for each broken folder."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINTS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from paligemma import checkpoint as checkpoint_files
from paligemma import conversion, kernels
from paligemma.checkpoint import LoadError
from paligemma.modeling_gemma import GemmaRotaryEmbedding
from paligemma.utils import load_hf_model


def transformers_name(ours: str) -> str:
    """This model's parameter name -> the one in transformers 5's in-memory PaliGemma."""
    for old, new in [("vision_tower.vision_model.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("language_model.model.", "model.language_model.")]:
        if ours.startswith(old):
            return new + ours[len(old):]
    raise AssertionError(ours)


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def shard_of(folder: Path, key_part: str) -> tuple[Path, str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(k for k in index["weight_map"] if key_part in k)
    return folder / index["weight_map"][name], name


def edit_header(path: Path, edit):
    """Rewrite a shard's JSON header with edit(header) -> header, keeping its data bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = edit(json.loads(raw[8:8 + n]))
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def rewrite_tensors(folder: Path, key_part: str, edit):
    """Rewrite the shard holding key_part with edit(tensors) -> tensors, and the index to match."""
    path, name = shard_of(folder, key_part)
    tensors = edit(load_file(path), name)
    save_file(tensors, path)
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != path.name}
    index["weight_map"].update({k: path.name for k in tensors})
    index_file.write_text(json.dumps(index))


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_every_layout_loads_exactly_the_values_transformers_loads(name, checkpoint, reference):
    ref, _ = reference(name)
    model, _ = load_hf_model(checkpoint(name), "cpu", torch.float32, verbose=False)
    expected = ref.state_dict()
    for ours, p in model.named_parameters():
        assert torch.equal(p, expected[transformers_name(ours)]), ours
    assert len(dict(model.named_parameters())) == len({transformers_name(n) for n, _ in model.named_parameters()})


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled converter", "torch converter"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_values_equal_the_file_rounded_to_nearest(dtype, compiled, checkpoint, reference, monkeypatch):
    if not compiled:
        monkeypatch.setattr(conversion, "library", lambda: None)
    ref, _ = reference("v1_mqa")
    model, _ = load_hf_model(checkpoint("v1_mqa"), "cpu", dtype, verbose=False)
    expected = ref.state_dict()
    for ours, p in model.named_parameters():
        assert p.dtype == dtype
        assert torch.equal(p, expected[transformers_name(ours)].to(dtype)), ours


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled converter", "torch converter"])
def test_tensor_larger_than_the_read_piece_is_streamed_exactly(compiled, checkpoint, monkeypatch):
    if not compiled:
        monkeypatch.setattr(conversion, "library", lambda: None)
    whole, _ = load_hf_model(checkpoint("v1_mqa"), "cpu", torch.float16, verbose=False)
    monkeypatch.setattr(conversion, "PIECE_BYTES", 1000)  # smaller than most tensors, and not a multiple of their rows
    pieces, _ = load_hf_model(checkpoint("v1_mqa"), "cpu", torch.float16, verbose=False)
    for (name, a), (_, b) in zip(whole.named_parameters(), pieces.named_parameters()):
        assert torch.equal(a, b), name


def test_single_file_checkpoint_loads(tmp_path, checkpoint, reference):
    import tiny

    tiny.build_checkpoint(tmp_path, max_shard_size="1GB", **CHECKPOINTS["v1_mqa"])
    assert (tmp_path / "model.safetensors").is_file()
    model, _ = load_hf_model(tmp_path, "cpu", torch.float32, verbose=False)
    ref, _ = reference("v1_mqa")
    torch.testing.assert_close(model.multi_modal_projector.linear.weight,
                               ref.model.multi_modal_projector.linear.weight, atol=0, rtol=0)


def test_no_parameter_or_buffer_is_left_uninitialised(checkpoint):
    model, _ = load_hf_model(checkpoint("v2_gqa"), "cpu", torch.float16, verbose=False)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert not t.is_meta and t.device.type == "cpu", name
        assert torch.isfinite(t).all(), name
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()


def test_rope_frequencies_are_computed_afresh_so_logits_stay_finite(checkpoint, image):
    # The fork this descends from left inv_freq as uninitialised memory after leaving the meta device.
    from test_model import load_ours

    from paligemma.generate import prefill

    for _ in range(3):
        model, processor = load_ours(checkpoint("v1_mqa"), torch.float16)
        rope = model.language_model.model.rotary_emb
        assert rope.inv_freq.dtype == torch.float32
        assert torch.equal(rope.inv_freq, GemmaRotaryEmbedding(model.config.text_config).inv_freq)
        inputs = processor(["caption en"], [image])
        with torch.no_grad():
            logits = prefill(model, inputs, 16, all_logits=True)
        assert torch.isfinite(logits).all()


def test_stored_tied_head_and_unused_vision_head_are_skipped_with_a_warning(folder, capsys):
    def add_extras(tensors, _):
        tensors["language_model.lm_head.weight"] = torch.zeros(1600, 64)
        tensors["vision_tower.vision_model.head.probe"] = torch.zeros(1, 1, 32)
        return tensors

    rewrite_tensors(folder, "embed_tokens", add_extras)
    model, _ = load_hf_model(folder, "cpu", torch.float32, verbose=False)
    assert "skipping 2 unused stored tensors" in capsys.readouterr().err
    assert model.language_model.lm_head.weight.abs().sum() > 0  # the embedding, not the stored zeros


class Canary:
    """Unpickling this writes a file, so a test can prove that a loader never unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def drop_safetensors(folder: Path):
    for path in shards(folder):
        path.unlink()
    (folder / "model.safetensors.index.json").unlink()


def only_pickle(folder: Path):
    drop_safetensors(folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Canary(folder.parent / "unpickled")))


def truncate_last_shard(folder: Path):
    path = shards(folder)[-1]
    path.write_bytes(path.read_bytes()[:-100])


def header_length_past_end(folder: Path):
    path = shards(folder)[0]
    raw = path.read_bytes()
    path.write_bytes((len(raw) * 2).to_bytes(8, "little") + raw[8:])


def edit_first_tensor(folder: Path, **changes):
    def edit(header):
        name = next(k for k in header if k != "__metadata__")
        header[name].update(changes)
        return header

    edit_header(shards(folder)[0], edit)


def overlap_offsets(folder: Path):
    def edit(header):
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        a, b = header[names[0]], header[names[1]]
        size = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]
        return header

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    crowded = max(shards(folder), key=lambda p: list(index["weight_map"].values()).count(p.name))
    edit_header(crowded, edit)


def reshape_tensor(tensors, name):
    tensors[name] = torch.zeros(3, 5)
    return tensors


def add_unexpected(tensors, _):
    tensors["language_model.model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    return tensors


def drop_tensor(tensors, name):
    del tensors[name]
    return tensors


BROKEN_FOLDERS = {
    "missing folder": (lambda f: shutil.rmtree(f), "model folder does not exist"),
    "no config.json": (lambda f: (f / "config.json").unlink(), "config.json is missing"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    "unknown model type": (lambda f: (f / "config.json").write_text('{"model_type": "llava"}'),
                           "'llava', not 'paligemma'"),
    "no weights": (drop_safetensors, "no weights"),
    "only pickle weights": (only_pickle, "only pickle weights .*pytorch_model.bin.*never loaded"),
    "index names a missing shard": (lambda f: shards(f)[2].unlink(), "00003-of-00007.safetensors: shard named by"),
    "truncated shard": (truncate_last_shard, "00007-of-00007.safetensors: tensor .* outside the file"),
    "header not JSON": (lambda f: shards(f)[0].write_bytes((5).to_bytes(8, "little") + b"{oops" + bytes(64)),
                        "header is not valid JSON"),
    "header length past the end": (header_length_past_end, "header length .* runs past the end"),
    "offsets past the end": (lambda f: edit_first_tensor(f, data_offsets=[0, 10**9]), "outside the file"),
    "overlapping offsets": (overlap_offsets, "overlap"),
    "unknown dtype": (lambda f: edit_first_tensor(f, dtype="F12"), "unknown dtype 'F12'"),
    "tensor missing": (lambda f: rewrite_tensors(f, "layers.1.mlp.up_proj", drop_tensor),
                       "language_model.model.layers.1.mlp.up_proj.weight missing"),
    "tensor of wrong shape": (lambda f: rewrite_tensors(f, "layers.0.self_attn.q_proj", reshape_tensor),
                              "q_proj.weight' has shape \\[3, 5\\], expected \\[64, 64\\]"),
    "unexpected tensor": (lambda f: rewrite_tensors(f, "layers.0.mlp.down_proj", add_unexpected),
                          "unexpected tensor 'language_model.model.layers.0.mlp.extra_proj.weight'"),
    "no tokenizer files": (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer files"),
}


@pytest.mark.parametrize("case", BROKEN_FOLDERS)
def test_broken_folder_raises_an_error_naming_the_problem(case, folder):
    breaks, message = BROKEN_FOLDERS[case]
    breaks(folder)
    with pytest.raises(LoadError, match=message):
        load_hf_model(folder, "cpu", torch.float16, verbose=False)
    assert not (folder.parent / "unpickled").exists()


# Fuzzing the header parser: whatever the bytes, it returns entries that are consistent with the file, or raises
# LoadError; never another exception, never a hang, never an allocation beyond the file's size.
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8))
tensor_info = st.fixed_dictionaries(
    {"dtype": st.one_of(st.sampled_from(list(checkpoint_files.SAFETENSORS_DTYPES)), json_scalars),
     "shape": st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), json_scalars),
     "data_offsets": st.one_of(st.lists(st.integers(-5, 300), min_size=2, max_size=2),
                               st.lists(json_scalars, max_size=3), json_scalars)})
headers = st.dictionaries(st.text(max_size=12), st.one_of(tensor_info, json_scalars), max_size=6).map(
    lambda h: json.dumps(h).encode())
raw_headers = st.one_of(headers, st.binary(max_size=64), st.just(b"[" * 5000 + b"]" * 5000))


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=raw_headers, declared=st.one_of(st.none(), st.integers(0, 2**64 - 1)), data=st.binary(max_size=300))
def test_fuzzed_headers_never_crash_the_parser(tmp_path, header, declared, data):
    path = tmp_path / "fuzz.safetensors"
    length = len(header) if declared is None else declared
    path.write_bytes(length.to_bytes(8, "little") + header + data)
    try:
        entries = checkpoint_files.read_safetensors_header(path)
    except LoadError:
        return
    size, end = path.stat().st_size, 0
    for e in sorted(entries, key=lambda e: e.start):
        assert e.start >= max(end, 8 + length) and e.start + e.nbytes <= size
        end = e.start + e.nbytes


def test_a_shard_that_stops_being_readable_while_converting_is_named(folder, monkeypatch):
    """The compiled converter reads the file as it goes: a read that comes up short (the file shrank under the
    loader, or the disk failed) is an error naming the shard and the tensor, never a weight left half-written."""
    if kernels.library() is None:
        pytest.skip("no C compiler with AVX2 here")
    short = folder / "short.bin"
    short.write_bytes(b"\0" * 100)
    with open(short, "rb") as f:
        assert conversion.convert_shard(f.fileno(), [(0, torch.float32, torch.empty(1000, dtype=torch.float16))]) == (
            0, -2)
    real = conversion.convert_shard
    monkeypatch.setattr(conversion, "convert_shard", lambda fd, jobs: (real(fd, jobs), (0, -2))[1])
    with pytest.raises(LoadError, match=r"cannot be read while converting tensor '.*' \(did the file change"):
        load_hf_model(folder, "cpu", torch.float16, verbose=False)
