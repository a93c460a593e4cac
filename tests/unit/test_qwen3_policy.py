"""The tiny Qwen3-VL (dense and MoE) and the family rules (issue 28): what the folder must carry for
vLLM to agree with transformers, the MoE expert layout on disk, and the family resolution."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from deepeyes.chat import QWEN3_ADDED_TOKENS
from deepeyes.config import load_config
from deepeyes.family import FAMILIES, checkpoint_layout, family_of_config, folder_family
from deepeyes.policy import build_tiny_policy, load_policy, save_policy
from deepeyes.policy_family import check_family, model_family, resolve_family, zoom_box_scale


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    return {f: build_tiny_policy(root / f, family=f) for f in ("qwen3_vl", "qwen3_vl_moe")}


def test_the_folders_carry_what_vllm_reads(folders):
    for family, folder in folders.items():
        config = json.loads((folder / "config.json").read_text())
        text = config["text_config"]
        assert config["model_type"] == family and folder_family(folder).name == family
        assert text["rope_parameters"]["mrope_interleaved"] is True
        assert text["rope_parameters"]["mrope_section"] == [6, 5, 5] and text["head_dim"] == 32
        assert config["vision_config"]["patch_size"] == 16
        assert json.loads((folder / "preprocessor_config.json").read_text())["patch_size"] == 16
    assert json.loads((folders["qwen3_vl_moe"] / "config.json").read_text())["text_config"]["norm_topk_prob"] is True


def test_a_config_without_the_interleave_flag_is_refused_naming_it(folders):
    config = json.loads((folders["qwen3_vl"] / "config.json").read_text())
    del config["text_config"]["rope_parameters"]["mrope_interleaved"]
    with pytest.raises(ValueError, match="mrope_interleaved"):
        family_of_config(config)
    (folders["qwen3_vl"] / "config.json").write_text(json.dumps(config))  # as a folder would hold it
    try:
        with pytest.raises(ValueError, match="mrope_interleaved"):
            load_policy(folders["qwen3_vl"])
    finally:
        config["text_config"]["rope_parameters"]["mrope_interleaved"] = True
        (folders["qwen3_vl"] / "config.json").write_text(json.dumps(config))


def test_a_moe_config_without_norm_topk_prob_is_refused(folders):
    config = json.loads((folders["qwen3_vl_moe"] / "config.json").read_text())
    del config["text_config"]["norm_topk_prob"]
    with pytest.raises(ValueError, match="norm_topk_prob"):
        family_of_config(config)
    with pytest.raises(ValueError, match="not a supported policy family"):
        family_of_config({"model_type": "llava"})


def test_the_tokenizer_has_the_qwen3_added_tokens_in_order(folders):
    policy = load_policy(folders["qwen3_vl"])
    ids = [policy.tokenizer.convert_tokens_to_ids(t) for t, _ in QWEN3_ADDED_TOKENS]
    assert ids == sorted(ids) and ids[-4:] == list(range(ids[-5] + 1, ids[-5] + 5))  # the four new ones follow
    assert policy.tokenizer.convert_tokens_to_ids("<think>") == ids[-2]
    assert policy.model.config.image_token_id == policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_moe_experts_are_stored_in_the_released_layout_and_load_back_exactly(folders, tmp_path):
    policy = load_policy(folders["qwen3_vl_moe"])
    assert type(policy.model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    held = policy.model.state_dict()
    on_disk = load_file(str(folders["qwen3_vl_moe"] / "model.safetensors"))
    key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    # transformers holds (experts, 2 x 192, 128); the released checkpoints store (experts, 128, 2 x 192)
    assert tuple(held[key].shape) == (4, 384, 128) and tuple(on_disk[key].shape) == (4, 128, 384)
    assert torch.equal(on_disk[key], held[key].transpose(1, 2))
    assert torch.equal(on_disk["model.language_model.layers.0.mlp.experts.down_proj"],
                       held["model.language_model.layers.0.mlp.experts.down_proj"].transpose(1, 2))
    # an export of the loaded model (tokenizer and processor beside it) loads back identical
    for f in folders["qwen3_vl_moe"].iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, tmp_path / f.name)
    save_policy(policy.model, tmp_path)
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))[key], on_disk[key])
    again = load_policy(tmp_path)
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in held.items())
    # the dense family's tensors pass through untouched
    assert checkpoint_layout({key: held[key]}, "qwen3_vl")[key] is held[key]


def test_the_family_resolves_and_a_mismatch_is_refused(folders):
    tiny = load_config(overrides=["model.family=qwen3_vl_moe"])
    assert model_family(tiny.model) is FAMILIES["qwen3_vl_moe"] and zoom_box_scale(tiny) == "relative"
    resolved = resolve_family(load_config(overrides=[]))
    assert (resolved.model.family, resolved.tools.box_scale) == ("qwen2_5_vl", "absolute")
    pinned = resolve_family(load_config(overrides=["model.family=qwen3_vl", "tools.box_scale=absolute"]))
    assert pinned.tools.box_scale == "absolute"  # a user's explicit scale wins
    folder = load_config(overrides=[f"model.path={folders['qwen3_vl']}"])
    assert model_family(folder.model) is FAMILIES["qwen3_vl"]  # auto reads the folder's config.json
    check_family(folder, folders["qwen3_vl"])
    with pytest.raises(ValueError, match="model.family=qwen3_vl"):
        check_family(load_config(overrides=["model.family=qwen2_5_vl"]), folders["qwen3_vl"])
