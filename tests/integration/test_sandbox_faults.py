"""Chaos, the python sandbox (issue 29): its Serve replica SIGKILLed while an episode's code runs.

Real: the tools app as the job deploys it (ToolService and the PythonSandbox ToolHost, from the
tiny DeepEyesV2 recipe's registry), Serve's handles with the trajectory's instance id as the
multiplexed id (`serve_tool_fn`, `serve_release_fn`), the agent loop, the sandbox kernels. Scripted:
the policy's turns (ScriptedPolicy below: the tiny random policy cannot be made to write a given
program), so that the kill lands inside a call every time. The tiny DeepEyesV2 job runs with its
real policy in tests/e2e/test_agentic_job.py.

Asserted (the issue's "done when"): the episode whose call was running gets an error turn and goes
on; its next call gets a fresh kernel that says the state is gone; an episode started after the
kill runs clean; every episode ends; and no kernel of the dead replica outlives it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time

import pytest
from PIL import Image

from bench.runner import sandbox_kernel_pids, serve_replica_pids
from deepeyes.chat import SYSTEM_PROMPT_AGENTIC
from deepeyes.config import load_config
from deepeyes.policy import load_policy
from deepeyes.toolspec import specs_for
from services.rollout.agent_loop import run_episode
from services.rollout.app import serve_release_fn, serve_tool_fn
from services.rollout.engines import GenerateResult
from services.rollout.types import EpisodeRequest, PolicyIO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

APP = "sandbox-chaos"
LONG = "<think>count first</think><code>\n```python\nx = 41\nimport time\ntime.sleep(60)\n```\n</code>"
READ_X = "<think>now use x</think><code>\n```python\nprint(x + 1)\n```\n</code>"
CLEAN = "<think>a sum</think><code>\n```python\ny = 2\nprint(y * 21)\n```\n</code>"
ANSWER = "<think>done</think><answer>42</answer>"


class ScriptedPolicy:
    """The policy's turns, fixed: replays texts as token ids ending with <|im_end|>."""

    def __init__(self, io: PolicyIO, texts: list[str]):
        self.io, self.texts = io, list(texts)

    async def __call__(self, prompt_ids, images, sampling):
        ids = self.io.tokenizer(self.texts.pop(0), add_special_tokens=False)["input_ids"] + [self.io.eos_id]
        return GenerateResult(ids, [-0.5] * len(ids), "stop")


def request(uid: str) -> EpisodeRequest:
    return EpisodeRequest(uid=uid, group_id=uid, messages=[
        {"role": "system", "content": SYSTEM_PROMPT_AGENTIC},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is 41 + 1?"}]}],
        images=[Image.new("RGB", (112, 84), "green")], ground_truth="42", question="What is 41 + 1?",
        data_source="chaos")


@pytest.fixture(scope="module")
def sandbox_app(ray_cluster):
    from ray import serve

    from services.tools.app import bind_tools

    cfg = load_config("deploy/configs/tiny-deepeyesv2.yaml", [])
    settings = {**cfg.tools.settings, "python": {"config": {"timeout_s": 120.0, "spares": 1}}}
    # the whole exchange may outlast a replica restart: the kill must show as a lost call, not a timeout
    tools = dataclasses.replace(cfg.tools, enabled=["python"], settings=settings, timeout_s=120.0)
    serve.run(bind_tools(tools, None, {"ray_actor_options": {"num_cpus": 0.1}}, False), name=APP,
              route_prefix=f"/{APP}")
    yield tools, cfg.rollout
    serve.delete(APP)


def test_a_sandbox_replica_killed_mid_call_costs_one_error_turn(sandbox_app, tiny_policy_dir):
    from ray import serve

    tools, rollout_cfg = sandbox_app
    specs = specs_for(tools)
    plugins = {"PythonSandbox": serve.get_deployment_handle("PythonSandbox", app_name=APP)}
    call_tool = serve_tool_fn(serve.get_deployment_handle("ToolService", app_name=APP), plugins, specs)
    release = serve_release_fn(plugins, specs)
    io = PolicyIO.from_policy(load_policy(tiny_policy_dir))
    rollout_cfg = dataclasses.replace(rollout_cfg, max_assistant_turns=5)

    def episode(uid: str, texts: list[str]):
        return run_episode(request(uid), policy_io=io, generate=ScriptedPolicy(io, texts), call_tool=call_tool,
                           score=None, cfg=rollout_cfg, tools_cfg=tools, specs=specs, release_tool=release)

    [victim] = serve_replica_pids(APP, "PythonSandbox")
    spare = set(sandbox_kernel_pids())

    async def scenario():
        hit = asyncio.create_task(episode("hit", [LONG, READ_X, ANSWER]))
        deadline = time.monotonic() + 120
        # wait until the episode's kernel is bound
        while not (set(sandbox_kernel_pids()) - spare) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        doomed = set(sandbox_kernel_pids()) - spare
        assert doomed, "the episode never got a kernel"
        await asyncio.sleep(1.0)  # inside time.sleep(60)
        os.kill(victim, signal.SIGKILL)
        after = await episode("after", [CLEAN, ANSWER])
        return await hit, after, doomed

    hit, after, doomed = asyncio.run(scenario())

    # the running call came back as an error turn, and the episode went on to its answer
    first, second = hit.tool_calls
    assert first.status == "lost" and not first.ok and "python" in first.text, first
    assert hit.finish_reason == "answer" and hit.num_turns == 6  # 1 + 3 assistant + 2 observation turns
    # the next call reached the restarted replica: a fresh kernel that says the state is gone
    assert "state was lost" in second.text and "NameError" in second.text, second.text
    # an episode started after the kill is untouched
    [clean] = after.tool_calls
    assert clean.status == "ok" and "42" in clean.text, clean.text
    assert after.finish_reason == "answer"
    # nothing of the dead replica outlives it; the new replica holds no instance after the releases
    deadline = time.monotonic() + 30
    while set(sandbox_kernel_pids()) & doomed and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(sandbox_kernel_pids()) & doomed
    [new] = serve_replica_pids(APP, "PythonSandbox")
    assert new != victim
    assert plugins["PythonSandbox"].stats.remote().result()["instances"] == 0
