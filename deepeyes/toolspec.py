"""The tool registry as data (docs/design.md, "Tool plugins"): one YAML entry per tool.

Every room reads the same entries: the rollout renders the prompt's tools block and parses calls
from them, the tools app decides which Serve deployment hosts which tool class, the judge learns
which calls were searches. An entry:

    - name: image_zoom_in_tool                 # what the model writes
      class: services.tools.zoom:ZoomTool      # module:Class, a services.tools.registry.Tool
      deployment: ToolService                  # the Serve deployment that hosts it
      call_format: tool_call                   # tool_call: <tool_call>{json}</tool_call>
                                               # code: <code>```python ...```</code>
      observation: tool_response               # how the result comes back (see OBSERVATIONS)
      stateful: false                          # true: one instance per trajectory (create/release)
      config: {}                               # handed to the class's constructor
      schema: {...}                            # the OpenAI function schema, or "module:NAME"
      limits: {max_per_episode: 1}             # optional: calls beyond are refused (image_search)
      deployment_options: {num_cpus: 1}        # optional: replicas/resources of its deployment

The built-in entries are `deepeyes/config/tools.yaml`; `tools.registry_files` adds more files
(a user's tools), and `tools.settings.<name>` overrides an entry's `config` and
`deployment_options` from a scenario. Pure Python: no Ray, no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BUILTIN_FILE = Path(__file__).resolve().parent / "config" / "tools.yaml"
CALL_FORMATS = ("tool_call", "code")
# How a result returns to the model: `tool_response` = a `tool` message (the template's
# <tool_response> user turn, image first; DeepEyes); `code_result` = a user turn "Code execution
# result:" with stdout, stderr and the images (DeepEyesV2's python tool); `search_result` = a user
# turn holding one <tool_response> block, images after the text (DeepEyesV2's search tools).
OBSERVATIONS = ("tool_response", "code_result", "search_result")
CALL_ENDS = {"tool_call": "</tool_call>", "code": "</code>"}
_KEYS = {"name", "class", "deployment", "call_format", "observation", "stateful", "config", "schema",
         "limits", "deployment_options"}


class ToolSpecError(ValueError):
    """A registry entry that cannot be used; the message names the file, the entry and the fix."""


@dataclass(frozen=True)
class ToolSpec:
    """One registry entry, checked (see the module docstring for the fields)."""

    name: str
    cls: str
    deployment: str
    call_format: str = "tool_call"
    observation: str = "tool_response"
    stateful: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    schema: dict[str, Any] | None = None
    max_per_episode: int = 0  # 0 = no cap
    deployment_options: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the file it came from (errors name it)

    @property
    def call_end(self) -> str:
        """The text that closes a call of this tool (a stop string when tools.stop_at_call)."""
        return CALL_ENDS[self.call_format]


def _resolve_schema(value: Any, where: str) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str) and ":" in value:
        module, attr = value.split(":", 1)
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ToolSpecError(f"{where}: schema {value!r} cannot be imported ({e})") from e
    raise ToolSpecError(f"{where}: schema must be a mapping (the OpenAI function schema) or 'module:NAME'")


def _spec(entry: Any, source: str) -> ToolSpec:
    where = f"{source}: tool {entry.get('name', '?') if isinstance(entry, dict) else entry!r}"
    if not isinstance(entry, dict):
        raise ToolSpecError(f"{where}: each entry must be a mapping with name, class and deployment")
    unknown = sorted(set(entry) - _KEYS)
    missing = [k for k in ("name", "class", "deployment") if not entry.get(k)]
    if unknown or missing:
        raise ToolSpecError(f"{where}: unknown keys {unknown} / missing keys {missing} "
                            f"(an entry takes {', '.join(sorted(_KEYS))})")
    spec = ToolSpec(name=str(entry["name"]), cls=str(entry["class"]), deployment=str(entry["deployment"]),
                    call_format=entry.get("call_format", "tool_call"),
                    observation=entry.get("observation", "tool_response"),
                    stateful=bool(entry.get("stateful", False)), config=dict(entry.get("config") or {}),
                    schema=_resolve_schema(entry.get("schema"), where),
                    max_per_episode=int((entry.get("limits") or {}).get("max_per_episode", 0)),
                    deployment_options=dict(entry.get("deployment_options") or {}), source=source)
    if spec.call_format not in CALL_FORMATS or spec.observation not in OBSERVATIONS:
        raise ToolSpecError(f"{where}: call_format must be one of {CALL_FORMATS} and observation one of "
                            f"{OBSERVATIONS}")
    if spec.call_format == "tool_call" and (spec.schema or {}).get("function", {}).get("name") != spec.name:
        raise ToolSpecError(f"{where}: a tool_call tool needs a schema whose function.name is {spec.name!r}")
    if ":" not in spec.cls:
        raise ToolSpecError(f"{where}: class must be 'package.module:ClassName', got {spec.cls!r}")
    return spec


@functools.lru_cache(maxsize=16)
def _read_file(path: str) -> tuple[ToolSpec, ...]:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ToolSpecError(f"tool registry file {path} cannot be read ({e}); fix tools.registry_files") from e
    entries = (raw or {}).get("tools") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise ToolSpecError(f"{path}: a tool registry file is a mapping with a `tools:` list")
    return tuple(_spec(e, path) for e in entries)


def load_specs(registry_files: list[str] | tuple[str, ...] = (),
               settings: dict[str, Any] | None = None) -> dict[str, ToolSpec]:
    """All tools by name: the built-in file, then `registry_files` in order, then `settings`.

    Args:
        registry_files: extra YAML files (tools.registry_files); a name defined twice is an error.
        settings: tools.settings: `{name: {config: {...}, deployment_options: {...}}}` merged over
            the entry's own (a scenario's knobs for a tool, e.g. the sandbox's memory cap).
    """
    specs: dict[str, ToolSpec] = {}
    for path in (str(BUILTIN_FILE), *map(str, registry_files)):
        for spec in _read_file(str(Path(path).resolve())):
            if spec.name in specs:
                raise ToolSpecError(f"tool {spec.name!r} is defined in {specs[spec.name].source} and in {path}")
            specs[spec.name] = spec
    for name, extra in (settings or {}).items():
        if name not in specs:
            raise ToolSpecError(f"tools.settings names {name!r}, which no registry file defines "
                                f"(known: {', '.join(sorted(specs))})")
        if not isinstance(extra, dict) or set(extra) - {"config", "deployment_options"}:
            raise ToolSpecError(f"tools.settings.{name} takes `config` and `deployment_options` mappings")
        spec = specs[name]
        specs[name] = dataclasses.replace(
            spec, config={**spec.config, **(extra.get("config") or {})},
            deployment_options={**spec.deployment_options, **(extra.get("deployment_options") or {})})
    return specs


def enabled_specs(names: list[str], registry_files: list[str] | tuple[str, ...] = (),
                  settings: dict[str, Any] | None = None) -> list[ToolSpec]:
    """The specs of `names`, in that order; an unknown name is an error naming the known ones."""
    specs = load_specs(tuple(registry_files), settings)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ToolSpecError(f"unknown tool(s) {unknown} (known: {', '.join(sorted(specs))}); add an entry "
                            f"to a file in tools.registry_files or fix tools.enabled")
    return [specs[n] for n in names]


def specs_for(tools_cfg: Any) -> list[ToolSpec]:
    """The enabled tools of a ToolsConfig (tools.enabled, tools.registry_files, tools.settings)."""
    return enabled_specs(list(tools_cfg.enabled), tuple(tools_cfg.registry_files), tools_cfg.settings)


def prompt_schemas(specs: list[ToolSpec]) -> list[dict[str, Any]]:
    """The tools block of the system turn: the schemas of the `tool_call` tools, in order (a `code`
    tool is described by the recipe's system prompt, as DeepEyesV2 does)."""
    return [s.schema for s in specs if s.call_format == "tool_call" and s.schema is not None]


def check_row_tools(names: Any, enabled: list[str], row: str) -> None:
    """A data row that names its tools (extra_info.tools) may name only enabled tools: anything
    else is an error naming the row and the fix, raised when the row is first read for a step."""
    if names is None:
        return
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ToolSpecError(f"row {row}: extra_info.tools must be a list of tool names, got {names!r}")
    unknown = [n for n in names if n not in enabled]
    if unknown:
        raise ToolSpecError(f"row {row} names tool(s) {unknown} that tools.enabled does not hold ({enabled}); "
                            f"enable them (and add a registry entry for a tool of your own) or fix the row")
