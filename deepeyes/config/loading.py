"""Reading the configuration tree: a scenario YAML (with `extends`), `key=value` overrides, type
checks that name the key, cross-field checks, and the `--help` listing of every field."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from deepeyes.toolspec import ToolSpecError, specs_for
from deepeyes.config.schema import CONFIG_DIR, DEFAULT_SCENARIO, REPO_ROOT, Config, ConfigError


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints widen to floats; nothing else is guessed."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is dict:  # a free-form mapping (tools.settings): its owner checks the inside
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item is str:
            value = [value] if value != "" else []
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-6` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            # YAML reads `model=123` as int: a string field still takes it verbatim.
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]} (known under {prefix or 'the top level'}: "
            f"{', '.join(sorted(names))})")
    obj = cls()
    for name, value in values.items():
        setattr(obj, name, _coerce(prefix + name, value, hints[name]))
    return obj


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["rollout.n=4", "data.train_files=[a.parquet]"]` -> nested dict; values are YAML scalars."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (example: trainer.steps=2)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse {raw!r} as a YAML value ({e})") from e
        _set_path(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_scenario(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A scenario file's tree; `extends: other.yaml` (same folder) starts from that file's tree."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    base_path = path.parent / str(base)
    if not base_path.exists():
        raise ConfigError(f"{path}: extends {base!r}, but {base_path} does not exist")
    return _merge(read_scenario(base_path, (*seen, path.resolve())), raw)


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Read a scenario YAML (default: tiny-cpu) and apply `key=value` overrides; validate all."""
    path = Path(path) if path else DEFAULT_SCENARIO
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        # `serve deploy` builds apps in a worker whose cwd is not the repo: a Serve YAML's
        # `config: deploy/configs/x.yaml` means the repository's file.
        path = REPO_ROOT / path
    if not path.exists():
        known = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"config file {path} does not exist (scenarios in {CONFIG_DIR}: {known})")
    tree = _merge(read_scenario(path), parse_overrides(overrides or []))
    try:
        cfg = _build(Config, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    checks = [
        (cfg.rollout.n >= 1, "rollout.n must be >= 1"),
        (cfg.rollout.max_assistant_turns >= 1, "rollout.max_assistant_turns must be >= 1"),
        (cfg.rollout.max_parallel_calls >= 1, "rollout.max_parallel_calls must be >= 1"),
        (cfg.trainer.batch_size >= 1, "trainer.batch_size must be >= 1"),
        (cfg.trainer.sft_batch_size >= 1, "trainer.sft_batch_size must be >= 1"),
        (cfg.trainer.num_workers >= 1, "trainer.num_workers must be >= 1"),
        (cfg.model.min_pixels <= cfg.model.max_pixels, "model.min_pixels must be <= model.max_pixels"),
        (cfg.trainer.updates_per_step >= 1, "trainer.updates_per_step must be >= 1"),
        (0 < cfg.trainer.clip_eps < 1, "trainer.clip_eps must lie in (0, 1)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    check_master_precision(cfg.trainer.master_dtype, cfg.trainer.lr)
    try:  # the enabled tools exist, their entries are sound, the settings name real tools
        specs_for(cfg.tools)
    except ToolSpecError as e:
        raise ConfigError(f"tools: {e}") from None


# The smallest relative change a rounding to the master dtype keeps: half a unit in the last place.
HALF_ULP = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 2.0 ** -24}
TYPICAL_WEIGHT = 0.02  # the init scale of transformer weights (initializer_range); most trained ones are near it


def check_master_precision(master_dtype: str, lr: float) -> None:
    """Refuse master weights too coarse for the learning rate: an AdamW step moves a weight by
    about lr, which rounds away unless it is over half a unit in the last place of a typical
    weight (bf16: 0.02 * 2^-8 = 7.8e-5)."""
    floor = TYPICAL_WEIGHT * HALF_ULP[master_dtype]
    if master_dtype != "float32" and 0 < lr < floor:
        raise ConfigError(
            f"trainer.master_dtype={master_dtype} with trainer.lr={lr:g}: an AdamW step of about {lr:g} is "
            f"under half a {master_dtype} step of a typical weight ({TYPICAL_WEIGHT} x {HALF_ULP[master_dtype]:g} "
            f"= {floor:.2g}), so almost no weight would move; set trainer.master_dtype=float32 (fp32 master "
            f"weights and optimizer state; model.dtype stays the compute dtype)")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def help_text(default: Any = None, prefix: str = "") -> str:
    """Every field as `key (type, default): help`, in the order of the tree."""
    default = Config() if default is None else default
    lines: list[str] = []
    hints = typing.get_type_hints(type(default))
    for f in dataclasses.fields(default):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n[{prefix}{f.name}] {f.metadata.get('help', '')}")
            lines.append(help_text(getattr(default, f.name), prefix + f.name + "."))
            continue
        value = getattr(default, f.name)
        lines.append(f"  {prefix}{f.name} ({_type_name(tp)}, default {value!r}): {f.metadata['help']}")
    return "\n".join(lines)


def config_from_dict(tree: dict[str, Any]) -> Config:
    """A Config from its `to_dict` form (how the driver hands the resolved tree to Ray workers)."""
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg
