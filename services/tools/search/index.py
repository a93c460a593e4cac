"""`SearchIndex`: an offline BM25 index over a local corpus (SQLite FTS5), the `search` tool's default backend.

A corpus is a JSONL or parquet file of documents `{id, title, text, url?}`. `build_index` writes
them into one FTS5 table (columns title and text, tokenizer `unicode61 remove_diacritics 2`) in a
`.sqlite` file; `SearchIndex` opens that file read-only and ranks with FTS5's `bm25()` (k1=1.2,
b=0.75, both columns weighted 1.0, so a document's length is its title plus its text).

Decisions:
- The query is model text, hence hostile. It is never handed to FTS5's query language: we cut it
  to `max_query_chars`, pull out its words (runs of letters and digits), keep the first
  `max_terms` distinct ones and OR them as quoted strings. Operators (AND, NEAR, `*`, `^`, `:`,
  quotes, parentheses) are just punctuation or plain words then, and a query without a word
  returns no hits instead of an error. OR, not AND: a question's words are not all in the answer.
- Words found in half the documents or more ("the", "of", or "capital" in the demo corpus) are
  left out of the query unless all its words are such: their BM25 idf is <= 0, which FTS5
  clamps to 1e-6, so they cannot change the order of the documents that match the other words,
  while their posting lists make a query 100x slower (measured on the 10k demo corpus). The
  cost: a document holding only such words is not returned (it would score ~1e-6, noise). The
  build lists them (table `common_terms`); the scores are FTS5's bm25() over the words kept.
- The text of a hit is FTS5's `snippet()` window (up to 64 tokens around the best match), close
  to what a web search engine shows and to what DeepEyesV2 trained on; `snippet_tokens=0` gives
  the document's leading text instead.
- Concurrency: a pool of read-only connections, one per query in flight (SQLite runs a query
  without the GIL, so threads really overlap); a connection moves between threads, never shared
  by two at once.
- The build writes a temporary file next to the output and renames it into place: a reader never
  sees a half-built index, and a crashed build leaves the old one.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import sqlite3
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

FORMAT = "deepeyes-search-fts5-1"  # bumped when the file layout changes; an old file must be rebuilt
TOKENIZER = "unicode61 remove_diacritics 2"
MAX_QUERY_CHARS = 2000   # longer queries are cut before parsing
MAX_TERMS = 32           # distinct query words kept
MAX_TOP_K = 50
SNIPPET_TOKENS = 64      # FTS5's own upper bound for snippet()
MAX_TEXT_CHARS = 2000    # leading text of a hit when snippet_tokens=0
BUILD_BATCH = 2000       # documents per insert transaction

_WORD = re.compile(r"[^\W_]+")  # letters and digits; unicode61 splits on everything else


@dataclass(frozen=True)
class SearchHit:
    """One search result.

    Attributes:
        doc_id: the corpus's id of the document (the HTTP service's, or "").
        title: the document's title.
        text: the snippet shown to the model.
        url: the document's address ("" when the corpus has none).
        date: publication date as the backend gives it ("" when unknown).
        score: relevance, higher is better (BM25 for the local index: minus FTS5's bm25()).
    """

    doc_id: str
    title: str
    text: str
    url: str = ""
    date: str = ""
    score: float = 0.0


class CorpusError(ValueError):
    """A corpus row that cannot be indexed; the message names the file, the row and the fix."""


def query_terms(query: str, max_query_chars: int = MAX_QUERY_CHARS, max_terms: int = MAX_TERMS) -> list[str]:
    """The distinct words of a model's query, lower-cased, in order: runs of letters and digits of
    its first `max_query_chars` characters, at most `max_terms` ([] = the query has no word).

    Raises:
        TypeError: `query` is not a str (the caller checks the model's arguments).
    """
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    terms: dict[str, None] = {}  # ordered set, case-folded as unicode61 folds
    for m in _WORD.finditer(query[:max_query_chars]):
        terms.setdefault(m.group().lower(), None)
        if len(terms) >= max_terms:
            break
    return list(terms)


def match_expression(terms: list[str]) -> str:
    """The FTS5 MATCH expression ORing `terms` as quoted strings (query syntax never reaches FTS5)."""
    # A word holds no '"' (query_terms keeps letters and digits only), so plain quoting is exact.
    return " OR ".join(f'"{t}"' for t in terms)


class SearchIndex:
    """A built index, opened read-only; `search` is safe from any number of threads at once.

    Args:
        path: the `.sqlite` file `build_index` wrote.
        max_query_chars: the query is cut to this many characters before parsing.
        max_terms: distinct words of the query kept.
        snippet_tokens: tokens of the snippet around the best match (1-64); 0 = the leading
            `max_text_chars` characters of the document.
        max_text_chars: cap on a hit's text when `snippet_tokens=0`.

    Raises:
        FileNotFoundError: no file at `path` (the message says how to build one).
        ValueError: the file is not an index of this format (rebuild it).
    """

    def __init__(self, path: str | os.PathLike[str], *, max_query_chars: int = MAX_QUERY_CHARS,
                 max_terms: int = MAX_TERMS, snippet_tokens: int = SNIPPET_TOKENS,
                 max_text_chars: int = MAX_TEXT_CHARS) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no search index at {self.path}: build one with `python -m "
                                    f"services.tools.search.index build --corpus DOCS.jsonl --out {self.path}`")
        if not 0 <= snippet_tokens <= SNIPPET_TOKENS:
            raise ValueError(f"snippet_tokens must be 0..{SNIPPET_TOKENS}, got {snippet_tokens}")
        self.max_query_chars = max_query_chars
        self.max_terms = max_terms
        self.snippet_tokens = snippet_tokens
        self.max_text_chars = max_text_chars
        self._uri = self.path.resolve().as_uri() + "?mode=ro"
        self._idle: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        try:
            with self._connection() as conn:
                self.meta = _read_meta(conn, self.path)
        except BaseException:
            self.close()
            raise
        self.doc_count = int(self.meta.get("docs", "0"))

    def __len__(self) -> int:
        return self.doc_count

    def __enter__(self) -> SearchIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A pooled read-only connection, for this thread alone until the block ends."""
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            with self._lock:
                if self._closed:
                    raise RuntimeError(f"search index {self.path} is closed") from None
                # check_same_thread=False: a pooled connection serves one thread at a time, not
                # always the same one.
                conn = sqlite3.connect(self._uri, uri=True, check_same_thread=False)
                conn.execute("PRAGMA query_only = 1")
                conn.execute("PRAGMA mmap_size = 268435456")  # pages shared through the OS cache
        try:
            yield conn
        finally:
            with self._lock:
                if self._closed:
                    conn.close()
                else:
                    self._idle.put(conn)

    def search(self, query: str, top_k: int = 5) -> list[SearchHit]:
        """The `top_k` best documents for `query`, best first; [] when the query has no word.

        Args:
            query: the model's query, any text (operators and quotes are taken as punctuation).
            top_k: hits wanted, clamped to 1..MAX_TOP_K.

        Raises:
            TypeError: `query` is not a str.
            sqlite3.Error: the index file is damaged (the backend names the file).
        """
        terms = query_terms(query, self.max_query_chars, self.max_terms)
        if not terms:
            return []
        top_k = max(1, min(int(top_k), MAX_TOP_K))
        if self.snippet_tokens:
            # Column 1 is the text; no highlight marks, "..." where the window cuts the text.
            text_sql, text_arg = "snippet(docs, 1, '', '', '...', ?)", self.snippet_tokens
        else:
            text_sql, text_arg = "substr(text, 1, ?)", self.max_text_chars
        sql = (f"SELECT doc_id, title, {text_sql}, url, bm25(docs) AS score FROM docs "
               f"WHERE docs MATCH ? ORDER BY score, rowid LIMIT ?")
        with self._connection() as conn:
            marks = ",".join("?" * len(terms))
            common = {t for (t,) in conn.execute(f"SELECT term FROM common_terms WHERE term IN ({marks})", terms)}
            # A word in half the documents or more has a BM25 idf of ~0 (FTS5 clamps it to 1e-6): it
            # cannot change the order, only cost a scan of its long posting list. Kept when all are.
            terms = [t for t in terms if t not in common] or terms
            rows = conn.execute(sql, (text_arg, match_expression(terms), top_k)).fetchall()
        return [SearchHit(doc_id=d, title=t, text=x, url=u or "", score=-s) for d, t, x, u, s in rows]

    def close(self) -> None:
        """Close every connection (ones in use close when their query ends); idempotent."""
        with self._lock:
            self._closed = True
            while True:
                try:
                    conn = self._idle.get_nowait()
                except queue.Empty:
                    break
                conn.close()


def _read_meta(conn: sqlite3.Connection, path: Path) -> dict[str, str]:
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{path} is not a search index ({e}): rebuild it with "
                         f"`python -m services.tools.search.index build`") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a search index of format {meta.get('format')!r}, this code reads "
                         f"{FORMAT!r}: rebuild it with `python -m services.tools.search.index build`")
    return meta


