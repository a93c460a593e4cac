"""The texts the model reads after a search: DeepEyesV2's layout, capped and cleaned.

Based on DeepEyesV2's `request_search` (reinforcement_learning/verl/workers/agent/envs/deepeyesv2/
deepeyesv2.py, the same code in evaluation/inference_demo/inference_demo.py of
github.com/Visual-Agent/DeepEyesV2), which its model was trained and evaluated on:

    A Google search for '{query}' found {n} results:

    ## Web Results
    1. [{title}]({link})
    Date published: {date}            <- only when the result has a date

    {snippet}

    2. ...

and for the image search, one `<image>` slot per result, each result ending in "] \\n" (the space
is its empty date):

    A Google image search for the image found {n} results:

    ## Web Results
    1. <image>
    [{title}] \\n

    2. <image>
    ...

The caller wraps the text in `<tool_response>\\n...\\n</tool_response>` (DeepEyesV2's
RETURN_SEARCH_PROMPT) and, for the image search, puts the i-th image at the i-th `<image>` marker
(`IMAGE_MARKER`, the data rows' marker). The word "Google" is DeepEyesV2's, kept
because its checkpoints read it; `engine` changes it.

Ours, where DeepEyesV2 has nothing to follow: no hit gives its own error text for a failed search
("No results found for '{query}'. Try with a more general query.", where DeepEyesV2 prints "found 0
results"); an empty image search gives its image error text; a hit without a URL prints `[title]`
alone. Every field is cleaned: chat special tokens (`<|im_end|>`, ...) are removed and tags that
frame a turn (`<tool_response>`, `<image>`, ...) become `[tool_response]`, so a snippet can neither
close the observation nor add an image slot; whitespace is collapsed; fields and the whole text
are capped in characters (whole results are dropped from the end to fit; the count says how many
are shown). The image text drops nothing: its result count must match the images.
"""

from __future__ import annotations

import re
from typing import Sequence

from deepeyes.data import IMAGE_MARKER  # "<image>": the data rows' image slot, DeepEyesV2's too
from services.tools.search.index import SearchHit

ENGINE = "Google"
MAX_RESULT_CHARS = 8000   # the whole text search observation
MAX_SNIPPET_CHARS = 1000
MAX_TITLE_CHARS = 200
MAX_URL_CHARS = 300
MAX_QUERY_CHARS = 200     # the query as echoed in the header

NO_TEXT_RESULTS = "No results found for '{query}'. Try with a more general query."
NO_IMAGE_RESULTS = "No results found for the image. Try with text search or direct output the answer."

_SPECIAL_TOKEN = re.compile(r"<\|[^<>|]{0,40}\|>")
_FRAME_TAG = re.compile(r"<(/?)\s*(tool_response|tool_call|tools|image|code|answer|think)\s*>", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(text: str, limit: int) -> str:
    """`text` safe to show inside an observation: special tokens gone, framing tags bracketed,
    lone surrogates replaced, whitespace collapsed, cut to `limit` characters ("..." marks a cut)."""
    text = text.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate cannot be tokenized or sent
    text = _CONTROL.sub(" ", text)
    text = _SPECIAL_TOKEN.sub("", text)
    text = _FRAME_TAG.sub(lambda m: f"[{m.group(1)}{m.group(2)}]", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:max(0, limit - 3)].rstrip() + "..."


def _text_result(rank: int, hit: SearchHit, max_snippet_chars: int) -> str:
    """One result as DeepEyesV2 prints it: `N. [title](link)`, the date line, a blank line, the snippet."""
    title, url = clean_text(hit.title, MAX_TITLE_CHARS), clean_text(hit.url, MAX_URL_CHARS)
    out = f"{rank}. [{title}]({url})" if url else f"{rank}. [{title}]"
    date = clean_text(hit.date, 50)
    if date:
        out += "\nDate published: " + date
    snippet = clean_text(hit.text, max_snippet_chars)
    return out + "\n" + ("\n" + snippet if snippet else "")


def format_text_results(hits: Sequence[SearchHit], *, query: str, max_chars: int = MAX_RESULT_CHARS,
                        max_snippet_chars: int = MAX_SNIPPET_CHARS, engine: str = ENGINE) -> str:
    """The text search observation for `hits` (best first), at most `max_chars` characters.

    Args:
        hits: the backend's hits, best first.
        query: the model's query, echoed (cleaned, cut to MAX_QUERY_CHARS) in the header.
        max_chars: cap on the whole text; results that do not fit are dropped from the end (a
            first result longer than the cap is cut instead).
        max_snippet_chars: cap on each snippet.
        engine: the search engine's name in the header.
    """
    shown_query = clean_text(query, MAX_QUERY_CHARS)
    if not hits:
        return NO_TEXT_RESULTS.format(query=shown_query)[:max_chars]

    def header(n: int) -> str:
        return f"A {engine} search for '{shown_query}' found {n} results:\n\n## Web Results\n"

    budget = max_chars - len(header(len(hits)))  # the count can only shrink: this header is the longest
    parts: list[str] = []
    for rank, hit in enumerate(hits, 1):
        item = _text_result(rank, hit, max_snippet_chars)
        cost = len(item) + (2 if parts else 0)  # the "\n\n" between results
        if cost > budget:
            if not parts:
                parts.append(item[:max(0, budget - 3)] + "...")
            break
        parts.append(item)
        budget -= cost
    return (header(len(parts)) + "\n\n".join(parts))[:max_chars]


def format_image_results(titles: Sequence[str], *, max_title_chars: int = MAX_TITLE_CHARS,
                         image_marker: str = IMAGE_MARKER, engine: str = ENGINE) -> str:
    """The image search observation: one numbered `image_marker` slot and title per result.

    The caller puts the i-th result's image at the i-th marker, so every title is kept (cut to
    `max_title_chars`) and the text is bounded by the number of results times that cap.

    Args:
        titles: the titles of the results whose images are returned, in order.
        max_title_chars: cap on each title.
        image_marker: the slot of an image in the text ("" when the caller adds images after it).
        engine: the search engine's name in the header.
    """
    if not titles:
        return NO_IMAGE_RESULTS
    parts = [f"{i}. {image_marker}\n[{clean_text(t, max_title_chars)}] \n" for i, t in enumerate(titles, 1)]
    return f"A {engine} image search for the image found {len(parts)} results:\n\n## Web Results\n" + "\n\n".join(parts)
