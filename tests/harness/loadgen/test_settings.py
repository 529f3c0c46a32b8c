"""LoadGen TestSettings from scenario YAMLs and an MLPerf user.conf."""
import mlperf_loadgen as lg
import pytest

from harness.config import ConfigError, ScenarioConfig
from harness.loadgen.settings import build_test_settings, check_user_conf, loadgen_model_name

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


def test_user_conf_is_applied_over_the_yaml(tmp_path):
    conf = tmp_path / "user.conf"
    conf.write_text("# ours\nsmollm2-135m.Server.target_qps = 3.5\n*.Server.min_duration = 1000\n")
    s = build_test_settings(SERVER, "performance", "smollm2-135m", sample_count=57, user_conf=conf)
    assert s.server_target_qps == 3.5
    assert s.min_duration_ms == 1000


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
