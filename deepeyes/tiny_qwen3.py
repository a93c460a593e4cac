"""The tiny Qwen3-VL (dense and MoE) configs: the embedded default's Qwen3-VL twins.

Same tokenizer recipe as the tiny Qwen2.5-VL (deepeyes/policy.py) with the Qwen3 added tokens, and
what Qwen3-VL needs on top (each seen failing without it):
- `head_dim` set explicitly (transformers' default is 128) to hidden/heads = 32: vLLM's CPU
  attention takes head sizes 32, 64, 80, ..., not 16;
- M-RoPE sections [6, 5, 5] (they sum to head_dim / 2) with `mrope_interleaved: true`, which
  vLLM reads (transformers always interleaves; without the flag vLLM lays them out contiguously);
- vision patch 16 and merge 2 (32 px a token), a learned position table whose side is a whole
  number (`num_position_embeddings` = 16^2), DeepStack from vision block 0 into the first text layer;
- the MoE twin: 4 experts of width 96 (2 x 96 != 128: a square fused gate_up would hide a
  transposed load, which transformers detects by shape), 2 per token, every layer sparse, `norm_topk_prob: true`
  (transformers always renormalises the top-k weights; vLLM reads the flag).
"""

from __future__ import annotations

from typing import Any

from deepeyes.chat import QWEN3_ADDED_TOKENS

PATCH = 16
MERGE = 2


def tiny_qwen3_config(tokenizer: Any, moe: bool = False, hidden: int = 128, layers: int = 2, intermediate: int = 256,
                      heads: int = 4, kv_heads: int = 2) -> Any:
    """The tiny Qwen3-VL's config (Qwen3VLMoeConfig when moe)."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig  # transformers: heavy, loaded on first use

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t, _ in QWEN3_ADDED_TOKENS}
    vocab = ((len(tokenizer) + 63) // 64) * 64
    head_dim = hidden // heads
    half = head_dim // 2
    t_section = half - 2 * (5 * half // 16)  # [6, 5, 5] at head_dim 32: Qwen3-VL's [24, 20, 20] scaled
    text = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                         "mrope_section": [t_section, 5 * half // 16, 5 * half // 16], "mrope_interleaved": True},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    if moe:
        # norm_topk_prob: transformers always renormalises the top-k router weights, vLLM only when this
        # says so (real Qwen3-VL MoE configs carry it; without it vLLM fails to start: no such attribute)
        text.update(moe_intermediate_size=192, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                    norm_topk_prob=True)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, out_hidden_size=hidden,
                  num_position_embeddings=256, deepstack_visual_indexes=[0])
    cls = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
               video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
               vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def tiny_qwen3_model(config: Any) -> Any:
    """A random-init model for a tiny Qwen3-VL config (dense or MoE), in eval mode."""
    # transformers: heavy, loaded on first use
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    cls = Qwen3VLMoeForConditionalGeneration if config.model_type == "qwen3_vl_moe" else Qwen3VLForConditionalGeneration
    return cls(config).eval()
