"""The policy: the embedded tiny Qwen2.5-VL / Qwen3-VL, built offline, and the one loader for any policy
of a supported family (deepeyes/family.py: Qwen2.5-VL, Qwen3-VL dense and MoE).

`load_policy(path)` is the only way the project loads a policy: the tiny default and a real 7B
checkpoint go through the same `from_pretrained` calls. `build_tiny_policy(folder)` writes a
Qwen2.5-VL folder from nothing (a byte-level BPE trained on a generated corpus with the real
Qwen2.5 added tokens in their real order, the project chat template, a PIL image processor and a
random-init model of about 1M parameters); the same seed gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deepeyes.chat import (CHAT_TEMPLATE, QWEN_ADDED_TOKENS, SYSTEM_PROMPT, THOUGHT_ANSWER, THOUGHT_DIRECT,
                           THOUGHT_ZOOM, THOUGHT_ZOOM_AT, TOOLS_HEAD, TOOLS_TAIL, ZOOM_IN_SCHEMA)
from deepeyes.config import DEFAULT_CACHE_DIR, DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from deepeyes.family import checkpoint_layout, family_named, folder_family, relaid_out
from deepeyes.hub import hub_snapshot, is_hub_id
from deepeyes.images import to_rgb
from deepeyes.tiny_qwen3 import tiny_qwen3_config, tiny_qwen3_model

TINY_VERSION = "tiny-qwen2.5-vl-v5"
PATCH = 14
MERGE = 2
FACTOR = PATCH * MERGE  # 28: Qwen2.5-VL's smart-resize grid (Qwen3-VL's is 32: deepeyes/family.py)


@dataclass
class Policy:
    """A loaded policy: model, tokenizer and image processor, plus the ids the loop needs."""

    model: Any
    tokenizer: Any
    image_processor: Any
    path: str

    @property
    def factor(self) -> int:
        """The smart-resize grid of this policy's processor (28 or 32 px)."""
        return processor_factor(self.image_processor)

    @property
    def image_pad_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids("<|im_end|>"))

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids("<|endoftext|>"))


# ---------------------------------------------------------------------------------------------
# image geometry


def processor_factor(image_processor: Any) -> int:
    """A Qwen-VL image processor's smart-resize grid: patch x merge (28 px Qwen2.5-VL, 32 px Qwen3-VL)."""
    return int(image_processor.patch_size) * int(image_processor.merge_size)


def smart_resize_hw(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> tuple[int, int]:
    """The (h, w) the Qwen2-VL processor resizes an image to (transformers' own function); factor is
    the family's grid (28 for Qwen2.5-VL, 32 for Qwen3-VL)."""
    # transformers: heavy, loaded on first use
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def resize_for_model(image: Image.Image, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> Image.Image:
    """The image in the frame the model sees: RGB, sides multiples of `factor`, area within bounds.

    The processor would do the same resize itself; doing it once up front gives the crop tool
    and the model one shared pixel frame, and the processor's own resize is then the identity.
    """
    image = to_rgb(image)  # transparent pixels over white, as the Qwen reference does
    h, w = smart_resize_hw(image.height, image.width, min_pixels, max_pixels, factor)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    return image


def merged_patches(grid_thw: Sequence[int]) -> int:
    """Number of <|image_pad|> tokens of one image: t*h*w / merge^2."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // (MERGE * MERGE)


# ---------------------------------------------------------------------------------------------
# the tiny tokenizer


def _corpus(seed: int) -> list[str]:
    """A deterministic corpus covering what the tiny policy reads and writes."""
    rng = random.Random(seed)
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "cyan", "pink"]
    shapes = ["circle", "square", "triangle", "star", "cross", "diamond", "stripe", "letter", "word"]
    words = ("the what which color shape is of in image small region zoom look answer question "
             "option choose letter text written pattern horizontal vertical target object box "
             "left right top bottom center see need closer detail think tool call crop area "
             "there a an and or it this that I to with on at for by from number how many value "
             "true false yes no correct incorrect reference model meaning same response judge "
             "math solve compute result boxed final sum product equals").split()
    # The fixed texts every prompt carries (system prompt, the template's tools block, schema-style
    # JSON) are repeated so that BPE gives their words single tokens: shorter sequences, less CPU.
    lines = [SYSTEM_PROMPT, TOOLS_HEAD + TOOLS_TAIL, json.dumps(ZOOM_IN_SCHEMA)] * 40
    lines += [" ".join(str(n) for n in range(k, 1000, 7)) for k in range(7)] * 6  # every number < 1000
    # The embedded demo's question and answers (data.synthetic_task=zoom): one token per option word.
    from deepeyes.data import ZOOM_ORIENTATIONS, ZOOM_PLACES, ZOOM_TARGET, zoom_question

    for k in range(len(ZOOM_ORIENTATIONS)):
        order = ZOOM_ORIENTATIONS[k:] + ZOOM_ORIENTATIONS[:k]
        lines += [zoom_question(ZOOM_TARGET, list(order), place) for place in (None,) + ZOOM_PLACES] * 10
        lines += [f"<think>{t}</think><answer>{order[0]}</answer>" for t in (THOUGHT_ANSWER, THOUGHT_DIRECT)] * 10
        lines += [f"<think>{THOUGHT_ZOOM}</think>"] * 10
        lines += [f"<think>{THOUGHT_ZOOM_AT.format(place=place)}</think>" for place in ZOOM_PLACES] * 10
    for _ in range(3000):
        kind = rng.random()
        if kind < 0.3:
            x1, y1 = rng.randint(0, 2000), rng.randint(0, 2000)
            x2, y2 = x1 + rng.randint(1, 400), y1 + rng.randint(1, 400)
            lines.append(json.dumps({"name": "image_zoom_in_tool",
                                     "arguments": {"bbox_2d": [x1, y1, x2, y2],
                                                   "label": f"{rng.choice(colors)} {rng.choice(shapes)}"}}))
        elif kind < 0.5:
            lines.append(f"<think>{' '.join(rng.choices(words, k=rng.randint(4, 16)))}</think>"
                         f"<answer>{rng.choice(colors + shapes + list('ABCD'))}</answer>")
        elif kind < 0.7:
            lines.append(f"What is the {rng.choice(['color', 'shape', 'text'])} of the "
                         f"{rng.choice(colors)} {rng.choice(shapes)}? (A) {rng.choice(colors)} "
                         f"(B) {rng.choice(colors)} (C) {rng.choice(colors)} (D) {rng.choice(colors)}")
        elif kind < 0.85:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            lines.append(f"{a} + {b} = {a + b}; \\boxed{{{a + b}}} {rng.random():.3f}")
        else:
            lines.append(" ".join(rng.choices(words + colors + shapes, k=rng.randint(5, 20))))
    return lines


def _number_regex() -> str:
    """Qwen's pre-tokenizer regex with numbers in runs of up to 3 digits (Qwen splits every digit).

    The one deliberate difference from the real tokenizer: a 1M-parameter policy cannot learn to
    stop a number it must spell digit by digit (it wrote 13-digit coordinates), while one token
    per coordinate under 1000 is easy. Real checkpoints keep their own tokenizer.
    """
    # transformers: heavy, loaded on first use
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    rx = PRETOKENIZE_REGEX.replace(r"\p{N}|", r"\p{N}{1,3}|")
    assert rx != PRETOKENIZE_REGEX, "transformers changed Qwen2's PRETOKENIZE_REGEX"
    return rx


def build_tiny_tokenizer(seed: int = 0, vocab_size: int = 2400,
                         added_tokens: Sequence[tuple[str, bool]] = QWEN_ADDED_TOKENS) -> Any:
    """Byte-level BPE trained on the generated corpus, with the family's added tokens in order."""
    # tokenizers: only the tiny builder
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    def pre_tokenizer() -> Any:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_number_regex()), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]

    qt = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, pad_token=None, eos_token=None)
    qt.backend_tokenizer.pre_tokenizer = pre_tokenizer()  # saved in tokenizer.json, kept on load
    # Added tokens in the real Qwen2.5 order; eos/pad are set only after all exist (see notes).
    for text, special in added_tokens:
        if text not in qt.get_vocab():
            qt.add_tokens([AddedToken(text, special=special, normalized=False)], special_tokens=special)
    # Saved as the generic fast tokenizer: Qwen2Tokenizer rebuilds its pre-tokenizer on load and
    # would drop the number rule above; TokenizersBackend loads tokenizer.json verbatim.
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=qt.backend_tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
                                   model_max_length=32768)
    return fast


# ---------------------------------------------------------------------------------------------
# the tiny model


def tiny_model_config(tokenizer: Any, hidden: int = 128, layers: int = 2, intermediate: int = 256, heads: int = 4,
                      kv_heads: int = 2) -> Any:
    """The tiny Qwen2.5-VL's config; the sizes can grow (the memory plan's CPU check builds a larger
    twin the same way: tests/unit/test_memory_plan.py)."""
    from transformers import Qwen2_5_VLConfig  # transformers: heavy, loaded on first use

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t, _ in QWEN_ADDED_TOKENS}
    vocab = ((len(tokenizer) + 63) // 64) * 64
    half = hidden // heads // 2  # M-RoPE splits half the head dim into (t, h, w): 1/4, 3/8, 3/8
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=PATCH,
            spatial_merge_size=MERGE, temporal_patch_size=2, window_size=112,
            out_hidden_size=hidden, fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def oriented_filter_bank(weight: torch.Tensor, periods: Sequence[float] = (4.0, 3.5), orientations: int = 4,
                         gain: float = 4.0) -> int:
    """Give the first channels of a patch embedding (C_out, 3, T, P, P) oriented gratings.

    For each period and orientation, a cosine and a sine grating on luminance under a Gaussian
    window, the same over time, at `gain` times the random channels' mean norm: the oriented
    edge and grating detectors every trained vision encoder's first layer holds. On the demo's
    crops (bench/zoom_learnability.py), 100 supervised steps teach the tiny policy to name the
    stripes' orientation at 0.75 held-out accuracy with the bank and 0.22 (chance) without it;
    at gain 8 the cold start no longer learns to open a turn with <think>. Returns the
    number of channels written.
    """
    c_out, c_in, t, p, _ = weight.shape
    need = 2 * orientations * len(periods)
    if need > c_out:
        raise ValueError(f"{need} filter channels asked of a {c_out}-channel patch embedding")
    yy, xx = torch.meshgrid(torch.arange(p, dtype=torch.float32), torch.arange(p, dtype=torch.float32), indexing="ij")
    yy, xx = yy - (p - 1) / 2, xx - (p - 1) / 2
    window = torch.exp(-(xx ** 2 + yy ** 2) / (2 * (p / 3) ** 2))
    norm = weight.detach().flatten(1).norm(dim=1).mean()
    k = 0
    with torch.no_grad():
        for period in periods:
            for o in range(orientations):
                theta = math.pi * o / orientations
                u = xx * math.cos(theta) + yy * math.sin(theta)
                for phase in (0.0, math.pi / 2):
                    g = (window * torch.cos(2 * math.pi * u / period + phase)).expand(c_in, t, p, p)
                    weight[k] = g / g.norm() * norm * gain
                    k += 1
    return k


def _image_processor(min_pixels: int, max_pixels: int, patch: int = PATCH) -> Any:
    # transformers: heavy, loaded on first use
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels,
                                    patch_size=patch, merge_size=MERGE, temporal_patch_size=2)


