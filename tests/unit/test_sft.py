"""Cold-start SFT data: the loss mask covers exactly what the policy would sample."""

from __future__ import annotations

from PIL import Image

from deepeyes.chat import SYSTEM_PROMPT
from deepeyes.config import load_config
from deepeyes.policy import load_policy, merged_patches
from services.tools.registry import tool_schemas
from trainer.sft import frame_box, tool_conversation
from trainer.supervised import conversation_tokens


def test_frame_box_scales_and_grows():
    # 1000x500 original -> 200x100 frame (x0.2); box 100..150 x 50..75 -> 20..30 x 10..15, grown by
    # 25% of its 10x5 size on each side -> 17.5..32.5 x 8.75..16.25 -> rounded 18, 9, 32, 16
    assert frame_box([100, 50, 150, 75], (1000, 500), (200, 100)) == [18, 9, 32, 16]


def test_mask_is_exactly_the_assistant_turns(tiny_policy_dir):
    cfg = load_config()
    policy = load_policy(tiny_policy_dir)

    class Row:
        images = [Image.new("RGB", (1200, 900), (30, 60, 90))]
        image_sizes = [(1200, 900)]
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which word?"}]}]
        ground_truth = "BOAT"
        extra = {"target_bbox": [600, 450, 630, 470]}

    messages, images = tool_conversation(Row(), cfg)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert len(images) == 2  # the frame, then the real crop the zoom tool returned
    ids, mask, pv, grid = conversation_tokens(policy, messages, images, tool_schemas(cfg.tools.enabled))
    assert len(ids) == len(mask)
    assert ids.count(policy.image_pad_id) == sum(merged_patches(g) for g in grid.tolist())
    # the masked spans, decoded, are the two assistant turns through <|im_end|>, nothing else
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    texts = [policy.tokenizer.decode(s) for s in spans]
    assert len(texts) == 2
    assert texts[0].startswith("<think>") and '"name": "image_zoom_in_tool"' in texts[0]
    assert texts[0].endswith("</tool_call><|im_end|>")
    assert texts[1] == "<think>Now the detail is clear.</think><answer>BOAT</answer><|im_end|>"
    assert policy.image_pad_id not in [t for s in spans for t in s]
