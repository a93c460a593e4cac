"""Pieces of the GRPO loop that need no cluster: data order, DAPO refill, lr schedule, IoU."""

from __future__ import annotations

import pytest

from deepeyes.config import load_config
from deepeyes.contracts import RewardResult
from services.rollout.trajectory import ToolCallRecord, Trajectory
from trainer.evaluate import grounding, iou
from trainer.loop import lr_factor, total_steps
from trainer.rollouts import dynamic_sampling


def _traj(group: str, score: float) -> Trajectory:
    return Trajectory(uid=f"{group}-{score}", group_id=group, prompt_ids=[1], response_ids=[2], loss_mask=[1],
                      logprobs=[0.0], images=[], image_grid_thw=[], response_text="", reward=RewardResult(score, 0.0, 0.0, 0.0))


def test_dynamic_sampling_drops_flat_groups_and_refills():
    trajs = [_traj("a", 0.0), _traj("a", 1.8), _traj("b", -0.2), _traj("b", -0.2), _traj("c", 0.8), _traj("c", 0.8)]
    calls = []

    def more(take, needed, round_):
        calls.append((take, needed, round_))
        # round 0 brings one useful group and one flat group; round 1 one useful group
        if round_ == 0:
            return [_traj("d", 0.0), _traj("d", 2.0), _traj("e", 0.6), _traj("e", 0.6)]
        return [_traj("f", -0.2), _traj("f", 0.8)]

    kept, dropped = dynamic_sampling(trajs, groups_wanted=3, max_rounds=2, more_episodes=more)
    assert {t.group_id for t in kept} == {"a", "d", "f"}
    assert dropped == 3  # b, c, then e
    assert calls == [(2, 2, 0), (1, 1, 1)]


def test_dynamic_sampling_takes_the_global_max_of_rows():
    trajs = [_traj("a", 0.0), _traj("a", 0.0)]
    seen = []
    kept, dropped = dynamic_sampling(trajs, 1, 1, lambda take, need, r: seen.append((take, need)) or [],
                                     global_max=lambda x: 4)  # another worker misses 4 groups
    assert seen == [(4, 1)] and kept == [] and dropped == 1


def test_total_steps_and_lr_schedule():
    cfg = load_config(None, ["trainer.steps=0", "trainer.batch_size=4", "trainer.epochs=2",
                             "trainer.warmup_steps=2", "trainer.lr_schedule=cosine"])
    assert total_steps(cfg, 10) == 5  # ceil(10 * 2 / 4)
    assert [round(lr_factor(cfg, s, 6), 6) for s in (1, 2, 4, 6)] == [0.5, 1.0, 0.5, 0.0]  # cos(pi*2/4)=0


def test_iou_and_grounding():
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    t = _traj("g", 1.0)
    from PIL import Image

    t.images = [Image.new("RGB", (112, 56))]
    t.extra = {"target_bbox": [200, 100, 400, 200], "orig_size": [448, 224]}  # frame = original / 4
    t.tool_calls = [ToolCallRecord(0, "image_zoom_in_tool", {"bbox_2d": [50, 25, 100, 50]}, True, "ok")]
    assert grounding(t) == pytest.approx((1.0, 1.0))
    t.tool_calls = [ToolCallRecord(0, "image_zoom_in_tool", {"bbox_2d": [0, 0, 70, 35]}, True, "ok")]
    # box 70x35 = 2450, target 50..100 x 25..50 (1250) -> overlap 20x10 = 200; union 3500
    assert grounding(t) == pytest.approx((200 / 3500, 0.0))  # centre (75, 37.5) lies outside


class _Resp:
    def __init__(self, value):
        self.value = value

    def result(self, timeout_s=None):
        return self.value


class _FakeJudgeHandle:
    """Stands in for the judge app's handle: scores by the rule judge's reward formula."""

    def __init__(self):
        self.seen = []
        self.score = self

    def remote(self, req):
        self.seen.append(req)
        return _Resp(RewardResult(0.8 if req.ground_truth in req.response_text else 0.0, 1.0, 0.0, 0.0))


def test_unscored_episodes_are_scored_by_the_driver_and_drops_are_kept_out():
    from trainer.rollouts import keep_judged, score_unscored

    a, b = _traj("g", 0.0), _traj("g", 0.0)
    a.reward, b.reward = None, None  # rollout.reward=never: the replica did not score
    a.response_text, a.ground_truth, b.ground_truth = "<answer>red</answer>", "red", "blue"
    judge = _FakeJudgeHandle()
    score_unscored(judge, [a, b, _traj("h", 1.8)])
    assert [r.ground_truth for r in judge.seen] == ["red", "blue"]  # only the unscored ones
    assert (a.reward.score, b.reward.score) == (0.8, 0.0)
    with pytest.raises(RuntimeError, match="no judge app is running"):
        c = _traj("g", 0.0)
        c.reward = None
        score_unscored(None, [c])
    failed = _traj("k", 0.0)
    failed.reward = RewardResult(float("nan"), float("nan"), 0.0, float("nan"), judge_ok=False, drop=True)
    kept, failures = keep_judged([a, failed, b])
    assert kept == [a, b] and failures == 1


