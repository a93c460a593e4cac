"""One GRPO step, measured: time per phase, how busy the engine and the update are, packing gain.

Part 1 runs the real main job (local Ray, the three Serve apps, Ray Train, tiny policy) for a few
steps and reads its metrics: seconds per phase (rollout, old log-prob, update, publish), the
share of the step each takes, and the engine's busy share of the rollout phase (the rollout
replica's own decode-time counter over the phase's wall time).

Part 2 times the update's forward+backward on one batch with a realistic length spread (GRPO
episodes: many short answers, some long multi-turn ones) three ways, side by side: padded to the
longest in fixed-size micro-batches, packed at the CPU budget (about one sequence per row, no
padding), and packed at a large budget (many sequences per row, block-causal mask).

    python bench/step.py [--steps 3] [--quick]

Ends with one JSON line of headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from deepeyes.serving import APP_NAMES, DEPLOYMENT_NAMES  # noqa: E402
from trainer.metrics import STEP_PHASES  # noqa: E402


def bench_step(steps: int, quick: bool) -> dict:
    from ray import serve

    from deepeyes.config import load_config
    from trainer.driver import GRPORecipe
    from trainer.metrics import read_metrics

    run_dir = tempfile.mkdtemp(prefix="bench-step-")
    overrides = [f"trainer.run_dir={run_dir}", f"trainer.steps={steps}", "trainer.save_every=0",
                 "trainer.test_every=0", "data.synthetic_val_rows=0", "logging.progress=false",
                 "logging.plots=false"]
    if quick:
        overrides += ["rollout.n=4", "trainer.batch_size=2"]
    recipe = GRPORecipe(load_config(None, overrides))
    try:
        recipe.setup()
        handle = serve.get_deployment_handle(DEPLOYMENT_NAMES["rollout"], app_name=APP_NAMES["rollout"])
        busy0 = handle.stats.remote().result()["engine_busy_s"]
        recipe.train()
        busy1 = handle.stats.remote().result()["engine_busy_s"]
    finally:
        recipe.cleanup()
    rows = [r for r in read_metrics(run_dir) if "timing/step_s" in r]
    # the first step pays one-off costs (imports, first forward): report steps 2.. when there are any
    steady = rows[1:] or rows
    step_s = statistics.fmean(r["timing/step_s"] for r in steady)
    out = {"steps_measured": len(steady), "step_s": step_s,
           "episodes_per_step": statistics.fmean(r["rollout/episodes"] for r in steady),
           "tokens_per_s": statistics.fmean(r["perf/tokens_per_s"] for r in steady)}
    for p in STEP_PHASES:
        out[f"{p}_s"] = statistics.fmean(r[f"timing/{p}_s"] for r in steady)
        out[f"{p}_share"] = out[f"{p}_s"] / step_s
    rollout_total = sum(r["timing/rollout_s"] for r in rows)
    out["engine_busy_share_of_rollout"] = (busy1 - busy0) / rollout_total if rollout_total else 0.0
    out["engine_busy_share_of_step"] = (busy1 - busy0) / sum(r["timing/step_s"] for r in rows)
    out["update_busy_share_of_step"] = out["update_share"]
    return out


def _batch(policy, n: int, seed: int):
    """n sequences shaped like a GRPO batch: prompt with one image + 60..900 response tokens."""
    from PIL import Image

    from deepeyes.chat import CHAT_TEMPLATE
    from deepeyes.policy import encode_text_with_images, process_images, resize_for_model
    from trainer.packing import make_example

    rng = random.Random(seed)
    text = policy.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the small sign's word?"}]}],
        chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    img = resize_for_model(Image.new("RGB", (1024, 768), (90, 120, 150)), 3136, 50176)
    pv, grid = process_images(policy, [img])
    prompt = encode_text_with_images(policy, text, grid.tolist())
    exs = []
    for i in range(n):
        # most answers short, a quarter long multi-turn episodes (the spread GRPO batches show)
        resp = rng.randint(40, 120) if rng.random() < 0.75 else rng.randint(400, 900)
        ids = prompt + [rng.randrange(100, 1900) for _ in range(resp)]
        mask = [0] * len(prompt) + [1] * resp
        exs.append(make_example(policy.model, ids, mask, rng.uniform(-1, 1), pv, grid))
    return exs


def bench_packing(quick: bool) -> dict:
    from deepeyes.config import load_config
    from deepeyes.policy import load_policy, resolve_policy_path
    from trainer.grpo import clipped_policy_loss
    from trainer.packing import pack, packed_forward, padded_forward, plan_micro_batches

    torch.set_num_threads(2)
    cfg = load_config()
    policy = load_policy(resolve_policy_path(cfg.model), trainable=True)
    model = policy.model
    exs = _batch(policy, 16 if quick else 32, seed=0)
    lengths = [len(e) for e in exs]
    real_tokens = sum(lengths)

    def run_padded(mb_size: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        padded_tokens = 0
        for i in range(0, len(exs), mb_size):
            chunk = exs[i:i + mb_size]
            padded_tokens += max(len(e) for e in chunk) * len(chunk)
            loss = 0.0
            for e, lp in zip(chunk, padded_forward(model, chunk, policy.pad_id)):
                tm = torch.cat([e.loss_mask[1:], torch.zeros(1)])
                loss = loss + clipped_policy_loss(lp, lp.detach(), torch.full_like(lp, e.advantage), tm, 0.2).pg_loss_sum
            loss.backward()
        return time.perf_counter() - t0, padded_tokens

    def run_packed(budget: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        rows = 0
        for mb in plan_micro_batches(lengths, budget):
            pk = pack([exs[i] for i in mb])
            lp, _ = packed_forward(model, pk)
            clipped_policy_loss(lp, lp.detach(), pk.advantages, pk.target_mask, 0.2).pg_loss_sum.backward()
            rows += 1
        return time.perf_counter() - t0, rows

    results = {}
    repeats = 1 if quick else 2
    for name, fn in [("padded (8 per micro-batch)", lambda: run_padded(8)),
                     ("packed, budget 1024 (CPU default)", lambda: run_packed(1024)),
                     ("packed, budget 8192", lambda: run_packed(8192))]:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            model.zero_grad(set_to_none=True)
            s, extra = fn()
            times.append(s)
        results[name] = (min(times), extra)
    pad_s, padded_tokens = results["padded (8 per micro-batch)"]
    pack_s, rows = results["packed, budget 1024 (CPU default)"]
    big_s, big_rows = results["packed, budget 8192"]
    return {"sequences": len(exs), "real_tokens": real_tokens, "padded_tokens": padded_tokens,
            "padded_s": pad_s, "packed_1024_s": pack_s, "packed_1024_rows": rows,
            "packed_8192_s": big_s, "packed_8192_rows": big_rows,
            "speedup_packed_vs_padded": pad_s / pack_s, "speedup_packed8192_vs_padded": pad_s / big_s,
            "min_len": min(lengths), "max_len": max(lengths)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="GRPO steps to run for part 1 (first is warm-up)")
    ap.add_argument("--quick", action="store_true", help="smaller batch (n=4, 2 prompts) and packing batch")
    ap.add_argument("--skip-step", action="store_true", help="only the packing comparison (no Ray)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    headline = {}
    if not args.skip_step:
        s = bench_step(args.steps, args.quick)
        print(f"\nGRPO step on the tiny policy ({s['episodes_per_step']:.0f} episodes/step, "
              f"mean of {s['steps_measured']} steps after the first)")
        print(f"{'phase':<14}{'seconds':>10}{'share':>9}")
        for p in STEP_PHASES:
            print(f"{p:<14}{s[p + '_s']:>10.2f}{s[p + '_share']:>9.1%}")
        print(f"{'step':<14}{s['step_s']:>10.2f}{1:>9.1%}")
        print(f"engine busy: {s['engine_busy_share_of_rollout']:.1%} of the rollout phase, "
              f"{s['engine_busy_share_of_step']:.1%} of the step; update busy: {s['update_busy_share_of_step']:.1%} "
              f"of the step; generated tokens/s during rollout: {s['tokens_per_s']:.0f}")
        headline.update({"step_s": round(s["step_s"], 3),
                         **{f"{p}_share": round(s[p + "_share"], 3) for p in STEP_PHASES},
                         "engine_busy_share_of_step": round(s["engine_busy_share_of_step"], 3),
                         "update_busy_share_of_step": round(s["update_busy_share_of_step"], 3)})
    k = bench_packing(args.quick)
    print(f"\nupdate forward+backward on {k['sequences']} sequences of {k['min_len']}..{k['max_len']} tokens "
          f"({k['real_tokens']} real tokens)")
    print(f"{'layout':<36}{'seconds':>9}{'tokens computed':>17}{'vs padded':>11}")
    print(f"{'padded, 8 per micro-batch':<36}{k['padded_s']:>9.2f}{k['padded_tokens']:>17}{1.0:>10.2f}x")
    print(f"{'packed, budget 1024 (' + str(k['packed_1024_rows']) + ' rows)':<36}{k['packed_1024_s']:>9.2f}"
          f"{k['real_tokens']:>17}{k['speedup_packed_vs_padded']:>10.2f}x")
    print(f"{'packed, budget 8192 (' + str(k['packed_8192_rows']) + ' rows)':<36}{k['packed_8192_s']:>9.2f}"
          f"{k['real_tokens']:>17}{k['speedup_packed8192_vs_padded']:>10.2f}x")
    headline.update({"packing_speedup_vs_padded": round(k["speedup_packed_vs_padded"], 2),
                     "packing8192_speedup_vs_padded": round(k["speedup_packed8192_vs_padded"], 2),
                     "padding_overhead": round(k["padded_tokens"] / k["real_tokens"], 2)})
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
