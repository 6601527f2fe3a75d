"""config.json read as transformers reads it, on every field the model uses (explicit nulls, keys of the other
decoder, old and new spellings), and impossible values refused with the field named."""

import json
import shutil
from pathlib import Path

import pytest
import tiny
import torch
from test_model import PROMPT, load_ours, reference_inputs

from paligemma.checkpoint import LoadError, load_config
from paligemma.generate import prefill

VARIANTS = {  # checkpoint, and what to change in its text_config
    "PaliGemma 1 with Gemma 2 keys": ("v1_gqa", {"attn_logit_softcapping": 5.0, "final_logit_softcapping": 0.5,
                                                 "query_pre_attn_scalar": 7}),
    "null soft-caps": ("v2_gqa", {"attn_logit_softcapping": None, "final_logit_softcapping": None}),
    "no layer_types": ("v2_448style", {"layer_types": None}),
    "other layer_types": ("v2_448style", {"layer_types": ["full_attention", "sliding_attention", "full_attention"]}),
    "a legacy gelu": ("v1_mqa", {"hidden_act": "gelu"}),
    "4.x rope_theta": ("v2_gqa", {"rope_theta": 500.0, "rope_parameters": None}),
    "5.x rope_parameters": ("v1_mqa", {"rope_parameters": {"rope_type": "default", "rope_theta": 321.0}}),
}


def edited(folder: Path, tmp_path: Path, text_changes: dict = None, **top_changes) -> Path:
    copy = Path(shutil.copytree(folder, tmp_path / "ckpt"))
    config = json.loads((copy / "config.json").read_text())
    for key, value in (text_changes or {}).items():
        if value is None and key in ("layer_types", "rope_parameters"):
            config["text_config"].pop(key, None)
        else:
            config["text_config"][key] = value
    config.update(top_changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_transformers_for_every_config_variant(variant, checkpoint, tmp_path, image):
    name, changes = VARIANTS[variant]
    folder = edited(checkpoint(name), tmp_path, changes)
    ref, ref_processor = tiny.load_reference(folder)
    model, processor = load_ours(folder)
    with torch.no_grad():
        expected = ref(**reference_inputs(ref_processor, image)).logits
        logits = prefill(model, processor([PROMPT], [image]), 0, all_logits=True)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


IMPOSSIBLE = {  # (section, field, value): each must be refused, naming the field
    ("text_config", "hidden_size", 0), ("text_config", "hidden_size", -64), ("text_config", "hidden_size", "64"),
    ("text_config", "hidden_size", 64.5), ("text_config", "num_hidden_layers", 0),
    ("text_config", "num_attention_heads", -1), ("text_config", "num_key_value_heads", "1"),
    ("text_config", "head_dim", 0), ("text_config", "head_dim", 15), ("text_config", "intermediate_size", None),
    ("text_config", "vocab_size", 0), ("text_config", "max_position_embeddings", -1),
    ("text_config", "rms_norm_eps", "1e-6"), ("text_config", "rms_norm_eps", -1.0),
    ("text_config", "layer_types", "sliding_attention"), ("vision_config", "hidden_size", 0),
    ("vision_config", "patch_size", -14), ("vision_config", "image_size", "28"), ("vision_config", "num_channels", 0),
    ("vision_config", "layer_norm_eps", "x"), ("vision_config", "num_attention_heads", 0),
    ("text_config", "sliding_window", None),  # with layers that slide: transformers fails on it too
    (None, "image_token_index", "1520"), (None, "image_token_index", -1), (None, "projection_dim", 0),
}


@pytest.mark.parametrize("section, field, value", sorted(IMPOSSIBLE, key=str))
def test_an_impossible_config_value_is_refused_naming_the_field(section, field, value, checkpoint, tmp_path):
    copy = Path(shutil.copytree(checkpoint("v2_gqa"), tmp_path / "ckpt"))
    config = json.loads((copy / "config.json").read_text())
    (config if section is None else config[section])[field] = value
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=field):
        load_config(copy)
