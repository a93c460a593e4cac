"""Rollout throughput (HF engine, dynamic batching) and weight publish+load cost.

    python bench/rollout.py [--episodes 32] [--max-new 32] [--skip-weights]

Part 1: the same 32 seeded episodes (so the same tokens: each sequence samples with its own
generator, whatever it is batched with) run on one engine at 1, 8 and 32 concurrent episodes:
episodes/s, generated tokens/s, mean batch size; ratio to concurrency 1.
Part 2: publish_weights (ray.put + WeightStore) then a Ray actor fetching the latest version and
loading it into its model, for the tiny model and a random-init Qwen2.5-VL of about 100M
parameters, against an in-memory copy of the same bytes (ratio).
Ends with one JSON line of headline figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from deepeyes.chat import SYSTEM_PROMPT  # noqa: E402
from deepeyes.config import RolloutConfig, ToolsConfig, load_config  # noqa: E402
from deepeyes.policy import load_policy, resolve_policy_path, tiny_model_config  # noqa: E402
from services.rollout.agent_loop import run_episode  # noqa: E402
from services.rollout.engines import HFEngine  # noqa: E402
from services.rollout.types import EpisodeRequest, PolicyIO  # noqa: E402


async def _no_tool(name, image, arguments):  # the random tiny policy does not call tools
    raise RuntimeError("no tool in this benchmark")


def requests(n: int) -> list[EpisodeRequest]:
    return [EpisodeRequest(uid=f"e{i}", group_id=f"g{i // 8}", seed=i, messages=[
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape?"}]}],
        images=[Image.new("RGB", (224 + 8 * (i % 4), 168), (40 * (i % 6), 90, 160))]) for i in range(n)]


async def run_at(policy, concurrency: int, reqs: list[EpisodeRequest], cfg: RolloutConfig) -> dict:
    engine = HFEngine(policy, max_batch_size=cfg.max_batch_size, batch_wait_ms=cfg.batch_wait_ms)
    io = PolicyIO.from_policy(policy)
    sem = asyncio.Semaphore(concurrency)

    async def one(r):
        async with sem:
            return await run_episode(r, policy_io=io, generate=engine.generate, call_tool=_no_tool,
                                     score=None, cfg=cfg, tools_cfg=ToolsConfig(), tool_schemas=[])

    t0 = time.perf_counter()
    trajs = await asyncio.gather(*(one(r) for r in reqs))
    wall = time.perf_counter() - t0
    tokens = sum(sum(t.loss_mask) for t in trajs)
    batches = sum(engine.batch_sizes.values())
    mean_bs = sum(k * v for k, v in engine.batch_sizes.items()) / max(batches, 1)
    return {"concurrency": concurrency, "episodes": len(trajs), "wall_s": wall,
            "episodes_per_s": len(trajs) / wall, "tokens_per_s": tokens / wall, "tokens": tokens,
            "mean_batch": mean_bs, "ids": [t.response_ids for t in trajs]}


def model_100m(tokenizer):
    """A random-init Qwen2.5-VL of about 100M parameters on the tiny tokenizer's ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tiny = tiny_model_config(tokenizer)
    t = tiny.text_config
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, bos_token_id=t.bos_token_id,
                         eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
        vision_config=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=768,
                           fullatt_block_indexes=[3]),
        image_token_id=tiny.image_token_id, video_token_id=tiny.video_token_id,
        vision_start_token_id=tiny.vision_start_token_id, vision_end_token_id=tiny.vision_end_token_id,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def weight_sync(models: dict[str, torch.nn.Module]) -> list[dict]:
    import ray

    from services.rollout.weights import get_or_create_weight_store, get_weight_store, publish_weights

    @ray.remote(num_cpus=0.5)
    class Replica:
        """Stands in for a rollout replica: holds a model, pulls the latest version, loads it."""

        def __init__(self, model):
            torch.set_num_threads(1)
            self.model = model

        def load_latest(self) -> tuple[int, float, float]:
            t0 = time.perf_counter()
            version, refs = ray.get(get_weight_store().latest.remote())
            state = ray.get(refs[0])
            t1 = time.perf_counter()
            with torch.no_grad():
                self.model.load_state_dict(state)
            return version, t1 - t0, time.perf_counter() - t1

    rows = []
    get_or_create_weight_store()
    version = 0
    for name, model in models.items():
        replica = Replica.remote(model)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        # baseline: copy the same bytes in memory (best of 3)
        copy_s = min(_timed(lambda: {k: v.clone() for k, v in state.items()}) for _ in range(3))
        best = None
        for _ in range(3):
            version += 1
            t0 = time.perf_counter()
            publish_s = publish_weights(state, version)
            got, fetch_s, load_s = ray.get(replica.load_latest.remote())
            total = time.perf_counter() - t0
            assert got == version
            if best is None or total < best[0]:
                best = (total, publish_s, fetch_s, load_s)
        total, publish_s, fetch_s, load_s = best
        rows.append({"model": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                     "mb": nbytes / 2**20, "publish_s": publish_s, "fetch_s": fetch_s, "load_s": load_s,
                     "total_s": total, "copy_s": copy_s, "ratio": total / copy_s})
        ray.kill(replica)
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=32, help="tokens per turn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="runs per level (best kept)")
    ap.add_argument("--skip-weights", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    full = load_config()
    policy = load_policy(resolve_policy_path(full.model))
    cfg = RolloutConfig(max_new_tokens_per_turn=args.max_new, max_response_length=args.max_new,
                        max_batch_size=32, batch_wait_ms=5.0, temperature=1.0)
    reqs = requests(args.episodes)
    asyncio.run(run_at(policy, 4, reqs[:4], cfg))  # warm-up
    # The box is shared with other jobs: interleave the levels and keep each level's best of 3.
    best: dict[int, dict] = {}
    for _ in range(args.repeats):
        for c in (1, 8, 32):
            r = asyncio.run(run_at(policy, c, reqs, cfg))
            if c not in best or r["wall_s"] < best[c]["wall_s"]:
                best[c] = r
    results = [best[c] for c in (1, 8, 32)]
    same = all(r["ids"] == results[0]["ids"] for r in results)
    base = results[0]
    print(f"\nRollout throughput: tiny Qwen2.5-VL, HF engine, {args.episodes} seeded episodes, "
          f"<= {args.max_new} new tokens, torch threads {args.threads}, best of {args.repeats}; "
          f"identical tokens at every level: {same}")
    print(f"{'concurrency':>11} {'episodes/s':>11} {'tokens/s':>9} {'mean batch':>10} {'x vs 1':>7}")
    for r in results:
        print(f"{r['concurrency']:>11} {r['episodes_per_s']:>11.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['mean_batch']:>10.1f} {r['tokens_per_s'] / base['tokens_per_s']:>7.2f}")

    sync_rows = []
    if not args.skip_weights:
        import ray

        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        sync_rows = weight_sync({"tiny": policy.model, "qwen2.5-vl-100m": model_100m(policy.tokenizer)})
        ray.shutdown()
        print("\nWeight publish + pull + load (best of 3) vs an in-memory copy of the same bytes")
        print(f"{'model':>16} {'params M':>8} {'MiB':>7} {'publish s':>9} {'fetch s':>8} {'load s':>7} "
              f"{'total s':>8} {'copy s':>7} {'ratio':>6}")
        for r in sync_rows:
            print(f"{r['model']:>16} {r['params_m']:>8.1f} {r['mb']:>7.1f} {r['publish_s']:>9.3f} {r['fetch_s']:>8.3f} "
                  f"{r['load_s']:>7.3f} {r['total_s']:>8.3f} {r['copy_s']:>7.3f} {r['ratio']:>6.1f}")

    headline = {"episodes_per_s": {r["concurrency"]: round(r["episodes_per_s"], 2) for r in results},
                "tokens_per_s": {r["concurrency"]: round(r["tokens_per_s"], 1) for r in results},
                "speedup_32_vs_1": round(results[-1]["tokens_per_s"] / base["tokens_per_s"], 2),
                "same_tokens": same,
                "sync_total_s": {r["model"]: round(r["total_s"], 3) for r in sync_rows},
                "sync_vs_copy": {r["model"]: round(r["ratio"], 1) for r in sync_rows}}
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
