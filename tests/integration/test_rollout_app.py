"""The rollout app on a local Ray cluster: concurrent episodes, versioned weights, a late replica."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
import torch
from PIL import Image

from deepeyes.chat import SYSTEM_PROMPT
from services.rollout.types import EpisodeRequest

pytestmark = pytest.mark.integration


def overrides(policy_dir, replicas):
    return [f"model.path={policy_dir}", f"serve.rollout.num_replicas={replicas}",
            "serve.rollout.num_cpus=0.25", "serve.rollout.max_ongoing_requests=64",
            "rollout.max_new_tokens_per_turn=8", "rollout.max_response_length=32",
            "rollout.batch_wait_ms=20", "rollout.reward=always", "serve.tools.num_cpus=0.1"]


def episode(i, min_version=0):
    return EpisodeRequest(uid=f"e{i}", group_id=f"g{i // 8}", messages=[
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it?"}]}],
        images=[Image.new("RGB", (120 + i, 90), "red")], ground_truth="red", min_version=min_version, seed=i)


def replica_stats(handle, want):
    """Stats of `want` distinct replicas (calls are routed at random, so ask until all answered)."""
    seen = {}
    for _ in range(60):
        s = handle.stats.remote().result(timeout_s=60)
        seen[s["replica"]] = s
        if len(seen) >= want:
            break
    return seen


def test_rollout_app_versions_and_scale_out(ray_cluster, tiny_policy_dir):
    from ray import serve

    from deepeyes.policy import load_policy
    from services.rollout.app import build_app
    from services.rollout.weights import publish_weights

    try:
        from services.tools.app import build_app as build_tools
        serve.run(build_tools({"overrides": ["serve.tools.num_cpus=0.1"]}), name="tools", route_prefix="/tools")
    except ImportError:  # the tool service lands separately; the tiny policy rarely calls it anyway
        pass
    from services.judge.app import build_app as build_judge
    serve.run(build_judge({"overrides": ["serve.judge.num_cpus=0.1", "judge.backend=rule"]}), name="judge",
              route_prefix="/judge")
    handle = serve.run(build_app({"overrides": overrides(tiny_policy_dir, 2)}), name="rollout",
                       route_prefix="/rollout")

    # 32 concurrent episodes on 2 replicas, version 0, each scored by the judge app
    trajs = [r.result(timeout_s=300) for r in [handle.run_episode.remote(episode(i)) for i in range(32)]]
    assert all(t.policy_version == 0 and 0 < len(t.response_ids) <= 32 for t in trajs)
    # scored through the judge app: the DeepEyes reward takes one of its six values (a random
    # policy almost never writes <answer> tags: mostly format errors, -0.2)
    assert all(min(abs(t.reward.score - v) for v in (-0.2, 0, 0.6, 0.8, 1.8, 2.0)) < 1e-9 for t in trajs)
    assert sum(t.reward.format == -1 for t in trajs) >= 16
    assert {t.uid for t in trajs} == {f"e{i}" for i in range(32)}
    stats = replica_stats(handle, 2)
    assert len(stats) == 2 and sum(s["episodes"] for s in stats.values()) == 32
    assert max(max(s["batch_sizes"], default=0) for s in stats.values()) > 1  # dynamic batching happened

    # publish version 2 (a visibly different policy): every later episode runs on it
    policy = load_policy(tiny_policy_dir)
    state = {k: v.clone() for k, v in policy.model.state_dict().items()}
    state["lm_head.weight"] = torch.randn_like(state["lm_head.weight"]) * 5
    publish_weights(state, 2)
    later = [r.result(timeout_s=300) for r in [handle.run_episode.remote(episode(i, min_version=2)) for i in range(16)]]
    assert all(t.policy_version == 2 for t in later)
    assert any(a.response_ids != b.response_ids for a, b in zip(trajs, later))  # same seeds, new weights
    stats = replica_stats(handle, 2)
    assert all(s["version"] == 2 and s["loads"] == [2] for s in stats.values())  # one load per replica

    # scale out to 3: the new replica starts on version 2 by itself
    handle = serve.run(build_app({"overrides": overrides(tiny_policy_dir, 3)}), name="rollout",
                       route_prefix="/rollout")
    stats = replica_stats(handle, 3)
    assert len(stats) == 3 and all(s["version"] == 2 for s in stats.values())
    more = [r.result(timeout_s=300) for r in [handle.run_episode.remote(episode(i)) for i in range(12)]]
    assert all(t.policy_version == 2 for t in more)

    # the debug HTTP route
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buf, format="PNG")
    body = {"messages": episode(0).messages, "images_b64": [base64.b64encode(buf.getvalue()).decode()],
            "min_version": 2}
    r = httpx.post(f"http://127.0.0.1:{ray_cluster['http_port']}/rollout/episode", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["policy_version"] == 2 and r.json()["num_turns"] >= 2
    assert httpx.get(f"http://127.0.0.1:{ray_cluster['http_port']}/rollout/healthz", timeout=30).json()["ok"]

    # hostile bodies (issue 12 items 1-2): a 4xx that names the cause, never a 500
    url = f"http://127.0.0.1:{ray_cluster['http_port']}/rollout/episode"
    bad_content = {**body, "messages": [{"role": "user", "content": 5}]}
    bad_part = {**body, "messages": [{"role": "user", "content": [{"type": "video"}]}]}
    for bad in [bad_content, bad_part, {**body, "temperature": float("nan")}, {**body, "seed": 2**70}]:
        r = httpx.post(url, content=json.dumps(bad), headers={"content-type": "application/json"},
                       timeout=120)  # json.dumps writes NaN as the attacker's client did
        assert r.status_code == 422, (bad, r.status_code, r.text)
    # issue 12 item 4: a 9.9 KB PNG of 9000x9000 was decoded (+257 MB); now refused from its header
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, format="PNG")
    r = httpx.post(url, json={**body, "images_b64": [base64.b64encode(buf.getvalue()).decode()]}, timeout=120)
    assert r.status_code == 413 and "serve.max_image_pixels" in r.json()["detail"], r.text
    r = httpx.post(url, content=b"x" * (16 * 1024 * 1024 + 1), timeout=120)
    assert r.status_code == 413 and "serve.max_request_bytes" in r.json()["detail"], r.text
    r = httpx.post(url, json={**body, "min_version": 10**9}, timeout=120)
    assert r.status_code == 409 and "latest published is 2" in r.json()["detail"], r.text
    serve.delete("rollout")
    serve.delete("judge")


def test_scripted_episode_through_the_tool_service(ray_cluster, tiny_policy_dir):
    """The replica's tool path (serve_tool_fn) against the real ToolService, with a scripted policy."""
    import asyncio

    from ray import serve

    from deepeyes.config import RolloutConfig, ToolsConfig
    from deepeyes.policy import load_policy
    from services.rollout.agent_loop import run_episode
    from services.rollout.app import serve_tool_fn
    from services.rollout.engines import GenerateResult
    from services.rollout.types import PolicyIO
    from services.tools.app import build_app as build_tools

    serve.run(build_tools({"overrides": ["serve.tools.num_cpus=0.1"]}), name="tools", route_prefix="/tools")
    io_ = PolicyIO.from_policy(load_policy(tiny_policy_dir))
    turns = ['<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [20, 10, 76, 66]}}\n</tool_call>',
             '<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [500, 500, 600, 600]}}\n</tool_call>',
             "<answer>red</answer>"]

    async def scripted(prompt_ids, images, sampling):  # stands in for the policy (a random one never calls)
        ids = io_.tokenizer(turns.pop(0), add_special_tokens=False)["input_ids"] + [io_.eos_id]
        return GenerateResult(ids, [0.0] * len(ids), "stop")

    async def main():
        handle = serve.get_deployment_handle("ToolService", app_name="tools")
        return await run_episode(episode(0), policy_io=io_, generate=scripted,
                                 call_tool=serve_tool_fn(handle), score=None,
                                 cfg=RolloutConfig(max_response_length=2048), tools_cfg=ToolsConfig())

    traj = asyncio.run(main())
    first, second = traj.tool_calls
    assert first.ok and traj.images[1].size == (56, 56)  # a 56x56 crop of the 120x90 frame (model frame 112x84)
    assert not second.ok and second.appended  # outside the image: an error text the episode goes on with
    assert traj.num_turns == 1 + 3 + 2 and traj.finish_reason == "answer"
