"""Where search results come from: a text-search backend behind one protocol, and the image-search replay.

`SearchBackend.search(query, top_k) -> list[SearchHit]` has two implementations picked by the
`search` tool's `backend` config: `LocalBM25Backend` (the offline FTS5 index, `index.py`) and
`HttpSearchBackend` (any service that answers `POST {"query", "top_k"}` with
`{"results": [{"title", "text" | "snippet", "url" | "link"?, "date"?, "id"?}]}`). A backend raises
`SearchBackendError`, whose message names the cause and the fix; the tool layer turns it into the
error text the model reads. The HTTP backend is for a trusted search service: it sends the
bearer token to the configured URL and never follows a redirect (the token would go along).

`ImageSearchReplay` is DeepEyesV2's image search: it never searches, it replays results cached
for the episode's image. DeepEyesV2 keys its cache by the data row's index and skips a cached
image whose file is missing (`search_utils.image_search` in its repository); so do we. The key is
the row id the caller passes, never text the model wrote, and the image paths come from the cache
file only, resolved inside its folder. Every image is size-checked before it is decoded
(`deepeyes.images.decode_image`); an image over the caps is left out with a note, not decoded.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import httpx
from PIL import Image

from deepeyes.images import ImageDecodeError, decode_image
from services.tools.search.index import MAX_TOP_K, SearchHit, SearchIndex

MAX_RESPONSE_BYTES = 2 << 20   # an HTTP search answer larger than this is refused
MAX_FIELD_CHARS = 20_000       # a title/text/url of an HTTP hit is cut to this
MAX_HTTP_QUERY_CHARS = 2000    # the query sent is cut to this
MAX_IMAGE_BYTES = 16 << 20     # a cached image file or blob larger than this is refused unread
MAX_IMAGE_PIXELS = 4096 * 4096  # ... and one whose header says more pixels than this


class SearchBackendError(RuntimeError):
    """The search could not be done; the message names the backend, the cause and the fix."""


class SearchBackend(Protocol):
    """A text-search backend: the `top_k` best hits for a query, best first."""

    def search(self, query: str, top_k: int) -> list[SearchHit]: ...


class LocalBM25Backend:
    """The offline index (`SearchIndex`) as a backend; its errors become `SearchBackendError`.

    Args:
        index: an open `SearchIndex`, or the path of a built `.sqlite` index.
    """

    def __init__(self, index: SearchIndex | str | os.PathLike[str]) -> None:
        self.index = index if isinstance(index, SearchIndex) else SearchIndex(index)

    def search(self, query: str, top_k: int) -> list[SearchHit]:
        try:
            return self.index.search(query, top_k)
        except (sqlite3.Error, RuntimeError) as e:  # a damaged file; the index closed
            raise SearchBackendError(f"the local search index {self.index.path} failed "
                                     f"({type(e).__name__}: {e}); rebuild it with "
                                     f"`python -m services.tools.search.index build`") from e

    def close(self) -> None:
        self.index.close()


class HttpSearchBackend:
    """A search service over HTTP: `POST url {"query", "top_k"}` -> `{"results": [...]}`.

    Args:
        url: the endpoint (http or https).
        timeout_s: the call's deadline: connecting, sending and each read wait at most this, and
            reading stops with an error once it has passed since the call began.
        token_env: name of the environment variable holding a bearer token ("" or unset = none);
            read once, here.
        max_response_bytes: a larger answer is refused (read no further than this).
    """

    def __init__(self, url: str, *, timeout_s: float = 10.0, token_env: str = "",
                 max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"search url {url!r} is not an http(s) URL (set tools.settings.search.config.url)")
        self.url = url
        self.timeout_s = timeout_s
        self.token_env = token_env
        self.max_response_bytes = max_response_bytes
        token = os.environ.get(token_env, "") if token_env else ""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # follow_redirects=False: a redirect would carry the token to wherever it points.
        self._client = httpx.Client(timeout=timeout_s, headers=headers, follow_redirects=False)

    def _fail(self, cause: str) -> SearchBackendError:
        return SearchBackendError(f"search service {self.url}: {cause}")

    def search(self, query: str, top_k: int) -> list[SearchHit]:
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        top_k = max(1, min(int(top_k), MAX_TOP_K))
        body = self._post({"query": query[:MAX_HTTP_QUERY_CHARS], "top_k": top_k})
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):
            raise self._fail(f"the answer is not JSON ({body[:120]!r}); it must be "
                             f'{{"results": [{{"title", "text", "url"}}, ...]}}') from None
        return parse_results(answer, self.url)[:top_k]

    def _post(self, payload: dict[str, Any]) -> bytes:
        """The answer's body: status 200 and at most `max_response_bytes`, within `timeout_s`."""
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._client.stream("POST", self.url, json=payload) as response:
                if response.status_code in (401, 403):
                    raise self._fail(self._refused(response.status_code))
                size = response.headers.get("content-length", "")
                if size.isdigit() and int(size) > self.max_response_bytes:
                    raise self._fail(f"the answer is {size} bytes, over the cap of {self.max_response_bytes}")
                chunks, n = [], 0
                for chunk in response.iter_bytes():
                    n += len(chunk)
                    if n > self.max_response_bytes:
                        raise self._fail(f"the answer is over the cap of {self.max_response_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("deadline passed while reading the answer")
                    chunks.append(chunk)
                body = b"".join(chunks)
                if response.status_code != 200:
                    raise self._fail(f"HTTP {response.status_code}: {body[:200]!r}")
                return body
        except httpx.TimeoutException:
            raise self._fail(f"no answer within {self.timeout_s:g} s (the search tool's timeout_s); "
                             f"is the service overloaded?") from None
        except httpx.HTTPError as e:
            raise self._fail(f"could not be reached ({type(e).__name__}: {e}); is it running?") from None

    def _refused(self, status: int) -> str:
        if not self.token_env:
            return f"HTTP {status}: the service wants a token; name its environment variable in token_env"
        if not self._client.headers.get("Authorization"):
            return f"HTTP {status}: no token sent (${self.token_env} is unset); set it to the service's token"
        return f"HTTP {status}: the service refused the token in ${self.token_env}; check its value"

    def close(self) -> None:
        self._client.close()


def _field(item: dict[str, Any], keys: tuple[str, ...], where: str, required: bool) -> str:
    """The first of `keys` present in `item`, a str (cut to MAX_FIELD_CHARS); "" when absent."""
    for key in keys:
        value = item.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key == "id":
            return str(value)
        if not isinstance(value, str):
            raise SearchBackendError(f"{where}.{key} must be a string, got {type(value).__name__}")
        return value[:MAX_FIELD_CHARS]
    if required:
        raise SearchBackendError(f"{where} has none of {', '.join(keys)}")
    return ""


def parse_results(answer: Any, source: str) -> list[SearchHit]:
    """The hits of a search service's answer `{"results": [...]}`, checked field by field.

    Raises:
        SearchBackendError: the answer does not have that shape (the message names the field).
    """
    results = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(results, list):
        raise SearchBackendError(f"search service {source}: the answer must be an object "
                                 f'{{"results": [...]}}, got {json.dumps(answer)[:120]}')
    hits = []
    for i, item in enumerate(results[:MAX_TOP_K]):
        where = f"search service {source}: results[{i}]"
        if not isinstance(item, dict):
            raise SearchBackendError(f"{where} must be an object, got {type(item).__name__}")
        score = item.get("score")
        score = float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else 0.0
        hits.append(SearchHit(doc_id=_field(item, ("id",), where, False),
                              title=_field(item, ("title",), where, False),
                              text=_field(item, ("text", "snippet"), where, True),
                              url=_field(item, ("url", "link"), where, False),
                              date=_field(item, ("date",), where, False),
                              score=score))
    return hits


# ---------------------------------------------------------------------------------------------
# image search: the replay of cached results


class ReplayCacheError(ValueError):
    """The image-search cache file cannot be used; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class ImageSearchResult:
    """One replayed image-search result: the found image and the title of the page it was on."""

    title: str
    image: Image.Image
    url: str = ""


@dataclass
class ImageReplay:
    """What the replay gives for one row.

    Attributes:
        row_id: the row asked for.
        results: the cached results whose image could be loaded, in cache order.
        cached: the cache has an entry for the row.
        notes: why results are missing: the row is not cached, or a cached image was left out
            (missing file, over the caps, not an image). For logs and metrics, not for the model.
    """

    row_id: str
    results: list[ImageSearchResult] = field(default_factory=list)
    cached: bool = True
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Entry:
    """A cached result before its image is loaded: `path` (inside the cache folder) or `blob`."""

    title: str
    url: str
    path: Path | None = None
    blob: bytes | str | None = None  # encoded bytes, or base64 text (decoded only after the size check)


class ImageSearchReplay:
    """Cached image-search results keyed by row id, loaded once; `lookup` is thread-safe.

    The cache is a JSONL or parquet file of rows `{"row_id", "results": [{"title", "image",
    "url"?}]}`, or DeepEyesV2's own JSON cache `{row_id: {"tool_returned_web_title": [...],
    "cached_images_path": [...]}}`. An `image` is a path relative to `image_root`, a `data:` URL,
    bytes (a parquet binary column, or `{"bytes": ...}` as Hugging Face stores images); an
    `image_base64` key holds plain base64. Inline images stay in memory: use paths for a big cache.

    Args:
        cache: the cache file.
        image_root: the folder image paths are relative to (default: the cache file's folder);
            a path that resolves outside it (`..`, an absolute path elsewhere, a symlink out)
            fails the load.
        max_results: results replayed per row (the first ones whose image loads).
        max_pixels: an image whose header says more pixels is left out, not decoded.
        max_bytes: an image file or blob larger than this is left out, not read.

    Raises:
        ReplayCacheError: the file is not such a cache, or a path leaves `image_root`.
    """

    def __init__(self, cache: str | os.PathLike[str], *, image_root: str | os.PathLike[str] | None = None,
                 max_results: int = 10, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> None:
        self.cache = Path(cache)
        self.image_root = Path(image_root if image_root is not None else self.cache.parent).resolve()
        self.max_results = max_results
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self._rows: dict[str, list[_Entry]] = {}
        for row_id, results, where in _cache_rows(self.cache):
            self._rows[row_id] = [self._entry(r, f"{where}, result {i}") for i, r in enumerate(results)]

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, row_id: object) -> bool:
        return isinstance(row_id, (str, int)) and str(row_id) in self._rows

    def _entry(self, item: Any, where: str) -> _Entry:
        if not isinstance(item, dict):
            raise ReplayCacheError(f"{where}: a result must be an object {{title, image, url?}}")
        title, url, image = item.get("title") or "", item.get("url") or "", item.get("image")
        if not isinstance(title, str) or not isinstance(url, str):
            raise ReplayCacheError(f"{where}: title and url must be strings")
        if isinstance(image, dict):  # Hugging Face's image struct {"bytes", "path"}
            image = image.get("bytes") or image.get("path")
        if item.get("image_base64") is not None:
            return _Entry(title, url, blob=str(item["image_base64"]))
        if isinstance(image, (bytes, bytearray)):
            return _Entry(title, url, blob=bytes(image))
        if isinstance(image, str) and image.startswith("data:"):
            return _Entry(title, url, blob=image.split(",", 1)[-1])
        if not isinstance(image, str) or not image:
            raise ReplayCacheError(f"{where}: `image` must be a path, a data: URL or bytes (or give image_base64)")
        path = (self.image_root / image).resolve()
        if not path.is_relative_to(self.image_root):  # an absolute path may point inside
            raise ReplayCacheError(f"{where}: image path {image!r} leaves the image folder {self.image_root}; "
                                   f"give paths inside it (or set image_root)")
        return _Entry(title, url, path=path)

    def lookup(self, row_id: str | int) -> ImageReplay:
        """The cached results of row `row_id` (the caller's key, never the model's text)."""
        if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
            raise TypeError(f"row_id must be a str or int, got {type(row_id).__name__}")
        key = str(row_id)
        entries = self._rows.get(key)
        if entries is None:
            return ImageReplay(key, cached=False, notes=[f"no cached image search results for row {key!r} "
                                                         f"in {self.cache} ({len(self._rows)} rows cached)"])
        replay = ImageReplay(key)
        for i, entry in enumerate(entries):
            if len(replay.results) >= self.max_results:
                break
            try:
                image = self._load(entry)
            except (ImageDecodeError, OSError) as e:
                replay.notes.append(f"row {key!r} result {i} left out: {e}")
                continue
            replay.results.append(ImageSearchResult(entry.title, image, entry.url))
        return replay

    def _load(self, entry: _Entry) -> Image.Image:
        """The entry's image, refused before decoding when over max_bytes or max_pixels."""
        cap_key = "image_search max_pixels"
        if entry.path is not None:
            size = entry.path.stat().st_size  # FileNotFoundError for a missing file: left out, as DeepEyesV2 does
            if size > self.max_bytes:
                raise ImageDecodeError(f"{entry.path.name} is {size} bytes, over the cap of {self.max_bytes}")
            data = entry.path.read_bytes()
        elif isinstance(entry.blob, str):
            size = len(entry.blob) * 3 // 4  # the decoded size, known before decoding
            if size > self.max_bytes:
                raise ImageDecodeError(f"inline image of ~{size} bytes is over the cap of {self.max_bytes}")
            try:
                data = base64.b64decode(entry.blob, validate=True)
            except (binascii.Error, ValueError):
                raise ImageDecodeError("inline image is not valid base64") from None
        else:
            data = entry.blob or b""
        return decode_image(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes, cap_key=cap_key)


def _cache_rows(path: Path) -> Iterator[tuple[str, list[Any], str]]:
    """(row_id, results, where) for each row of an image-search cache file."""
    if not path.is_file():
        raise ReplayCacheError(f"no image-search cache at {path} (set tools.settings.image_search.config.cache)")
    if path.suffix == ".parquet":
        # pyarrow here only: JSON caches need none of it, and it is slow to import.
        import pyarrow.parquet as pq

        for n, row in enumerate(pq.read_table(path, columns=["row_id", "results"]).to_pylist()):
            yield _cache_row(row, f"{path} row {n}")
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise ReplayCacheError(f"{path}: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise ReplayCacheError(f"{path}: DeepEyesV2's cache is an object {{row_id: {{...}}}}")
        for key, item in data.items():
            yield key, _deepeyesv2_results(item, f"{path} row {key!r}"), f"{path} row {key!r}"
    else:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        raise ReplayCacheError(f"{path}:{lineno}: not JSON ({e})") from None
                    yield _cache_row(row, f"{path}:{lineno}")


def _cache_row(row: Any, where: str) -> tuple[str, list[Any], str]:
    row_id = row.get("row_id") if isinstance(row, dict) else None
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise ReplayCacheError(f"{where}: a row must be {{\"row_id\": str, \"results\": [...]}}")
    if not isinstance(row.get("results"), list):
        raise ReplayCacheError(f"{where}: `results` must be a list of {{title, image, url?}}")
    return str(row_id), row["results"], where


def _deepeyesv2_results(item: Any, where: str) -> list[dict[str, Any]]:
    """DeepEyesV2's cache entry -> our results; a null path (an image it could not fetch) is skipped."""
    titles = item.get("tool_returned_web_title") if isinstance(item, dict) else None
    paths = item.get("cached_images_path") if isinstance(item, dict) else None
    if not isinstance(titles, list) or not isinstance(paths, list) or len(titles) != len(paths):
        raise ReplayCacheError(f"{where}: needs lists tool_returned_web_title and cached_images_path of one length")
    return [{"title": t, "image": p} for t, p in zip(titles, paths) if p]
