"""A chat prompt with images on the tiny policy, as the trainer's tests build their sequences."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from deepeyes.chat import CHAT_TEMPLATE
from deepeyes.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from deepeyes.policy import encode_text_with_images, process_images, resize_for_model


def image_prompt(policy: Any, sizes: list[tuple[int, int]], text: str, colour_seed: int = 0
                 ) -> tuple[list[int], list[Image.Image], torch.Tensor | None, torch.Tensor | None]:
    """(prompt ids with expanded pads, images in the model frame, pixel values, grids)."""
    images = [resize_for_model(Image.new("RGB", s, (40 * colour_seed % 256, 90, 200 - 30 * i)),
                               DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS) for i, s in enumerate(sizes)]
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]
    rendered = policy.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                    chat_template=CHAT_TEMPLATE, tokenize=False,
                                                    add_generation_prompt=True)
    pv, grid = process_images(policy, images)
    return encode_text_with_images(policy, rendered, grid.tolist() if grid is not None else []), images, pv, grid
