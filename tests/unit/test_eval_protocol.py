"""The evaluation protocol without Ray: readers on the benchmark twins and on malformed files, the
option shuffle, the rule matcher, hand-computed Avg@k / pass@k, and why shuffling matters."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import pytest

from trainer.eval.items import BenchmarkFormatError, Item, read_hrbench, read_vstar
from trainer.eval.protocol import Outcome, match_answer, outcome_from, sample_prompt, summarize
from trainer.eval.twins import write_hrbench_twin, write_vstar_twin


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    root = tmp_path_factory.mktemp("twins")
    return write_vstar_twin(root / "vstar_bench", 6, seed=3), write_hrbench_twin(root / "hr_bench_4k.tsv", 6, seed=3)


def test_vstar_twin_reads_back_in_both_layouts(twins):
    vstar, _ = twins
    per_image = list(read_vstar(vstar))
    assert len(per_image) == 6 and {i.category for i in per_image} == {"direct_attributes", "relative_position"}
    assert all(i.answer == 0 for i in per_image)  # the distributed layout lists the correct option first
    assert sorted(len(i.options) for i in per_image) == [2, 2, 2, 4, 4, 4]
    assert all(i.target_bbox and i.target_bbox[2] > i.target_bbox[0] for i in per_image)
    by_jsonl = {i.category + str(i.id): i for i in read_vstar(vstar / "test_questions.jsonl")}
    assert len(by_jsonl) == 6
    # the same questions: the jsonl's labelled option is the per-image file's first option
    truths = sorted(i.options[0] for i in per_image)
    assert sorted(i.options[i.answer] for i in by_jsonl.values()) == truths


def test_hrbench_twin_reads_back(twins):
    _, tsv = twins
    items = list(read_hrbench(tsv))
    assert len(items) == 6 and all(len(i.options) == 4 for i in items)
    assert {i.benchmark for i in items} == {"hrbench_4k"} and {i.category for i in items} == {"single", "cross"}
    assert all(i.image[:2] == b"\xff\xd8" for i in items)  # the base64 decoded back to the JPEG


def test_readers_name_file_row_and_field(tmp_path, twins):
    vstar, tsv = twins
    # V* jsonl: a row without its label
    bad = tmp_path / "test_questions.jsonl"
    rows = (vstar / "test_questions.jsonl").read_text().splitlines()
    rec = json.loads(rows[1])
    del rec["label"]
    bad.write_text("\n".join([rows[0], json.dumps(rec)]) + "\n")
    for r in rows[:2]:
        img = json.loads(r)["image"]
        (tmp_path / img).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / img).write_bytes((vstar / img).read_bytes())
    with pytest.raises(BenchmarkFormatError, match=r"test_questions.jsonl: row 2: missing field 'label'"):
        list(read_vstar(bad))
    # V* per-image annotation without options
    folder = tmp_path / "vs" / "direct_attributes"
    folder.mkdir(parents=True)
    (folder / "x.jpg").write_bytes(b"jpeg")
    (folder / "x.json").write_text(json.dumps({"question": "What colour?"}))
    with pytest.raises(BenchmarkFormatError, match=r"x.json: row x.json: missing field 'options'"):
        list(read_vstar(tmp_path / "vs"))
    # HR-Bench: a missing column, then a row with an empty answer
    lines = tsv.read_text().splitlines()
    header = lines[0].split("\t")
    no_cat = tmp_path / "no_category.tsv"
    no_cat.write_text("\n".join("\t".join(c for j, c in enumerate(l.split("\t")) if header[j] != "category")
                                for l in lines[:3]) + "\n")
    with pytest.raises(BenchmarkFormatError, match=r"no_category.tsv: row header: missing column\(s\) \['category'\]"):
        list(read_hrbench(no_cat))
    cells = lines[3].split("\t")
    cells[header.index("answer")] = ""
    empty = tmp_path / "empty_answer.tsv"
    empty.write_text("\n".join(lines[:3] + ["\t".join(cells)]) + "\n")
    with pytest.raises(BenchmarkFormatError, match=r"empty_answer.tsv: row 3: missing field 'answer'"):
        list(read_hrbench(empty))


def _item(i: int, n: int, category: str = "c") -> Item:
    return Item(benchmark="b", id=f"q{i}", category=category, question=f"Question {i}?",
                options=[f"word{j}" for j in range(n)], answer=0, image=b"")


def test_sample_prompt_shuffles_by_its_recorded_seed():
    item = _item(0, 4)
    a, b = sample_prompt(item, 0, seed=7), sample_prompt(item, 0, seed=7)
    assert a == b  # reproducible from (seed, item, sample)
    orders = {tuple(sample_prompt(item, s, seed=7).order) for s in range(16)}
    assert len(orders) > 4  # the samples see different orders
    p = sample_prompt(item, 3, seed=7)
    assert p.shown[ord(p.correct_letter) - 65] == "word0" and p.reference == "word0"
    assert "(A) " + p.shown[0] in p.text and "(D) " + p.shown[3] in p.text
    assert sample_prompt(item, 3, seed=7, shuffle=False).order == [0, 1, 2, 3]


def test_match_answer_letter_and_text_forms():
    shown = ["red", "blue", "green sign", "yellow"]
    for answer, letter in [("B", "B"), ("(b)", "B"), ("B.", "B"), ("Option C", "C"), ("(C) green sign", "C"),
                           ("D. yellow", "D"), ("blue", "B"), ("The green sign.", "C"), ("answer: A", "A")]:
        assert match_answer(answer, shown) == letter, answer
    for answer in ["E", "purple", "it is probably blue", "", None]:
        assert match_answer(answer, shown) is None, answer


def test_avg_and_pass_at_k_by_hand():
    # k=4; item a: 3/4 correct, item b: 0/4, item c: 1/4 (a and b in category x, c in y)
    pattern = {"a": ("x", [1, 1, 0, 1]), "b": ("x", [0, 0, 0, 0]), "c": ("y", [0, 0, 1, 0])}
    outs = [Outcome(item=i, category=c, mode="tool", sample=s, correct=bool(v), scored_by="rule",
                    tool_calls=1 if s == 0 else 0, tool_errors=1 if (i == "a" and s == 0) else 0, answered=True)
            for i, (c, vs) in pattern.items() for s, v in enumerate(vs)]
    s = summarize(outs, 4)
    assert s["avg@k"] == pytest.approx((3 / 4 + 0 + 1 / 4) / 3)      # 0.3333
    assert s["pass@k"] == pytest.approx(2 / 3)                        # a and c
    assert s["categories"]["x"] == {"avg@k": pytest.approx(3 / 8), "pass@k": pytest.approx(0.5), "items": 2}
    assert s["categories"]["y"] == {"avg@k": pytest.approx(1 / 4), "pass@k": pytest.approx(1.0), "items": 1}
    assert s["tool_use"] == pytest.approx(3 / 12) and s["calls_per_episode"] == pytest.approx(3 / 12)
    assert s["error_turn_rate"] == pytest.approx(1 / 3) and s["episodes"] == 12 and s["failed"] == 0


def _traj(text: str) -> SimpleNamespace:
    return SimpleNamespace(uid="u", response_text=text, tool_calls=[], crops_returned=0, num_turns=2,
                           finish_reason="answer", images=[], reward=None, data_source="b")


def fake_always_a(items, k, shuffle):
    """A fake responder that answers "A" to every question, scored by the real protocol."""
    outs = []
    for item in items:
        for s in range(k):
            prompt = sample_prompt(item, s, seed=0, shuffle=shuffle)
            out, _ = outcome_from(_traj("<think>first one</think><answer>A</answer>"), item, prompt, "tool", s)
            outs.append(out)
    return summarize(outs, k)


def test_shuffling_matters_an_always_a_policy_scores_chance():
    # V*'s shape: 115 items with 4 options, 76 with 2, the correct option listed first in the file
    items = [_item(i, 4, "direct_attributes") for i in range(115)] + [_item(115 + i, 2, "relative_position")
                                                                      for i in range(76)]
    biased = fake_always_a(items, 4, shuffle=False)
    assert biased["avg@k"] == 1.0  # the unshuffled protocol gives "always A" a perfect score
    fair = fake_always_a(items, 8, shuffle=True)
    chance = (115 * 0.25 + 76 * 0.5) / 191  # 0.349
    assert abs(fair["avg@k"] - chance) < 0.04, fair["avg@k"]
    assert abs(fair["categories"]["direct_attributes"]["avg@k"] - 0.25) < 0.05
    assert abs(fair["categories"]["relative_position"]["avg@k"] - 0.5) < 0.06


def test_free_form_and_unmatched_answers_go_to_the_judge():
    item = _item(0, 4)
    prompt = sample_prompt(item, 0, seed=1)
    asked = []

    def judge(traj, p):
        asked.append(traj.response_text)
        return True, True

    out, rec = outcome_from(_traj(f"<answer>{prompt.correct_letter}</answer>"), item, prompt, "tool", 0, judge)
    assert out.correct and out.scored_by == "rule" and not asked
    out, rec = outcome_from(_traj("<answer>the first word</answer>"), item, prompt, "tool", 0, judge)
    assert out.correct and out.scored_by == "judge" and len(asked) == 1
    assert rec["options_order"] == prompt.order and rec["seed"] == prompt.seed
    free = Item(benchmark="b", id="f", category="c", question="How many dots?", options=[], answer="3", image=b"")
    out, _ = outcome_from(_traj("<answer>three</answer>"), free, sample_prompt(free, 0, 0), "tool", 0,
                          lambda t, p: (False, False))
    assert not out.correct and out.scored_by == "judge_failed"
    out, _ = outcome_from(_traj(""), free, sample_prompt(free, 0, 0), "tool", 0, judge)
    assert not out.correct and out.scored_by == "rule" and len(asked) == 1  # no answer: nothing to judge


def test_base64_image_column_must_decode(tmp_path, twins):
    _, tsv = twins
    lines = tsv.read_text().splitlines()
    header = lines[0].split("\t")
    cells = lines[1].split("\t")
    cells[header.index("image")] = "not base64 !!"
    bad = tmp_path / "bad_image.tsv"
    bad.write_text("\n".join([lines[0], "\t".join(cells)]) + "\n")
    with pytest.raises(BenchmarkFormatError, match=r"bad_image.tsv: row 1: field 'image' is not base64"):
        list(read_hrbench(bad))
    assert base64.b64decode(lines[1].split("\t")[header.index("image")])[:2] == b"\xff\xd8"
