"""A synthetic corpus for the tiny scenario: made-up countries, each with facts only its document holds.

"The capital of Zorbland is Quexton": every document follows the same template, so the words
"capital", "river" or "founded" are in all of them and only the made-up names tell documents apart;
a search for a question finds the right document only if the ranking weighs rare words, which
BM25 does. `make_demo_corpus` writes the documents and returns the questions they answer, so a
scenario (or a test) can check that `search` brings back the document that holds the answer.
Deterministic for a seed; names never repeat within a corpus.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from deepeyes.data.agentic import DemoFact, demo_documents  # the facts' one home (the data maker asks them)
from services.tools.search.index import build_index


def make_demo_corpus(path: str | os.PathLike[str], n: int, seed: int = 0) -> list[DemoFact]:
    """Write `n` demo documents to the JSONL file `path`; the questions they answer.

    The file is written beside its final name and renamed into place, so concurrent callers
    (several replicas preparing the same scenario) never read half a file.
    """
    docs, facts = demo_documents(n, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(d) + "\n" for d in docs))
    os.replace(tmp, path)
    return facts


def ensure_demo_index(folder: str | os.PathLike[str], n: int = 200, seed: int = 0) -> Path:
    """The demo corpus's index in `folder` (`demo-N-SEED.sqlite`), built when it is not there yet."""
    folder = Path(folder)
    index = folder / f"demo-{n}-{seed}.sqlite"
    if not index.is_file():
        corpus = folder / f"demo-{n}-{seed}.jsonl"
        make_demo_corpus(corpus, n, seed)
        build_index(corpus, index)
    return index
