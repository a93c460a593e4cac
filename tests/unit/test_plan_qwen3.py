"""`python -m trainer plan` for Qwen3-VL, dense and MoE: the parameter count exact against transformers'
own models (the real 8B and 30B-A3B built on the meta device, and small configs with every option),
the per-token activation count equal to the bytes a decoder layer saves for backward (fp32 and bf16),
the whole estimate near the measured peak of a real update on CPU, the two recipes fitting 80 GiB
GPUs with the figures their YAML states, and the Qwen2.5-VL 7B plan unchanged."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                          Qwen3VLMoeForConditionalGeneration)

from deepeyes.config import ConfigError, load_config
from trainer.__main__ import main as trainer_main
from trainer.loop import update
from trainer.memory import peak_tensor_bytes
from trainer.packing import Example
from trainer.plan import KNOWN, Dims, activation_bytes, layer_activation_bytes, param_counts, plan

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {"qwen3-vl-8b": "qwen3_vl", "qwen3-vl-30b-a3b": "qwen3_vl_moe"}
TOKENS = 1024
ROPE = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [8, 12, 12], "mrope_interleaved": True}
VISION_8B_UP = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24])
SMALL_VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16, spatial_merge_size=2,
                    temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])


def real_8b() -> Qwen3VLConfig:
    """Qwen/Qwen3-VL-8B-Instruct's config.json sizes."""
    return Qwen3VLConfig(text_config=dict(vocab_size=151936, hidden_size=4096, num_hidden_layers=36,
                                          num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                          intermediate_size=12288, tie_word_embeddings=False),
                         vision_config=dict(VISION_8B_UP, out_hidden_size=4096), tie_word_embeddings=False)


def real_30b_a3b() -> Qwen3VLMoeConfig:
    """Qwen/Qwen3-VL-30B-A3B-Instruct's config.json sizes."""
    return Qwen3VLMoeConfig(text_config=dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
                                             num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                             intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                                             num_experts_per_tok=8, tie_word_embeddings=False),
                            vision_config=dict(VISION_8B_UP, out_hidden_size=2048), tie_word_embeddings=False)


def small(moe: bool, hidden: int = 256, layers: int = 2, vocab: int = 4096, vision: dict | None = None,
          tied: bool = False, **text) -> Qwen3VLConfig | Qwen3VLMoeConfig:
    """A small Qwen3-VL: 8 heads of 64 (queries twice the hidden size), 2 KV heads."""
    t = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, intermediate_size=3 * hidden, rope_parameters=ROPE,
             tie_word_embeddings=tied)
    if moe:
        t.update(moe_intermediate_size=hidden // 2, num_experts=16, num_experts_per_tok=4)
    t.update(text)
    v = dict(vision or SMALL_VISION, out_hidden_size=hidden)
    cls = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return cls(text_config=t, vision_config=v, tie_word_embeddings=tied)


def build(config, device: str = "meta"):
    cls = Qwen3VLMoeForConditionalGeneration if config.model_type == "qwen3_vl_moe" else Qwen3VLForConditionalGeneration
    with torch.device(device):
        return cls(config)


def counts(model) -> tuple[int, int, int]:
    """(all parameters, the largest decoder layer's, all but the decoder layers'), counted on the model."""
    total = sum(p.numel() for p in model.parameters())
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.language_model.layers]
    return total, max(layers), total - sum(layers)


@pytest.mark.parametrize("name, make, published", [
    ("Qwen/Qwen3-VL-8B-Instruct", real_8b, 8.77e9),
    ("Qwen/Qwen3-VL-30B-A3B-Instruct", real_30b_a3b, 31.1e9),
])
def test_the_real_sizes_count_exactly(name, make, published):
    config = make()
    dims = Dims.from_config(config.to_dict())
    assert dims == KNOWN[name] == KNOWN[name.replace("-Instruct", "-Thinking")]
    got = counts(build(config))
    assert param_counts(dims) == got, (param_counts(dims), got)
    assert got[0] == pytest.approx(published, rel=0.005)  # the model cards' totals


@pytest.mark.parametrize("moe, kw", [
    (False, {}),
    (False, dict(tied=True, attention_bias=True)),
    (False, dict(vision=dict(SMALL_VISION, deepstack_visual_indexes=[], num_position_embeddings=16))),
    (True, {}),
    (True, dict(mlp_only_layers=[0], layers=3)),
    (True, dict(decoder_sparse_step=2, layers=4, intermediate_size=200, tied=True)),
])
def test_small_configs_count_exactly(moe, kw):
    config = small(moe, **kw)
    model = build(config)
    dims = Dims.from_config(config.to_dict())
    assert dims.family == config.model_type and param_counts(dims) == counts(model)


def test_a_hub_config_json_reads_the_same_as_transformers_own():
    """The Hub's config.json names the experts num_experts; transformers' to_dict num_local_experts."""
    d = real_30b_a3b().to_dict()
    d["text_config"]["num_experts"] = d["text_config"].pop("num_local_experts")
    assert Dims.from_config(d) == KNOWN["Qwen/Qwen3-VL-30B-A3B-Instruct"]
    with pytest.raises(ConfigError, match="model_type"):
        Dims.from_config(dict(d, model_type="llava"))


