"""`python -m trainer plan` against what real update steps use on CPU: the parameter count exactly,
and the memory one update adds (gradients and activations) within 25% of the measured peak of live
tensors (trainer/memory.py), on the tiny policy and a 13x larger twin built the same way, plain,
with activation checkpointing and with the chunked log-prob head. Then the 7B scenario's plan."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from deepeyes.config import load_config
from deepeyes.policy import tiny_model_config
from trainer.__main__ import main as trainer_main
from trainer.loop import update
from trainer.memory import peak_tensor_bytes
from trainer.packing import install_logprob_head, make_example
from trainer.plan import KNOWN, Dims, activation_bytes, param_counts, plan
from trainer.precision import enable_gradient_checkpointing

TOKENS = 1024
CHUNK = 256
SIZES = {"tiny": {}, "13x": dict(hidden=512, layers=4, intermediate=1408, heads=8, kv_heads=2)}
MODES = ("plain", "checkpointed", "chunked head")


@pytest.fixture(scope="module")
def measured(tiny_policy_dir):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(tiny_policy_dir))
    cfg = load_config(overrides=[f"trainer.micro_batch_tokens={TOKENS}"])
    ids = torch.randint(10, 2000, (TOKENS,)).tolist()
    out = {}
    for size, kw in SIZES.items():
        config = tiny_model_config(tok, **kw)
        base = Qwen2_5_VLForConditionalGeneration(config)
        dims = Dims.from_config(config.to_dict())
        for mode in MODES:
            model = copy.deepcopy(base)
            if mode == "checkpointed":
                enable_gradient_checkpointing(model)
            if mode == "chunked head":
                install_logprob_head(model, CHUNK)
            model.train()
            ex = make_example(model, ids, [0] * 16 + [1] * (TOKENS - 16), 1.0, None, None)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            update(model, opt, [ex], cfg, float(TOKENS), 1.0, lambda m: None)  # the moments exist from here on
            ex.old_logp = None
            start, peak = peak_tensor_bytes(lambda: update(model, opt, [ex], cfg, float(TOKENS), 1.0, lambda m: None))
            out[size, mode] = (dims, sum(p.numel() for p in model.parameters()), peak - start)
    return out


def test_the_parameter_count_is_exact(measured):
    for (size, mode), (dims, count, _) in measured.items():
        assert param_counts(dims)[0] == count, (size, count)
    assert measured["13x", "plain"][1] / measured["tiny", "plain"][1] > 10  # the larger twin is 10-50x


def test_what_an_update_adds_is_within_a_quarter_of_the_measured_peak(measured):
    rows = []
    for (size, mode), (dims, count, got) in measured.items():
        want = activation_bytes(dims, TOKENS, 4, mode == "checkpointed", CHUNK if mode == "chunked head" else 0,
                                grads=4.0 * count)
        rows.append((size, mode, got / 2 ** 20, want / 2 ** 20, want / got - 1))
    print("\n".join(f"{s:>5} {m:<13} measured {g:7.1f} MiB  plan {w:7.1f} MiB  {e:+.0%}" for s, m, g, w, e in rows))
    assert all(abs(e) <= 0.25 for *_, e in rows), rows


def test_the_7b_scenario_fits_80_gib_and_a_plan_that_does_not_names_the_knob(capsys):
    cfg = load_config("deploy/configs/deepeyes-7b.yaml")
    p = plan(cfg, 80.0)
    assert p.fits and p.train_gib < 80 and p.kv_tokens > p.sequence
    assert param_counts(KNOWN[cfg.model.path])[0] == pytest.approx(8.29e9, rel=0.01)  # Qwen2.5-VL-7B: 8.29 B
    assert trainer_main(["plan", "--config", "deploy/configs/deepeyes-7b.yaml"]) == 0
    assert "fits" in capsys.readouterr().out
    worse = plan(load_config("deploy/configs/deepeyes-7b.yaml", ["trainer.logit_chunk_tokens=0",
                                                                 "trainer.gradient_checkpointing=false"]), 80.0)
    assert not worse.fits and any("gradient_checkpointing" in f for f in worse.fixes)
    assert any("logit_chunk_tokens" in f for f in worse.fixes)
    assert trainer_main(["plan", "--config", "deploy/configs/deepeyes-7b.yaml", "trainer.logit_chunk_tokens=0"]) == 1
