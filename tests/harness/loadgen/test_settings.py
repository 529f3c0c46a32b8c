"""LoadGen TestSettings from scenario YAMLs and an MLPerf user.conf."""
import json
import subprocess
import sys
from pathlib import Path

import mlperf_loadgen as lg
import pytest

from wallperf.harness.config import ConfigError, ScenarioConfig
from wallperf.harness.loadgen.settings import (USER_CONF_KEYS, build_test_settings, check_user_conf,
                                      loadgen_model_name)

SERVER = ScenarioConfig(name="Server", min_duration_s=12, min_query_count=7, max_batch=4,
                        target_qps=1.5, ttft_ms=2000, tpot_ms=100)


def test_server_settings_from_yaml_values():
    s = build_test_settings(SERVER, "performance", "smollm2-135m", sample_count=57)
    assert s.scenario == lg.TestScenario.Server and s.mode == lg.TestMode.PerformanceOnly
    assert s.min_duration_ms == 12000 and s.min_query_count == 7
    assert s.server_target_qps == 1.5
    assert s.ttft_latency == 2_000_000_000 and s.tpot_latency == 100_000_000
    assert s.use_token_latencies and s.performance_sample_count_override == 57


def test_accuracy_server_issues_quickly():
    s = build_test_settings(SERVER, "accuracy", "m", sample_count=570)
    assert s.mode == lg.TestMode.AccuracyOnly and s.server_target_qps == 57


def test_interactive_is_server_under_interactive_name():
    sc = ScenarioConfig(name="Interactive", target_qps=1, ttft_ms=500, tpot_ms=30)
    s = build_test_settings(sc, "performance", "llama3_1-8b", sample_count=10)
    assert s.scenario == lg.TestScenario.Server
    assert loadgen_model_name("llama3_1-8b", "Interactive") == "llama3_1-8b-interactive"


def test_offline_and_singlestream_and_multistream():
    off = build_test_settings(ScenarioConfig(name="Offline", offline_expected_qps=3), "performance", "m", 5)
    assert off.scenario == lg.TestScenario.Offline and off.offline_expected_qps == 3
    ss = build_test_settings(ScenarioConfig(name="SingleStream", expected_latency_ms=250), "performance", "m", 5)
    assert ss.single_stream_expected_latency_ns == 250_000_000
    ms = build_test_settings(ScenarioConfig(name="MultiStream", samples_per_query=4, max_batch=4),
                             "performance", "m", 5)
    assert ms.multi_stream_samples_per_query == 4


def _settings_in_fresh_process(code: str, *args) -> dict:
    """Run `code` (which prints a JSON object) in a new interpreter: FromConfig loads
    mlperf.conf once per process and marks every later LoadGen test of the process
    as using several conf files, so it must not run inside pytest's own process."""
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[3], timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_user_conf_is_applied_over_the_yaml(tmp_path):
    conf = tmp_path / "user.conf"
    conf.write_text("# ours\nsmollm2-135m.Server.target_qps = 3.5\n*.Server.min_duration = 1000\n")
    s = _settings_in_fresh_process("""
import json, sys
from pathlib import Path
from wallperf.harness.config import ScenarioConfig
from wallperf.harness.loadgen.settings import build_test_settings
sc = ScenarioConfig(name="Server", min_duration_s=12, min_query_count=7, max_batch=4, target_qps=1.5,
                    ttft_ms=2000, tpot_ms=100)
s = build_test_settings(sc, "performance", "smollm2-135m", sample_count=57, user_conf=Path(sys.argv[1]))
print(json.dumps({"qps": s.server_target_qps, "min_duration_ms": s.min_duration_ms}))
""", conf)
    assert s == {"qps": 3.5, "min_duration_ms": 1000}


@pytest.mark.parametrize("line,match", [
    ("smollm2-135m.Server.target_qsp = 3", "unknown LoadGen key"),
    ("smollm2-135m.Batch.target_qps = 3", "unknown scenario 'Batch'"),
    ("smollm2-135m.Server.target_qps = fast", "not a number"),
    ("target_qps 3", "expected 'model.Scenario.key = value'"),
])
def test_bad_user_conf_names_file_line_and_key(tmp_path, line, match):
    conf = tmp_path / "user.conf"
    conf.write_text(f"# header\n{line}\n")
    with pytest.raises(ConfigError, match=match) as err:
        check_user_conf(conf)
    assert f"{conf}:2" in str(err.value)


def test_missing_user_conf(tmp_path):
    with pytest.raises(ConfigError, match="user.conf not found"):
        check_user_conf(tmp_path / "nope.conf")


def test_user_conf_keys_are_what_fromconfig_reads(tmp_path):
    """Every key in USER_CONF_KEYS passes the check and FromConfig applies a file
    with all of them; keys LoadGen reads that wallperf once refused are in, the
    one it never reads is out (loadgen/test_settings_internal.cc)."""
    assert {"mode", "accuracy_sample_count_override"} <= USER_CONF_KEYS
    assert "server_num_issue_query_threads" not in USER_CONF_KEYS
    conf = tmp_path / "user.conf"
    conf.write_text("".join(f"m.Server.{key} = 1\n" for key in sorted(USER_CONF_KEYS)))
    check_user_conf(conf)
    s = _settings_in_fresh_process("""
import json, sys
import mlperf_loadgen as lg
s = lg.TestSettings()
rc = s.FromConfig(sys.argv[1], "m", "Server")
print(json.dumps({"rc": rc, "accuracy_mode": s.mode == lg.TestMode.AccuracyOnly,
                  "accuracy_sample_count_override": s.accuracy_sample_count_override,
                  "qps": s.server_target_qps, "min_duration_ms": s.min_duration_ms}))
""", conf)
    # A few whose effect the binding exposes: mode 1 is AccuracyOnly.
    assert s == {"rc": 0, "accuracy_mode": True, "accuracy_sample_count_override": 1, "qps": 1.0,
                 "min_duration_ms": 1}


_TINY_TEST = """
import sys
from pathlib import Path
import mlperf_loadgen as lg
from wallperf.harness.loadgen.settings import start_test
def issue(qs):
    lg.QuerySamplesComplete([lg.QuerySampleResponse(q.id, 0, 0) for q in qs])
sut = lg.ConstructSUT(issue, lambda: None)
qsl = lg.ConstructQSL(4, 4, lambda s: None, lambda s: None)
s = lg.TestSettings()
s.scenario, s.mode = lg.TestScenario.Offline, lg.TestMode.PerformanceOnly
s.min_duration_ms, s.min_query_count, s.offline_expected_qps = 10, 1, 100
start_test(sut, qsl, s, Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
"""


@pytest.mark.parametrize("named", [False, True])
def test_only_a_named_audit_config_is_read(tmp_path, named):
    """A stray audit.config in the working directory changes nothing; a compliance
    test's named one is read (LoadGen says so in the detail log)."""
    (tmp_path / "audit.config").write_text("*.*.min_duration = 1234\n")
    args = [sys.executable, "-c", _TINY_TEST, str(tmp_path / "logs")] + ([str(tmp_path / "audit.config")] if named else [])
    (tmp_path / "logs").mkdir()
    subprocess.run(args, cwd=tmp_path, check=True, timeout=60, capture_output=True)
    detail = (tmp_path / "logs" / "mlperf_log_detail.txt").read_text()
    assert ("Found Audit Config" in detail) is named
    assert ('"effective_min_duration_ms", "value": 1234' in detail) is named
