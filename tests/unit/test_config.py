"""The config tree: scenarios load, overrides apply, mistakes name the key."""

from __future__ import annotations


import pytest

from deepeyes.config import CONFIG_DIR, Config, ConfigError, help_text, load_config, parse_overrides


def test_scenarios_load_and_7b_matches_design_section_6():
    tiny = load_config(CONFIG_DIR / "tiny-cpu.yaml")
    assert tiny.model.path == "tiny" and tiny.judge.backend == "rule" and tiny.rollout.engine == "hf"
    ref = load_config(CONFIG_DIR / "deepeyes-7b.yaml")
    assert (ref.trainer.batch_size, ref.rollout.n) == (128, 8)
    assert ref.trainer.lr == 1e-6 and ref.trainer.lr_schedule == "constant"
    assert (ref.trainer.weight_decay, ref.trainer.grad_clip) == (0.01, 1.0)
    assert (ref.trainer.kl_coef, ref.trainer.entropy_coef, ref.trainer.updates_per_step) == (0.0, 0.0, 1)
    assert (ref.rollout.max_prompt_length, ref.rollout.max_response_length) == (8192, 16384)
    assert ref.rollout.max_assistant_turns == 5
    assert (ref.rollout.temperature, ref.rollout.val_temperature) == (1.0, 0.0)
    assert (ref.trainer.epochs, ref.trainer.save_every) == (1, 8)


def test_overrides_nested_and_typed():
    cfg = load_config(None, ["rollout.n=4", "trainer.lr=0.5", "judge.backend=openai",
                             "data.train_files=[a.parquet, b.parquet]", "serve.rollout.num_replicas=3"])
    assert cfg.rollout.n == 4 and cfg.trainer.lr == 0.5 and cfg.judge.backend == "openai"
    assert cfg.data.train_files == ["a.parquet", "b.parquet"]
    assert cfg.serve.rollout.num_replicas == 3
    assert isinstance(cfg.trainer.lr, float)
    assert load_config(None, ["trainer.lr=1e-6"]).trainer.lr == 1e-6  # YAML 1.1 reads this as a string


@pytest.mark.parametrize("override, fragment", [
    (["rollout.nn=4"], "unknown key rollout.nn"),
    (["nosuch.x=1"], "unknown key nosuch"),
    (["rollout.n=four"], "rollout.n: expected an integer"),
    (["judge.backend=gpt"], "judge.backend: 'gpt' is not one of"),
    (["trainer.use_gpu=3"], "trainer.use_gpu: expected true/false"),
    (["rollout.n=0"], "rollout.n must be >= 1"),
    (["trainer.sft_batch_size=0"], "trainer.sft_batch_size must be >= 1"),
    (["trainer.steps"], "is not key=value"),
])
def test_mistakes_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, override)
    assert fragment in str(e.value)


def test_missing_file_lists_scenarios(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.yaml")
    assert "tiny-cpu.yaml" in str(e.value)


def test_every_field_has_help():
    text = help_text()
    assert "rollout.max_assistant_turns (int, default 5)" in text
    assert "serve.tools.max_ongoing_requests (int, default 128)" in text
    # one line per leaf field, each with a help text after the colon
    leaves = [l for l in text.splitlines() if l.startswith("  ")]
    assert len(leaves) > 60 and all(l.split("): ", 1)[1].strip() for l in leaves)


def test_parse_overrides_yaml_values():
    assert parse_overrides(["a.b=1", "a.c=true", "d=x y"]) == {"a": {"b": 1, "c": True}, "d": "x y"}


def test_default_config_equals_dataclass_defaults_where_yaml_is_silent():
    cfg = load_config()
    assert cfg.judge.acc_weight == Config().judge.acc_weight == 0.8