def build_tiny_policy(folder: str | os.PathLike[str], seed: int = 0,
                      min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                      vision: str = "random", family: str = "qwen2_5_vl") -> Path:
    """Write the tiny policy folder of `family` (qwen2_5_vl, qwen3_vl, qwen3_vl_moe); the same
    arguments give byte-identical files."""
    from transformers import Qwen2_5_VLForConditionalGeneration  # transformers: heavy, loaded on first use

    fam = family_named(family)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(seed, added_tokens=fam.added_tokens)
    torch.manual_seed(seed)
    if fam.name == "qwen2_5_vl":
        config = tiny_model_config(tokenizer)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    else:
        config = tiny_qwen3_config(tokenizer, moe=fam.name == "qwen3_vl_moe")
        model = tiny_qwen3_model(config)
    if vision == "oriented":
        oriented_filter_bank(model.model.visual.patch_embed.proj.weight)
    elif vision != "random":
        raise ValueError(f"tiny vision {vision!r}: use random or oriented")
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    save_policy(model, folder)
    tokenizer.save_pretrained(folder)
    _image_processor(min_pixels, max_pixels, fam.patch).save_pretrained(folder)
    # Keep the folder portable: name the standard processor class, ship the template alone too.
    processor = "Qwen2_5_VLProcessor" if fam.name == "qwen2_5_vl" else "Qwen3VLProcessor"
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": processor}, indent=2) + "\n")
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


def save_policy(model: Any, folder: str | os.PathLike[str], state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """`model.save_pretrained`, with the weights in the family's released-checkpoint layout
    (deepeyes/family.py, `checkpoint_layout`: Qwen3-VL-MoE's fused experts), so the folder loads in
    vLLM as a downloaded checkpoint does and in transformers through its own conversion."""
    model.save_pretrained(folder, state_dict=state_dict)
    model_type = model.config.model_type
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            keys = list(f.keys())
        if relaid_out(keys, model_type):
            tensors = checkpoint_layout(load_file(str(shard)), model_type)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(shard), metadata={"format": "pt"})


def build_cached(cache_dir: str | os.PathLike[str], name: str, build: Callable[[Path], Any]) -> Path:
    """`cache_dir/name`, written by `build(tmp_folder)` on first use and renamed into place.

    The rename is atomic, so concurrent first users (test workers, replicas) never see a half
    written folder; when two build at once the loser's identical copy is dropped.
    """
    root = Path(os.path.expanduser(cache_dir))
    final = root / name
    if (final / "model.safetensors").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_policy_path(cache_dir: str = DEFAULT_CACHE_DIR, seed: int = 0,
                     min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                     vision: str = "random", family: str = "qwen2_5_vl") -> Path:
    """The cached tiny folder for these settings, built on first use."""
    tag = "" if vision == "random" else f"-{vision}"  # the random tiny model keeps its key
    if family != "qwen2_5_vl":
        tag += f"-{family}"
    key = hashlib.sha1(f"{TINY_VERSION}-{seed}-{min_pixels}-{max_pixels}{tag}".encode()).hexdigest()[:10]
    name = "tiny-qwen2.5-vl" if family == "qwen2_5_vl" else f"tiny-{family.replace('_', '-')}"
    return build_cached(cache_dir, f"{name}-{key}",
                        lambda tmp: build_tiny_policy(tmp, seed=seed, min_pixels=min_pixels, max_pixels=max_pixels,
                                                      vision=vision, family=family))


# ---------------------------------------------------------------------------------------------
# the one loader


def load_image_processor(path: str | os.PathLike[str], min_pixels: int | None = None,
                         max_pixels: int | None = None) -> Any:
    """The folder's PIL image processor; min/max_pixels, when given, override its frame.

    The config owns the visual frame: every loader (this module's `load_policy`, the rollout
    service's tokenizer-only `PolicyIO.from_folder`) passes model.min/max_pixels here.
    """
    # transformers: heavy, loaded on first use
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
    if min_pixels is not None:
        image_processor.size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        image_processor.size["longest_edge"] = max_pixels
    return image_processor


