"""Checkpoints: an HF export (loadable by from_pretrained and vLLM), the full optimizer state, RNG
and the trainer state (step, policy version, data position); finding the latest one to resume.

Ray Train stores each checkpoint folder under run_dir/train/step_NNNNNN (the driver names them).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from deepeyes.policy import Policy, save_policy

STATE_FILE = "trainer_state.json"
STOPPED_FILE = "stopped.json"  # in the run folder: why the loop stopped early (the driver reports it)
MASTER_FILE = "master.safetensors"  # the master weights, when hf/ holds another dtype
STARTUP_FILE = "startup.json"  # rank 0: when the workers started and sent the first rollout


def save_checkpoint(folder: Path, policy: Policy, model_state: dict[str, torch.Tensor],
                    optim_state: dict[str, Any], state: dict[str, Any], export_dtype: torch.dtype | None = None) -> None:
    """Model (HF format under hf/, loadable by from_pretrained and vLLM, in `export_dtype`), the
    master weights beside it when the export's dtype is another (master.safetensors), optimizer,
    trainer state."""
    hf = folder / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    master = next((v.dtype for v in model_state.values() if v.is_floating_point()), None)
    export_dtype = export_dtype or master
    if export_dtype != master:
        save_file(model_state, str(folder / MASTER_FILE))  # resume continues from these, not the export
    save_policy(policy.model, hf, state_dict={k: v.to(export_dtype) if v.is_floating_point() else v
                                              for k, v in model_state.items()})
    if export_dtype != master:  # save_pretrained names the model's own dtype: name the export's
        config = json.loads((hf / "config.json").read_text())
        for c in (config, config.get("text_config"), config.get("vision_config")):
            if isinstance(c, dict) and "dtype" in c:
                c["dtype"] = str(export_dtype).removeprefix("torch.")
        (hf / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    src = Path(policy.path)
    for f in src.iterdir():  # tokenizer, processor, template: everything but the weights
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", "generation_config.json"):
            (hf / f.name).write_bytes(f.read_bytes())
    torch.save(optim_state, folder / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    torch.save(rng, folder / "rng.pt")
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


def load_masters(folder: Path, model: Any) -> bool:
    """Load a checkpoint's master weights (master.safetensors) into `model`, if it has them."""
    path = folder / MASTER_FILE
    if not path.exists():
        return False
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path}: does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return True


def full_optimizer_state(model: Any, optimizer: Any, fsdp: bool) -> dict[str, Any]:
    """The optimizer state as one full (unsharded, CPU) dict; under FSDP2 a collective whose result
    only rank 0 holds (other ranks get an empty dict)."""
    if not fsdp:
        return optimizer.state_dict()
    # torch.distributed: only with FSDP2 or a process group
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any], fsdp: bool) -> None:
    """Load a `full_optimizer_state` dict; under FSDP2 every rank passes the full dict (a collective)."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    # torch.distributed: only with FSDP2 or a process group
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint folder with the highest step under run_dir/train (Ray Train's storage)."""
    found = []
    for p in Path(run_dir, "train").glob("step_*"):
        if (p / STATE_FILE).exists():
            found.append((json.loads((p / STATE_FILE).read_text())["step"], p))
    return max(found)[1] if found else None
