"""What the model wrote -> the calls to run, and a result -> the message that returns it
(docs/design.md, "Chat format" and "Tool plugins").

Two call formats, both read from the registry (deepeyes/toolspec.py):
- `tool_call`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, DeepEyes);
- `code`: `<code>```python ...```</code>` (DeepEyesV2's python tool; the fence is optional here,
  the body is the code either way).
Calls come back in the order they appear in the text. Everything here is pure and never raises on
model text.
"""

from __future__ import annotations

import json
import re
from typing import Any

from PIL import Image

from deepeyes.toolspec import ToolSpec

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
CODE_RE = re.compile(r"<code>(.*?)</code>", re.DOTALL)
FENCE_RE = re.compile(r"```(?:python|py)?[ \t]*\n?(.*?)```", re.DOTALL)
MAX_ARGUMENT_DEPTH = 32  # a real call nests 2 levels; ~500 levels already break pickling the trajectory
CALL_SHAPE = 'Write <tool_call>{"name": "...", "arguments": {...}}</tool_call>.'

Call = tuple[str, "dict[str, Any] | None", "str | None"]  # (name, arguments, error or None)


def _load_call_json(text: str) -> tuple[Any, str | None]:
    """json.loads that turns every failure into an error text (docs/design.md, "Chat format": an error turn).

    Besides JSONDecodeError, json raises ValueError for an integer of more than 4,300 digits and
    RecursionError for deep nesting; text the model wrote must never fail the episode.
    """
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"Error: the tool call is not valid JSON ({e.msg} at char {e.pos}). {CALL_SHAPE}"
    except RecursionError:
        return None, f"Error: the tool call JSON nests too deeply. {CALL_SHAPE}"
    except ValueError:  # int of too many digits (sys.get_int_max_str_digits)
        return None, f"Error: the tool call JSON holds a number with too many digits. {CALL_SHAPE}"


def _nesting_depth(obj: Any) -> int:
    """Levels of dict/list nesting (iterative: the object may be as deep as json allows)."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            depth = max(depth, d)
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return depth


def _json_call(body: str, enabled: list[str]) -> Call:
    obj, error = _load_call_json(body.strip())
    if error is not None:
        return "", None, error
    name = obj.get("name") if isinstance(obj, dict) else None
    args = obj.get("arguments", {}) if isinstance(obj, dict) else None
    if isinstance(args, str):  # some models emit arguments as a JSON string
        args, error = _load_call_json(args)
    name = name if isinstance(name, str) else ""
    if args is None and isinstance(obj, dict) and "arguments" in obj and error is None:
        args = {}  # {"name": "image_search", "arguments": null}: a call without arguments
    if error is not None:
        return name, None, error.replace("the tool call", "the tool call's arguments", 1)
    if not name or not isinstance(args, dict):
        return name, None, 'Error: a tool call needs {"name": <string>, "arguments": <object>}.'
    if _nesting_depth(args) > MAX_ARGUMENT_DEPTH:
        return name, None, f"Error: the tool call's arguments nest more than {MAX_ARGUMENT_DEPTH} levels. {CALL_SHAPE}"
    if name not in enabled:
        return name, args, f"Error: unknown tool '{name}'. Available tools: {', '.join(enabled)}."
    return name, args, None


def _code_call(body: str, tool: str) -> Call:
    fenced = FENCE_RE.findall(body)
    code = (fenced[-1] if fenced else body).strip("\n")
    if not code.strip():
        return tool, None, "Error: the <code> block holds no code. Write <code>\n```python\n...\n```\n</code>."
    return tool, {"code": code}, None


def parse_calls(text: str, specs: list[ToolSpec]) -> list[Call]:
    """Every call the text holds, in order of appearance: `<tool_call>` blocks (the tool_call tools
    and unknown names get error texts) and, when a `code` tool is enabled, `<code>` blocks."""
    enabled = [s.name for s in specs]
    found: list[tuple[int, Call]] = [(m.start(), _json_call(m.group(1), enabled)) for m in TOOL_CALL_RE.finditer(text)]
    code_tool = next((s.name for s in specs if s.call_format == "code"), None)
    if code_tool is not None:
        found += [(m.start(), _code_call(m.group(1), code_tool)) for m in CODE_RE.finditer(text)]
    return [call for _, call in sorted(found, key=lambda x: x[0])]


def parse_tool_calls(text: str, enabled: list[str]) -> list[Call]:
    """Every <tool_call> block as (name, arguments, error) (the Hermes format alone)."""
    return [_json_call(m.group(1), enabled) for m in TOOL_CALL_RE.finditer(text)]


def observation_message(observation: str, text: str, images: list[Image.Image]) -> dict[str, Any]:
    """The chat message that returns one result (see deepeyes.toolspec.OBSERVATIONS).

    `images` are already in the model's frame; the template writes each `{"type": "image"}` part
    as one image slot, in order.
    """
    image_parts = [{"type": "image"} for _ in images]
    if observation == "tool_response":  # the template's <tool_response> user turn, image first
        return {"role": "tool", "content": image_parts + [{"type": "text", "text": text}]}
    if observation == "search_result":
        return {"role": "user", "content": [{"type": "text", "text": f"<tool_response>\n{text}\n</tool_response>"}]
                + image_parts}
    if images:  # code_result: the images follow the output, as DeepEyesV2 lays them out
        return {"role": "user", "content": [{"type": "text", "text": text + "Images:\n"}] + image_parts}
    return {"role": "user", "content": [{"type": "text", "text": text.rstrip("\n")}]}

