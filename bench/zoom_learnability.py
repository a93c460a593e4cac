"""What stands between the tiny policy and the zoom demo (issues 16, 25), measured piece by piece.

The demo task (`data.synthetic_task=zoom`, deploy/configs/tiny-zoom.yaml): which way do the stripes
inside the red frame run? A policy must (1) find the red frame in the 224 px model frame and write
its box, (2) read the stripes in the crop cut from the original. This bench measures each part on
its own, on the same rows the scenario writes:

1. invisibility: the largest difference, in the model frame, between the same scene with each of
   the four orientations (with and without the contrast ramp at the stripes' edge), against the
   same difference in the crops;
2. perception: a linear probe (L-BFGS logistic regression) on the vision tower's crop features,
   mean-pooled, for the random patch embedding and the oriented one (model.tiny_vision);
3. reading: supervised steps on the whole cold-start conversation with the loss on the answer
   word only, held-out accuracy of that word (an upper bound on what GRPO can learn per sample);
4. finding: supervised steps with the loss on the box's x1 and y1 only (the target's grid cell),
   held-out accuracy of both (chance 1/4), on the cued task (`zoom`: the question names the
   frame's quarter and the cold-start thought repeats it right before the call) and on the uncued
   one (`zoom_find`: find the frame by sight).

  python -m bench.zoom_learnability [--rows 256] [--read-steps 100] [--find-steps 200]
  python -m bench.zoom_learnability --family qwen3_vl --only find   # the finding probes on Qwen3-VL

On Qwen3-VL (issue 28) the box is written 0-1000 relative (the family's scale) on a 32 px grid;
the probe still scores x1 and y1, the tokens that name the cell.

Prints a table and ends with one JSON line of the headline figures.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.runner import REPO_ROOT, print_headline
from deepeyes.config import load_config
from deepeyes.data import ZOOM_ORIENTATIONS, read_deepeyes, write_synthetic, zoom_stripes
from deepeyes.policy import build_tiny_policy, load_policy, process_images, resize_for_model
from services.tools.registry import tool_schemas
from trainer.packing import make_example, pack, packed_forward, plan_micro_batches
from trainer.sft import conversation_tokens, sft_answer, tool_conversation


def invisibility() -> dict[str, float]:
    """Max |difference| between orientations: frame without/with the ramp, and the crop."""
    out = {}
    for fade in (0, 14):
        worst = crop_worst = 0
        for px, py in [(701, 533), (333, 901), (1000, 17)]:
            frames, crops = [], []
            for o in ZOOM_ORIENTATIONS:
                scene = Image.new("RGB", (1568, 1568), (150, 150, 150))
                scene.paste(zoom_stripes(o, 140, 140, fade), (px, py))
                frames.append(np.asarray(resize_for_model(scene, 3136, 50176)).astype(int))
                crops.append(np.asarray(scene.crop((px, py, px + 140, py + 140))).astype(int))
            worst = max(worst, max(int(np.abs(a - b).max()) for a in frames for b in frames))
            crop_worst = max(crop_worst, max(int(np.abs(a - b).max()) for a in crops for b in crops))
        out[f"frame_fade{fade}"] = worst
        out["crop"] = crop_worst
    return out


def probe(policy, train, test, cfg) -> dict[str, float]:
    """Linear-probe test accuracy on mean-pooled vision features of the crops and of the frames."""
    def feats(rows):
        xs, fs, ys = [], [], []
        for r in rows:
            frame, crop = tool_conversation(r, cfg)[1]  # the model frame and the cold start's crop
            for im, acc in ((crop, xs), (frame, fs)):
                pv, g = process_images(policy, [im])
                with torch.no_grad():
                    e = policy.model.model.visual(pv, grid_thw=g)
                e = e if torch.is_tensor(e) else e.pooler_output
                acc.append(e.mean(0))
            ys.append(ZOOM_ORIENTATIONS.index(r.ground_truth))
        return torch.stack(xs), torch.stack(fs), torch.tensor(ys)

    xa, fa, ya = feats(train)
    xb, fb, yb = feats(test)

    def fit(a, b):
        mu, sd = a.mean(0), a.std(0) + 1e-6
        a, b = (a - mu) / sd, (b - mu) / sd
        w = torch.zeros(a.shape[1], 4, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=500)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(a @ w, ya) + 1e-3 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return float(((b @ w).argmax(1) == yb).float().mean())

    return {"crop": fit(xa, xb), "frame": fit(fa, fb)}


def supervised(policy, train, test, cfg, steps: int, target: str, lr: float = 3e-3) -> list[tuple[int, float]]:
    """Held-out accuracy every 25 steps of supervised steps on the answer word or the box cell."""
    tools = tool_schemas(cfg.tools.enabled)
    tok = policy.tokenizer
    words = {tok(">" + w)["input_ids"][-1]: i for i, w in enumerate(ZOOM_ORIENTATIONS)}
    bracket = tok(" [")["input_ids"][0]
    pick = random.Random(0)

    def examples(rows, answer_truth):
        out = []
        for r in rows:
            text = r.ground_truth if answer_truth else sft_answer(r, "random", pick)
            messages, images = tool_conversation(r, cfg, text)
            ids, mask, pv, g = conversation_tokens(policy, messages, images, tools)
            if target == "answer":
                where = [max(i for i, t in enumerate(ids) if t in words)]
            else:  # x1 and y1 of the box: the target's grid cell
                b = max(i for i, t in enumerate(ids) if t == bracket and mask[i])
                where = [b + 1, b + 4]
            mask = [0] * len(ids)
            for i in where:
                mask[i] = 1
            out.append((make_example(policy.model, ids, mask, 1.0, pv, g), ids, where))
        return out

    tr, te = examples(train, True), examples(test, True)
    model = policy.model
    model.train()
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)

    def accuracy():
        ok = 0
        with torch.no_grad():
            for e, ids, where in te:
                seen = {}
                hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.__setitem__("o", o))
                packed_forward(model, pack([e]))
                hook.remove()
                logits = seen["o"][0]
                if target == "answer":
                    opts = list(words)
                    ok += int(opts[int(logits[where[0] - 1][opts].argmax())] == ids[where[0]])
                else:
                    ok += int(all(int(logits[i - 1].argmax()) == ids[i] for i in where))
        return ok / len(te)

    curve = [(0, accuracy())]
    for step in range(1, steps + 1):
        batch = [tr[i][0] for i in torch.randperm(len(tr), generator=gen)[:8].tolist()]
        total = sum(float(e.loss_mask[1:].sum()) for e in batch)
        opt.zero_grad(set_to_none=True)
        for mb in plan_micro_batches([len(e) for e in batch], cfg.trainer.micro_batch_tokens):
            pk = pack([batch[i] for i in mb])
            logp, _ = packed_forward(model, pk)
            (-(logp * pk.target_mask).sum() / total).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            curve.append((step, accuracy()))
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256, help="training rows (held out: a quarter as many)")
    ap.add_argument("--read-steps", type=int, default=100)
    ap.add_argument("--find-steps", type=int, default=200)
    ap.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"],
                    help="the tiny policy's family (default: the embedded Qwen2.5-VL)")
    ap.add_argument("--only", choices=["all", "find"], default="all",
                    help="find: only the two box-cell probes (cued and by sight)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config(str(REPO_ROOT / "deploy/configs/tiny-zoom.yaml"), [f"model.family={args.family}"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        train = read_deepeyes([write_synthetic(os.path.join(d, "tr.parquet"), args.rows, 11, mix={"zoom": 1.0})],
                              cfg.data).rows
        test = read_deepeyes([write_synthetic(os.path.join(d, "te.parquet"), max(args.rows // 4, 16), 11,
                                              mix={"zoom": 1.0}, split="test")], cfg.data).rows
        # the uncued task: the same scenes (same streams), no place in the question
        train_find = read_deepeyes([write_synthetic(os.path.join(d, "trf.parquet"), args.rows, 11,
                                                    mix={"zoom_find": 1.0})], cfg.data).rows
        test_find = read_deepeyes([write_synthetic(os.path.join(d, "tef.parquet"), max(args.rows // 4, 16), 11,
                                                   mix={"zoom_find": 1.0}, split="test")], cfg.data).rows
        folders = {v: build_tiny_policy(Path(d) / v, vision=v, family=args.family) for v in ("random", "oriented")}

        def fresh(v):
            return load_policy(folders[v], min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels,
                               trainable=True)

        if args.only == "find":
            finding = supervised(fresh("oriented"), train, test, cfg, args.find_steps, "box")
            finding_uncued = supervised(fresh("oriented"), train_find, test_find, cfg, args.find_steps, "box")
            return report_finding(args, finding, finding_uncued, time.perf_counter() - t0)
        inv = invisibility()
        probes = {v: probe(fresh(v), train, test, cfg) for v in folders}
        reading = {v: supervised(fresh(v), train, test, cfg, args.read_steps, "answer") for v in folders}
        finding = supervised(fresh("oriented"), train, test, cfg, args.find_steps, "box")
        finding_uncued = supervised(fresh("oriented"), train_find, test_find, cfg, args.find_steps, "box")
    print(f"rows: {len(train)} train, {len(test)} held out; {time.perf_counter() - t0:.0f} s\n")
    print(f"{'measure':<58} {'random':>8} {'oriented':>9}")
    print("-" * 77)
    print(f"{'max |frame difference| across orientations, no edge ramp':<58} {inv['frame_fade0']:>8} {'':>9}")
    print(f"{'max |frame difference| across orientations, ramp (used)':<58} {inv['frame_fade14']:>8} {'':>9}")
    print(f"{'max |crop difference| across orientations':<58} {inv['crop']:>8} {'':>9}")
    for part in ("crop", "frame"):
        print(f"{'linear probe on pooled ' + part + ' features (chance 0.25)':<58} "
              f"{probes['random'][part]:>8.3f} {probes['oriented'][part]:>9.3f}")
    for (s, a), (_, b) in zip(reading["random"], reading["oriented"]):
        print(f"{f'answer word from the crop, step {s} (chance 0.25)':<58} {a:>8.3f} {b:>9.3f}")
    for (s, b), (_, u) in zip(finding, finding_uncued):
        print(f"{f'box cell (x1, y1), question names the quarter, step {s}':<58} {'':>8} {b:>9.3f}")
        print(f"{f'box cell (x1, y1), found by sight (zoom_find), step {s}':<58} {'':>8} {u:>9.3f}")
    print_headline({"frame_diff_levels": inv["frame_fade14"], "crop_diff_levels": inv["crop"],
                    "probe_crop_random": probes["random"]["crop"], "probe_crop_oriented": probes["oriented"]["crop"],
                    "probe_frame_oriented": probes["oriented"]["frame"],
                    "read_acc_oriented": reading["oriented"][-1][1], "read_acc_random": reading["random"][-1][1],
                    "find_acc_cued": finding[-1][1], "find_acc_by_sight": finding_uncued[-1][1],
                    "read_steps": args.read_steps, "find_steps": args.find_steps})


def report_finding(args, finding, finding_uncued, seconds: float) -> None:
    print(f"family {args.family}, oriented vision, {args.rows} rows; {seconds:.0f} s\n")
    print(f"{'box cell (x1 and y1 both right), held out, chance 0.25':<58} {'cued':>8} {'by sight':>9}")
    print("-" * 77)
    for (s, b), (_, u) in zip(finding, finding_uncued):
        print(f"{f'step {s}':<58} {b:>8.3f} {u:>9.3f}")
    print_headline({"family": args.family, "find_acc_cued": finding[-1][1], "find_acc_by_sight": finding_uncued[-1][1],
                    "find_steps": args.find_steps})


if __name__ == "__main__":
    main()