def test_resumed_sink_drops_the_rows_of_redone_steps(tmp_path):
    import json

    from trainer.metrics import MetricsSink

    sink = MetricsSink(tmp_path, tensorboard=False, ray_metrics=False)
    for step in (1, 2, 3):  # the run died after writing step 3; its last checkpoint is step 2
        sink.write(step, {"reward/score": float(step)})
    sink.close()
    again = MetricsSink(tmp_path, tensorboard=False, ray_metrics=False, start_step=3)
    again.write(3, {"reward/score": 30.0})
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["reward/score"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        again.write(4, {"reward/scroe": 1.0})


def test_run_health_stops_on_a_failing_judge_and_warns_on_flat_steps(caplog):
    from trainer.loop import RunHealth

    cfg = load_config(overrides=["judge.stop_failure_share=0.5", "judge.stop_after_steps=2",
                                 "trainer.warn_flat_steps=2"])
    health = RunHealth(cfg)

    def step(failures, flat):
        return [{"asked": 8, "judge_failures": failures, "groups": 2, "flat_groups": flat}] * 2

    assert health.check(1, step(8, 0)) == ""          # one bad step is not yet a pattern
    assert health.check(2, step(3, 0)) == ""          # 6/16 < 50%: the count starts again
    assert health.check(3, step(4, 2)) == ""          # 8/16 = 50%: first failing step
    with caplog.at_level("WARNING", logger="deepeyes.trainer"):
        reason = health.check(4, step(8, 2))
    assert "failed 16 of 16 judgments at step 4" in reason and "2 steps in a row" in reason
    assert "no gradient signal" in caplog.text and "steps 3-4" in caplog.text
    never = RunHealth(load_config(overrides=["judge.stop_after_steps=0"]))
    assert all(never.check(s, step(8, 0)) == "" for s in range(10))


def test_processed_images_equal_the_processor_on_the_whole_list(tiny_policy_dir):
    """build_examples processes each distinct image once per step; the result is exactly the
    processor's output for the trajectory's whole image list (a shared original, own crops)."""
    import torch
    from PIL import Image

    from deepeyes.policy import load_policy, process_images
    from trainer.loop import processed_images

    policy = load_policy(tiny_policy_dir)
    original = Image.new("RGB", (280, 196), (200, 30, 60))
    crops = [Image.new("RGB", (112, 84), (10, 20 * i, 90)) for i in range(3)]
    seen: dict = {}
    for images in ([original.copy(), crops[0]], [original.copy()], [original.copy(), crops[1], crops[2]]):
        pv, grid = processed_images(policy, images, seen)
        want_pv, want_grid = process_images(policy, images)
        assert torch.equal(grid, want_grid) and torch.equal(pv, want_pv)
    assert len(seen) == 4 and processed_images(policy, [], seen) == (None, None)


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self, timeout_s=None):
        return self.value


class _VersionedRollout:
    """Stand-in for the rollout app's handle: each episode comes back sampled by a set version."""

    def __init__(self, versions):
        self.versions = list(versions)
        self.run_episode = self

    def remote(self, req):
        t = _traj(req.group_id, float(len(self.versions) % 2))
        t.policy_version = self.versions.pop(0)
        return _Done(t)


def test_episodes_older_than_max_staleness_are_dropped_and_counted():
    """The staleness bound (issue 17): an episode sampled by version v trains at version s only if
    s - v <= max_staleness; older ones are dropped and counted; k = 0 keeps only fresh ones."""
    from deepeyes.data import Row
    from trainer.rollouts import Rollouts

    cfg = load_config(None, ["rollout.n=2"])
    rows = [Row(index=f"p{i}", data_source="vstar", messages=[{"role": "user", "content": "q"}], image_bytes=[],
                ground_truth="A", question="q", extra={}, position=i) for i in range(3)]
    for k, kept_versions, dropped in [(0, [5, 5], 4), (1, [4, 4, 5, 5], 2), (2, [3, 3, 4, 4, 5, 5], 0)]:
        handle = _VersionedRollout([3, 3, 4, 4, 5, 5])  # two samples each of three prompts
        r = Rollouts(cfg, handle, None, step=7, version=5, max_staleness=k)
        inflight = r.submit(rows, step=7)
        assert [req.min_version for req, _ in inflight.pending] == [5] * 6
        kept = r.collect(inflight)
        assert sorted(t.policy_version for t in kept) == kept_versions
        assert r.stale_dropped == dropped and r.asked == 6
        assert sorted(r.staleness) == sorted(5 - v for v in kept_versions) and max(r.staleness) <= k


def test_rollout_idle_share_from_the_replicas_stamps_by_hand():
    """timing/rollout_idle_share (issue 17): per replica, 1 - engine busy seconds / wall seconds
    between the stamps its episodes carried at two steps; the mean over replicas."""
    from trainer.metrics import engine_stamps, rollout_idle_share

    def stamped(replica, wall, busy):
        t = _traj("g", 0.0)
        t.extra["engine_stamp"] = (replica, wall, busy)
        return t

    seen: dict = {}
    first = engine_stamps([stamped("a", 100.0, 5.0), stamped("a", 101.0, 5.5), stamped("b", 100.5, 1.0)])
    assert first == {"a": (101.0, 5.5), "b": (100.5, 1.0)}  # the latest stamp of each replica
    assert rollout_idle_share(seen, first) is None  # one stamp per replica: no interval yet
    # a: 4 s of wall, 3 s busy -> idle 0.25; b: 2 s of wall, 0.5 s busy -> idle 0.75
    assert rollout_idle_share(seen, {"a": (105.0, 8.5), "b": (102.5, 1.5)}) == pytest.approx(0.5)
    assert rollout_idle_share(seen, {"a": (105.0, 8.5)}) is None  # nothing newer than what was seen
    assert rollout_idle_share(seen, {"c": (110.0, 1.0)}) is None and "c" in seen
