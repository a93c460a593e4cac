"""The tool plugin interface: registry entries, the toy tool added as one module + one YAML entry,
the <code> call format, stop-at-call turns, per-episode caps, instances and their release, and the
DeepEyesV2 reward. Golden values come from the chat template rendered on the full conversation,
from PIL/numpy, or from the formula worked by hand.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from PIL import Image

from deepeyes.chat import CHAT_TEMPLATE
from deepeyes.config import ConfigError, JudgeConfig, RolloutConfig, ToolsConfig, load_config
from deepeyes.contracts import ScoreRequest, ToolResult
from deepeyes.policy import encode_text_with_images, load_policy
from deepeyes.toolspec import ToolSpecError, enabled_specs, prompt_schemas, specs_for
from services.judge.reward import combine, read_format, searched
from services.rollout.agent_loop import run_episode
from services.rollout.calls import parse_calls
from services.rollout.engines import GenerateResult, hits_stop_string
from services.rollout.types import EpisodeRequest, PolicyIO
from services.tools.registry import CallContext, load_tool, run_call

TOY = ToolsConfig(enabled=["image_zoom_in_tool", "image_mean_color"],
                  registry_files=["examples/toy_tool/tools.yaml"])
V2 = ToolsConfig(enabled=["python", "search", "image_search"], stop_at_call=True)


@pytest.fixture(scope="module")
def io(tiny_policy_dir):
    return PolicyIO.from_policy(load_policy(tiny_policy_dir))


class Scripted:
    """Replays assistant texts as ids; `end=False` turns end without <|im_end|> (a stop string)."""

    def __init__(self, io, texts, end=True):
        self.io, self.texts, self.end, self.sampling = io, list(texts), end, []

    async def __call__(self, prompt_ids, images, sampling):
        self.sampling.append(sampling)
        text = self.texts.pop(0)
        ids = self.io.tokenizer(text, add_special_tokens=False)["input_ids"]
        stopped = any(s in text for s in sampling.stop_strings)
        if self.end and not stopped:
            ids = ids + [self.io.eos_id]
        return GenerateResult(ids, [-0.5] * len(ids), "stop")


class LocalTools:
    """Runs registry tools in process (the Serve host's core, without Serve): instance ids seen,
    creations and releases counted."""

    def __init__(self, specs, results=None):
        self.tools = {s.name: load_tool(s) for s in specs if s.deployment == "ToolService"}
        self.results = results or {}
        self.calls, self.released = [], []

    async def __call__(self, name, image, arguments, **options):
        self.calls.append((name, arguments, options))
        if name in self.results:
            return self.results[name]
        return run_call(self.tools.get(name), name, CallContext(image=image, options=options), arguments,
                        sorted(self.tools))

    async def release(self, name, instance_id):
        self.released.append((name, instance_id))


def episode(image=None, uid="e0"):
    image = image or Image.new("RGB", (300, 200), (30, 60, 90))
    return EpisodeRequest(uid=uid, group_id="g0", messages=[
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}],
        images=[image], ground_truth="a", question="Q?", data_source="vstar", extra={"row_id": "row-7"})


def run(io, texts, tools_cfg, tools, end=True):
    cfg = RolloutConfig(max_response_length=4096, max_new_tokens_per_turn=512, max_prompt_length=8192)
    engine = Scripted(io, texts, end)
    traj = asyncio.run(run_episode(episode(), policy_io=io, generate=engine, call_tool=tools, score=None, cfg=cfg,
                                   tools_cfg=tools_cfg, release_tool=tools.release))
    return traj, engine


# ---- the registry ---------------------------------------------------------------------------


def test_the_toy_tool_is_one_module_and_one_yaml_entry(io):
    specs = specs_for(TOY)
    assert [s.name for s in specs] == ["image_zoom_in_tool", "image_mean_color"]
    assert [s["function"]["name"] for s in prompt_schemas(specs)] == ["image_zoom_in_tool", "image_mean_color"]
    call = '<tool_call>\n{"name": "image_mean_color", "arguments": {"bbox_2d": [0, 0, 56, 56]}}\n</tool_call>'
    tools = LocalTools(specs)
    traj, _ = run(io, [call, "<answer>a</answer>"], TOY, tools)
    frame = io.to_model_frame(episode().images[0])
    mean = np.asarray(frame.convert("RGB"), dtype=np.float64)[:56, :56].reshape(-1, 3).mean(axis=0)
    expected = f"The mean colour is RGB({mean[0]:.1f}, {mean[1]:.1f}, {mean[2]:.1f})."
    assert [(c.name, c.ok, c.text, c.status) for c in traj.tool_calls] == [("image_mean_color", True, expected, "ok")]
    assert expected in io.tokenizer.decode(traj.response_ids)
    assert tools.released == []  # a stateless tool has nothing to release


def test_unknown_tools_and_bad_entries_fail_at_load(tmp_path):
    with pytest.raises(ConfigError, match="unknown tool.*'zoom'.*known:"):
        load_config(None, ["tools.enabled=[zoom]"])
    with pytest.raises(ConfigError, match="settings names 'nope'"):
        load_config(None, ["tools.settings={nope: {config: {}}}"])
    twice = tmp_path / "twice.yaml"
    twice.write_text("tools:\n  - {name: search, class: a.b:C, deployment: X, schema: "
                     "{function: {name: search}}}\n")
    with pytest.raises(ToolSpecError, match="'search' is defined in .*tools.yaml and in"):
        enabled_specs(["search"], [str(twice)])
    bad = tmp_path / "bad.yaml"
    bad.write_text("tools:\n  - {name: t, class: a.b:C, deployment: X, call_format: xml}\n")
    with pytest.raises(ToolSpecError, match="call_format must be one of"):
        enabled_specs(["t"], [str(bad)])


def test_settings_override_an_entry():
    cfg = ToolsConfig(enabled=["python"], settings={"python": {"config": {"memory_mb": 2048},
                                                              "deployment_options": {"num_replicas": 3}}})
    (spec,) = specs_for(cfg)
    assert spec.config["memory_mb"] == 2048 and spec.config["timeout_s"] == 8.0
    assert spec.deployment_options["num_replicas"] == 3 and spec.deployment_options["num_cpus"] == 0.5


# ---- parsing ---------------------------------------------------------------------------------


def test_code_blocks_and_tool_calls_in_order_of_appearance():
    specs = specs_for(V2)
    text = ('<think>x</think><tool_call>{"name": "search", "arguments": {"query": "q"}}</tool_call>'
            '<code>\n```python\nprint(1)\n```\n</code><code>print(2)</code><code>```python\n```</code>'
            '<tool_call>{"name": "image_search", "arguments": null}</tool_call>')
    assert parse_calls(text, specs) == [
        ("search", {"query": "q"}, None), ("python", {"code": "print(1)"}, None), ("python", {"code": "print(2)"}, None),
        ("python", None, "Error: the <code> block holds no code. Write <code>\n```python\n...\n```\n</code>."),
        ("image_search", {}, None)]
    # without a code tool enabled, <code> is just text
    assert parse_calls("<code>print(1)</code>", specs_for(ToolsConfig())) == []


def test_the_hf_engine_stop_check_sees_a_call_end(io):
    ids = io.tokenizer("<think>t</think><code>\n```python\nx=1\n```\n</code>", add_special_tokens=False)["input_ids"]
    assert hits_stop_string(io.tokenizer, ids, ["</code>"])
    assert not hits_stop_string(io.tokenizer, ids[:-2], ["</code>"])


# ---- the loop with plugin tools --------------------------------------------------------------


CODE = "<think>look</think><code>\n```python\nprint(image_1.size)\n```\n</code>"
OUT = "Code execution result:\nstdout:\n```\n(252, 168)\n```\n\nstderr:\n```\n\n```\n\n"


def test_a_code_turn_stops_at_its_end_and_returns_a_code_result_turn(io):
    figure = Image.new("RGB", (56, 56), "red")
    tools = LocalTools(specs_for(V2), {"python": ToolResult(True, OUT, images=[figure])})
    traj, engine = run(io, [CODE, "<think>ok</think><answer>a</answer>"], V2, tools)
    assert engine.sampling[0].stop_strings == ["</code>", "</tool_call>"]
    name, args, options = tools.calls[0]
    assert (name, args) == ("python", {"code": "print(image_1.size)"})
    assert options["row_id"] == "row-7" and options["fresh"] is True and options["instance_id"].startswith("e0-")
    assert tools.released == [("python", options["instance_id"])]  # released once, at the end
    # the reference: the template on the whole conversation (the loop's <|im_end|> after the stopped turn)
    full = [{"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
            {"role": "assistant", "content": CODE},
            {"role": "user", "content": [{"type": "text", "text": OUT + "Images:\n"}, {"type": "image"}]},
            {"role": "assistant", "content": "<think>ok</think><answer>a</answer>"}]
    text = io.tokenizer.apply_chat_template(full, tools=prompt_schemas(specs_for(V2)), chat_template=CHAT_TEMPLATE,
                                            tokenize=False)
    ref = encode_text_with_images(io, text, traj.image_grid_thw)
    assert traj.prompt_ids + traj.response_ids == ref[:len(traj.prompt_ids) + len(traj.response_ids)]
    assert len(ref) == len(traj.prompt_ids) + len(traj.response_ids) + 1  # the template's final "\n"
    code_ids = io.tokenizer(CODE, add_special_tokens=False)["input_ids"]
    assert traj.loss_mask[:len(code_ids) + 1] == [1] * len(code_ids) + [0]  # <|im_end|> is the loop's
    assert [c.images for c in traj.tool_calls] == [1] and len(traj.images) == 2


def test_instances_are_fresh_per_episode_and_image_search_runs_once(io):
    tools = LocalTools(specs_for(V2), {"image_search": ToolResult(True, "results"),
                                       "python": ToolResult(True, OUT)})
    isearch = '<tool_call>{"name": "image_search", "arguments": {}}</tool_call>'
    traj, _ = run(io, [CODE, isearch, isearch, CODE, "<answer>a</answer>"], V2, tools)
    assert [c.status for c in traj.tool_calls] == ["ok", "ok", "error", "ok"]
    assert traj.tool_calls[2].text == "Error: image_search can be called at most 1 time(s) per episode."
    assert [o["fresh"] for n, _, o in tools.calls if n == "python"] == [True, False]
    first = tools.calls[0][2]["instance_id"]
    tools2 = LocalTools(specs_for(V2), {"python": ToolResult(True, OUT)})
    run(io, [CODE, "<answer>a</answer>"], V2, tools2)
    assert tools2.calls[0][2]["instance_id"] != first  # never shared between trajectories
    assert traj.score_request().tools_used == ["python", "image_search", "image_search", "python"]


def test_a_failing_tool_call_is_an_error_turn_and_the_instance_is_still_released(io):
    class Dying(LocalTools):
        async def __call__(self, name, image, arguments, **options):
            self.calls.append((name, arguments, options))
            raise RuntimeError("replica died")

    tools = Dying(specs_for(V2))
    traj, _ = run(io, [CODE, "<answer>a</answer>"], V2, tools)
    assert traj.tool_calls[0].status == "lost" and "replica died" in traj.tool_calls[0].text
    assert traj.finish_reason == "answer" and len(tools.released) == 1


# ---- the DeepEyesV2 reward -------------------------------------------------------------------


V2_JUDGE = dataclasses.replace(JudgeConfig(), reward="deepeyes_v2", tool_weight=0.0, max_answer_chars=300)


@pytest.mark.parametrize("acc, fmt_error, search, expected", [
    (1.0, False, False, 0.8 + 0.2),          # right, well formed
    (1.0, False, True, 0.8 * 0.9 + 0.2),     # right after a search: 0.92
    (0.0, False, True, 0.2),                 # wrong, well formed
    (1.0, True, False, 0.8),                 # right, badly formed: fmt 0, not -1
    (0.0, True, True, 0.0),
])
def test_deepeyes_v2_score(acc, fmt_error, search, expected):
    r = combine(acc, fmt_error, True, V2_JUDGE, search=search)
    assert r.score == pytest.approx(expected) and r.tool == (1.0 if acc == 1.0 else 0.0)
    # the opt-in bonus, gated on acc >= 0.5
    bonus = dataclasses.replace(V2_JUDGE, tool_weight=0.5, tool_bonus_min_acc=0.5)
    assert combine(acc, fmt_error, True, bonus, search=search).score == pytest.approx(expected + 0.5 * acc)


def test_deepeyes_v2_format_and_search_rules():
    assert not read_format("look</think><answer>a</answer>", V2_JUDGE)  # the opening <think> is implied
    assert read_format("<think>x</think><code>print(1)<answer>a</answer>", V2_JUDGE)  # unclosed <code>
    assert read_format("<think>x</think><tool_call>{}<answer>a</answer>", V2_JUDGE)
    assert read_format("<think>x<answer>a</answer>", V2_JUDGE)  # no </think>
    assert searched(ScoreRequest("", "", "", tools_used=["python", "search"]), V2_JUDGE)
    assert not searched(ScoreRequest("", "", "", tools_used=["python"]), V2_JUDGE)
