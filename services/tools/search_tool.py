"""`search` and `image_search`: DeepEyesV2's search tools as plugins (docs/design.md, "Tool plugins").

`search` asks a backend (the offline BM25 index, or an HTTP search service) and returns the
results in DeepEyesV2's layout (services/tools/search/format.py). `image_search` replays the
results cached for the episode's row (the key is the row id the rollout passes, never anything the
model wrote), as DeepEyesV2 trains; it takes no arguments and the agent loop allows it once per
episode (the entry's limits). Both are stateless: no create or release.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from deepeyes.contracts import ToolResult
from deepeyes.toolspec import ToolSpec
from services.tools.registry import CallContext, Tool
from services.tools.search.backends import (HttpSearchBackend, ImageSearchReplay, LocalBM25Backend, SearchBackend,
                                            SearchBackendError)
from services.tools.search.corpus import ensure_demo_index
from services.tools.search.format import format_image_results, format_text_results

log = logging.getLogger(__name__)
MAX_QUERY_CHARS = 2000  # a longer query is cut (the index caps its terms too)
DEMO_FOLDER = Path(tempfile.gettempdir()) / "deepeyes-search-demo"  # where index "" builds the demo corpus


def make_backend(config: dict[str, Any]) -> SearchBackend:
    """The backend the entry's config names: `local` (index path, "" = the demo corpus) or `http`."""
    if config.get("backend", "local") == "http":
        if not config.get("url"):
            raise ValueError("search backend http needs tools.settings.search.config.url")
        return HttpSearchBackend(config["url"], timeout_s=float(config.get("timeout_s", 10.0)),
                                 token_env=str(config.get("token_env", "")))
    index = config.get("index") or ensure_demo_index(DEMO_FOLDER)
    return LocalBM25Backend(index)


class SearchTool(Tool):
    """The plugin of `search`: one backend per replica, thread-safe."""

    def __init__(self, spec: ToolSpec) -> None:
        super().__init__(spec)
        self.backend = make_backend(self.config)
        self.top_k = int(self.config.get("top_k", 5))

    def execute(self, ctx: CallContext, arguments: Any) -> ToolResult:
        query = arguments.get("query") if isinstance(arguments, dict) else None
        if isinstance(query, list) and query and all(isinstance(q, str) for q in query):
            query = query[0]  # DeepEyesV2's prompt mentions a batch; one query is what it runs
        if not isinstance(query, str) or not query.strip():
            return ToolResult(False, 'Error: search needs {"query": "<text>"}.', status="error")
        query = query[:MAX_QUERY_CHARS]
        try:
            hits = self.backend.search(query, self.top_k)
        except SearchBackendError as e:
            return ToolResult(False, f"Error: the search failed ({e}); try again or answer without it.", status="error")
        return ToolResult(True, format_text_results(hits, query=query), metrics={"hits": float(len(hits))})

    def health(self) -> None:
        if isinstance(self.backend, LocalBM25Backend):
            self.backend.search("health", 1)

    def close(self) -> None:
        self.backend.close()


class ImageSearchTool(Tool):
    """The plugin of `image_search`: the replay cache of the entry's config (none = every call
    says there is no result for the image)."""

    def __init__(self, spec: ToolSpec) -> None:
        super().__init__(spec)
        cache = self.config.get("cache") or ""
        self.max_results = int(self.config.get("max_results", 5))
        self.replay = ImageSearchReplay(cache, max_results=self.max_results) if cache else None

    def execute(self, ctx: CallContext, arguments: Any) -> ToolResult:
        if arguments not in (None, {}):
            return ToolResult(False, "Error: image_search takes no arguments; it searches with the image.",
                              status="error")
        row_id = str(ctx.options.get("row_id", ""))
        if self.replay is None:
            return ToolResult(True, format_image_results([], image_marker=""), metrics={"hits": 0.0})
        found = self.replay.lookup(row_id)
        for note in found.notes:
            log.info("image_search row %s: %s", row_id, note)
        results = found.results[:self.max_results]
        return ToolResult(True, format_image_results([r.title for r in results], image_marker=""),
                          images=[r.image for r in results], metrics={"hits": float(len(results))})
