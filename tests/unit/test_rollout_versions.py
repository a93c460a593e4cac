"""A replica's weight loads against the episodes it has in flight (issue 17, rollout.partial).

The replica class runs here without Serve or Ray: a stand-in engine (a version and a generate
that takes a little time), a stand-in load that takes the version, and a stand-in agent loop that
runs two turns (RolloutWorker._agent_loop); only RolloutWorker.run_episode's ordering of episodes and loads is real.
"""

from __future__ import annotations

import asyncio

import pytest

from deepeyes.config import load_config
from services.rollout import app as rollout_app
from services.rollout.trajectory import Trajectory
from services.rollout.types import EpisodeRequest


class _StandInEngine:
    """Only what the replica's version gate touches (the Engine protocol's version and busy_s)."""

    def __init__(self) -> None:
        self.version = 1
        self.busy_s = 0.0

    async def generate(self, ids, images, sp):
        await asyncio.sleep(0.01)


async def _two_turn_loop(request, generate, policy_version):
    for _ in range(2):
        await generate([1], [], None)
        await asyncio.sleep(0.05)  # the tool call between the turns
    return Trajectory(uid=request.uid, group_id=request.group_id, prompt_ids=[1], response_ids=[2], loss_mask=[1],
                      logprobs=[0.0], images=[], image_grid_thw=[], response_text="", policy_version=policy_version)


def _replica(partial: bool):
    w = object.__new__(rollout_app.RolloutWorker.func_or_class)
    w.cfg = load_config(None, [f"rollout.partial={str(partial).lower()}"])
    w.engine = _StandInEngine()
    w._gate, w._running, w._loading, w._start_version, w.episodes = asyncio.Condition(), 0, False, 0, 0
    w.loads_at = []

    async def ensure(version):
        w.loads_at.append((version, w._running))  # how many episodes were in flight at the load
        w.engine.version = version

    w._ensure_version = ensure
    w._agent_loop = _two_turn_loop
    w._metrics = type("M", (), {"record": lambda self, t: None, "tags": {"replica": "r0"}})()
    return w


def _request(uid, min_version):
    return EpisodeRequest(uid=uid, group_id="g", messages=[{"role": "user", "content": "q"}], min_version=min_version)


@pytest.mark.parametrize("partial", [False, True])
def test_a_newer_version_waits_for_the_episodes_in_flight_unless_partial(partial):
    w = _replica(partial)

    async def main():
        old = [asyncio.ensure_future(w.run_episode(_request(f"o{i}", 1))) for i in range(3)]
        await asyncio.sleep(0.03)  # the three are between their turns
        new = asyncio.ensure_future(w.run_episode(_request("n", 2)))
        await asyncio.sleep(0.005)
        late_old = asyncio.ensure_future(w.run_episode(_request("o-late", 1)))  # arrives while the load waits
        return await asyncio.gather(*old), await new, await late_old

    old, new, late_old = asyncio.run(main())
    assert new.extra["turn_versions"] == [2, 2] and new.policy_version == 2
    if partial:  # the load went ahead between turns; each turn's version is recorded, the oldest counts
        assert w.loads_at == [(2, 3)]
        assert all(t.extra["turn_versions"] == [1, 2] and t.policy_version == 1 for t in old)
    else:  # the load waited until no episode was in flight; nobody started while it waited
        assert w.loads_at == [(2, 0)]
        assert all(t.extra["turn_versions"] == [1, 1] and t.policy_version == 1 for t in old)
        assert late_old.extra["turn_versions"] == [2, 2]  # it asked for >= 1 and got the new policy
    assert w._running == 0 and not w._loading
    assert all(t.extra["engine_stamp"][0] == "r0" for t in [*old, new, late_old])  # for the rollout idle share
