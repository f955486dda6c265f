"""Configuration: typed sections, presets, YAML in and out, dotted overrides and validation."""
from megacpm.config.loader import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_config,
    preset_names,
)
from megacpm.config.schedule import ScheduleLandmarks, resolve_schedule
from megacpm.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LogConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
)
from megacpm.config.validate import validate

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LogConfig", "ModelConfig", "ObjectiveConfig",
    "OptimConfig", "ParallelConfig", "RunConfig", "ScheduleConfig", "ScheduleLandmarks", "TrainConfig",
    "config_from_dict", "config_to_dict", "dump_yaml", "load_config", "preset_names", "resolve_schedule",
    "validate",
]
