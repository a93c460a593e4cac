"""Teacher-forced log-probs of token sequences under a Qwen2.5-VL policy, and the M-RoPE positions.

The rollout engine and the trainer must see the same positions, or the sampling log-probs and the
trainer's disagree: on the tiny policy, tests/unit/test_rollout_hf_engine.py measures a gap below
1e-4 with the explicit positions computed here on both sides and above 1e-3 when the forward derives 1-D
positions from the padded batch itself. Qwen2.5-VL uses 3-D M-RoPE: text tokens
advance one position on all three axes, an image's pad run takes (t, h, w) grid positions and
advances the text position by max(h, w)/merge. Both sides therefore compute positions explicitly
with the model's own `get_rope_index` (image tokens typed by `<|image_pad|>`), ignoring padding
through the attention mask, and hand them to the forward as `position_ids` of shape (3, B, L).
"""

from __future__ import annotations

from typing import Any

import torch

from deepeyes.policy import mrope_positions


def sequence_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None,
                      temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of every token given its prefix, for a right-padded batch (the trainer reuses this).

    Args:
        model: a Qwen2_5_VLForConditionalGeneration (eval or train mode; gradients flow).
        input_ids: (B, L) token ids, right-padded.
        attention_mask: (B, L) 1 for real tokens, 0 for padding.
        pixel_values: the processor's pixel values of all images of all rows, concatenated in row
            order and, within a row, in the order of their pad runs (None without images).
        image_grid_thw: (num_images, 3) grids in the same order (None without images).
        temperature: logits are divided by it before the log-softmax (the sampling temperature;
            0 or greedy counts as 1.0, the distribution the greedy token was read from).

    Returns:
        (B, L) float32: out[b, t] = log p(input_ids[b, t] | input_ids[b, :t]) for t >= 1;
        out[:, 0] = 0 and padding positions are 0.
    """
    position_ids, _ = mrope_positions(model, input_ids, attention_mask, image_grid_thw)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=False)
    t = temperature if temperature and temperature > 0 else 1.0
    logits = out.logits[:, :-1].float() / t
    lp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    lp = torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)
    return lp * attention_mask.to(lp.dtype)
