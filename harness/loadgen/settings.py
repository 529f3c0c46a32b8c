"""LoadGen TestSettings from a scenario YAML and, optionally, an MLPerf user.conf.

Interactive is not a LoadGen scenario: it runs as Server under the model name
"<model>-interactive", which is where mlperf.conf keeps its tighter limits.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import mlperf_loadgen as lg

from wallperf.harness.config import ConfigError, ScenarioConfig, shorten
from wallperf.sut import scenarios

LOADGEN_SCENARIO = {s.name: s.loadgen_enum for s in scenarios.SCENARIOS.values()}
LOADGEN_MODE = {"performance": lg.TestMode.PerformanceOnly, "accuracy": lg.TestMode.AccuracyOnly}

# Every key LoadGen's TestSettings::FromConfig looks up (mlcommons-loadgen 6.0.17,
# loadgen/test_settings_internal.cc), with the values it can take. LoadGen reads an
# integer key with strtoull (a negative wraps to nearly 2**64, a leading 0 means
# octal) into a uint64 and multiplies milliseconds to nanoseconds in an int64; it
# sizes vectors by the counts. Out of range, the test process dies of SIGSEGV or
# SIGFPE or bad_alloc long after the run started, so every value is checked here,
# before any process starts. A key outside this table is silently ignored by
# LoadGen, so check_user_conf refuses it.
_MS_TO_NS_MAX = (2**63 - 1) // 10**6
# Far above any benchmark's count (the largest data set, llama2-70b, has 24576
# samples; mlperf.conf's largest min_query_count is 270336), far below what fills memory.
_MAX_COUNT = 10**7
_U64 = 2**64 - 1
_BOOL, _SEED = ("int", 0, 1), ("int", 0, _U64)
USER_CONF_RANGES = {
    "mode": ("int", 0, 3),
    "min_duration": ("int", 0, _MS_TO_NS_MAX), "max_duration": ("int", 0, _MS_TO_NS_MAX),
    "min_query_count": ("int", 0, _MAX_COUNT), "max_query_count": ("int", 0, _MAX_COUNT),
    "qsl_rng_seed": _SEED, "sample_index_rng_seed": _SEED, "schedule_rng_seed": _SEED,
    "accuracy_log_rng_seed": _SEED, "test05_qsl_rng_seed": _SEED, "test05_sample_index_rng_seed": _SEED,
    "test05_schedule_rng_seed": _SEED,
    # Percentages (LoadGen multiplies them by 0.01).
    "accuracy_log_probability": ("float", 0, 100), "target_latency_percentile": ("float", 0, 100),
    "accuracy_log_sampling_target": ("int", 0, _MAX_COUNT),
    "test05": _BOOL, "use_token_latencies": _BOOL, "infer_token_latencies": _BOOL, "print_timestamps": _BOOL,
    "performance_issue_unique": _BOOL, "performance_issue_same": _BOOL, "sample_concatenate_permutation": _BOOL,
    "coalesce_queries": _BOOL,
    "performance_issue_same_index": ("int", 0, _MAX_COUNT),
    "token_latency_scaling_factor": ("int", 1, _MAX_COUNT),
    # Milliseconds, held in nanoseconds.
    "ttft_latency": ("int", 0, _MS_TO_NS_MAX), "tpot_latency": ("int", 0, _MS_TO_NS_MAX),
    "target_latency": ("int", 0, _MS_TO_NS_MAX),
    # Queries per second: LoadGen divides by it.
    "target_qps": ("float", 1e-6, 1e9),
    # Cast to a C int.
    "samples_per_query": ("int", 1, _MAX_COUNT), "max_async_queries": ("int", 0, 2**31 - 1),
    "performance_sample_count_override": ("int", 0, _MAX_COUNT),
    "accuracy_sample_count_override": ("int", 0, _MAX_COUNT),
}
USER_CONF_KEYS = frozenset(USER_CONF_RANGES)
# A user.conf is a few dozen lines; a bigger file is not one (and is not read whole).
MAX_USER_CONF_BYTES = 1 << 20
_DECIMAL_INT = re.compile(r"\+?[0-9]+")
# StartTestWithLogSettings reads this file, if it exists, as an audit.config over
# the settings. Only compliance tests name a real one; every other test names a
# path that cannot exist, so a stray audit.config in the working directory is inert.
NO_AUDIT_CONFIG = ""
_CONF_LINE = re.compile(r"^\s*([\w.\-*]+)\.([\w*]+)\.(\w+)\s*=\s*(\S+)\s*$")


def loadgen_model_name(model_name: str, scenario: str) -> str:
    return scenarios.scenario(scenario).loadgen_model(model_name)


def _value_problem(key: str, value: str) -> str | None:
    """Why LoadGen would misread `value` for `key`, or None."""
    kind, low, high = USER_CONF_RANGES[key]
    allowed = f"allowed: an integer from {low} to {high}" if kind == "int" else \
        f"allowed: a number from {low:g} to {high:g}"
    if kind == "int":
        if not _DECIMAL_INT.fullmatch(value):
            return f"value {shorten(value)} is not a non-negative decimal integer; {allowed}"
        if len(value.lstrip("+")) > 1 and value.lstrip("+").startswith("0"):
            return f"value {shorten(value)} has a leading 0, which LoadGen reads as octal; {allowed}"
        number = int(value)
    else:
        try:
            number = float(value)
        except ValueError:
            return f"value {shorten(value)} is not a number; {allowed}"
        if not math.isfinite(number):
            return f"value {shorten(value)} is not a finite number; {allowed}"
    return None if low <= number <= high else f"value {shorten(value)} is out of range; {allowed}"


def check_user_conf(path: Path) -> None:
    """Fail with file, line and key for anything LoadGen would misread, ignore or crash on."""
    if not path.is_file():
        raise ConfigError(path, None, "user.conf not found")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_USER_CONF_BYTES + 1)
    except OSError as e:
        raise ConfigError(path, None, f"cannot read it: {e.strerror or e}") from None
    if len(data) > MAX_USER_CONF_BYTES:
        raise ConfigError(path, None, f"larger than {MAX_USER_CONF_BYTES >> 20} MiB: a user.conf is a few "
                          "dozen 'model.Scenario.key = value' lines")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _CONF_LINE.match(line)
        if not m:
            raise ConfigError(f"{path}:{lineno}", None,
                              f"expected 'model.Scenario.key = value', got {shorten(raw.strip())}")
        _, scenario, key, value = m.groups()
        if scenario != "*" and scenario not in scenarios.LOADGEN_SCENARIOS:
            raise ConfigError(f"{path}:{lineno}", key, f"unknown scenario {shorten(scenario)}; allowed: "
                              f"*, {', '.join(scenarios.LOADGEN_SCENARIOS)}")
        if key not in USER_CONF_KEYS:
            raise ConfigError(f"{path}:{lineno}", key if len(key) <= 64 else key[:61] + "...", f"unknown LoadGen key; allowed: {', '.join(sorted(USER_CONF_KEYS))}")
        if problem := _value_problem(key, value):
            raise ConfigError(f"{path}:{lineno}", key, problem)


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