def load_policy(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                dtype: str | torch.dtype = "float32", min_pixels: int | None = None,
                max_pixels: int | None = None, attn_implementation: str = "sdpa",
                trainable: bool = False) -> Policy:
    """Load model, tokenizer and PIL image processor from a policy folder (tiny or 7B) of any
    supported family; its config.json's model_type picks the class (deepeyes/family.py).

    min/max_pixels override the folder's processor settings (the config owns the visual frame).
    """
    import transformers  # heavy, loaded on first use
    from transformers import AutoTokenizer

    path = str(path)
    if not Path(path, "config.json").exists():
        raise FileNotFoundError(
            f"no policy folder at {path} (config.json missing): set model.path to a folder "
            f"holding a checkpoint, or model.path=tiny for the embedded default")
    model_class = getattr(transformers, folder_family(path).model_class)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = load_image_processor(path, min_pixels, max_pixels)
    model = model_class.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation).to(device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return Policy(model=model, tokenizer=tokenizer, image_processor=image_processor, path=path)


def resolve_policy_path(model_cfg: Any) -> Path:
    """model.path -> a folder: 'tiny' builds/uses the cached tiny model; a Hub id (owner/name) its
    snapshot in the Hugging Face cache, downloaded on first use (deepeyes/hub.py); else the path itself."""
    if model_cfg.path == "tiny":
        return tiny_policy_path(model_cfg.cache_dir, model_cfg.seed, model_cfg.min_pixels, model_cfg.max_pixels,
                                model_cfg.tiny_vision, tiny_family(model_cfg))
    if is_hub_id(model_cfg.path):
        return hub_snapshot(model_cfg.path)
    return Path(os.path.expanduser(model_cfg.path))


def tiny_family(model_cfg: Any) -> str:
    """The family the tiny default is built as: model.family, with auto = Qwen2.5-VL."""
    return "qwen2_5_vl" if model_cfg.family == "auto" else model_cfg.family


def process_images(policy: Policy, images: Sequence[Image.Image]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """pixel_values and image_grid_thw for a list of images (None, None when there are none)."""
    if not images:
        return None, None
    out = policy.image_processor(images=list(images), return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def encode_text_with_images(policy: Policy, text: str, grids: Sequence[Sequence[int]]) -> list[int]:
    """Tokenize rendered text and expand the i-th <|image_pad|> to the i-th image's token count."""
    ids = policy.tokenizer(text, add_special_tokens=False)["input_ids"]
    pad = policy.image_pad_id
    out: list[int] = []
    k = 0
    for t in ids:
        if t == pad:
            if k >= len(grids):
                raise ValueError(f"text has more image slots than images ({len(grids)})")
            out.extend([pad] * merged_patches(grids[k]))
            k += 1
        else:
            out.append(t)
    if k != len(grids):
        raise ValueError(f"text has {k} image slots but {len(grids)} images were given")
    return out


def mrope_positions(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    image_grid_thw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D M-RoPE position ids (3, B, L) and per-row deltas (B, 1), as the model computes them.

    Text tokens advance one position on all three axes; an image's pad run takes (t, h, w) grid
    positions and the text after it resumes at the image's largest extent. Padding (0 in
    `attention_mask`, left or right) gets position 0; the delta is `max position + 1 - real
    length`, where decoding continues. Teacher-forced passes must use these (or pass
    `mm_token_type_ids`): 1-D fallback positions change log-probs by ~1e-2.
    """
    mm_types = (input_ids == int(model.config.image_token_id)).to(torch.int32)
    return model.model.get_rope_index(input_ids, mm_types, image_grid_thw=image_grid_thw,
                                      attention_mask=attention_mask)


def mrope_position_ids(model: Any, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """`mrope_positions` of ONE unpadded sequence: (3, L)."""
    ids = input_ids.view(1, -1)
    return mrope_positions(model, ids, torch.ones_like(ids), image_grid_thw)[0][:, 0, :]
