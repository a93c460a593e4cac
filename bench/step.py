"""One GRPO step, measured: time per phase, how busy the engine and the update are, packing gain.

Part 1 runs the real main job (local Ray, the three Serve apps, Ray Train, tiny policy) for a few
steps and reads its metrics: seconds per phase (rollout, old log-prob, update, publish), the
share of the step each takes, and the engine's busy share of the rollout phase (the rollout
replica's own decode-time counter over the phase's wall time).

Part 2 times the update's forward+backward on one batch with a realistic length spread (GRPO
episodes: many short answers, some long multi-turn ones) three ways, side by side: padded to the
longest in fixed-size micro-batches, packed at the CPU budget (about one sequence per row, no
padding), and packed at a large budget (many sequences per row, block-causal mask).

    python -m bench.step [--steps 3] [--quick]

Ends with one JSON line of headline figures.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import torch
from PIL import Image

from bench.runner import ISSUE_SHAPE, after_first, job_config, print_headline, print_table, run_job
from deepeyes.chat import CHAT_TEMPLATE
from deepeyes.config import load_config
from deepeyes.data import read_deepeyes
from deepeyes.toolspec import prompt_schemas, specs_for
from trainer.grpo import clipped_policy_loss
from trainer.metrics import STEP_PHASES


def bench_step(steps: int, quick: bool) -> dict:
    """The main job for `steps` steps: per-phase means of the steps after the first, shares of the
    step, and the engine's busy share of the rollout phase and of the step."""
    run = run_job(job_config(tempfile.mkdtemp(prefix="bench-step-"), steps,
                             ["rollout.n=4", "trainer.batch_size=2"] if quick else []), engine_stats=True)
    rows = run.step_rows()
    steady = after_first(rows)
    step_s = statistics.fmean(r["timing/step_s"] for r in steady)
    out = {"steps_measured": len(steady), "step_s": step_s,
           "episodes_per_step": statistics.fmean(r["rollout/episodes"] for r in steady),
           "tokens_per_s": statistics.fmean(r["perf/tokens_per_s"] for r in steady)}
    for p in STEP_PHASES:
        out[f"{p}_s"] = statistics.fmean(r[f"timing/{p}_s"] for r in steady)
        out[f"{p}_share"] = out[f"{p}_s"] / step_s
    rollout_total = sum(r["timing/rollout_s"] for r in rows)
    out["engine_busy_share_of_rollout"] = run.engine_busy_s / rollout_total if rollout_total else 0.0
    out["engine_busy_share_of_step"] = run.engine_busy_s / sum(r["timing/step_s"] for r in rows)
    out["update_busy_share_of_step"] = out["update_share"]
    return out


def _batch(policy, n: int, seed: int):
    """n sequences shaped like a GRPO batch: prompt with one image + 60..900 response tokens."""
    # heavy (transformers): only the parts that load the policy import these
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
    # heavy (transformers): only the parts that load the policy import these
    from deepeyes.policy import load_policy, resolve_policy_path
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


# ---- each phase against its floor (issue 13) ------------------------------------------------


def floor_job(overrides: list[str], steps: int) -> dict:
    """The main job (local Ray, Serve apps, Ray Train) for `steps` steps: per-phase medians of the
    steps after the first, the engine's busy seconds per step, start-up parts, and the run."""
    run = run_job(job_config(tempfile.mkdtemp(prefix="bench-floor-"), steps, overrides), engine_stats=True)
    recipe, startup = run.recipe, run.startup()
    rows = run.step_rows()
    steady = after_first(rows)
    med = {p: statistics.median(r[f"timing/{p}_s"] for r in steady) for p in (*STEP_PHASES, "step")}
    total_rollout = sum(r["timing/rollout_s"] for r in rows)
    busy_share = run.engine_busy_s / total_rollout if total_rollout else 0.0  # of the rollout phase
    return {"cfg": run.cfg, "policy_dir": recipe.policy_dir, "train_files": recipe.train_files, "median": med,
            "engine_busy_s": med["rollout"] * busy_share, "engine_threads": run.engine_before["torch_threads"],
            "setup_s": run.setup_s,
            "setup_parts": {**{k: v for k, v in recipe.timings.items() if k != "train_s"},
                            "train_workers_s": startup["train_workers_s"], "worker_setup_s": startup["worker_setup_s"]},
            "first_request_s": startup["first_request_s"], "response_tokens": statistics.fmean(
                r["rollout/response_tokens"] for r in steady), "episodes": statistics.fmean(
                r["rollout/episodes"] for r in steady)}


def _floor_batch(job: dict, prompts: int):
    """The job's policy and `prompts` of its training rows, n copies each: ids, images, grids."""
    # heavy (transformers): only the parts that load the policy import these
    from deepeyes.policy import encode_text_with_images, load_policy, process_images, resize_for_model
    from services.rollout.agent_loop import render_prompt
    from services.rollout.types import PolicyIO

    cfg = job["cfg"]
    policy = load_policy(job["policy_dir"], trainable=True)
    rows = read_deepeyes(job["train_files"], cfg.data).rows[:prompts]
    batch, frames_all = [], []
    schemas = prompt_schemas(specs_for(cfg.tools))
    for row in rows:
        # the prompt exactly as the agent loop renders it (system prompt with the tools block)
        text = render_prompt(PolicyIO.from_policy(policy), row.messages, schemas)
        frames = [resize_for_model(im, cfg.model.min_pixels, cfg.model.max_pixels) for im in row.images]
        pv, grid = process_images(policy, frames)
        ids = encode_text_with_images(policy, text, grid.tolist() if grid is not None else [])
        batch += [(ids, pv, grid)] * cfg.rollout.n
        frames_all.extend([(ids, frames)] * cfg.rollout.n)
    return policy, batch, frames_all


def floor_rollout(policy, batch, new_tokens: int, repeats: int = 2) -> float:
    """Plain batched `model.generate` of the batch (left-padded, sampled, exactly new_tokens each)."""
    width = max(len(ids) for ids, _, _ in batch)
    pad = policy.pad_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _, _ in batch])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _, _ in batch])
    pvs = [pv for _, pv, _ in batch if pv is not None]
    grids = [g for _, _, g in batch if g is not None]
    mm = (input_ids == int(policy.model.config.image_token_id)).to(torch.int32)
    kwargs = dict(input_ids=input_ids, attention_mask=attention, mm_token_type_ids=mm,
                  pixel_values=torch.cat(pvs) if pvs else None, image_grid_thw=torch.cat(grids) if grids else None,
                  do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, pad_token_id=pad)
    best = float("inf")
    policy.model.eval()
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            out = policy.model.generate(**kwargs)
        best = min(best, time.perf_counter() - t)
    assert out.shape[1] == width + new_tokens
    return best


def engine_alone(policy, batch, new_tokens: int, threads: int, repeats: int = 2) -> float:
    """The rollout's own HF engine on the same batch in this process (no Serve, no agent loop)."""
    # heavy (transformers): floors only
    from services.rollout.engines import SamplingParams
    from services.rollout.hf_engine import HFEngine

    engine = HFEngine(policy)
    # images: the batch holds processed tensors; the engine takes PIL frames, so rebuild them
    reqs = [(ids, frames, SamplingParams(new_tokens, 1.0, seed=i)) for i, (ids, frames) in enumerate(batch)]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            engine.generate_batch_sync(reqs)
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return best


def floor_update(policy, batch, new_tokens: int, repeats: int = 2) -> float:
    """Plain single-process forward + backward + AdamW step of the batch's sequences (prompt plus
    new_tokens random tokens each), one padded forward, the policy-gradient loss written out."""
    g = torch.Generator().manual_seed(0)
    seqs = [ids + torch.randint(100, 1900, (new_tokens,), generator=g).tolist() for ids, _, _ in batch]
    width = max(map(len, seqs))
    pad = policy.pad_id
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    loss_mask = torch.tensor([[0] * len(ids) + [1] * new_tokens + [0] * (width - len(ids) - new_tokens)
                              for ids, _, _ in batch], dtype=torch.float32)
    adv = torch.randn(len(seqs), 1, generator=g)
    pvs = [pv for _, pv, _ in batch if pv is not None]
    grids = [gr for _, _, gr in batch if gr is not None]
    mm = (input_ids == int(policy.model.config.image_token_id)).to(torch.int32)
    model = policy.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    best = float("inf")
    for _ in range(repeats + 1):  # the first one allocates the optimizer state
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, attention_mask=attention, mm_token_type_ids=mm, use_cache=False,
                    pixel_values=torch.cat(pvs) if pvs else None, image_grid_thw=torch.cat(grids) if grids else None)
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        loss = -(adv * logp * loss_mask[:, 1:]).sum() / loss_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        best = min(best, time.perf_counter() - t)
    return best


