"""`python -m bench.gpu_check --tiny`: the one-shot GPU check's whole path (one-rank process
group, FSDP2, packed image+text episodes, PPO-clip update, AdamW, full-state-dict gather) runs on
CPU with gloo and ends with one JSON line of finite figures. It runs as on the GPU machine it is
written for: from the repository root, with `ray` and `vllm` unimportable. The 7B run itself
needs a CUDA machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from deepeyes.config import REPO_ROOT

FIGURES = ("tokens_per_s", "mfu", "peak_mem_gib", "step_s", "fwd_bwd_s", "adamw_s", "logprob_fwd_s",
           "gather_s", "gather_gib", "loss", "loss_first", "grad_norm", "build_s", "param_change_frac")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], dict]:
    blockers = tmp_path_factory.mktemp("no-ray-no-vllm")
    for name in ("ray", "vllm"):  # shadow the installed packages: importing them fails
        (blockers / name).mkdir()
        (blockers / name / "__init__.py").write_text(f"raise ImportError('no {name} on the GPU machine')\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(blockers)}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--tiny"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_ends_with_one_json_line_of_finite_figures(tiny_run) -> None:
    proc, summary = tiny_run
    assert summary["ok"] is True and summary["mode"] == "tiny"
    for key in FIGURES:
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), (key, summary.get(key))
    assert summary["tokens_per_s"] > 0 and summary["step_s"] > 0 and summary["grad_norm"] > 0
    assert "case" in proc.stdout and "tok/s" in proc.stdout  # the table came before the JSON


def test_runs_sharded_on_gloo(tiny_run) -> None:
    _, summary = tiny_run
    # torch 2.13's FSDP2 shards on a one-rank CPU mesh; a fallback would say fsdp2=false and why
    assert summary["backend"] == "gloo"
    assert summary["fsdp2"] is True, summary["fsdp2_note"]


def test_every_case_ran_on_the_planned_packing(tiny_run) -> None:
    _, summary = tiny_run
    assert [(c["name"], c["status"], c["tokens"]) for c in summary["cases"]] == [
        ("tiny-256", "ok", 256), ("tiny-512", "ok", 512), ("tiny-256-nockpt", "ok", 256)]
    assert summary["headline_case"] == "tiny-512" and summary["tokens"] == 512
    assert 0 < summary["loss_tokens"] < summary["tokens"] and 0 < summary["image_tokens"] < summary["tokens"]
    assert summary["images"] >= 4  # one original image per episode, crops after


def test_figures_follow_their_formulas(tiny_run) -> None:
    _, summary = tiny_run
    # MFU as stated: 6 * N * tokens/s over the H200's 989 TFLOP/s
    assert summary["mfu"] == pytest.approx(6 * summary["params"] * summary["tokens_per_s"] / 989e12, rel=1e-3)
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["step_s"], rel=1e-3)
    # the first step is on-policy (old log-probs from the same weights): ratio 1, so the token-mean
    # PPO-clip loss is minus the mean advantage over loss tokens
    assert summary["loss_first"] == pytest.approx(summary["loss_on_policy"], abs=1e-5)
    assert summary["loss_on_policy"] != 0.0
    # fp32 tiny weights: every AdamW step moves (nearly) every element of the watched weight
    # the 7B scenario's precision: fp32 masters and moments, bf16 compute; at lr 1e-6 every element moved
    assert summary["dtype"] == "float32" and summary["adamw_state_dtype"] == "float32"
    assert summary["compute_dtype"] == "bfloat16" and summary["param_change_frac"] > 0.9
    assert summary["logit_chunk_tokens"] > 0 and 0 < summary["plan_gib"] < 1


def test_gather_returns_the_whole_model(tiny_run) -> None:
    _, summary = tiny_run
    from transformers import Qwen2_5_VLForConditionalGeneration

    from bench import gpu_check

    model = Qwen2_5_VLForConditionalGeneration._from_config(gpu_check.build_config(gpu_check.TINY))
    state = model.state_dict()
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    assert summary["gather_tensors"] == len(state)
    assert summary["gather_gib"] == pytest.approx(sum(v.numel() * v.element_size() for v in state.values()) / 2**30, rel=1e-3)
