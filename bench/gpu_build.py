"""The one-shot GPU check's model and data (bench.gpu_check runs them): the Qwen2.5-VL-7B
architecture and a toy one of the same layout, the one-rank process group, FSDP2 as
trainer/distributed.py shards, and packed rows of synthetic multi-turn tool episodes.

Like bench.gpu_check, it imports neither Ray nor vLLM, and transformers only inside the functions
that build (the check imports them inside its guarded run, so a broken install still ends in its
JSON line).
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import traceback
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

try:
    import PIL.Image  # noqa: F401
except ImportError:
    # trainer.packing imports deepeyes.policy, which imports PIL at module level for its image
    # helpers; the bench never calls them, so a machine without Pillow gets an empty stand-in.
    _pil = types.ModuleType("PIL")
    _pil.Image = types.ModuleType("PIL.Image")  # type: ignore[attr-defined]
    sys.modules.update({"PIL": _pil, "PIL.Image": _pil.Image})  # type: ignore[attr-defined]

from deepeyes.policy import mrope_position_ids  # noqa: E402  (after the PIL stand-in)
from trainer.packing import Example, pack  # noqa: E402
from trainer.plan import Dims, train_rows  # noqa: E402

# Qwen/Qwen2.5-VL-7B-Instruct config.json (architecture fields), in the checkpoint's own flat
# layout, which transformers 4.x and 5.x both read.
QWEN25_VL_7B: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu",
    "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 28,
    "tie_word_embeddings": False, "attention_dropout": 0.0, "initializer_range": 0.02,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
        "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
        "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
    },
}

# The same layout at toy size: head_dim 16 -> mrope sections sum to 8; special ids inside a
# 512-token vocabulary.
TINY: dict[str, Any] = {
    **QWEN25_VL_7B,
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "max_window_layers": 2,
    "bos_token_id": 500, "eos_token_id": 511, "vision_start_token_id": 502,
    "vision_end_token_id": 503, "vision_token_id": 504, "image_token_id": 505, "video_token_id": 506,
    "vision_config": {
        **QWEN25_VL_7B["vision_config"], "depth": 2, "hidden_size": 32, "intermediate_size": 64,
        "num_heads": 2, "out_hidden_size": 64, "fullatt_block_indexes": [1],
    },
}


@dataclass
class Shape:
    """Episode geometry of one mode: image grids (t, h, w) in 14-px patches, text lengths, ids."""

    text_vocab: int        # ordinary token ids are drawn from [0, text_vocab)
    im_start: int          # <|im_start|>
    im_end: int            # <|im_end|>
    image_grids: list[tuple[int, int, int]]
    crop_grids: list[tuple[int, int, int]]
    prompt_text: int       # system prompt + question tokens
    turn_text: int         # tokens of one assistant turn (thinking + tool call)
    obs_text: int          # text tokens of one tool observation
    max_crops: int         # tool calls per episode at most (docs/design.md, "Agent loop limits": 5 turns)


SHAPE_7B = Shape(  # original images of 96-2596 tokens, crops of 80-400
    text_vocab=151643, im_start=151644, im_end=151645,
    image_grids=[(1, 16, 24), (1, 36, 52), (1, 52, 80), (1, 64, 92), (1, 76, 100), (1, 88, 118)],
    crop_grids=[(1, 16, 20), (1, 28, 36), (1, 20, 44), (1, 40, 40)],
    prompt_text=420, turn_text=300, obs_text=40, max_crops=4)
SHAPE_TINY = Shape(
    text_vocab=500, im_start=510, im_end=511,
    image_grids=[(1, 4, 6), (1, 6, 8)], crop_grids=[(1, 2, 4), (1, 4, 4)],
    prompt_text=16, turn_text=10, obs_text=4, max_crops=2)


# ---------------------------------------------------------------------------------------------
# SET-UP


def build_config(spec: dict[str, Any]) -> Any:
    from transformers import Qwen2_5_VLConfig  # inside the check's guarded run: see the docstring

    cfg = Qwen2_5_VLConfig(**json.loads(json.dumps(spec)))
    text = getattr(cfg, "text_config", cfg)
    want = {k: spec[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "intermediate_size", "vocab_size")}
    got = {k: getattr(text, k) for k in want}
    if got != want:  # an old or new transformers that reads the flat layout differently
        raise RuntimeError(f"config read back wrong: {got} != {want}")
    return cfg


def cut_layers(spec: dict[str, Any], n: int) -> dict[str, Any]:
    """`spec` with n text layers and n vision blocks (the last one full-attention), widths kept."""
    vision = {**spec["vision_config"], "depth": n, "fullatt_block_indexes": [n - 1]}
    return {**spec, "num_hidden_layers": n, "max_window_layers": n, "vision_config": vision}


def pick_attn(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401  (optional: only whether it imports matters)

            return "flash_attention_2"
        except Exception:
            return "sdpa"
    return "sdpa"


def init_dist(device: torch.device, store_dir: str) -> str:
    """One-rank process group on a file store: NCCL on CUDA, gloo on CPU. 'none (why)' if it fails."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"file://{store_dir}/store", rank=0, world_size=1, **kwargs)
        return backend
    except Exception as e:  # noqa: BLE001 -- measured unsharded instead, and said so
        traceback.print_exc()
        return f"none ({backend} init failed: {type(e).__name__}: {e})"[:300]


