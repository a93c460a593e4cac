"""The cold start of the DeepEyesV2 scenario (`data.synthetic_task=agentic`): conversations that
use all three agentic tools, in the rollout's own layout.

DeepEyesV2's finding is that RL alone does not make a model call tools; a cold start does. For a
row (a card naming a country; the question asks its capital) the conversation is:

    [image_search once, on every second row]  ->  <code> that prints the image's size
    ->  search for the country's capital  ->  the answer.

The search results are the real search tool's over the scenario's corpus (the registry's `search`
entry, run in process); the image search is the real replay tool. The code's printed output is
computed here with PIL (`print(image_1.size)`; the kernel prints the same string), which keeps the
cold start free of kernel start-ups. The code is one short line on purpose: a crop with the card's
box (tried first) has some 30 tokens of digits, and the tiny policy sampling at temperature 1 got
one wrong in most episodes (an invalid box, a traceback it had never seen, and then no search).
"""

from __future__ import annotations

import json
from typing import Any

from PIL import Image

from deepeyes.config import Config
from deepeyes.toolspec import specs_for
from services.tools.registry import CallContext, Tool, load_tool, run_call
from services.tools.python_tool import CODE_RESULT

THINK_LOOK = "The card names a country. I look at the image first."
THINK_SEARCH = "Now I search for the capital of {country}."
THINK_IMAGE = "First I search with the image."
THINK_ANSWER = "The results name the capital."


_TOOLS: dict[str, dict[str, Tool]] = {}  # the search tools by the tools config they were built for


def search_tools(cfg: Config) -> dict[str, Tool]:
    """The enabled search and image_search tools, loaded once per tools config."""
    key = repr(cfg.tools)
    if key not in _TOOLS:
        _TOOLS[key] = {s.name: load_tool(s) for s in specs_for(cfg.tools) if s.name in ("search", "image_search")}
    return _TOOLS[key]


def _call_text(name: str, arguments: dict[str, Any]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def agentic_conversation(row: Any, frame: Image.Image, cfg: Config, index: int) -> list[dict[str, Any]]:
    """The assistant and observation turns after the row's prompt (see the module docstring)."""
    tools = search_tools(cfg)
    country = str(row.extra.get("target_attribute", ""))
    turns: list[dict[str, Any]] = []
    if index % 2 == 0 and "image_search" in tools:
        ctx = CallContext(instance_id="", image=frame, options={"row_id": str(row.index)})
        result = run_call(tools["image_search"], "image_search", ctx, {}, sorted(tools))
        turns += [{"role": "assistant", "content": f"<think>{THINK_IMAGE}</think>" + _call_text("image_search", {})},
                  {"role": "user", "content": f"<tool_response>\n{result.text}\n</tool_response>"}]
    code = "print(image_1.size)"
    stdout = str(frame.size)
    turns += [{"role": "assistant", "content": f"<think>{THINK_LOOK}</think><code>\n```python\n{code}\n```\n</code>"},
              {"role": "user", "content": CODE_RESULT.format(stdout=stdout, stderr="").rstrip("\n")}]
    query = f"capital of {country}"
    ctx = CallContext(options={"row_id": str(row.index)})
    result = run_call(tools.get("search"), "search", ctx, {"query": query}, sorted(tools))
    turns += [{"role": "assistant", "content": f"<think>{THINK_SEARCH.format(country=country)}</think>"
                                               + _call_text("search", {"query": query})},
              {"role": "user", "content": f"<tool_response>\n{result.text}\n</tool_response>"},
              {"role": "assistant", "content": f"<think>{THINK_ANSWER}</think><answer>{row.ground_truth}</answer>"}]
    return turns


def agentic_index(row: Any) -> int:
    """The row's position in its file (the synthetic index ends with it): which rows image-search."""
    tail = str(row.index).rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0