def bench_floors(steps: int, shapes: list[str]) -> dict:
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # a single process gets the machine
    out = {}
    for name in shapes:
        overrides = ISSUE_SHAPE if name == "issue" else []
        job = floor_job(overrides, steps)
        cfg = job["cfg"]
        policy, batch, frames = _floor_batch(job, cfg.trainer.batch_size)
        new_tokens = max(1, round(job["response_tokens"]))
        roll_floor = floor_rollout(policy, batch, new_tokens)
        threads = job["engine_threads"]  # what the job's rollout replica ran with
        alone = engine_alone(policy, frames, new_tokens, threads)
        upd_floor = floor_update(policy, batch, new_tokens)
        m = job["median"]
        compute = job["engine_busy_s"] + m["old_logprob"] + m["update"] + m["publish"]
        out[name] = {"episodes": job["episodes"], "response_tokens": job["response_tokens"], "step_s": m["step"],
                     "rollout_s": m["rollout"], "rollout_floor_s": roll_floor, "old_logprob_s": m["old_logprob"],
                     "update_s": m["update"], "update_floor_s": upd_floor, "publish_s": m["publish"],
                     "engine_busy_s": job["engine_busy_s"], "engine_alone_s": alone, "engine_threads": threads,
                     "orchestration_share": max(0.0, m["step"] - compute) / m["step"],
                     "rollout_ratio": m["rollout"] / roll_floor,
                     "update_ratio": (m["update"] + m["old_logprob"]) / upd_floor,
                     "floor_step_s": roll_floor + upd_floor,
                     "setup_s": job["first_request_s"], "setup_parts": job["setup_parts"]}
    return out


def print_floors(f: dict) -> dict:
    headline = {}
    for name, r in f.items():
        print(f"\nshape '{name}': {r['episodes']:.0f} episodes/step, {r['response_tokens']:.0f} response tokens "
              f"each (medians of the steps after the first)")
        print(f"{'phase':<26}{'job s':>8}{'floor s':>9}{'ratio':>8}{'target':>9}")
        print(f"{'rollout (vs generate)':<26}{r['rollout_s']:>8.3f}{r['rollout_floor_s']:>9.3f}"
              f"{r['rollout_ratio']:>7.2f}x{'<= 1.3x':>9}")
        print(f"{'old log-prob + update':<26}{r['old_logprob_s'] + r['update_s']:>8.3f}{r['update_floor_s']:>9.3f}"
              f"{r['update_ratio']:>7.2f}x{'<= 1.3x':>9}")
        print(f"{'  engine busy in the job':<26}{r['engine_busy_s']:>8.3f}{r['engine_alone_s']:>9.3f}"
              f"{r['engine_busy_s'] / r['engine_alone_s']:>7.2f}x   (floor: the same engine alone, "
              f"{r['engine_threads']} thread(s), no Serve)")
        print(f"{'  of which old log-prob':<26}{r['old_logprob_s']:>8.3f}")
        print(f"{'publish':<26}{r['publish_s']:>8.3f}")
        print(f"{'orchestration (share)':<26}{r['orchestration_share']:>8.1%}{'':>9}{'':>8}{'<= 10%':>9}")
        print(f"{'step':<26}{r['step_s']:>8.3f}{r['floor_step_s']:>9.3f}{r['step_s'] / r['floor_step_s']:>7.2f}x")
        parts = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in r["setup_parts"].items())
        print(f"start-up, command to first rollout request: {r['setup_s']:.1f} s ({parts})")
        headline.update({f"{name}_step_s": round(r["step_s"], 3), f"{name}_rollout_ratio": round(r["rollout_ratio"], 2),
                         f"{name}_update_ratio": round(r["update_ratio"], 2),
                         f"{name}_orchestration_share": round(r["orchestration_share"], 3),
                         f"{name}_setup_s": round(r["setup_s"], 1)})
    return headline


SPLITS = {  # how the tiny-cpu scenario divides 2 cores between the phases (threads follow reserved CPUs)
    "2 workers x 1 CPU, rollout 0.5 CPU (1 thread)": [],
    "2 workers x 1 CPU, rollout 2 CPUs": ["serve.rollout.num_cpus=2"],
    "1 worker x 2 CPUs, rollout 0.5 CPU (1 thread)": ["trainer.num_workers=1", "trainer.cpus_per_worker=2"],
    "1 worker x 2 CPUs, rollout 2 CPUs": ["trainer.num_workers=1", "trainer.cpus_per_worker=2",
                                          "serve.rollout.num_cpus=2"],
}


