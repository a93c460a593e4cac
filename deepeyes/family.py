"""Policy families: what differs between Qwen2.5-VL and Qwen3-VL (dense and MoE), in one place.

Everything else reads these values or the folder's own processor: the vision patch and merge (so the
smart-resize grid: 28 px for Qwen2.5-VL, 32 px for Qwen3-VL), the transformers class, the zoom
box's scale the family's checkpoints emit (absolute frame pixels for Qwen2.5-VL, 0-1000 relative
for Qwen3-VL), the added tokens of its tokenizer, and the M-RoPE layout its rope parameters must
carry. docs/design.md, "Policy families", says why each matters. Pure Python.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepeyes.chat import QWEN3_ADDED_TOKENS, QWEN_ADDED_TOKENS


@dataclass(frozen=True)
class Family:
    name: str                 # model.family
    model_type: str           # config.json's model_type
    model_class: str          # the transformers class (and vLLM's architecture name)
    patch: int                # vision patch side in pixels
    merge: int                # spatial merge: merge x merge patches make one token
    box_scale: str            # the zoom box its checkpoints write: "absolute" or "relative" (0-1000)
    added_tokens: tuple[tuple[str, bool], ...]
    interleaved_mrope: bool   # M-RoPE sections interleaved over the rotary dims (vLLM needs the flag)

    @property
    def factor(self) -> int:
        """The smart-resize grid: image sides are multiples of patch * merge."""
        return self.patch * self.merge

    @property
    def pixel_budget(self) -> tuple[int, int]:
        """(min_pixels, max_pixels) of the family's reference processor: 4 to 16,384 tokens."""
        return 4 * self.factor ** 2, 16384 * self.factor ** 2


FAMILIES: dict[str, Family] = {
    "qwen2_5_vl": Family("qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", 14, 2, "absolute",
                         tuple(QWEN_ADDED_TOKENS), False),
    "qwen3_vl": Family("qwen3_vl", "qwen3_vl", "Qwen3VLForConditionalGeneration", 16, 2, "relative",
                       tuple(QWEN3_ADDED_TOKENS), True),
    "qwen3_vl_moe": Family("qwen3_vl_moe", "qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", 16, 2, "relative",
                           tuple(QWEN3_ADDED_TOKENS), True),
}


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r}: use one of {', '.join(FAMILIES)} (or auto)")
    return FAMILIES[name]


def family_of_config(config: dict[str, Any], where: str = "the checkpoint") -> Family:
    """The family of a config.json dict, by its model_type; checks the M-RoPE layout it needs."""
    model_type = config.get("model_type")
    for fam in FAMILIES.values():
        if fam.model_type == model_type:
            break
    else:
        raise ValueError(f"{where}: model_type {model_type!r} is not a supported policy family "
                         f"({', '.join(f.model_type for f in FAMILIES.values())})")
    if fam.interleaved_mrope:
        rope = (config.get("text_config") or {}).get("rope_parameters") or (config.get("text_config") or {}).get(
            "rope_scaling") or {}
        if not rope.get("mrope_interleaved"):
            raise ValueError(
                f"{where}: a {fam.name} config without text_config.rope_parameters.mrope_interleaved=true. "
                f"transformers always interleaves Qwen3-VL's M-RoPE, but vLLM reads this flag and without it "
                f"lays the sections out contiguously: rollout and trainer log-probs would silently disagree. "
                f"Add \"mrope_interleaved\": true to the folder's config.json.")
    text = config.get("text_config") or {}
    if fam.name == "qwen3_vl_moe" and not text.get("norm_topk_prob"):
        raise ValueError(f"{where}: a qwen3_vl_moe config without text_config.norm_topk_prob=true. transformers "
                         f"always renormalises the top-k router weights, vLLM only with this flag. Add it.")
    return fam


def folder_family(folder: str | os.PathLike[str]) -> Family:
    """The family of a checkpoint folder (its config.json)."""
    path = Path(folder) / "config.json"
    return family_of_config(json.loads(path.read_text()), where=str(path))


FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def checkpoint_layout(tensors: dict[str, Any], model_type: str) -> dict[str, Any]:
    """Tensors in the layout the family's released checkpoints use (and vLLM's loader expects).

    transformers 5 holds Qwen3-VL-MoE's fused experts as (experts, out, in) and writes them so; the
    released checkpoints store (experts, in, out), which transformers transposes on load and vLLM
    reads as it is (`is_fused_checkpoint_transposed`). Every other tensor passes through."""
    if not relaid_out(tensors, model_type):
        return tensors
    return {k: v.transpose(1, 2) if k.endswith(FUSED_EXPERTS) else v for k, v in tensors.items()}


def relaid_out(names: Any, model_type: str) -> bool:
    """Whether `checkpoint_layout` changes any of these tensor names."""
    return model_type == "qwen3_vl_moe" and any(k.endswith(FUSED_EXPERTS) for k in names)


def box_scale_of(setting: str, family: Family) -> str:
    """tools.box_scale resolved: auto -> the family's own."""
    return family.box_scale if setting == "auto" else setting