def build_model(cfg: Any, device: torch.device, dtype: torch.dtype, attn: str) -> Any:
    from transformers import Qwen2_5_VLForConditionalGeneration  # inside the guarded run: see the docstring

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it lives: no 16 GB host copy first
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False
    model.train()
    return model


def shard(model: Any, device: torch.device, mp_policy: Any = None) -> tuple[bool, str]:
    """FSDP2 as trainer/distributed.py: each decoder layer, then the root, with `mp_policy`
    (trainer/precision.py: bf16 compute over fp32 masters). (ok, note)."""
    if not dist.is_initialized():
        return False, "no process group; running unsharded"
    try:
        # inside the try: a torch without FSDP2 runs unsharded and says so
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        kw = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
        for layer in model.model.language_model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        n = len(model.model.language_model.layers)
        return True, f"fully_shard on {n} decoder layers + root, mesh {device.type} x{dist.get_world_size()}"
    except Exception as e:  # noqa: BLE001 -- measured unsharded instead, and said so
        return False, f"fully_shard failed ({type(e).__name__}: {e}); running unsharded"


def compute_context(model: Any, device: torch.device) -> Any:
    """bf16 compute over the fp32 masters: FSDP2's policy casts; unsharded, autocast does."""
    sharded = any(hasattr(p, "to_local") for p in model.parameters())
    return contextlib.nullcontext() if sharded else torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def plan_gib(model: Any, tokens: int, grad_ckpt: bool, spec: dict[str, Any]) -> float:
    """The plan's estimate for this case on one device (trainer/plan.py `train_rows`): fp32 masters,
    gradients and moments, bf16 gathered copies of the root unit and two layers (and their
    gradients), and the activations of the case's tokens (checkpointed or not, the chunked head)."""
    d = Dims.from_config(build_config(spec).to_dict())
    return sum(gib for _, gib in train_rows(d, 4, 2, 1, True, tokens, grad_ckpt, model.lm_head.chunk))


def set_grad_ckpt(model: Any, on: bool) -> None:
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


# ---------------------------------------------------------------------------------------------
# DATA


