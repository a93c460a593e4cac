"""Run benchmark items as agent episodes through the rollout app and write what came out.

`run_items` is the loop both the CLI (`python -m trainer eval`) and the trainer's validation use:
items are taken a chunk at a time (images decoded for that chunk only), each as k samples per
mode (with the tool / without it), all of a chunk in flight at once on the rollout replicas; each
episode is scored by the rule matcher, the judge only when the answer names no option.
`EvalCluster` starts what the trainer starts (a local Ray cluster unless one is named, the tools,
judge and rollout Serve apps on the policy folder) by reusing trainer.driver's functions.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from trainer.eval.items import Item
from trainer.eval.protocol import (Outcome, episode_request, failed_outcome, outcome_from, sample_prompt,
                                   summarize)

log = logging.getLogger("deepeyes.eval")


def judge_with(judge_handle: Any, timeout_s: float = 600.0) -> Callable[[Any, Any], tuple[bool, bool]]:
    """A verdict callable for outcome_from: the rollout's own reward when it scored the episode,
    else the judge app (None: no judge, every unmatched answer is a judge failure)."""
    from services.judge.reward import ScoreRequest

    def verdict(traj: Any, prompt: Any) -> tuple[bool, bool]:
        if traj.reward is not None:
            return traj.reward.acc == 1.0, bool(traj.reward.judge_ok)
        if judge_handle is None:
            return False, False
        req = ScoreRequest(response_text=traj.response_text, question=prompt.text, ground_truth=prompt.reference,
                           data_source=traj.data_source, tool_calls=sum(1 for c in traj.tool_calls if c.executed),
                           crops=traj.crops_returned)
        try:
            res = judge_handle.score.remote(req).result(timeout_s=timeout_s)
        except Exception as e:  # counted as a judge failure, the run goes on
            log.warning("judge failed on %s: %s: %s", traj.uid, type(e).__name__, e)
            return False, False
        return res.acc == 1.0, bool(res.judge_ok)

    return verdict


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_items(handle: Any, judge_handle: Any, items: Iterable[Item], *, k: int, modes: Sequence[str],
              seed: int, greedy: bool, temperature: float | None, map_crops: bool, min_pixels: int,
              max_pixels: int, min_version: int = 0, shuffle: bool = True, chunk_items: int = 8,
              tag: str = "e", on_record: Callable[[dict[str, Any], Any], None] | None = None) -> list[Outcome]:
    """Every item, k samples per mode, through the rollout handle; returns the Outcomes.

    `on_record(record, trajectory_or_None)` sees each episode's items.jsonl record (and its
    trajectory, e.g. for grounding figures) as its chunk finishes.
    """
    from deepeyes.policy import resize_for_model
    from trainer.eval.protocol import decode_item_image
    from trainer.rollouts import run_episodes

    verdict = judge_with(judge_handle)
    outcomes: list[Outcome] = []
    for chunk in _chunks(items, chunk_items):
        reqs, meta = [], {}
        for item in chunk:
            image, orig_size = decode_item_image(item)
            frame = resize_for_model(image, min_pixels, max_pixels)
            del image
            for s in range(k):
                prompt = sample_prompt(item, s, seed, shuffle)
                for mode in modes:
                    uid = f"{tag}-{mode}-{item.benchmark}-{item.id}-{s}"
                    meta[uid] = (item, prompt, mode, s)
                    reqs.append(episode_request(item, prompt, mode=mode, frame=frame, uid=uid,
                                                group_id=f"{tag}-{mode}-{item.benchmark}-{item.id}",
                                                greedy=greedy, temperature=temperature, map_crops=map_crops,
                                                min_version=min_version, orig_size=orig_size))
        trajs, _ = run_episodes(handle, reqs)
        by_uid = {t.uid: t for t in trajs}
        for uid, (item, prompt, mode, s) in meta.items():
            t = by_uid.get(uid)
            out, record = (outcome_from(t, item, prompt, mode, s, verdict) if t is not None
                           else failed_outcome(item, prompt, mode, s))
            outcomes.append(out)
            if on_record is not None:
                on_record(record, t)
    return outcomes


# ---------------------------------------------------------------------------------------------
# the table


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The stdout table: one line per benchmark and mode, then per category with vs without tool."""
    head = (f"{'benchmark':<14} {'mode':<8} {'items':>5} {'k':>3} {'Avg@k':>7} {'pass@k':>7} {'tool_use':>8} "
            f"{'calls/ep':>8} {'err_turns':>9} {'answered':>8} {'judged':>7} {'failed':>6}")
    lines = [head, "-" * len(head)]
    for bench, modes in results.items():
        for mode, s in modes.items():
            lines.append(f"{bench:<14} {mode:<8} {s['items']:>5} {s['k']:>3} {s['avg@k']:>7.3f} {s['pass@k']:>7.3f} "
                         f"{s['tool_use']:>8.3f} {s['calls_per_episode']:>8.2f} {s['error_turn_rate']:>9.3f} "
                         f"{s['answered']:>8.3f} {s['judged']:>7.3f} {s['failed']:>6}")
        cats = sorted({c for s in modes.values() for c in s["categories"]})
        for c in cats:
            parts = "  ".join(f"{mode} {modes[mode]['categories'].get(c, {}).get('avg@k', 0.0):.3f}"
                              for mode in modes)
            lines.append(f"{'':<14}   Avg@k {c}: {parts}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the cluster


class EvalCluster:
    """Ray + the three Serve apps for an evaluation, started as the trainer starts them.

    The rollout app runs with rollout.reward=never: the harness scores (rule matcher first, the
    judge app only for answers that name no option).
    """

    def __init__(self, cfg: Any, out_dir: Path):
        self.cfg, self.out_dir = cfg, out_dir
        self.started_ray = False
        self.deployed: list[str] = []

    def start(self) -> tuple[Any, Any]:
        import yaml
        from ray import serve

        from deepeyes.config import to_dict
        from deepeyes.serving import APP_NAMES, DEPLOYMENT_NAMES
        from trainer.driver import connect_ray, deploy_services, prepare_policy

        t0 = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        self.policy_dir = prepare_policy(self.cfg)
        self.started_ray = connect_ray(self.cfg)
        self.deployed = deploy_services(self.cfg, self.out_dir, self.policy_dir)
        self.startup_s = time.perf_counter() - t0
        handle = serve.get_deployment_handle(DEPLOYMENT_NAMES["rollout"], app_name=APP_NAMES["rollout"])
        judge = serve.get_deployment_handle(DEPLOYMENT_NAMES["judge"], app_name=APP_NAMES["judge"])
        return handle, judge

    def stop(self) -> None:
        from trainer.driver import release_cluster

        release_cluster(self.started_ray, self.deployed)


# ---------------------------------------------------------------------------------------------
# items.jsonl and its thumbnails

IMAGE_KB = 16384  # default per-run budget of the thumbnails kept for `python -m trainer view`


class ItemsWriter:
    """OUT/items.jsonl, one record per episode as run_items hands it over (its `on_record`), and
    small JPEG thumbnails in OUT/images/ for `python -m trainer view`.

    Each record with a trajectory gets the episode's `uid` and `question` (the prompt text as
    shown, options in the sample's order), the model frame's size in `images` (its thumbnail's
    path relative to OUT in `file`), `target_box` in the model frame, and per tool call its `box`
    in the model frame, whether its crop was `appended`, and the crop's thumbnail in `image`.
    Thumbnails (longest side trainer.metrics.THUMBNAIL_SIDE) are kept until `image_kb` KiB are
    spent over the whole run (0 = none; `file`/`image` is then None): an item's frame once, shared
    by its samples and both modes, first come first served; the crops of tool calls only while
    less than half the budget is spent, so the frames of later items keep their share.
    """

    def __init__(self, out_dir: str | Path, image_kb: int = IMAGE_KB):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "items.jsonl"
        self.file = self.path.open("w")
        self.budget = max(image_kb, 0) * 1024
        self.spent = 0
        self.frames: dict[tuple[str, str], str | None] = {}  # (benchmark, item) -> its frame's file
        self.episodes = 0

    def _save(self, image: Any, name: str, limit: int) -> str | None:
        from trainer.metrics import _jpeg

        if self.spent >= limit:
            return None
        data = _jpeg(image)
        if self.spent + len(data) > limit:
            return None
        self.spent += len(data)
        (self.out / "images").mkdir(exist_ok=True)
        (self.out / "images" / name).write_bytes(data)
        return f"images/{name}"

    def _annotate(self, record: dict[str, Any], traj: Any) -> None:
        from trainer.metrics import _frame_box, _target_box

        record["uid"], record["question"] = traj.uid, traj.question
        if not traj.images:
            return
        key = (str(record.get("benchmark")), str(record.get("item")))
        if key not in self.frames:
            self.frames[key] = self._save(traj.images[0], f"item_{len(self.frames):06d}.jpg", self.budget)
        frame = traj.images[0]
        record["images"] = [{"file": self.frames[key], "width": frame.width, "height": frame.height}]
        record["target_box"] = _target_box(traj)
        # traj.images[first_crop:] are the crops, in the order of the calls whose result was appended
        returned = [c for c in traj.tool_calls if c.ok and c.appended]
        first_crop = len(traj.images) - len(returned)
        crop_of = {id(c): first_crop + j for j, c in enumerate(returned)}
        for c, rec in zip(traj.tool_calls, record.get("tool_calls", [])):
            rec["box"], rec["appended"], rec["image"] = _frame_box(c.arguments), c.appended, None
            if id(c) in crop_of and first_crop > 0:
                k = crop_of[id(c)]
                rec["image"] = self._save(traj.images[k], f"crop_{self.episodes:06d}_{k}.jpg", self.budget // 2)

    def __call__(self, record: dict[str, Any], traj: Any) -> None:
        if traj is not None:
            self._annotate(record, traj)
        self.episodes += 1
        self.file.write(json.dumps(record, default=str) + "\n")

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "ItemsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
