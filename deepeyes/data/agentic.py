"""The tiny DeepEyesV2 scenario's data (`data.synthetic_task=agentic`) and the facts its search
corpus holds.

A row shows a card with a made-up country's name and asks a fact about that country that only
the demo corpus holds ("What is the capital of Zorbland?"): the image says which country, the
search says the fact. The row names its tools (extra_info.tools: python, search, image_search),
as DeepEyesV2's rows name their tool environment. The facts are generated here, at the ground
floor, so the data maker and the search tool's demo corpus (services/tools/search/corpus.py)
agree without importing each other.
"""

from __future__ import annotations

import functools
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import ImageDraw, ImageFont

from deepeyes.data.scene import clutter

DEMO_DOCS, DEMO_SEED = 200, 0  # the demo corpus the tiny scenario's search tool indexes (index "")
AGENTIC_TOOLS = ["python", "search", "image_search"]

SYLLABLES = ("zor", "quex", "bal", "tri", "mon", "vek", "lus", "dra", "pim", "sor", "kal", "fen", "gro", "wis",
             "nar", "tul", "yob", "hes", "cri", "dun", "ops", "rai", "mel", "jat")
COUNTRY_ENDINGS = ("land", "ia", "stan", "mark", "oria")
KINDS = ("an island nation", "a mountain kingdom", "a river republic", "a desert principality", "a coastal federation")
REGIONS = ("northern", "southern", "eastern", "western", "central")
MAX_DOCS = 50_000  # four names a document, drawn from ~346k


@dataclass(frozen=True)
class DemoFact:
    """A question one document of the demo corpus answers."""

    question: str
    answer: str
    doc_id: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _name(rng: random.Random, used: set[str], ending: str = "") -> str:
    """A made-up capitalised name of two to four syllables, new to `used`."""
    for _ in range(1000):  # 24^2 + 24^3 + 24^4 names: a miss streak this long means they ran out
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))) + ending
        if name not in used:
            used.add(name)
            return name.capitalize()
    raise ValueError(f"the demo corpus ran out of made-up names after {len(used)}: ask for fewer documents "
                     f"(at most {MAX_DOCS})")


def demo_documents(n: int, seed: int = 0) -> tuple[list[dict[str, Any]], list[DemoFact]]:
    """`n` documents `{id, title, text, url}` and the four questions each one answers."""
    if not 0 <= n <= MAX_DOCS:
        raise ValueError(f"the demo corpus holds 0..{MAX_DOCS} documents, not {n}")
    rng = random.Random(seed)
    used: set[str] = set()
    docs: list[dict[str, Any]] = []
    facts: list[DemoFact] = []
    for i in range(n):
        doc_id = f"demo-{i:06d}"
        country = _name(rng, used, rng.choice(COUNTRY_ENDINGS))
        capital, river, animal = _name(rng, used), _name(rng, used), _name(rng, used).lower()
        year = str(rng.randint(1100, 1990))
        text = (f"{country} is {rng.choice(KINDS)} in the {rng.choice(REGIONS)} region. "
                f"The capital of {country} is {capital}. The longest river of {country} is the {river}, "
                f"and its national animal is the {animal}. {country} was founded in {year}.")
        docs.append({"id": doc_id, "title": country, "text": text, "url": f"https://demo.invalid/wiki/{country}"})
        facts += [DemoFact(f"What is the capital of {country}?", capital, doc_id),
                  DemoFact(f"What is the longest river of {country}?", river, doc_id),
                  DemoFact(f"What is the national animal of {country}?", animal, doc_id),
                  DemoFact(f"In which year was {country} founded?", year, doc_id)]
    return docs, facts


@functools.lru_cache(maxsize=4)
def demo_facts(n: int = DEMO_DOCS, seed: int = DEMO_SEED) -> tuple[DemoFact, ...]:
    """The questions the demo corpus answers (cached: every row of a file draws from them)."""
    return tuple(demo_documents(n, seed)[1])


def agentic_task(rng: np.random.Generator) -> dict[str, Any]:
    """One row: a card naming a country on a cluttered 448x336 scene, a question about it."""
    facts = [f for f in demo_facts() if f.question.startswith("What is the capital")]
    fact = facts[int(rng.integers(len(facts)))]
    country = fact.question.rsplit(" ", 1)[1].rstrip("?")
    image = clutter(rng, 448, 336)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=18)
    l, t, r, b = font.getbbox(country)
    x, y = int(rng.integers(8, 448 - (r - l) - 24)), int(rng.integers(8, 336 - (b - t) - 24))
    bbox = [x, y, x + (r - l) + 12, y + (b - t) + 12]
    draw.rectangle(bbox, fill=(250, 250, 235))
    draw.text((x + 6 - l, y + 6 - t), country, fill=(10, 10, 10), font=font)
    return {"image": image, "question": "What is the capital of the country named on the card?",
            "answer": fact.answer, "options": [], "kind": "agentic", "attribute": country, "bbox": bbox,
            "style": "model", "ability": "agentic_search", "env": "deepeyesv2", "tools": list(AGENTIC_TOOLS)}
