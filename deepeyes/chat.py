"""The conversation format: Qwen2.5 ChatML with Hermes-style tools and Qwen2.5-VL image slots.

This module is the one place that knows how a conversation becomes text. The tiny model's folder
ships this template, and every renderer (rollout, trainer, SFT data) passes it explicitly, so a 7B
folder whose own template differs still sees the exact same layout.

Layout (what the reference Qwen2.5-VL template produces):
- the system turn carries the "# Tools" block: one JSON schema per line inside <tools></tools>;
- an assistant tool call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
- an image is `<|vision_start|><|image_pad|><|vision_end|>` (the pad is expanded to one token per
  merged 28x28 patch when tokenizing);
- consecutive `tool` messages become one `user` turn of `<tool_response>` blocks, image first.
"""

from __future__ import annotations

import json
from typing import Any

SYSTEM_PROMPT = (
    "You are a careful visual assistant. Look at the image, think inside <think></think>, and "
    "when a detail is too small to read, zoom in with image_zoom_in_tool by giving the bounding "
    "box [x1, y1, x2, y2] of the region in pixels of the image you see. Give the final answer "
    "inside <answer></answer>."
)

# The same for a policy that writes boxes 0-1000 relative (Qwen3-VL: tools.box_scale=relative).
SYSTEM_PROMPT_RELATIVE = SYSTEM_PROMPT.replace(
    "in pixels of the image you see", "on a 0-1000 scale of the image's width and height")


# The system turn of rows whose tools include the python tool (the DeepEyesV2 recipe; our wording
# of what its prompt tells the model: the code format, image_1, the search tools, the answer tags).
SYSTEM_PROMPT_AGENTIC = (
    "You are a careful visual assistant that can run code and search. Think inside <think></think>. "
    "To look closer at the image, write Python inside <code>\n```python\n...\n```\n</code>: the image is "
    "already loaded as the PIL image image_1, variables persist between your code calls, and what you "
    "print and the figures you plt.show() come back to you. To find facts you do not know, call the "
    "search tool (or image_search, once, to search with the image). Give the final answer inside "
    "<answer></answer>."
)


def system_prompt_for(box_scale: str) -> str:
    return SYSTEM_PROMPT_RELATIVE if box_scale == "relative" else SYSTEM_PROMPT


def with_box_scale(messages: list[dict[str, Any]], box_scale: str) -> list[dict[str, Any]]:
    """The messages with the project's system turn worded for `box_scale` (others left alone)."""
    if box_scale != "relative":
        return messages
    return [dict(m, content=SYSTEM_PROMPT_RELATIVE) if m.get("role") == "system" and m.get("content") == SYSTEM_PROMPT
            else m for m in messages]


IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

# The system turn's "# Tools" block (Hermes/Qwen2.5 wording, word for word): the tool schemas
# stand between the two parts, one JSON line each. The template below embeds both parts; the tiny
# tokenizer's corpus (deepeyes.policy) reads them too.
TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and "
              "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
              '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')

# The schema of `image_zoom_in_tool` (docs/design.md, "Chat format"), the tool SYSTEM_PROMPT tells the model to
# use. It lives here, not in services/tools/zoom.py, because deepeyes is the base every package
# imports and imports none of them: the tiny tokenizer (deepeyes.policy) is trained on this text,
# and the tool (services.tools.zoom) registers it.
ZOOM_IN_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "image_zoom_in_tool",
        "description": ("Zoom in on a specific region of an image by cropping it based on a bounding "
                        "box (bbox) and an optional object label."),
        "parameters": {
            "type": "object",
            "properties": {
                "bbox_2d": {
                    "type": "array",
                    "items": {"type": "number"},
                    "minItems": 4,
                    "maxItems": 4,
                    "description": ("The bounding box of the region to zoom in, as [x1, y1, x2, y2], "
                                    "where (x1, y1) is the top-left corner and (x2, y2) is the "
                                    "bottom-right corner."),
                },
                "label": {
                    "type": "string",
                    "description": "The name or label of the object in the specified bounding box (optional).",
                },
            },
            "required": ["bbox_2d"],
        },
    },
}

# Jinja template (transformers' apply_chat_template). Content may be a string or a list of
# {"type": "image"} / {"type": "text", "text": ...} parts. TOOLS_HEAD / TOOLS_TAIL are filled in
# below as Jinja string literals (a JSON string is one).
_TEMPLATE = r"""{%- macro render(content) -%}
{%- if content is string -%}{{- content -}}
{%- else -%}{%- for part in content -%}
{%- if part.type == 'image' or 'image' in part -%}<|vision_start|><|image_pad|><|vision_end|>
{%- elif part.type == 'text' -%}{{- part.text -}}{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- render(messages[0].content) }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
{{- TOOLS_HEAD }}
{%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
{{- TOOLS_TAIL }}
{%- elif messages[0].role != 'system' %}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first and tools %}
{%- elif message.role == 'user' or message.role == 'system' or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\n' + render(message.content) + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\n' + render(message.content) }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\n<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + render(message.content) + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""
CHAT_TEMPLATE = (_TEMPLATE.replace("TOOLS_HEAD", json.dumps("\n\n" + TOOLS_HEAD))
                 .replace("TOOLS_TAIL", json.dumps(TOOLS_TAIL + "<|im_end|>\n")))

# The Qwen2.5 added tokens, in their real order (ids follow the base vocabulary contiguously).
# `<tool_call>` and `</tool_call>` are added but not "special" in Qwen2.5: they survive decoding.
QWEN_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
# Qwen3 (and Qwen3-VL) add four after these, in this order; none is special.
QWEN3_ADDED_TOKENS: list[tuple[str, bool]] = QWEN_ADDED_TOKENS + [
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]


# What the cold-start SFT conversations think (trainer.sft); the tiny tokenizer learns these words.
THOUGHT_DIRECT = "I can read this directly."
THOUGHT_ZOOM = "The detail is too small here. I zoom in on it."
THOUGHT_ANSWER = "Now the detail is clear."
# Where the question names the target's place (the zoom task), the zoom thought says it first: the
# box is then written right after the words that decide it.
THOUGHT_ZOOM_AT = "The target is in the {place} quarter. I zoom in on it."
