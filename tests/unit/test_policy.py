"""The embedded tiny Qwen2.5-VL: deterministic build, real token layout, a working forward."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from deepeyes.chat import CHAT_TEMPLATE, QWEN_ADDED_TOKENS
from deepeyes.policy import (build_tiny_policy, encode_text_with_images, load_policy, merged_patches,
                             process_images, resize_for_model)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_build_is_byte_identical(tmp_path):
    a = build_tiny_policy(tmp_path / "a")
    b = build_tiny_policy(tmp_path / "b")
    da, db = _digest(a), _digest(b)
    assert set(da) >= {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                       "chat_template.jinja", "processor_config.json"}
    assert da == db
    c = build_tiny_policy(tmp_path / "c", seed=1)
    assert _digest(c)["model.safetensors"] != da["model.safetensors"]


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
    return load_policy(tiny_policy_dir)


def test_added_tokens_in_real_order(policy):
    tok = policy.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t, _ in QWEN_ADDED_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # contiguous, in Qwen's order
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    cfg = policy.model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.text_config.vocab_size >= len(tok)
    # <tool_call> is an added token but not special: it survives skip_special_tokens decoding.
    call_id = tok.convert_tokens_to_ids("<tool_call>")
    assert tok.decode([call_id], skip_special_tokens=True) == "<tool_call>"
    n_params = sum(p.numel() for p in policy.model.parameters())
    assert 0.5e6 < n_params < 2e6


def test_chat_template_two_turn_tool_conversation_golden(policy):
    tools = [{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
        {"role": "assistant", "content": "<think>look</think>",
         "tool_calls": [{"type": "function", "function": {"name": "zoom", "arguments": {"bbox_2d": [1, 2, 3, 4]}}}]},
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "Zoomed in on [1, 2, 3, 4]."}]},
        {"role": "assistant", "content": "<answer>A</answer>"},
    ]
    text = policy.tokenizer.apply_chat_template(messages, tools=tools, chat_template=CHAT_TEMPLATE, tokenize=False)
    # Written out by hand from the Qwen2.5 / Qwen2.5-VL layout.
    expected = (
        "<|im_start|>system\nSYS\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n"
        "<|im_start|>assistant\n<think>look</think>\n<tool_call>\n"
        '{"name": "zoom", "arguments": {"bbox_2d": [1, 2, 3, 4]}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>"
        "Zoomed in on [1, 2, 3, 4].\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<answer>A</answer><|im_end|>\n"
    )
    assert text == expected
    # and the folder's own template is the same one (the 7B path passes it explicitly)
    assert policy.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False) == expected


def test_tokenizer_round_trips_text(policy):
    s = 'Zoom {"bbox_2d": [12.5, 7, 300, 41]} — é ü 漢字 <answer>C</answer>'
    ids = policy.tokenizer(s, add_special_tokens=False)["input_ids"]
    assert policy.tokenizer.decode(ids) == s


def test_forward_and_generate_with_one_image(policy):
    img = resize_for_model(Image.new("RGB", (640, 480), (200, 30, 30)), 3136, 50176)
    w, h = img.size
    assert w % 28 == 0 and h % 28 == 0 and 3136 <= w * h <= 50176
    pv, grid = process_images(policy, [img])
    assert grid.tolist() == [[1, h // 14, w // 14]]
    text = policy.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
        chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    ids = encode_text_with_images(policy, text, grid.tolist())
    assert ids.count(policy.image_pad_id) == merged_patches(grid[0]) == (h // 28) * (w // 28)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = policy.model(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=pv, image_grid_thw=grid)
    assert out.logits.shape == (1, len(ids), policy.model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    gen = policy.model.generate(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=pv,
                                image_grid_thw=grid, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > len(ids)


def test_load_policy_names_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path"):
        load_policy(tmp_path / "nothing")


def test_portable_processor_class_name(tiny_policy_dir):
    assert json.loads((tiny_policy_dir / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
