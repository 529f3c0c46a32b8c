"""Configuration: conf/'s YAML files validated into frozen dataclasses.

`checks` holds the allowed values, the errors and the name rules, `schema` the
dataclasses (what each file may say), `load` the reading and checking of files
and the resolution of a run YAML. Callers import from here.
"""
from wallperf.harness.config.checks import (BACKENDS, DTYPE_ALIASES, DTYPES, GGUF_CHOICES, MODES, SCENARIOS, ConfigError,
                                   check_out_folder,
                                   FieldError, canonical_dtype, conf_dir, folder_inside, plain_name_problem, positive,
                                   positive_list, shorten)
from wallperf.harness.config.load import (ResolvedRun, available, build, load_dataset_config, load_hardware_config,
                                 load_model_config, load_run, load_scenario_config, read_yaml)
from wallperf.harness.config.schema import (PEAK_DTYPES, ArtifactSource, DatasetConfig, HardwareConfig, ModelConfig,
                                   OpenAIConfig, OutputLength, RunConfig, ScenarioConfig)

__all__ = [
    "ResolvedRun", "available", "build", "load_dataset_config", "load_hardware_config", "load_model_config",
    "load_run", "load_scenario_config", "read_yaml", "BACKENDS", "DTYPE_ALIASES", "DTYPES", "GGUF_CHOICES", "MODES", "PEAK_DTYPES",
    "SCENARIOS", "ArtifactSource", "ConfigError", "check_out_folder", "DatasetConfig", "FieldError", "HardwareConfig", "ModelConfig",
    "OpenAIConfig", "OutputLength", "RunConfig", "ScenarioConfig", "canonical_dtype", "conf_dir",
    "folder_inside", "plain_name_problem", "positive", "positive_list", "shorten",
]
