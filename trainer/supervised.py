"""Supervised training on whole conversations, shared by the cold start (trainer/sft.py) and the
tiny policy's perception pre-stage (trainer/perception.py): tokens and loss masks cut as the
rollout cuts them, AdamW steps over packed examples, and the trained copy of a model folder.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from deepeyes.chat import CHAT_TEMPLATE
from deepeyes.config import Config
from deepeyes.policy import Policy, encode_text_with_images, process_images, save_policy
from trainer.packing import pack, packed_forward, plan_micro_batches

ASSISTANT_HEADER = "<|im_start|>assistant\n"
END = "<|im_end|>"


def conversation_tokens(policy: Policy, messages: list[dict[str, Any]], images: list[Image.Image],
                        tools: list[dict[str, Any]]) -> tuple[list[int], list[int], Any, Any]:
    """Token ids and loss mask (1 on assistant content through <|im_end|>), with image tensors.

    The text is cut into the pieces the rollout produces (prompt through the assistant header,
    assistant content through <|im_end|>, observation segments) and each piece is tokenized alone,
    as the agent loop does: a BPE merge never crosses a turn boundary.
    """
    text = policy.tokenizer.apply_chat_template(messages, tools=tools, chat_template=CHAT_TEMPLATE,
                                                tokenize=False)
    pieces: list[tuple[str, int]] = []
    pos = 0
    while (start := text.find(ASSISTANT_HEADER, pos)) >= 0:
        content_start = start + len(ASSISTANT_HEADER)
        end = text.index(END, content_start) + len(END)
        pieces.append((text[pos:content_start], 0))
        pieces.append((text[content_start:end], 1))
        pos = end
    pieces.append((text[pos:], 0))
    pixel_values, grids = process_images(policy, images)
    grid_list = grids.tolist() if grids is not None else []
    ids: list[int] = []
    mask: list[int] = []
    used = 0
    for piece, m in pieces:
        n_img = piece.count("<|image_pad|>")
        piece_ids = encode_text_with_images(policy, piece, grid_list[used:used + n_img])
        used += n_img
        ids += piece_ids
        mask += [m] * len(piece_ids)
    return ids, mask, pixel_values, grids


def supervised_steps(model: Any, examples: Sequence[Any], cfg: Config, steps: int, lr: float, batch_size: int,
                     seed: int, desc: str, progress: bool = True) -> list[float]:
    """AdamW steps on random batches of packed examples (token-mean NLL over their loss masks, grad
    norm clipped at 1.0); the model is left in eval mode, frozen. Returns the loss per step."""
    model.train()
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, file=sys.stderr)
    for _ in bar:
        idx = torch.randperm(len(examples), generator=gen)[:batch_size].tolist()
        batch = [examples[i] for i in idx]
        total = sum(float(e.loss_mask[1:].sum()) for e in batch)
        opt.zero_grad(set_to_none=True)
        loss_value = 0.0
        for mb in plan_micro_batches([len(e) for e in batch], cfg.trainer.micro_batch_tokens):
            pk = pack([batch[i] for i in mb])
            logp, _ = packed_forward(model, pk)
            loss = -(logp * pk.target_mask).sum() / total
            loss.backward()
            loss_value += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss_value)
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    model.requires_grad_(False)
    return losses


def save_trained_copy(policy: Policy, base: Path, folder: Path) -> None:
    """`base`'s folder (tokenizer, processor, template) with `policy`'s weights, written to `folder`."""
    for f in base.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, folder / f.name)
    save_policy(policy.model, folder)
