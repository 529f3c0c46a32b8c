"""LoadGen TestSettings from a scenario YAML and, optionally, an MLPerf user.conf.

Interactive is not a LoadGen scenario: it runs as Server under the model name
"<model>-interactive", which is where mlperf.conf keeps its tighter limits.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import mlperf_loadgen as lg

from wallperf.harness.config import ConfigError, ScenarioConfig
from wallperf.sut import scenarios

LOADGEN_SCENARIO = {s.name: s.loadgen_enum for s in scenarios.SCENARIOS.values()}
LOADGEN_MODE = {"performance": lg.TestMode.PerformanceOnly, "accuracy": lg.TestMode.AccuracyOnly}

# Every key LoadGen's TestSettings::FromConfig looks up (mlcommons-loadgen 6.0.17,
# loadgen/test_settings_internal.cc): a key outside this set is silently ignored by
# LoadGen, so check_user_conf refuses it.
USER_CONF_KEYS = frozenset("""
mode min_duration max_duration min_query_count max_query_count qsl_rng_seed sample_index_rng_seed
schedule_rng_seed accuracy_log_rng_seed accuracy_log_probability accuracy_log_sampling_target
test05 test05_qsl_rng_seed test05_sample_index_rng_seed test05_schedule_rng_seed
use_token_latencies ttft_latency tpot_latency infer_token_latencies token_latency_scaling_factor
target_latency_percentile target_latency target_qps samples_per_query performance_issue_unique
performance_issue_same performance_issue_same_index sample_concatenate_permutation coalesce_queries
max_async_queries performance_sample_count_override accuracy_sample_count_override print_timestamps
""".split())
# StartTestWithLogSettings reads this file, if it exists, as an audit.config over
# the settings. Only compliance tests name a real one; every other test names a
# path that cannot exist, so a stray audit.config in the working directory is inert.
NO_AUDIT_CONFIG = ""
_CONF_LINE = re.compile(r"^\s*([\w.\-*]+)\.([\w*]+)\.(\w+)\s*=\s*(\S+)\s*$")


def loadgen_model_name(model_name: str, scenario: str) -> str:
    return scenarios.scenario(scenario).loadgen_model(model_name)


def check_user_conf(path: Path) -> None:
    """Fail with file, line and key for anything LoadGen would misread or ignore."""
    if not path.is_file():
        raise ConfigError(path, None, "user.conf not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(path, None, f"cannot read it: {e.strerror or e}") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _CONF_LINE.match(line)
        if not m:
            raise ConfigError(f"{path}:{lineno}", None,
                              f"expected 'model.Scenario.key = value', got {raw.strip()!r}")
        _, scenario, key, value = m.groups()
        if scenario != "*" and scenario not in scenarios.LOADGEN_SCENARIOS:
            raise ConfigError(f"{path}:{lineno}", key, f"unknown scenario {scenario!r}; allowed: "
                              f"*, {', '.join(scenarios.LOADGEN_SCENARIOS)}")
        if key not in USER_CONF_KEYS:
            raise ConfigError(f"{path}:{lineno}", key, f"unknown LoadGen key; allowed: {', '.join(sorted(USER_CONF_KEYS))}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{path}:{lineno}", key, f"value {value!r} is not a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{path}:{lineno}", key, f"value {value!r} is not a finite number")


def build_test_settings(sc: ScenarioConfig, mode: str, model_name: str, sample_count: int,
                        user_conf: Path | None = None) -> lg.TestSettings:
    """Settings for one LoadGen test: the scenario YAML's values, or, with a
    user.conf (official settings), only mlperf.conf's and the user.conf's over
    LoadGen's defaults: no number of the YAML reaches an official run."""
    s = lg.TestSettings()
    s.scenario = LOADGEN_SCENARIO[sc.name]
    s.mode = LOADGEN_MODE[mode]
    s.use_token_latencies = True
    if user_conf is None:
        _yaml_settings(s, sc, mode, sample_count)
        return s
    check_user_conf(user_conf)
    kind = scenarios.scenario(sc.name)
    rc = s.FromConfig(str(user_conf), kind.loadgen_model(model_name), kind.loadgen_name)
    if rc != 0:
        raise ConfigError(user_conf, None, f"LoadGen could not apply it (FromConfig returned {rc})")
    return s


def _yaml_settings(s: lg.TestSettings, sc: ScenarioConfig, mode: str, sample_count: int) -> None:
    s.min_duration_ms = int(sc.min_duration_s * 1000)
    s.min_query_count = sc.min_query_count
    s.performance_sample_count_override = sample_count
    kind = scenarios.scenario(sc.name)
    if kind.server_like:
        s.server_target_qps = sc.target_qps
        if mode == "accuracy":
            # Accuracy runs judge answers, not latency: issue every sample within
            # about ten seconds instead of pacing them over minutes.
            s.server_target_qps = max(sc.target_qps, sample_count / 10)
        s.ttft_latency = int(sc.ttft_ms * 1e6)
        s.tpot_latency = int(sc.tpot_ms * 1e6)
    elif kind is scenarios.OFFLINE:
        s.offline_expected_qps = sc.offline_expected_qps or 1.0
    elif kind is scenarios.SINGLE_STREAM:
        s.single_stream_expected_latency_ns = int((sc.expected_latency_ms or 1000) * 1e6)
    elif kind is scenarios.MULTI_STREAM:
        s.multi_stream_samples_per_query = sc.samples_per_query
        s.multi_stream_expected_latency_ns = int((sc.expected_latency_ms or 1000) * 1e6)


def start_test(sut_handle, qsl_handle, settings: lg.TestSettings, log_dir: Path,
               audit_config: Path | None = None) -> None:
    """One LoadGen test; `audit_config` only for a compliance test."""
    lg.StartTestWithLogSettings(sut_handle, qsl_handle, settings, log_settings(log_dir),
                                str(audit_config) if audit_config is not None else NO_AUDIT_CONFIG)


_MLPERF_CONF_START = b"# The format of this config file is"


def embedded_mlperf_conf() -> str:
    """The mlperf.conf the installed LoadGen applies: built into its extension
    module as one C string (loadgen/mlperf_conf.h), read back from the binary."""
    data = Path(lg.__file__).read_bytes()
    start = data.find(_MLPERF_CONF_START)
    if start < 0:
        raise RuntimeError(f"no embedded mlperf.conf found in {lg.__file__}")
    return data[start:data.index(b"\0", start)].decode("utf-8")


def log_settings(outdir: Path) -> lg.LogSettings:
    ls = lg.LogSettings()
    ls.log_output.outdir = str(outdir)
    ls.log_output.copy_summary_to_stdout = False
    ls.enable_trace = False
    return ls
