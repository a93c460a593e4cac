"""Requests into the rollout service and the tokenizer-side view of the policy (no model).

`EpisodeRequest` is what the driver sends per episode; `PolicyIO` is what the agent loop needs to
render, tokenize and measure images: the tokenizer, the image processor and a few token ids. A
vLLM replica builds it from the model folder without loading the model into torch.
"""

from __future__ import annotations

import os
import json
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Sequence

from PIL import Image

from deepeyes.policy import load_image_processor, processor_factor, resize_for_model
from services.rollout.engines import check_sampling

GRID_CACHE_SIZES = 4096  # image sizes whose grid PolicyIO remembers
EPISODE_SEED_LIMIT = 2**63  # the loop seeds turn t with seed + t: room left below the engine's 2**64


@dataclass
class EpisodeRequest:
    """One episode to roll out: the prompt conversation, its images and the reference answer.

    `messages` are chat messages whose content is a string or a list of {"type": "image"} /
    {"type": "text", "text": ...} parts; the i-th image part is `images[i]`, at any resolution
    (the rollout brings it to the model frame; the trainer sends it there already, which keeps
    the n copies of a prompt small).
    `crop_source` (opt-in, evaluation): the first image at its original resolution, a PIL image
    or its encoded file bytes. When set, zoom boxes (in the model frame of `images[0]`) are mapped
    to it and the crop is cut from it (services.tools.zoom.crop_image's frame_size); None (the
    training default) crops the model frame itself.
    `use_tools=False` (tool ablation): no tools block in the system turn and no call executed; a
    turn that writes `<tool_call>` anyway ends the episode, its calls recorded as not executed.
    `min_version`: the replica must serve this with policy version >= min_version.
    Sampling: `greedy` wins over `temperature`; `temperature=None` means the config's. Checked on
    creation (engines.check_sampling; seed in [0, EPISODE_SEED_LIMIT)): ValueError names the field.
    """

    uid: str
    group_id: str
    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    ground_truth: str = ""
    question: str = ""
    data_source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    min_version: int = 0
    temperature: float | None = None
    greedy: bool = False
    seed: int | None = None
    crop_source: Image.Image | bytes | None = None
    use_tools: bool = True

    def __post_init__(self) -> None:
        check_sampling(0.0 if self.temperature is None else self.temperature, self.seed, EPISODE_SEED_LIMIT)


@dataclass
class PolicyIO:
    """Tokenizer, image processor and the ids the loop needs; the pixel frame comes from the processor."""

    tokenizer: Any
    image_processor: Any
    image_pad_id: int
    eos_id: int
    pad_id: int
    _grids: dict[tuple[int, int], list[int]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_policy(cls, policy: Any) -> "PolicyIO":
        """From a loaded deepeyes.policy.Policy."""
        return cls(tokenizer=policy.tokenizer, image_processor=policy.image_processor,
                   image_pad_id=policy.image_pad_id, eos_id=policy.eos_id, pad_id=policy.pad_id)

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str], min_pixels: int | None = None,
                    max_pixels: int | None = None) -> "PolicyIO":
        """From a model folder without loading weights (vLLM replicas hold the model elsewhere)."""
        from transformers import AutoTokenizer  # transformers: heavy, loaded on first use

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        image_processor = load_image_processor(path, min_pixels, max_pixels)
        config = json.loads(Path(path, "config.json").read_text())
        return cls(tokenizer=tokenizer, image_processor=image_processor,
                   image_pad_id=int(config["image_token_id"]),
                   eos_id=int(tokenizer.convert_tokens_to_ids("<|im_end|>")),
                   pad_id=int(tokenizer.convert_tokens_to_ids("<|endoftext|>")))

    @property
    def min_pixels(self) -> int:
        return int(self.image_processor.size["shortest_edge"])

    @property
    def max_pixels(self) -> int:
        return int(self.image_processor.size["longest_edge"])

    def to_model_frame(self, image: Image.Image) -> Image.Image:
        """The image resized to the frame the model sees (the processor's resize is then the identity)."""
        return resize_for_model(image, self.min_pixels, self.max_pixels, self.factor)

    @property
    def factor(self) -> int:
        """The processor's smart-resize grid (28 px for Qwen2.5-VL, 32 for Qwen3-VL)."""
        return processor_factor(self.image_processor)

    def grids(self, images: Sequence[Image.Image]) -> list[list[int]]:
        """image_grid_thw of each image, from the processor itself (the one authority on it).

        The grid depends on the image's size alone, so each size asks the processor once (its
        full preprocess, pixels included, was 5% of a rollout replica's CPU when run per turn)."""
        new = [im for im in images if im.size not in self._grids]
        if new:
            if len(self._grids) > GRID_CACHE_SIZES:
                self._grids.clear()
            out = self.image_processor(images=new, return_tensors="pt")
            for im, g in zip(new, out["image_grid_thw"].tolist()):
                self._grids[im.size] = [int(x) for x in g]
        return [list(self._grids[im.size]) for im in images]

    @property
    def banned_ids(self) -> list[int]:
        """Vision placeholders the policy must never write: a sampled <|image_pad|> would break
        the pad-count invariant and the next forward (the random tiny model does sample them)."""
        toks = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
        return sorted({self.image_pad_id, *(int(self.tokenizer.convert_tokens_to_ids(t)) for t in toks)})