# ---------------------------------------------------------------------------------------------
# building


def _document(row: Any, where: str) -> tuple[str, str, str, str]:
    """(id, title, text, url) of a corpus row, checked."""
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: a document must be an object {{id, title, text, url?}}, got {type(row).__name__}")
    doc_id, title, text, url = row.get("id"), row.get("title", ""), row.get("text"), row.get("url")
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise CorpusError(f"{where}: `id` must be a string or an integer, got {doc_id!r:.80}")
    if not isinstance(text, str):
        raise CorpusError(f"{where}: `text` must be a string, got {type(text).__name__}")
    if title is None:
        title = ""
    if not isinstance(title, str):
        raise CorpusError(f"{where}: `title` must be a string, got {type(title).__name__}")
    if url is not None and not isinstance(url, str):
        raise CorpusError(f"{where}: `url` must be a string or absent, got {type(url).__name__}")
    return str(doc_id), title, text, url or ""


def read_corpus(path: str | os.PathLike[str], *, progress: bool = False) -> Iterator[tuple[str, str, str, str]]:
    """The documents of a JSONL (`.jsonl`, `.json` with one object a line) or parquet corpus, as
    (id, title, text, url), checked; with `progress`, a bar on stderr (bytes for JSONL, rows for parquet).

    Raises:
        CorpusError: a row is not a document (the message names the line or row).
    """
    path = Path(path)
    if path.suffix == ".parquet":
        yield from _read_parquet(path, progress)
        return
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, disable=not progress,
                                     desc=f"indexing {path.name}", file=sys.stderr) as bar:
        for lineno, line in enumerate(f, 1):
            bar.update(len(line))
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise CorpusError(f"{path}:{lineno}: not JSON ({e}); each line must be one document "
                                  f"{{\"id\", \"title\", \"text\", \"url\"?}}") from None
            yield _document(row, f"{path}:{lineno}")


