"""The configured policy's family, resolved: model.family and tools.box_scale without `auto`, the
frame grid and the zoom box scale a run uses, and the check that a named family is the folder's."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from deepeyes.family import Family, box_scale_of, family_named, folder_family
from deepeyes.policy import resolve_policy_path, tiny_family


def model_family(model_cfg: Any) -> Family:
    """model.family resolved: a named family, else the tiny default's, else the folder's config.json
    (a Hub id is resolved, and downloaded on first use, through resolve_policy_path)."""
    if model_cfg.family != "auto":
        return family_named(model_cfg.family)
    if model_cfg.path == "tiny":
        return family_named(tiny_family(model_cfg))
    return folder_family(resolve_policy_path(model_cfg))


def resolve_family(cfg: Any) -> Any:
    """cfg with model.family and tools.box_scale resolved (no `auto` left): what a run hands its
    services and workers, so every one of them reads the same family."""
    fam = model_family(cfg.model)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, family=fam.name),
                               tools=dataclasses.replace(cfg.tools, box_scale=box_scale_of(cfg.tools.box_scale, fam)))


def check_family(cfg: Any, folder: str | os.PathLike[str]) -> None:
    """A named model.family must be the folder's own (a Qwen3-VL family on a Qwen2.5-VL checkpoint
    would resize and crop on the wrong grid)."""
    found = folder_family(folder)
    if cfg.model.family not in ("auto", found.name):
        raise ValueError(f"model.family={cfg.model.family} but {folder} holds a {found.name} checkpoint: "
                         f"set model.family={found.name} (or auto)")


def zoom_box_scale(cfg: Any) -> str:
    """tools.box_scale resolved against the policy family (auto -> the family's own)."""
    return box_scale_of(cfg.tools.box_scale, model_family(cfg.model))


def frame_factor(model_cfg: Any) -> int:
    """The smart-resize grid of the configured policy (28 or 32 px)."""
    return model_family(model_cfg).factor