def merged(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return t * h * w // 4


def synth_episode(model: Any, rng: random.Random, length: int, shape: Shape, spec: dict[str, Any],
                  advantage: float, dtype: torch.dtype) -> Example:
    """One multi-turn tool episode of exactly `length` tokens (loss mask on assistant turns)."""
    text_hi, im_start, im_end = shape.text_vocab, shape.im_start, shape.im_end
    vs, ve, pad = spec["vision_start_token_id"], spec["vision_end_token_id"], spec["image_token_id"]
    ids: list[int] = []
    mask: list[int] = []
    grids: list[tuple[int, int, int]] = []

    def text(n: int, loss: int) -> None:
        ids.extend(rng.randrange(text_hi) for _ in range(n))
        mask.extend([loss] * n)

    def image(grid: tuple[int, int, int]) -> None:
        ids.extend([vs] + [pad] * merged(grid) + [ve])
        mask.extend([0] * (merged(grid) + 2))
        grids.append(grid)

    def marker(tok: int, loss: int) -> None:
        ids.append(tok)
        mask.append(loss)

    # prompt: system + user(image, question) + generation prompt; the largest image that leaves
    # room for one assistant turn is as likely as any other that fits
    prompt_text, turn_text = min(shape.prompt_text, length // 8), min(shape.turn_text, length // 8)
    fits = [g for g in shape.image_grids if merged(g) + prompt_text + turn_text + 12 <= length]
    if not fits:
        raise ValueError(f"episode length {length} too short for the prompt and the smallest image")
    marker(im_start, 0); text(prompt_text // 2, 0); marker(im_end, 0)
    marker(im_start, 0); image(rng.choice(fits)); text(prompt_text // 2, 0); marker(im_end, 0)
    marker(im_start, 0)
    crops = 0
    while True:
        crop = rng.choice(shape.crop_grids)
        obs = merged(crop) + 2 + shape.obs_text + 4
        # room for this assistant turn, its observation and a final answer turn of the same size
        if crops >= shape.max_crops or len(ids) + 2 * turn_text + obs + 2 > length:
            break
        text(turn_text, 1); marker(im_end, 1)
        marker(im_start, 0); image(crop); text(shape.obs_text, 0); marker(im_end, 0); marker(im_start, 0)
        crops += 1
    final = length - len(ids) - 1
    if final < 1:
        raise ValueError(f"episode length {length} too short for its prompt and image ({len(ids)} tokens)")
    text(final, 1); marker(im_end, 1)
    assert len(ids) == length
    ids_t = torch.tensor(ids, dtype=torch.long)
    grid_t = torch.tensor(grids, dtype=torch.long)
    patch_dim = 3 * spec["vision_config"]["temporal_patch_size"] * spec["vision_config"]["patch_size"] ** 2
    patches = int(grid_t.prod(dim=1).sum())
    noise = torch.Generator().manual_seed(rng.randrange(2**31))
    pixel_values = torch.randn(patches, patch_dim, generator=noise).to(dtype)
    return Example(input_ids=ids_t, loss_mask=torch.tensor(mask, dtype=torch.float32), advantage=advantage,
                   pixel_values=pixel_values, image_grid_thw=grid_t,
                   positions=mrope_position_ids(model, ids_t, grid_t))


def episode_lengths(total: int) -> list[int]:
    """A GRPO-like spread that sums to `total`: one long multi-turn episode, shorter ones after."""
    shares = [0.36, 0.26, 0.2, 0.18]
    lengths = [int(total * s) for s in shares]
    lengths[-1] += total - sum(lengths)
    return lengths


def packed_row(model: Any, tokens: int, shape: Shape, spec: dict[str, Any], seed: int,
               dtype: torch.dtype, device: torch.device) -> Any:
    rng = random.Random(seed)
    advs = [1.1, -0.6, 0.8, -1.3]
    exs = [synth_episode(model, rng, n, shape, spec, a, dtype) for n, a in zip(episode_lengths(tokens), advs)]
    pk = pack(exs)
    n_pad = int((pk.input_ids == spec["image_token_id"]).sum())
    want = int((pk.image_grid_thw.prod(dim=1) // 4).sum())
    if n_pad != want:  # the pad invariant (docs/design.md, "Chat format"), before every forward
        raise AssertionError(f"{n_pad} <|image_pad|> tokens but image_grid_thw asks for {want}")
    for name in ("input_ids", "position_ids", "pixel_values", "image_grid_thw", "targets", "target_mask", "advantages"):
        setattr(pk, name, getattr(pk, name).to(device))
    return pk
