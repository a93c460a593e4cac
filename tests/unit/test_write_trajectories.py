"""What a run folder keeps of a step's episodes for people and `python -m trainer view`:
trainer/metrics.py::write_trajectories on real Trajectory records with PIL images."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from deepeyes.contracts import RewardResult
from services.rollout.trajectory import ToolCallRecord, Trajectory
from trainer.grpo import group_advantages
from trainer.metrics import THUMBNAIL_SIDE, thumbnail_jpeg, write_trajectories


def decode(ids: list[int]) -> str:  # the tests' "tokenizer": one token per character
    return "".join(map(chr, ids))


def encode(text: str) -> list[int]:
    return [ord(ch) for ch in text]


CALL = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": %s}}</tool_call>'
OBSERVATION = "<tool_response>zoomed</tool_response>"  # what the observation tokens decode to


def episode(uid: str, group: str, turns: list[str], calls: list[ToolCallRecord], images: list[Image.Image],
            score: float, extra: dict | None = None) -> Trajectory:
    """Assistant turns with an observation after each turn but the last, as the agent loop lays them."""
    response, mask = [], []
    for k, text in enumerate(turns):
        response += encode(text)
        mask += [1] * len(text)
        if k < len(turns) - 1:
            response += encode(OBSERVATION)
            mask += [0] * len(OBSERVATION)
    return Trajectory(uid=uid, group_id=group, prompt_ids=[1] * 7, response_ids=response, loss_mask=mask,
                      logprobs=[0.0] * len(response), images=images, image_grid_thw=[[1, 2, 2]] * len(images),
                      response_text="\n".join(turns), tool_calls=calls, num_turns=2 * len(turns), policy_version=3,
                      finish_reason="answer", reward=RewardResult(score, float(score > 0), 0.0, float(score > 1)),
                      question="What colour is the flag?", ground_truth="red", extra=extra or {})


def solid(colour: str, size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size, colour)


def two_groups() -> list[Trajectory]:
    original = solid("white", (280, 168))
    zoomed = episode("s1-0-0", "s1-0", [CALL % "[10, 20, 110, 90]", CALL % "[-5, 0, 3, 2]", "<answer>red</answer>"],
                     [ToolCallRecord(0, "image_zoom_in_tool", {"bbox_2d": [10, 20, 110, 90]}, True, "Zoomed in"),
                      ToolCallRecord(1, "image_zoom_in_tool", {"bbox_2d": [-5, 0, 3, 2]}, False, "Error: invalid")],
                     [original, solid("red", (100, 70))], 2.0,
                     extra={"target_bbox": [20, 40, 60, 80], "orig_size": [560, 336]})
    plain = episode("s1-0-1", "s1-0", ["<answer>blue</answer>"], [], [original], 0.0)
    other = [episode(f"s1-1-{k}", "s1-1", ["<answer>red</answer>"], [], [solid("gray", (56, 56))], 0.8)
             for k in range(3)]
    return [zoomed, plain] + other


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_turns_boxes_crops_and_advantages(tmp_path):
    trajs = two_groups()
    adv = group_advantages([t.reward.score for t in trajs], [t.group_id for t in trajs])
    path = tmp_path / "step_000001.jsonl"
    write_trajectories(path, trajs, adv, keep=3, decode=decode, image_kb=1024)

    recs = lines(path)
    assert [r["uid"] for r in recs] == ["s1-0-0", "s1-0-1", "s1-1-0"]  # the first `keep`
    # group sizes over every episode of the step, not only the kept ones; advantages as GRPO's
    assert [r["group_size"] for r in recs] == [2, 2, 3]
    # scores 2.0 and 0.0: mean 1, unbiased std sqrt(2), so +-1/sqrt(2)
    assert [r["advantage"] for r in recs[:2]] == pytest.approx([2 ** -0.5, -(2 ** -0.5)], abs=1e-5)
    assert recs[2]["advantage"] == pytest.approx(0.0, abs=1e-6)  # a flat group (round-off of 0.8s)

    z = recs[0]
    assert [(t["role"], t["tokens"]) for t in z["turns"]] == [
        ("assistant", len(CALL % "[10, 20, 110, 90]")), ("tool", len(OBSERVATION)),
        ("assistant", len(CALL % "[-5, 0, 3, 2]")), ("tool", len(OBSERVATION)), ("assistant", len("<answer>red</answer>"))]
    assert z["turns"][4]["text"] == "<answer>red</answer>"
    assert (z["prompt_tokens"], z["response_tokens"]) == (7, len(trajs[0].response_ids))
    assert z["policy_tokens"] == sum(trajs[0].loss_mask)
    assert [c["box"] for c in z["tool_calls"]] == [[10, 20, 110, 90], [-5, 0, 3, 2]]
    assert [c["ok"] for c in z["tool_calls"]] == [True, False]
    assert z["target_box"] == [10, 20, 30, 40]  # target_bbox halved: stored 560x336, model frame 280x168
    assert z["images"][0]["width"] == 280 and z["images"][1]["height"] == 70

    # the crop of call 1 is images[1] (red); the rejected call brought nothing back
    crop = z["tool_calls"][0]["image"]
    assert crop == z["images"][1]["file"] == "step_000001/s1-0-0_1.jpg"
    assert Image.open(tmp_path / crop).convert("RGB").getpixel((50, 35))[0] > 200
    assert z["tool_calls"][1]["image"] is None
    assert Image.open(tmp_path / z["images"][0]["file"]).size == (280, 168)
    assert not list(tmp_path.glob("*.tmp"))
    # the keys earlier readers (tests, people) rely on are still there
    assert {"version", "question", "ground_truth", "response", "reward", "num_turns", "finish_reason"} <= z.keys()


def test_image_budget_keeps_originals_first_and_is_a_bound(tmp_path):
    trajs = two_groups()[:2]
    originals = len(thumbnail_jpeg(trajs[0].images[0])) + len(thumbnail_jpeg(trajs[1].images[0]))
    kb = -(-originals // 1024)  # room for the two originals, not for the crop as well
    assert originals + len(thumbnail_jpeg(trajs[0].images[1])) > kb * 1024
    path = tmp_path / "step_000002.jsonl"
    write_trajectories(path, trajs, [0.0, 0.0], keep=8, decode=decode, image_kb=kb)
    recs = lines(path)
    assert all(r["images"][0]["file"] for r in recs)
    assert recs[0]["images"][1]["file"] is None and recs[0]["tool_calls"][0]["image"] is None
    assert sum(f.stat().st_size for f in (tmp_path / "step_000002").iterdir()) <= kb * 1024

    write_trajectories(tmp_path / "step_000003.jsonl", trajs, [0.0, 0.0], keep=8, decode=decode, image_kb=0)
    assert not (tmp_path / "step_000003").exists()
    assert all(im["file"] is None for r in lines(tmp_path / "step_000003.jsonl") for im in r["images"])


def test_thumbnails_are_bounded_and_boxes_stay_in_the_model_frame(tmp_path):
    big = solid("blue", (2000, 1000))
    t = episode("s4-2-0", "s4-2", [CALL % "[100, 100, 1900, 900]", "<answer>red</answer>"],
                [ToolCallRecord(0, "image_zoom_in_tool", {"bbox_2d": [100, 100, 1900, 900]}, True, "Zoomed in")],
                [big, solid("red", (1800, 800))], 2.0)
    write_trajectories(tmp_path / "step_000004.jsonl", [t], [0.0], keep=1, decode=decode, image_kb=1024)
    rec = lines(tmp_path / "step_000004.jsonl")[0]
    assert Image.open(io.BytesIO((tmp_path / rec["images"][0]["file"]).read_bytes())).size == (THUMBNAIL_SIDE, 256)
    assert (rec["images"][0]["width"], rec["images"][0]["height"]) == (2000, 1000)
    assert rec["tool_calls"][0]["box"] == [100, 100, 1900, 900]
    assert big.size == (2000, 1000)  # the trajectory's own image is left as it was


def test_nothing_kept_writes_nothing(tmp_path):
    write_trajectories(tmp_path / "step_000005.jsonl", two_groups(), [0.0] * 5, keep=0, decode=decode, image_kb=1024)
    assert list(tmp_path.iterdir()) == []


def test_malformed_boxes_are_recorded_as_none(tmp_path):
    calls = [ToolCallRecord(0, "image_zoom_in_tool", args, False, "Error")
             for args in ({"bbox_2d": [1, 2, 3]}, {"bbox_2d": [True, 0, 5, 5]}, {"bbox_2d": ["a", 0, 5, 5]},
                          {"bbox_2d": [0, 0, float("inf"), 5]}, None, {"label": "x"})]
    t = episode("s5-0-0", "s5-0", [CALL % "[1, 2, 3]", "<answer>x</answer>"], calls, [solid("white", (56, 56))], 0.0)
    write_trajectories(tmp_path / "step_000005.jsonl", [t], [0.0], keep=1, decode=decode, image_kb=1024)
    assert [c["box"] for c in lines(tmp_path / "step_000005.jsonl")[0]["tool_calls"]] == [None] * 6
