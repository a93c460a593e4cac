"""The fair protocol: shuffled options per sample, k samples per item, rule matcher first, scores.

Pure (no Ray): `sample_prompt` draws the option order of sample s from a seed recorded with it,
`episode_request` turns it into the rollout's EpisodeRequest, `match_answer` reads the option the
answer names (its letter or its text), and `summarize` aggregates episodes into Avg@k, pass@k,
per-category accuracy and the tool figures. The harness (trainer/eval/harness.py) and the
trainer's periodic validation (trainer/evaluate.py) both use these.
"""

from __future__ import annotations

import io
import re
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from services.judge.backends import normalize_text
from trainer.eval.items import LETTERS, Item

NO_TOOL_SYSTEM_PROMPT = ("You are a careful visual assistant. Look at the image, think inside "
                         "<think></think>, and give the final answer inside <answer></answer>.")
MODES = ("tool", "no_tool")


def sample_seed(seed: int, item_id: str, sample: int) -> int:
    """The recorded seed of sample `sample` of an item: option order and sampling both follow it."""
    return zlib.crc32(f"{seed}:{item_id}:{sample}".encode()) & 0x7FFFFFFF


@dataclass
class SamplePrompt:
    """One sample's question text, the order its options are shown in and the correct letter."""

    text: str
    order: list[int]          # order[j] = index (in the file) of the option shown at letter j
    shown: list[str]          # the option texts as shown
    correct_letter: str | None
    reference: str            # what the judge compares with: the correct option's text, or the answer
    seed: int


def sample_prompt(item: Item, sample: int, seed: int, shuffle: bool = True) -> SamplePrompt:
    s = sample_seed(seed, item.id, sample)
    if not item.multiple_choice:
        text = item.question if not item.instruction else f"{item.question}\n{item.instruction}"
        return SamplePrompt(text, [], [], None, str(item.answer), s)
    n = len(item.options)
    order = [int(i) for i in np.random.default_rng(s).permutation(n)] if shuffle else list(range(n))
    shown = [item.options[i] for i in order]
    if item.style == "inline":
        listing = "Options: " + " ".join(f"({LETTERS[j]}) {o}" for j, o in enumerate(shown))
    else:
        listing = "\n".join(f"({LETTERS[j]}) {o}" for j, o in enumerate(shown))
    text = f"{item.question}\n{listing}" + (f"\n{item.instruction}" if item.instruction else "")
    assert isinstance(item.answer, int)
    return SamplePrompt(text, order, shown, LETTERS[order.index(item.answer)], item.options[item.answer], s)


def decode_item_image(item: Item, min_side: int = 28) -> tuple[Any, tuple[int, int]]:
    """(the item's image as RGB, tiny images upscaled to `min_side` as the data reader does; its
    stored size, the frame of target_bbox)."""
    from PIL import Image  # the viewer imports this module: it stays light

    from deepeyes.data import upscale_to_min_side

    with Image.open(io.BytesIO(item.image)) as im:
        return upscale_to_min_side(im.convert("RGB"), min_side), im.size


def episode_request(item: Item, prompt: SamplePrompt, *, mode: str, frame: Any, uid: str, group_id: str,
                    greedy: bool, temperature: float | None, map_crops: bool, min_version: int = 0,
                    orig_size: tuple[int, int] | None = None, system_prompt: str | None = None,
                    box_scale: str = "absolute") -> Any:
    """The EpisodeRequest of one sample: the frame as the image; with `map_crops` the encoded
    original as crop_source (the zoom is cut from it); mode no_tool drops the tools."""
    from deepeyes.chat import system_prompt_for  # the viewer imports this module: it stays light
    from services.rollout.types import EpisodeRequest

    use_tools = mode == "tool"
    system = system_prompt or (system_prompt_for(box_scale) if use_tools else NO_TOOL_SYSTEM_PROMPT)
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt.text}]}]
    return EpisodeRequest(uid=uid, group_id=group_id, messages=messages, images=[frame],
                          ground_truth=prompt.reference, question=prompt.text,
                          data_source=str(item.extra.get("data_source", item.benchmark)),
                          extra={"target_bbox": item.target_bbox, "item": item.id,
                                 "orig_size": list(orig_size) if orig_size else None},
                          min_version=min_version, greedy=greedy, temperature=temperature,
                          seed=prompt.seed, use_tools=use_tools,
                          crop_source=item.image if (map_crops and use_tools) else None)


# ---------------------------------------------------------------------------------------------
# the rule matcher

_LETTER_FORMS = (re.compile(r"(?:the\s+)?(?:answer|option)?\s*(?:is\s*)?:?\s*\(?([A-J])\)?[.:)]?", re.IGNORECASE),
                 re.compile(r"\(([A-J])\)"),          # "(B) green"
                 re.compile(r"([A-J])[.:)]\s"))       # "B. green"


def match_answer(answer: str | None, shown: Sequence[str]) -> str | None:
    """The letter of the option `answer` names, by its letter ("B", "(B)", "B.", "Option B",
    "(B) green") or by its text ("green", "The green one." does not count); None = no option."""
    if not answer or not shown:
        return None
    s = answer.strip()
    letters = LETTERS[:len(shown)]
    for i, pattern in enumerate(_LETTER_FORMS):
        m = pattern.fullmatch(s) if i == 0 else pattern.match(s)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    norm = normalize_text(s)
    for j, option in enumerate(shown):
        if norm == normalize_text(option):
            return letters[j]
    return None