def saved_bytes(layer, hidden: int, rotary, dtype: torch.dtype) -> int:
    """Bytes one decoder layer saves for backward over TOKENS tokens (distinct storages, parameters apart)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randn(1, TOKENS, hidden, dtype=dtype, requires_grad=True)
    position_ids = torch.arange(TOKENS).view(1, 1, -1).expand(3, 1, -1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, position_embeddings=rotary(x, position_ids),
              position_ids=position_ids[0])
    return sum(seen.values())


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decoder_layer_saves_what_the_plan_counts(moe, dtype):
    torch.manual_seed(0)
    config = small(moe, layers=1)
    config._attn_implementation = "sdpa"
    model = build(config, "cpu").to(dtype)
    lm = model.model.language_model
    got = saved_bytes(lm.layers[0], config.text_config.hidden_size, lm.rotary_emb, dtype)
    want = TOKENS * layer_activation_bytes(Dims.from_config(config.to_dict()), dtype.itemsize)[0]
    assert want == pytest.approx(got, rel=0.001), (want, got)


@pytest.mark.parametrize("moe", [False, True])
def test_an_update_peaks_near_the_plan(moe):
    """The whole estimate (layers, head, gradients) against the measured peak of a real update, fp32."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = small(moe)
    model = build(config, "cpu")
    model.train()
    cfg = load_config(overrides=[f"trainer.micro_batch_tokens={TOKENS}"])
    ids = torch.randint(10, 2000, (TOKENS,))
    ex = Example(ids, torch.tensor([0.0] * 16 + [1.0] * (TOKENS - 16)), 1.0, None, None,
                 torch.arange(TOKENS).expand(3, -1).clone())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    update(model, opt, [copy.copy(ex)], cfg, float(TOKENS), 1.0, lambda m: None)  # the moments exist from here on
    start, peak = peak_tensor_bytes(lambda: update(model, opt, [ex], cfg, float(TOKENS), 1.0, lambda m: None))
    count = sum(p.numel() for p in model.parameters())
    want = activation_bytes(Dims.from_config(config.to_dict()), TOKENS, 4, False, 0, grads=4.0 * count)
    assert want == pytest.approx(peak - start, rel=0.1), (want, peak - start)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_the_recipes_fit_80_gib_with_the_figures_they_state(recipe, capsys):
    path = f"deploy/configs/{recipe}.yaml"
    cfg = load_config(path)
    assert cfg.model.family == RECIPES[recipe] == KNOWN[cfg.model.path].family
    assert cfg.tools.box_scale == "relative" and (cfg.model.min_pixels, cfg.model.max_pixels) == (4096, 16777216)
    p = plan(cfg, 80.0)
    assert p.fits and p.train_gib < 72 and p.kv_tokens > 4 * p.sequence, (p.train, p.rollout)
    header = "".join(line for line in (ROOT / path).read_text().splitlines(keepends=True) if line.startswith("#"))
    rollout = dict(p.rollout)
    stated = [f"{p.train_gib:.1f} GiB", f"{rollout['weights (model.dtype)']:.1f} GiB weights",
              f"{rollout['KV cache']:.1f} GiB KV cache", f"{p.kv_tokens:,.0f} tokens"]
    assert all(s in header for s in stated), (stated, header)
    assert trainer_main(["plan", "--config", path]) == 0
    assert capsys.readouterr().out.rstrip().endswith("fits")


def test_the_family_must_match_the_checkpoint_and_kv_heads_are_copied_past_tp():
    with pytest.raises(ConfigError, match="model.family=qwen3_vl_moe"):
        plan(load_config("deploy/configs/qwen3-vl-30b-a3b.yaml", ["model.path=Qwen/Qwen3-VL-8B-Instruct"]))
    at = {tp: plan(load_config("deploy/configs/qwen3-vl-30b-a3b.yaml", [f"rollout.tensor_parallel_size={tp}"]))
          for tp in (4, 8)}  # 4 KV heads: at tp 8 each is held by two GPUs, so the cache holds no more tokens
    assert dict(at[8].rollout)["KV cache"] > dict(at[4].rollout)["KV cache"]
    assert at[8].kv_tokens == pytest.approx(at[4].kv_tokens * dict(at[8].rollout)["KV cache"]
                                            / dict(at[4].rollout)["KV cache"])


def test_the_qwen2_5_vl_7b_plan_is_unchanged():
    p = plan(load_config("deploy/configs/deepeyes-7b.yaml"), 80.0)
    assert [v for _, v in p.train] == pytest.approx([7.722681999206543, 7.722681999206543, 15.445363998413086,
                                                     8.31732177734375, 13.234375, 2.0], rel=1e-12)
    assert [v for _, v in p.rollout] == pytest.approx([15.445363998413086, 2.0, 30.554636001586914], rel=1e-12)
    assert p.kv_tokens == pytest.approx(572122.4642857143, rel=1e-12)
    assert param_counts(KNOWN["Qwen/Qwen2.5-VL-7B-Instruct"]) == (8292166656, 233057792, 1766548480)
