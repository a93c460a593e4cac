"""The one typed configuration tree of deepeyes-ray.

Every knob of the system lives here as a dataclass field with a default and a one-line help text
(`help` metadata; schema.py). A scenario YAML in `deploy/configs/` sets some of them; `key=value`
overrides on the command line set more (`rollout.n=4`, `judge.backend=openai`). Unknown keys and
values of the wrong type are errors that name the key (loading.py). `python -m trainer --help`
prints this whole tree.
"""

from deepeyes.config.loading import (check_master_precision, config_from_dict, help_text, load_config, parse_overrides,
                                     read_scenario, to_dict, validate)
from deepeyes.config.schema import (CONFIG_DIR, DEFAULT_CACHE_DIR, DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS,
                                    DEFAULT_SCENARIO, REPO_ROOT, Config, ConfigError, DataConfig, DeploymentConfig,
                                    JudgeConfig, LoggingConfig, ModelConfig, RayConfig, RolloutConfig, ServeConfig,
                                    ToolsConfig, TrainerConfig)

__all__ = ["CONFIG_DIR", "DEFAULT_CACHE_DIR", "DEFAULT_MAX_PIXELS", "DEFAULT_MIN_PIXELS", "DEFAULT_SCENARIO",
           "REPO_ROOT", "Config", "ConfigError", "DataConfig", "DeploymentConfig", "JudgeConfig", "LoggingConfig",
           "ModelConfig", "RayConfig", "RolloutConfig", "ServeConfig", "ToolsConfig", "TrainerConfig",
           "check_master_precision", "config_from_dict", "help_text", "load_config", "parse_overrides", "read_scenario", "to_dict", "validate"]