# ---------------------------------------------------------------------------------------------
# outcomes and figures


@dataclass
class Outcome:
    """One episode's result: what the table and eval.json are computed from (items.jsonl keeps more)."""

    item: str
    category: str
    mode: str
    sample: int
    correct: bool
    scored_by: str            # rule | judge | judge_failed | failed (the episode did not come back)
    tool_calls: int = 0       # calls executed
    tool_errors: int = 0      # executed calls that came back as an error
    crops: int = 0
    answered: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def outcome_from(traj: Any, item: Item, prompt: SamplePrompt, mode: str, sample: int,
                 judge_verdict: Any = None) -> tuple[Outcome, dict[str, Any]]:
    """(Outcome, the items.jsonl record) of a finished trajectory.

    Multiple choice: the rule matcher decides when the answer names an option; otherwise (and for
    free-form items) `judge_verdict(traj, prompt)` -> (correct, ok) decides, recorded as `judge`.
    """
    from services.judge.reward import extract_answer  # the viewer imports this module: it stays light

    answer = extract_answer(traj.response_text)
    chosen = match_answer(answer, prompt.shown) if prompt.correct_letter else None
    if chosen is not None:
        correct, by = chosen == prompt.correct_letter, "rule"
    elif answer is None:
        correct, by = False, "rule"  # nothing to judge: wrong, no judge asked
    elif judge_verdict is None:
        correct, by = False, "judge_failed"
    else:
        ok_correct, ok = judge_verdict(traj, prompt)
        correct, by = (bool(ok_correct), "judge") if ok else (False, "judge_failed")
    executed = [c for c in traj.tool_calls if c.executed]
    boxes = [c.arguments.get("bbox_2d") for c in traj.tool_calls
             if isinstance(c.arguments, dict) and "bbox_2d" in c.arguments]
    out = Outcome(item=item.id, category=item.category, mode=mode, sample=sample, correct=correct, scored_by=by,
                  tool_calls=len(executed), tool_errors=sum(1 for c in executed if not c.ok),
                  crops=int(traj.crops_returned), answered=answer is not None)
    record = {"benchmark": item.benchmark, "item": item.id, "category": item.category, "mode": mode,
              "sample": sample, "seed": prompt.seed, "options_order": prompt.order, "options": prompt.shown,
              "correct_letter": prompt.correct_letter, "reference": prompt.reference, "answer": answer,
              "chosen": chosen, "correct": correct, "scored_by": by,
              "tool_calls": [{"turn": c.turn, "name": c.name, "arguments": c.arguments, "ok": c.ok,
                              "executed": c.executed, "text": c.text} for c in traj.tool_calls],
              "boxes": boxes, "crops": out.crops, "num_turns": traj.num_turns, "finish": traj.finish_reason,
              "frame_size": list(traj.images[0].size) if traj.images else None,
              "target_bbox": item.target_bbox, "response": traj.response_text}
    return out, record


def failed_outcome(item: Item, prompt: SamplePrompt, mode: str, sample: int) -> tuple[Outcome, dict[str, Any]]:
    out = Outcome(item=item.id, category=item.category, mode=mode, sample=sample, correct=False, scored_by="failed")
    return out, {"benchmark": item.benchmark, "item": item.id, "category": item.category, "mode": mode,
                 "sample": sample, "seed": prompt.seed, "options_order": prompt.order, "correct": False,
                 "scored_by": "failed"}


def summarize(outcomes: Iterable[Outcome], k: int) -> dict[str, Any]:
    """Avg@k (mean over items of the fraction of its samples correct), pass@k (fraction of items
    with a correct sample), the same per category, and per episode: tool_use (share with an
    executed call), calls_per_episode, error_turn_rate (executed calls that returned an error, over
    executed calls), answered (an answer could be read), judged (share scored by the judge)."""
    per_item: dict[str, list[bool]] = defaultdict(list)
    category: dict[str, str] = {}
    eps = list(outcomes)
    for o in eps:
        per_item[o.item].append(o.correct)
        category[o.item] = o.category

    def figures(items: list[str]) -> dict[str, float]:
        if not items:
            return {"avg@k": 0.0, "pass@k": 0.0, "items": 0}
        return {"avg@k": float(np.mean([np.mean(per_item[i]) for i in items])),
                "pass@k": float(np.mean([any(per_item[i]) for i in items])), "items": len(items)}

    items = sorted(per_item)
    n = max(len(eps), 1)
    calls = sum(o.tool_calls for o in eps)
    return {
        "k": k, **figures(items), "episodes": len(eps),
        "failed": sum(1 for o in eps if o.scored_by == "failed"),
        "categories": {c: figures([i for i in items if category[i] == c]) for c in sorted(set(category.values()))},
        "tool_use": sum(1 for o in eps if o.tool_calls > 0) / n,
        "calls_per_episode": calls / n,
        "error_turn_rate": sum(o.tool_errors for o in eps) / calls if calls else 0.0,
        "crops_per_episode": sum(o.crops for o in eps) / n,
        "answered": sum(1 for o in eps if o.answered) / n,
        "judged": sum(1 for o in eps if o.scored_by in ("judge", "judge_failed")) / n,
        "judge_failures": sum(1 for o in eps if o.scored_by == "judge_failed"),
    }
