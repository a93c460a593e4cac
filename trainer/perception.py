"""The tiny policy's stand-in for pre-training: reading stripes in close-ups.

A real checkpoint comes to the cold start able to see: it names a pattern in a close-up because
pre-training taught it. The tiny random model cannot, and learning to read from the zoom task's
reward alone took 70-150 GRPO steps of 64 episodes (measured outside the repo, issue 25), far over
the main job's budget. So before the cold start the tiny model gets what pre-training would give:
supervised reading of close-ups that look like the zoom tool's crops (a square striped frame of
any colour in clutter, cut from the 1568 px original at a box around the frame, jittered), each
asked on its own: "Which way do the stripes run inside the blue frame?", answered with the word.
Scenes come from their own seed stream, never the task's training or held-out rows. The whole-scene
question, where the frame is, and the tool call are not taught here (the cold start and GRPO do
that). Built once per model and settings and cached like the model (`model.tiny_perception_steps`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from deepeyes.boxes import box_scale
from deepeyes.config import Config
from deepeyes.data import TARGET_COLOURS, ZOOM_ORIENTATIONS, zoom_question, zoom_task
from deepeyes.policy import Policy, build_cached, load_policy, resize_for_model
from deepeyes.policy_family import frame_factor
from services.tools.registry import execute_tool
from trainer.packing import make_example, pack
from trainer.supervised import conversation_tokens, save_trained_copy, supervised_steps

log = logging.getLogger("deepeyes.perception")
PERCEPTION_VERSION = "read-v1"
SEED_STREAM = 424_243  # the scenes' own stream: disjoint from every split of deepeyes.data

# Measured on 64 held-out close-ups (one run each): 150 steps at lr 1e-3 on 256 rows read 0.859 (42 s);
# probe runs (not in the repo): 200 steps on 384 rows 0.89 (53 s); lr 2e-3 0.69.
PERCEPTION_ROWS = 256
PERCEPTION_HELD_OUT = 64
PERCEPTION_LR = 1e-3


def closeup(rng: np.random.Generator, cfg: Config) -> tuple[Image.Image, str, str]:
    """One reading example: (crop in the model frame, question, answer word).

    The crop is cut by the zoom tool itself from the original (as `tools.crop_from=original` does)
    at a box around a frame of a random colour: the frame's box in model-frame pixels, grown to
    24-40 px and shifted by up to 6 px, so the frame sits anywhere near the crop's middle."""
    colour = str(rng.choice(list(TARGET_COLOURS)))
    made = zoom_task(rng, cued=False, target=colour)
    original = made["image"]
    frame = resize_for_model(original, cfg.model.min_pixels, cfg.model.max_pixels, frame_factor(cfg.model))
    sx, sy = box_scale(original.size, frame.size)
    x1, y1, x2, y2 = made["bbox"]
    cx = (x1 + x2) / 2 * sx + rng.uniform(-6, 6)
    cy = (y1 + y2) / 2 * sy + rng.uniform(-6, 6)
    half = max((x2 - x1) * sx, 24.0, rng.uniform(24, 40)) / 2
    box = [round(cx - half), round(cy - half), round(cx + half), round(cy + half)]
    result = execute_tool("image_zoom_in_tool", original, {"bbox_2d": box}, frame_size=frame.size)
    if not result.ok:
        raise RuntimeError(f"perception close-up: the zoom tool refused {box}: {result.text}")
    crop = resize_for_model(result.image, cfg.model.min_pixels, cfg.model.max_pixels, frame_factor(cfg.model))
    options = [str(o) for o in rng.permutation(ZOOM_ORIENTATIONS)]
    return crop, zoom_question(colour, options), made["answer"]


