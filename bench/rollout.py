"""Rollout throughput of both engines side by side (hf, vllm) and weight publish+load cost.

    python -m bench.rollout [--episodes 32] [--max-new 32] [--engines hf,vllm] [--skip-weights]

Part 1: the same 32 seeded episodes (each sequence samples with its own seed, whatever it is
batched with) through the real agent loop on each engine, same model, prompts and sampling, at 1,
8 and 32 concurrent episodes: episodes/s, generated tokens/s; ratio to concurrency 1 and vLLM/HF.
Engine start time (vLLM: AsyncLLM up; HF: the policy loaded).
Part 2: publish_weights (ray.put + WeightStore) then a Ray actor fetching the latest version and
loading it into its model, for the tiny model and a random-init Qwen2.5-VL of about 100M
parameters, against an in-memory copy of the same bytes (ratio).
Part 3: vLLM's weight reload (VLLMEngine.load_weights: safetensors buckets over collective_rpc,
in-place reload, cache resets) for the same two models, against the same copy.
Ends with one JSON line of headline figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before the tokenizers load

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

from bench.runner import local_cluster, print_headline, print_table  # noqa: E402
from deepeyes.chat import SYSTEM_PROMPT  # noqa: E402
from deepeyes.config import RolloutConfig, ToolsConfig, load_config  # noqa: E402
from deepeyes.policy import load_policy, resolve_policy_path, tiny_model_config  # noqa: E402
from services.rollout.agent_loop import run_episode  # noqa: E402
from services.rollout.hf_engine import HFEngine  # noqa: E402
from services.rollout.types import EpisodeRequest, PolicyIO  # noqa: E402


async def _no_tool(name, image, arguments):  # the random tiny policy does not call tools
    raise RuntimeError("no tool in this benchmark")


def requests(n: int) -> list[EpisodeRequest]:
    return [EpisodeRequest(uid=f"e{i}", group_id=f"g{i // 8}", seed=i, messages=[
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape?"}]}],
        images=[Image.new("RGB", (224 + 8 * (i % 4), 168), (40 * (i % 6), 90, 160))]) for i in range(n)]


async def run_at(engine, io: PolicyIO, concurrency: int, reqs: list[EpisodeRequest], cfg: RolloutConfig) -> dict:
    sem = asyncio.Semaphore(concurrency)

    async def one(r):
        async with sem:
            return await run_episode(r, policy_io=io, generate=engine.generate, call_tool=_no_tool,
                                     score=None, cfg=cfg, tools_cfg=ToolsConfig(), tool_schemas=[])

    t0 = time.perf_counter()
    trajs = await asyncio.gather(*(one(r) for r in reqs))
    wall = time.perf_counter() - t0
    tokens = sum(sum(t.loss_mask) for t in trajs)
    return {"concurrency": concurrency, "episodes": len(trajs), "wall_s": wall,
            "episodes_per_s": len(trajs) / wall, "tokens_per_s": tokens / wall, "tokens": tokens,
            "ids": [t.response_ids for t in trajs]}


async def bench_engine(name: str, folder: Path, full, cfg: RolloutConfig, reqs, repeats: int) -> tuple[dict, float, object]:
    """Best-of-`repeats` results per concurrency level for one engine, its start time, the engine."""
    t0 = time.perf_counter()
    if name == "vllm":
        from services.rollout.vllm_engine import VLLMEngine  # heavy: only this engine needs vLLM

        engine = VLLMEngine(folder, full.model, cfg)
        io = PolicyIO.from_folder(folder, full.model.min_pixels, full.model.max_pixels)
    else:
        policy = load_policy(folder)
        engine = HFEngine(policy, max_batch_size=cfg.max_batch_size, batch_wait_ms=cfg.batch_wait_ms)
        io = PolicyIO.from_policy(policy)
    start_s = time.perf_counter() - t0
    await run_at(engine, io, 4, reqs[:4], cfg)  # warm-up
    best: dict[int, dict] = {}
    # The box is shared with other jobs: interleave the levels and keep each level's best.
    for _ in range(repeats):
        for c in (1, 8, 32):
            r = await run_at(engine, io, c, reqs, cfg)
            if c not in best or r["wall_s"] < best[c]["wall_s"]:
                best[c] = r
    return best, start_s, engine


async def vllm_reload(engine, state: dict[str, torch.Tensor], repeats: int = 3) -> dict:
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    copy_s = min(_timed(lambda: {k: v.clone() for k, v in state.items()}) for _ in range(3))
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        await engine.load_weights(state, engine.version + 1)
        total = time.perf_counter() - t0
        if best is None or total < best[0]:
            best = (total, dict(engine.last_load_split))
    return {"mb": nbytes / 2**20, "total_s": best[0], "copy_s": copy_s, "ratio": best[0] / copy_s,
            "split": best[1]}


def folder_100m(tiny_folder: Path, out: Path, tokenizer) -> Path:
    """The 100M model as a from_pretrained folder (tokenizer/processor files of the tiny one)."""
    if not (out / "model.safetensors").exists():
        shutil.copytree(tiny_folder, out, dirs_exist_ok=True)
        model_100m(tokenizer).save_pretrained(out)
    return out


def model_100m(tokenizer):
    """A random-init Qwen2.5-VL of about 100M parameters on the tiny tokenizer's ids."""
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


def weight_sync(models: dict[str, torch.nn.Module], replica_counts: tuple[int, ...] = (1, 2)) -> list[dict]:
    # heavy: Ray and the weight store on it, only for part 2
    import ray

    from services.rollout.weights import fetch_weights, get_or_create_weight_store, get_weight_store, publish_weights

    @ray.remote(num_cpus=0.5)
    class Replica:
        """Stands in for a rollout replica: holds a model, pulls the latest version, loads it."""

        def __init__(self, model):
            torch.set_num_threads(1)
            self.model = model

        def load_latest(self) -> tuple[int, float, float]:
            t0 = time.perf_counter()
            version, refs = ray.get(get_weight_store().latest.remote())
            state = fetch_weights(refs[0])
            t1 = time.perf_counter()
            with torch.no_grad():
                self.model.load_state_dict(state)
            return version, t1 - t0, time.perf_counter() - t1

    rows = []
    get_or_create_weight_store()
    version = 0
    for name, model in models.items():
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        # baseline: copy the same bytes in memory (best of 3)
        copy_s = min(_timed(lambda: {k: v.clone() for k, v in state.items()}) for _ in range(3))
        for n_replicas in replica_counts:
            replicas = [Replica.remote(model) for _ in range(n_replicas)]
            best = None
            for _ in range(3):
                version += 1
                t0 = time.perf_counter()
                publish_s = publish_weights(state, version)
                answers = ray.get([r.load_latest.remote() for r in replicas])  # all pull at once
                total = time.perf_counter() - t0
                assert all(got == version for got, _, _ in answers)
                fetch_s, load_s = max(a[1] for a in answers), max(a[2] for a in answers)
                if best is None or total < best[0]:
                    best = (total, publish_s, fetch_s, load_s)
            total, publish_s, fetch_s, load_s = best
            rows.append({"model": name, "replicas": n_replicas,
                         "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                         "mb": nbytes / 2**20, "publish_s": publish_s, "fetch_s": fetch_s, "load_s": load_s,
                         "total_s": total, "copy_s": copy_s, "ratio": total / copy_s})
            for r in replicas:
                ray.kill(r)
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


async def run_engines(args: argparse.Namespace, folder: Path, full, cfg: RolloutConfig, reqs,
                      policy) -> tuple[dict, list]:
    """Part 1 on each engine, and part 3 on vLLM (unless --skip-weights)."""
    out, reload_rows = {}, []
    for name in [e for e in args.engines.split(",") if e]:
        best, start_s, engine = await bench_engine(name, folder, full, cfg, reqs, args.repeats)
        out[name] = (best, start_s)
        if name == "vllm" and not args.skip_weights:
            reload_rows.append({"model": "tiny", **await vllm_reload(engine, policy.model.state_dict())})
            engine.shutdown()
            big = folder_100m(folder, Path(args.work_dir) / "qwen2.5-vl-100m", policy.tokenizer)
            from services.rollout.vllm_engine import VLLMEngine  # heavy: only this engine needs vLLM

            t0 = time.perf_counter()
            engine = VLLMEngine(big, full.model, cfg)
            big_start = time.perf_counter() - t0
            state = load_policy(big).model.state_dict()
            reload_rows.append({"model": "qwen2.5-vl-100m", "start_s": big_start, **await vllm_reload(engine, state)})
        if hasattr(engine, "shutdown"):
            engine.shutdown()
    return out, reload_rows


def print_engines(per_engine: dict, args: argparse.Namespace) -> dict:
    print(f"\nRollout throughput: tiny Qwen2.5-VL, {args.episodes} seeded episodes through the agent loop, "
          f"<= {args.max_new} new tokens, T=1.0, torch threads {args.threads}, best of {args.repeats}")
    headline: dict = {"episodes_per_s": {}, "tokens_per_s": {}, "start_s": {}, "same_tokens": {}}
    rows = []
    for name, (best, start_s) in per_engine.items():
        results = [best[c] for c in (1, 8, 32)]
        same = all(r["ids"] == results[0]["ids"] for r in results)
        rows += [(name, start_s, r["concurrency"], r["episodes_per_s"], r["tokens_per_s"],
                  r["tokens_per_s"] / results[0]["tokens_per_s"], str(same)) for r in results]
        headline["episodes_per_s"][name] = {r["concurrency"]: round(r["episodes_per_s"], 2) for r in results}
        headline["tokens_per_s"][name] = {r["concurrency"]: round(r["tokens_per_s"], 1) for r in results}
        headline["start_s"][name] = round(start_s, 1)
        headline["same_tokens"][name] = same
    print_table([("engine", ">6"), ("start s", ">8.1f"), ("concurrency", ">11"), ("episodes/s", ">11.2f"),
                 ("tokens/s", ">9.1f"), ("x vs 1", ">7.2f"), ("same tokens", ">11")], rows, sep=" ")
    if {"hf", "vllm"} <= set(per_engine):
        ratio = {c: per_engine["vllm"][0][c]["tokens_per_s"] / per_engine["hf"][0][c]["tokens_per_s"] for c in (1, 8, 32)}
        print("vLLM / HF tokens/s: " + ", ".join(f"{c}: {v:.2f}x" for c, v in ratio.items()))
        headline["vllm_over_hf"] = {c: round(v, 2) for c, v in ratio.items()}
    return headline


def print_sync(sync_rows: list[dict]) -> None:
    print("\nWeight publish + pull + load into an HF replica (best of 3) vs an in-memory copy of the same bytes")
    print_table([("model", ">16"), ("replicas", ">8"), ("params M", ">8.1f"), ("MiB", ">7.1f"),
                 ("publish s", ">9.3f"), ("fetch s", ">8.3f"), ("load s", ">7.3f"), ("total s", ">8.3f"),
                 ("copy s", ">7.3f"), ("ratio", ">6.1f")],
                [(r["model"], r["replicas"], r["params_m"], r["mb"], r["publish_s"], r["fetch_s"], r["load_s"],
                  r["total_s"], r["copy_s"], r["ratio"]) for r in sync_rows], sep=" ")


def print_reload(reload_rows: list[dict]) -> dict:
    print("\nvLLM weight reload (load_weights: buckets -> shm files -> collective_rpc stage -> in-place reload -> cache resets), "
          "best of 3, vs an in-memory copy")
    print_table([("model", ">16"), ("MiB", ">7.1f"), ("total s", ">8.3f"), ("write s", ">7.3f"), ("stage s", ">7.3f"),
                 ("reload s", ">9.3f"), ("reset s", ">8.3f"), ("copy s", ">7.3f"), ("ratio", ">6.1f")],
                [(r["model"], r["mb"], r["total_s"], r["split"]["pack_s"], r["split"]["stage_s"],
                  r["split"]["reload_s"], r["split"]["reset_s"], r["copy_s"], r["ratio"]) for r in reload_rows],
                sep=" ")
    return {"vllm_reload_s": {r["model"]: round(r["total_s"], 3) for r in reload_rows},
            "vllm_reload_vs_copy": {r["model"]: round(r["ratio"], 1) for r in reload_rows},
            "vllm_start_s_100m": round(reload_rows[-1].get("start_s", float("nan")), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=32, help="tokens per turn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="runs per level (best kept)")
    ap.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm")
    ap.add_argument("--skip-weights", action="store_true")
    ap.add_argument("--work-dir", default="/tmp/deepeyes-bench", help="where the 100M model folder is written")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    full = load_config(overrides=["rollout.enforce_eager=true", "rollout.kv_cache_gb=0.5"])
    folder = resolve_policy_path(full.model)
    policy = load_policy(folder)
    cfg = RolloutConfig(max_new_tokens_per_turn=args.max_new, max_response_length=args.max_new,
                        max_batch_size=32, batch_wait_ms=5.0, temperature=1.0, enforce_eager=True,
                        kv_cache_gb=0.5)
    per_engine, reload_rows = asyncio.run(run_engines(args, folder, full, cfg, requests(args.episodes), policy))
    headline = print_engines(per_engine, args)

    sync_rows = []
    if not args.skip_weights:
        with local_cluster(4):
            sync_rows = weight_sync({"tiny": policy.model, "qwen2.5-vl-100m": model_100m(policy.tokenizer)})
        print_sync(sync_rows)
    if reload_rows:
        headline.update(print_reload(reload_rows))
    headline["sync_total_s"] = {f"{r['model']}x{r['replicas']}": round(r["total_s"], 3) for r in sync_rows}
    headline["sync_vs_copy"] = {f"{r['model']}x{r['replicas']}": round(r["ratio"], 1) for r in sync_rows}
    print_headline(headline)


if __name__ == "__main__":
    main()
