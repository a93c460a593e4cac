"""`model.path` as a Hugging Face Hub id: resolved through a real (local) Hub cache, a clear error
when it is not there and the Hub cannot be asked, and the dry run saying what set-up would do.
No request leaves the machine: the cache is laid out on disk as huggingface_hub writes it."""

from __future__ import annotations

import pytest

from deepeyes.config import ConfigError, ModelConfig
from deepeyes.hub import is_hub_id
from deepeyes.policy import resolve_policy_path
from trainer.__main__ import main as trainer_main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root, repo_id: str):
    """The layout huggingface_hub keeps: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    return snap


def test_hub_ids_and_folders_are_told_apart(tmp_path, monkeypatch):
    assert is_hub_id("Qwen/Qwen2.5-VL-7B-Instruct")
    assert not is_hub_id("tiny") and not is_hub_id("/models/qwen") and not is_hub_id("a/b/c")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt" / "step_10").mkdir(parents=True)
    assert not is_hub_id("ckpt/step_10")  # an existing folder wins over the id pattern


def test_a_cached_hub_id_resolves_to_its_snapshot_without_a_request(tmp_path, monkeypatch):
    snap = fake_cache(tmp_path, "Qwen/Qwen2.5-VL-7B-Instruct")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a request would fail: the cache alone must answer
    assert resolve_policy_path(ModelConfig(path="Qwen/Qwen2.5-VL-7B-Instruct")) == snap


def test_an_uncached_hub_id_offline_is_an_error_naming_the_id_the_cache_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as e:
        resolve_policy_path(ModelConfig(path="Qwen/Qwen2.5-VL-7B-Instruct"))
    msg = str(e.value)
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in msg and str(tmp_path) in msg
    assert "hf download Qwen/Qwen2.5-VL-7B-Instruct" in msg and "local folder" in msg


def test_the_7b_dry_run_accepts_the_hub_id_and_says_it_would_download_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    data = tmp_path / "train.parquet"
    data.write_bytes(b"")  # the dry run checks that the file is there, it reads nothing
    rc = trainer_main(["--config", "deploy/configs/deepeyes-7b.yaml", "--dry-run", f"data.train_files=[{data}]"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "model.path=Qwen/Qwen2.5-VL-7B-Instruct: a Hugging Face Hub id, not in the cache" in out
    assert "would download it" in out and "dry run: ready" in out
    # once the snapshot is in the cache, the dry run says so and would download nothing
    snap = fake_cache(tmp_path / "hub", "Qwen/Qwen2.5-VL-7B-Instruct")
    assert trainer_main(["--config", "deploy/configs/deepeyes-7b.yaml", "--dry-run", f"data.train_files=[{data}]"]) == 0
    assert f"in the cache at {snap}" in capsys.readouterr().out


def test_the_dry_run_names_what_is_missing(tmp_path, capsys):
    rc = trainer_main(["--dry-run", f"model.path={tmp_path}/nothing", f"data.train_files=[{tmp_path}/none.parquet]"])
    out = capsys.readouterr().out
    assert rc == 2
    assert "no model folder there" in out and f"missing: data file {tmp_path}/none.parquet does not exist" in out
