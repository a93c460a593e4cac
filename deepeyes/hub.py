"""`model.path` as users write it: a local folder, or a Hugging Face Hub id (`Qwen/Qwen2.5-VL-7B-Instruct`).

A Hub id resolves through the Hugging Face cache (HF_HOME / HF_HUB_CACHE): a snapshot already there
is used as it is, without a request; otherwise it is downloaded once, at set-up, on the driver. With
no network (or HF_HUB_OFFLINE=1) a missing snapshot is a ConfigError naming the id, the cache and
the two fixes. `describe` says what a run would do, for `python -m trainer --dry-run`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from deepeyes.config import ConfigError

# owner/name as the Hub spells them (letters, digits, '-', '_', '.'); a folder that exists wins.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def is_hub_id(path: str) -> bool:
    """True when `path` names a Hub repository rather than a local folder."""
    return bool(HUB_ID.match(path)) and not Path(os.path.expanduser(path)).exists()


def cache_dir() -> str:
    """The Hub cache as huggingface_hub finds it (HF_HUB_CACHE, else HF_HOME/hub), read at each call."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The snapshot folder of `repo_id` in the local cache, or None (no request is made)."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(), local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot folder of `repo_id`: from the cache, else downloaded into it."""
    found = cached_snapshot(repo_id, revision)
    if found is not None:
        return found
    fix = (f"download it where there is network (`hf download {repo_id}`, into the same cache) or "
           f"set model.path to a local folder holding the checkpoint")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"model.path={repo_id}: a Hugging Face Hub id not in the cache {cache_dir()}, and "
                          f"HF_HUB_OFFLINE is set: {fix}")
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir()))
    except Exception as e:  # unreachable Hub, unknown or gated repository: one message with the fix
        raise ConfigError(f"model.path={repo_id}: a Hugging Face Hub id not in the cache {cache_dir()}, and the "
                          f"download failed ({type(e).__name__}: {str(e)[:300]}): {fix}") from None


def describe(path: str) -> str:
    """One line: where `model.path` would come from, without downloading anything."""
    if path == "tiny":
        return "model.path=tiny: the embedded tiny Qwen2.5-VL, built locally (cached after the first run)"
    if is_hub_id(path):
        found = cached_snapshot(path)
        if found is not None:
            return f"model.path={path}: a Hugging Face Hub id, in the cache at {found}"
        return (f"model.path={path}: a Hugging Face Hub id, not in the cache {cache_dir()}: set-up would "
                f"download it there (on the driver, once)")
    folder = Path(os.path.expanduser(path))
    if (folder / "config.json").exists():
        return f"model.path={path}: a local folder with config.json"
    return f"model.path={path}: no model folder there (config.json missing) and not a Hub id (owner/name)"