def closeup_example(policy: Policy, crop: Image.Image, question: str, answer: str) -> Any:
    """The packed training example of one close-up: loss on the assistant's answer only."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": f"<answer>{answer}</answer>"}]
    ids, mask, pv, grid = conversation_tokens(policy, messages, [crop], tools=[])
    return make_example(policy.model, ids, mask, 1.0, pv, grid)


@torch.no_grad()
def reading_accuracy(policy: Policy, examples: Sequence[Any], answers: Sequence[str]) -> float:
    """Share of held-out close-ups whose likeliest answer word (among the 4 options) is the truth:
    the logits where the answer's word is predicted, read over the 4 words' first tokens."""
    encoded = [policy.tokenizer.encode(f"<answer>{w}</answer>") for w in ZOOM_ORIENTATIONS]
    prefix = next(i for i, t in enumerate(zip(*encoded)) if len(set(t)) > 1)  # BPE may merge ">word"
    firsts = [e[prefix] for e in encoded]
    policy.model.eval()
    right = 0
    for ex, truth in zip(examples, answers):
        pk = pack([ex])
        out = policy.model(input_ids=pk.input_ids, position_ids=pk.position_ids, attention_mask=None,
                           pixel_values=pk.pixel_values, image_grid_thw=pk.image_grid_thw, use_cache=False)
        first = int(torch.nonzero(pk.target_mask)[0])  # predicts the answer's first token
        scores = out.logits[0, first + prefix, firsts]
        right += int(ZOOM_ORIENTATIONS[int(scores.argmax())] == truth)
    return right / max(len(examples), 1)


def train_reading(policy: Policy, cfg: Config, steps: int, rows: int, lr: float, batch_size: int = 8,
                  seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Supervised reading steps on `rows` close-ups; returns losses and held-out accuracy."""
    rng = np.random.default_rng([seed, SEED_STREAM])
    made = [closeup(rng, cfg) for _ in range(rows + PERCEPTION_HELD_OUT)]
    examples = [closeup_example(policy, *m) for m in made]
    train, held = examples[:rows], examples[rows:]
    held_answers = [m[2] for m in made[rows:]]
    losses = supervised_steps(policy.model, train, cfg, steps, lr, batch_size, seed, "perception pre-stage",
                              progress)
    return {"losses": losses, "held_out_acc": reading_accuracy(policy, held, held_answers)}


def perception_key(base: Path, cfg: Config) -> str:
    h = hashlib.sha1()
    h.update((base / "model.safetensors").read_bytes())
    h.update(json.dumps([PERCEPTION_VERSION, cfg.model.tiny_perception_steps, PERCEPTION_ROWS, PERCEPTION_LR,
                         cfg.model.min_pixels, cfg.model.max_pixels, cfg.model.seed]).encode())
    return h.hexdigest()[:12]


def perceiving_policy_path(cfg: Config, base: Path, progress: bool = True) -> Path:
    """The cached copy of the tiny `base` after its reading pre-stage (built on first use)."""

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        policy = load_policy(base, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels, trainable=True)
        torch.manual_seed(cfg.model.seed)
        out = train_reading(policy, cfg, steps=cfg.model.tiny_perception_steps, rows=PERCEPTION_ROWS,
                            lr=PERCEPTION_LR, seed=cfg.model.seed, progress=progress)
        losses = out["losses"]
        log.info("perception pre-stage: %d steps in %.1f s, loss %.3f -> %.3f, held-out close-ups read %.3f",
                 len(losses), time.perf_counter() - t0, losses[0], losses[-1], out["held_out_acc"])
        save_trained_copy(policy, base, tmp)
        (tmp / "perception.json").write_text(json.dumps(
            {"base": str(base), "steps": len(losses), "rows": PERCEPTION_ROWS, "lr": PERCEPTION_LR,
             "first_loss": losses[0], "last_loss": losses[-1], "held_out_read_acc": out["held_out_acc"],
             "seconds": time.perf_counter() - t0}, indent=2))

    return build_cached(cfg.model.cache_dir, f"read-{perception_key(base, cfg)}", build)
