"""A run of Offline, SingleStream and Server with a user.conf (official settings):
each test in its own process, so every detail log carries mlperf.conf's seeds
(read from the mlperf.conf the installed LoadGen embeds) and no
error_invalid_config, and the benchmark's latency limits are mlperf.conf's,
not the scenario YAML's. On a tiny synthetic model: settings are the point."""
import json
import re
from pathlib import Path

import pytest

from wallperf.cli import main
from wallperf.harness.loadgen.settings import embedded_mlperf_conf

pytestmark = pytest.mark.slow
USER_CONF = """\
llama3_1-8b.Server.target_qps = 2
llama3_1-8b.Offline.target_qps = 2
*.SingleStream.target_latency = 100
*.*.min_duration = 500
*.*.min_query_count = 3
*.*.performance_sample_count_override = 3
"""


# A test this short can issue its last query before min_duration has passed; LoadGen
# then logs this runtime error (Offline issues its one query at once). Whether it
# appears depends on how fast the machine is, not on the settings this test checks,
# so it is the one error let through here; a full-length run must not have it.
RAN_OUT = "Ran out of generated queries to issue before the minimum query count"


def detail(log_dir) -> tuple[dict, list]:
    values, errors = {}, []
    for line in open(Path(log_dir) / "mlperf_log_detail.txt"):
        entry = json.loads(line[len(":::MLLOG "):])
        values[entry["key"]] = entry["value"]
        if (entry.get("metadata") or {}).get("is_error") and RAN_OUT not in str(entry["value"]):
            errors.append(entry)
    return values, errors


def test_every_test_gets_mlperf_conf(tiny_conf, tmp_path):
    (tmp_path / "user.conf").write_text(USER_CONF)
    out = tmp_path / "out"
    rc = main(["run", "--model", "tiny-synthetic", "--benchmark", "llama3_1-8b", "--scenario",
               "Offline,SingleStream,Server", "--mode", "performance", "--max-samples", "3", "--output-tokens", "4",
               "--user-conf", str(tmp_path / "user.conf"), "--out", str(out), "--no-progress",
               "--wall-from-profile"])
    assert rc == 0
    seeds = {key: int(value) for key, value in
             re.findall(r"^\*\.\*\.(\w+_rng_seed) = (\d+)", embedded_mlperf_conf(), re.M)
             if not key.startswith("test05")}
    assert len(seeds) == 3 and all(seeds.values())
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["scenario"] for r in runs] == ["Offline", "SingleStream", "Server"]
    for run in runs:
        values, errors = detail(run["log_dir"])
        assert errors == []
        for key, seed in seeds.items():
            assert values[f"effective_{key}"] == seed
        assert values["effective_sample_concatenate_permutation"] is True  # llama3_1-8b's equal issue
        assert run["settings"] == "official" and run["loadgen_settings"]["min_duration_ms"] == 500
    values, _ = detail(runs[2]["log_dir"])
    # mlperf.conf's llama3_1-8b Server limits (2000/100 ms), not conf/scenarios/server.yaml's 2000/200.
    assert values["requested_server_ttft_latency"] == 2_000_000_000
    assert values["requested_server_tpot_latency"] == 100_000_000