def _read_parquet(path: Path, progress: bool) -> Iterator[tuple[str, str, str, str]]:
    # pyarrow here only: a JSONL corpus needs none of it, and it is slow to import.
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    missing = {"id", "text"} - names
    if missing:
        raise CorpusError(f"{path}: missing column(s) {sorted(missing)}; a corpus has id, title, text and "
                          f"url (optional)")
    columns = [c for c in ("id", "title", "text", "url") if c in names]
    n = 0
    with tqdm(total=pf.metadata.num_rows, unit="doc", disable=not progress, desc=f"indexing {path.name}",
              file=sys.stderr) as bar:
        for batch in pf.iter_batches(batch_size=BUILD_BATCH, columns=columns):
            for row in batch.to_pylist():
                n += 1
                yield _document(row, f"{path} row {n}")
            bar.update(batch.num_rows)


def build_index(corpus: str | os.PathLike[str], out: str | os.PathLike[str], *, progress: bool = False) -> int:
    """Index the documents of `corpus` into the SQLite file `out` (replaced atomically).

    Args:
        corpus: a JSONL or parquet file of documents `{id, title, text, url?}`.
        out: the `.sqlite` file to write; an existing file is replaced when the build succeeds.
        progress: show a progress bar on stderr.

    Returns:
        The number of documents indexed.

    Raises:
        CorpusError: a row is not a document; nothing is written then.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        conn.execute("PRAGMA journal_mode = OFF")  # a failed build is thrown away, never recovered
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute(f"CREATE VIRTUAL TABLE docs USING fts5(title, text, doc_id UNINDEXED, url UNINDEXED, "
                     f"tokenize='{TOKENIZER}')")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        n, batch = 0, []
        for doc_id, title, text, url in read_corpus(corpus, progress=progress):
            batch.append((title, text, doc_id, url))
            if len(batch) >= BUILD_BATCH:
                n += _insert(conn, batch)
        n += _insert(conn, batch)
        conn.execute("INSERT INTO docs(docs) VALUES ('optimize')")  # one b-tree segment: faster queries
        # The words in at least half the documents (2*df >= N: idf <= 0), which queries leave out.
        conn.execute("CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(main, 'docs', 'row')")
        conn.execute("CREATE TABLE common_terms (term TEXT PRIMARY KEY) WITHOUT ROWID")
        conn.execute("INSERT INTO common_terms SELECT term FROM temp.vocab WHERE 2 * doc >= ?", (n,))
        meta = {"format": FORMAT, "docs": str(n), "tokenizer": TOKENIZER, "corpus": str(Path(corpus).resolve()),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        conn.commit()
        conn.close()
        os.replace(tmp, out)
    except BaseException:
        conn.close()
        tmp.unlink(missing_ok=True)
        raise
    return n


def _insert(conn: sqlite3.Connection, batch: list[tuple[str, str, str, str]]) -> int:
    """Insert and clear `batch` in one transaction; the count inserted."""
    with conn:
        conn.executemany("INSERT INTO docs (title, text, doc_id, url) VALUES (?, ?, ?, ?)", batch)
    n = len(batch)
    batch.clear()
    return n


# ---------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    """`build` an index from a corpus, or `query` one."""
    parser = argparse.ArgumentParser(prog="python -m services.tools.search.index",
                                     description="The offline BM25 search index of the `search` tool (SQLite FTS5).")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="index a corpus into a .sqlite file")
    b.add_argument("--corpus", required=True, help="JSONL or parquet file of documents {id, title, text, url?}")
    b.add_argument("--out", required=True, help="the .sqlite index to write (replaced when the build succeeds)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    q = sub.add_parser("query", help="print the top hits of a query")
    q.add_argument("--index", required=True, help="a .sqlite index")
    q.add_argument("--top-k", type=int, default=5, help="hits to print")
    q.add_argument("query", help="the query text")
    args = parser.parse_args(argv)
    if args.command == "build":
        started = time.perf_counter()
        try:
            n = build_index(args.corpus, args.out, progress=not args.no_progress)
        except (CorpusError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"indexed {n} documents into {args.out} in {time.perf_counter() - started:.1f} s")
    else:
        try:
            index = SearchIndex(args.index)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        with index:
            for hit in index.search(args.query, args.top_k):
                print(f"{hit.score:8.3f}  {hit.doc_id}  {hit.title}\n          {hit.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