def bench_splits(steps: int) -> dict:
    out = {}
    for name, extra in SPLITS.items():
        m = floor_job(ISSUE_SHAPE + extra, steps)["median"]
        out[name] = m
        print(f"  {name}: step {m['step']:.3f} s (rollout {m['rollout']:.3f}, update {m['update']:.3f})", flush=True)
    return out


def print_splits(sp: dict) -> dict:
    print_table([("split", "<50"), ("step s", ">8.3f"), ("rollout s", ">10.3f"), ("update s", ">9.3f")],
                [(name, m["step"], m["rollout"], m["update"]) for name, m in sp.items()])
    return {"splits_step_s": {name: round(m["step"], 3) for name, m in sp.items()}}


def print_step(s: dict) -> dict:
    print(f"\nGRPO step on the tiny policy ({s['episodes_per_step']:.0f} episodes/step, "
          f"mean of {s['steps_measured']} steps after the first)")
    print_table([("phase", "<14"), ("seconds", ">10.2f"), ("share", ">9.1%")],
                [*((p, s[p + "_s"], s[p + "_share"]) for p in STEP_PHASES), ("step", s["step_s"], 1)])
    print(f"engine busy: {s['engine_busy_share_of_rollout']:.1%} of the rollout phase, "
          f"{s['engine_busy_share_of_step']:.1%} of the step; update busy: {s['update_busy_share_of_step']:.1%} "
          f"of the step; generated tokens/s during rollout: {s['tokens_per_s']:.0f}")
    return {"step_s": round(s["step_s"], 3), **{f"{p}_share": round(s[p + "_share"], 3) for p in STEP_PHASES},
            "engine_busy_share_of_step": round(s["engine_busy_share_of_step"], 3),
            "update_busy_share_of_step": round(s["update_busy_share_of_step"], 3)}


def print_packing(k: dict) -> dict:
    print(f"\nupdate forward+backward on {k['sequences']} sequences of {k['min_len']}..{k['max_len']} tokens "
          f"({k['real_tokens']} real tokens)")
    print_table([("layout", "<36"), ("seconds", ">9.2f"), ("tokens computed", ">17"), ("vs padded", ">11")], [
        ("padded, 8 per micro-batch", k["padded_s"], k["padded_tokens"], f"{1.0:.2f}x"),
        (f"packed, budget 1024 ({k['packed_1024_rows']} rows)", k["packed_1024_s"], k["real_tokens"],
         f"{k['speedup_packed_vs_padded']:.2f}x"),
        (f"packed, budget 8192 ({k['packed_8192_rows']} rows)", k["packed_8192_s"], k["real_tokens"],
         f"{k['speedup_packed8192_vs_padded']:.2f}x")])
    return {"packing_speedup_vs_padded": round(k["speedup_packed_vs_padded"], 2),
            "packing8192_speedup_vs_padded": round(k["speedup_packed8192_vs_padded"], 2),
            "padding_overhead": round(k["padded_tokens"] / k["real_tokens"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="GRPO steps to run for part 1 (first is warm-up)")
    ap.add_argument("--quick", action="store_true", help="smaller batch (n=4, 2 prompts) and packing batch")
    ap.add_argument("--skip-step", action="store_true", help="only the packing comparison (no Ray)")
    ap.add_argument("--floors", default="issue,tiny-cpu",
                    help="shapes to run against their floors (issue = 4 prompts x n=4, one 64-token "
                         "turn; tiny-cpu = the scenario's default); empty = skip")
    ap.add_argument("--floor-steps", type=int, default=6, help="steps per shape (the first is warm-up)")
    ap.add_argument("--splits", action="store_true",
                    help="also time the issue shape under each CPU split of SPLITS (workers, threads)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    headline = {}
    if args.splits:
        print("CPU splits on the issue shape (medians of the steps after the first):")
        headline.update(print_splits(bench_splits(args.floor_steps)))
    if args.floors:
        headline.update(print_floors(bench_floors(args.floor_steps, args.floors.split(","))))
    if not args.skip_step:
        headline.update(print_step(bench_step(args.steps, args.quick)))
    headline.update(print_packing(bench_packing(args.quick)))
    print_headline(headline)


if __name__ == "__main__":
    main()
