"""Cold-start SFT: a short supervised warm start on tool-using conversations.

A random-init policy almost never calls the tool, so GRPO would have nothing to reinforce. From
each synthetic row with a target box we write the conversation DeepEyes teaches: think, call
`image_zoom_in_tool` on the target, read the real crop the tool returns, answer. The token layout
is the rollout's own (prompt with generation header, assistant content through <|im_end|> with
loss, observation segments without), so what SFT teaches is exactly what the agent loop samples.

`python -m trainer.sft [--config ...] [key=value ...]` builds (or finds) the cached warm-started
tiny policy and prints its valid tool-call rate under sampling. The main job uses the same cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from deepeyes.chat import THOUGHT_ANSWER, THOUGHT_DIRECT, THOUGHT_ZOOM, THOUGHT_ZOOM_AT, with_box_scale
from deepeyes.config import Config, ConfigError, load_config
from deepeyes.boxes import box_from_frame, box_scale
from deepeyes.data import ZOOM_PLACES, ZOOM_TASKS, read_deepeyes, write_synthetic
from deepeyes.policy import Policy, build_cached, load_policy, resize_for_model, resolve_policy_path
from deepeyes.policy_family import frame_factor, resolve_family, zoom_box_scale
import asyncio
from deepeyes.images import decode_image
from deepeyes.toolspec import prompt_schemas, specs_for
from services.rollout.agent_loop import run_episode
from services.rollout.hf_engine import HFEngine
from services.rollout.types import EpisodeRequest, PolicyIO
from deepeyes.contracts import ToolResult
from services.tools.registry import CallContext, execute_tool, run_call
from trainer.agentic_sft import agentic_conversation, agentic_index, search_tools
from trainer.packing import make_example
from trainer.perception import perceiving_policy_path
from trainer.supervised import conversation_tokens, save_trained_copy, supervised_steps

log = logging.getLogger("deepeyes.sft")
SFT_VERSION = "sft-v3"  # bump when the cold-start conversations change (the cache key holds it)


def frame_box(target_bbox: Sequence[float], orig_size: tuple[int, int], frame_size: tuple[int, int],
              margin: float = 0.25, grid: int = 0, min_side: int = 32) -> list[int]:
    """The zoom box the cold start teaches: the target box mapped into the model's frame, grown by
    `margin` of its size on each side. With `grid` > 0 the box is also grown to `min_side` px and
    centred on the target's centre snapped to `grid` px: then a coordinate takes a few values,
    which a tiny policy can learn to write (zoom task, valid calls under sampling: 17% after 120
    steps with pixel-exact boxes, 58% after 150 with grid 8; one probe run each)."""
    sx, sy = box_scale(orig_size, frame_size)
    x1, y1, x2, y2 = target_bbox
    w, h = (x2 - x1) * sx, (y2 - y1) * sy
    if grid <= 0:
        box = [x1 * sx - margin * w, y1 * sy - margin * h, x2 * sx + margin * w, y2 * sy + margin * h]
        return [max(0, round(box[0])), max(0, round(box[1])),
                min(frame_size[0], round(box[2])), min(frame_size[1], round(box[3]))]
    w, h = max(w * (1 + 2 * margin), min_side), max(h * (1 + 2 * margin), min_side)
    cx, cy = round((x1 + x2) / 2 * sx / grid) * grid, round((y1 + y2) / 2 * sy / grid) * grid
    w, h = math.ceil(w / 2 / grid) * 2 * grid, math.ceil(h / 2 / grid) * 2 * grid
    return [max(0, cx - w // 2), max(0, cy - h // 2), min(frame_size[0], cx + w // 2), min(frame_size[1], cy + h // 2)]


def sft_answer(row: Any, policy: str, rng: random.Random, zooms: bool = True) -> str:
    """The answer a cold-start conversation ends with: the truth, an option drawn uniformly
    (`random`: the SFT teaches the format, not the task), or (`seen`) the truth where the
    conversation zoomed (the crop shows it) and a random option where it answers at once (the
    frame does not). Rows without options always get the truth."""
    options = list(row.extra.get("options") or [])
    if not options or policy == "truth" or (policy == "seen" and zooms):
        return str(row.ground_truth)
    return rng.choice(options)


def tool_conversation(row: Any, cfg: Config, answer_text: str | None = None, zoom: bool = True
                      ) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """The conversation DeepEyes teaches for one data row, and its images in the model frame.

    The crop is cut as training cuts it (`tools.crop_from`): from the frame, or from the original
    at the box mapped from the frame. `answer_text` replaces the ground truth in the answer.
    `zoom` false (or a row with no target box) answers at once, without the tool."""
    original = row.images[0]  # decodes: read once
    frame = resize_for_model(original, cfg.model.min_pixels, cfg.model.max_pixels, frame_factor(cfg.model))
    messages = [dict(m) for m in with_box_scale(row.messages, zoom_box_scale(cfg))]
    images = [frame]
    if "python" in (row.extra.get("tools") or ()):  # a DeepEyesV2 row: code, search, answer
        return messages + agentic_conversation(row, frame, cfg, agentic_index(row)), images
    answer = f"<answer>{row.ground_truth if answer_text is None else answer_text}</answer>"
    target = row.extra.get("target_bbox")
    if target is None or not zoom:  # no box to zoom on (e.g. math rows), or a direct answer
        messages.append({"role": "assistant", "content": f"<think>{THOUGHT_DIRECT}</think>" + answer})
        return messages, images
    bbox = frame_box(target, row.image_sizes[0], frame.size,  # the box is in the stored image's pixels
                     grid=cfg.trainer.sft_box_grid, min_side=cfg.trainer.sft_box_min)
    # written as the family's checkpoints write boxes: frame pixels, or 0-1000 relative (Qwen3-VL)
    box_scale = zoom_box_scale(cfg)
    arguments = {"bbox_2d": box_from_frame(bbox, frame.size, box_scale), "label": "target"}
    from_original = cfg.tools.crop_from == "original"
    result = execute_tool("image_zoom_in_tool", original if from_original else frame, arguments,
                          min_side_policy=cfg.tools.min_side_policy, frame_size=frame.size if from_original else None,
                          box_scale=box_scale)
    if result.ok:  # the trajectory holds crops in the model frame (the agent loop resizes them too)
        result = dataclasses.replace(result, image=resize_for_model(result.image, cfg.model.min_pixels,
                                                                     cfg.model.max_pixels, frame_factor(cfg.model)))
    place = next((p for p in ZOOM_PLACES if f" {p} quarter" in str(row.extra.get("question", ""))), None)
    thought = THOUGHT_ZOOM_AT.format(place=place) if place else THOUGHT_ZOOM
    messages.append({"role": "assistant", "content": f"<think>{thought}</think>",
                     "tool_calls": [{"type": "function", "function": {"name": "image_zoom_in_tool",
                                                                      "arguments": arguments}}]})
    if result.ok:
        messages.append({"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": result.text}]})
        images.append(result.image)
    else:
        messages.append({"role": "tool", "content": result.text})
    messages.append({"role": "assistant", "content": f"<think>{THOUGHT_ANSWER}</think>" + answer})
    return messages, images


def train_sft(policy: Policy, rows: Sequence[Any], cfg: Config, steps: int, lr: float,
              batch_size: int = 8, seed: int = 0, progress: bool = True) -> list[float]:
    """Supervised steps (token-mean NLL over assistant tokens); returns the loss per step."""
    specs = specs_for(cfg.tools)
    examples = []
    pick = random.Random(seed)
    for row in rows:
        zoom = cfg.trainer.sft_zoom_share >= 1 or pick.random() < cfg.trainer.sft_zoom_share
        messages, images = tool_conversation(row, cfg, sft_answer(row, cfg.trainer.sft_answers, pick, zoom), zoom)
        named = row.extra.get("tools")  # the row's own tools, as the agent loop offers them
        tools = prompt_schemas([s for s in specs if named is None or s.name in named])
        ids, mask, pv, grid = conversation_tokens(policy, messages, images, tools)
        examples.append(make_example(policy.model, ids, mask, 1.0, pv, grid))
    return supervised_steps(policy.model, examples, cfg, steps, lr, batch_size, seed, "sft warm start", progress)


def tool_call_rate(policy: Policy, rows: Sequence[Any], cfg: Config, seed: int = 0) -> dict[str, float]:
    """Episodes sampled (temperature rollout.temperature) by the real agent loop on the HF engine.

    Returns the fraction of episodes with a valid zoom call (a crop came back), with any
    executed call, and with an <answer>: what GRPO will start from.
    """
    engine = HFEngine(policy, max_batch_size=cfg.rollout.max_batch_size, batch_wait_ms=cfg.rollout.batch_wait_ms)
    io = PolicyIO.from_policy(policy)

    async def call_tool(name: str, image: Any, args: Any, frame_size: Any = None, **plugin: Any) -> Any:
        if isinstance(image, bytes):  # crop_from=original: the encoded original, as the tool service gets it
            image = decode_image(image, max_pixels=cfg.data.max_image_pixels)
        if name in ("search", "image_search"):  # in process, as the cold start's conversations ran them
            ctx = CallContext(image=image, options={"row_id": plugin.get("row_id", "")})
            return run_call(search_tools(cfg).get(name), name, ctx, args, ["image_search", "search"])
        if name == "python":  # no kernels in this check: the call counts, its result is an error turn
            return ToolResult(False, "Error: code is not run in the cold start's held-out check.", status="error")
        return execute_tool(name, image, args, min_side_policy=cfg.tools.min_side_policy, frame_size=frame_size)

    async def run_all() -> list[Any]:
        reqs = [EpisodeRequest(uid=f"eval-{i}", group_id=f"eval-{i}", messages=r.messages, images=r.images,
                               ground_truth=r.ground_truth, question=r.question, data_source=r.data_source,
                               extra=r.extra, seed=seed + i,
                               crop_source=r.image_bytes[0] if cfg.tools.crop_from == "original" else None) for i, r in enumerate(rows)]
        return await asyncio.gather(*(run_episode(q, policy_io=io, generate=engine.generate, call_tool=call_tool,
                                                  score=None, cfg=cfg.rollout, tools_cfg=cfg.tools) for q in reqs))

    trajs = asyncio.run(run_all())
    n = max(len(trajs), 1)
    return {"valid_call_rate": sum(t.crops_returned > 0 for t in trajs) / n,
            "any_call_rate": sum(any(c.executed for c in t.tool_calls) for t in trajs) / n,
            "answer_rate": sum("<answer>" in t.response_text for t in trajs) / n,
            "episodes": float(len(trajs))}


def _sft_rows(cfg: Config, rows: int, seed: int) -> list[Any]:
    with tempfile.TemporaryDirectory() as d:
        task = cfg.data.synthetic_task
        mix = {task: 1.0} if task in ZOOM_TASKS else None  # the run's own task
        path = write_synthetic(os.path.join(d, "sft.parquet"), rows=rows, seed=seed, mix=mix)
        return read_deepeyes([path], cfg.data).rows


def warm_start_key(base: Path, cfg: Config) -> str:
    h = hashlib.sha1()
    h.update((base / "model.safetensors").read_bytes())
    h.update(json.dumps([SFT_VERSION, cfg.trainer.sft_steps, cfg.trainer.sft_lr, cfg.model.min_pixels,
                         cfg.model.max_pixels, cfg.tools.enabled, cfg.trainer.sft_rows, cfg.trainer.sft_answers,
                         cfg.data.synthetic_task, cfg.tools.crop_from, cfg.trainer.seed, cfg.trainer.sft_box_grid,
                         cfg.trainer.sft_box_min, cfg.trainer.sft_zoom_share, cfg.trainer.sft_batch_size]).encode())
    scale = zoom_box_scale(cfg)
    if scale != "absolute":  # (absolute, the first families' scale, leaves the earlier keys as they were)
        h.update(scale.encode())
    return h.hexdigest()[:12]


def warm_started_policy_path(cfg: Config, base: Path, progress: bool = True) -> Path:
    """The cached warm-started copy of `base` (built on first use)."""

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        policy = load_policy(base, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels, trainable=True)
        torch.manual_seed(cfg.trainer.seed)
        rows = _sft_rows(cfg, rows=cfg.trainer.sft_rows, seed=cfg.data.synthetic_seed + 7919)
        losses = train_sft(policy, rows, cfg, steps=cfg.trainer.sft_steps, lr=cfg.trainer.sft_lr,
                           batch_size=cfg.trainer.sft_batch_size, progress=progress)
        train_s = time.perf_counter() - t0
        held_out = [r for r in _sft_rows(cfg, rows=24, seed=cfg.data.synthetic_seed + 104729) if r.extra.get("target_bbox")]
        rates = tool_call_rate(policy, held_out, cfg, seed=cfg.trainer.seed)
        log.info("warm start: %d steps in %.1f s, loss %.3f -> %.3f, %s", cfg.trainer.sft_steps, train_s,
                 losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"), rates)
        save_trained_copy(policy, base, tmp)
        (tmp / "warm_start.json").write_text(json.dumps(
            {"base": str(base), "steps": cfg.trainer.sft_steps, "lr": cfg.trainer.sft_lr,
             "batch_size": cfg.trainer.sft_batch_size,
             "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
             "train_seconds": train_s, "seconds": time.perf_counter() - t0, "held_out": rates}, indent=2))

    return build_cached(cfg.model.cache_dir, f"warm-{warm_start_key(base, cfg)}", build)


def prepared_policy_path(cfg: Config, progress: bool = True) -> Path:
    """The policy folder the rollout replicas and Train workers load: `model.path` as it is, or
    for the tiny policy its cached perception pre-stage and cold start (each built on first use)."""
    cfg = resolve_family(cfg)  # the cold start writes boxes on the family's scale
    base = perceived_policy_path(cfg, progress)
    if cfg.model.path == "tiny" and cfg.model.warm_start:
        log.info("cold-start SFT of the tiny policy (cached after the first run)...")
        return warm_started_policy_path(cfg, base, progress=progress)
    return base


def perceived_policy_path(cfg: Config, progress: bool = True) -> Path:
    """`model.path`'s folder, after the tiny policy's perception pre-stage when it has one."""
    base = resolve_policy_path(cfg.model)
    if not (base / "config.json").exists():
        raise ConfigError(f"model.path={cfg.model.path}: no model folder at {base} (config.json missing)")
    if cfg.model.path == "tiny" and cfg.model.tiny_perception_steps > 0:
        log.info("perception pre-stage of the tiny policy (cached after the first run)...")
        return perceiving_policy_path(cfg, base, progress=progress)
    return base


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m trainer.sft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="scenario YAML (default deploy/configs/tiny-cpu.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    path = warm_started_policy_path(cfg, perceived_policy_path(cfg))
    print(f"warm-started policy at {path} ({time.perf_counter() - t0:.1f} s)")
    print((path / "warm_start.json").read_text())


if __name__ == "__main__":
    main()
