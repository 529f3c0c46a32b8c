"""The wall a run is set against, end to end on the real SmolLM2: a run records the
figures it used and where they came from, and a run held to a CPU profile that states
far less than the machine streams (--wall-from-profile) is an error in the performance
audit, its roofline marked untrusted. SmolLM2's 269 MB of bf16 weights dwarf the
caches, so every step streams them from memory. The profile states 0.01 GB/s, not a
plausible 10, so that the test holds on a machine shared with other work too: with
seven busy processes on 2 cores, a SmolLM2 token has taken 5 s (55 MB/s), and 27 s
per token would still be above 0.01 GB/s."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from wallperf.audit.perf_audit import audit_results
from wallperf.cli import main

pytestmark = pytest.mark.slow

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture
def slow_cpu_conf(tmp_path, monkeypatch, smollm2_gguf_path, mmlu_path):
    root = tmp_path / "conf"
    shutil.copytree(CONF, root)
    profile = yaml.safe_load((root / "hardware" / "cpu.yaml").read_text())
    (root / "hardware" / "cpu.yaml").write_text(yaml.safe_dump({**profile, "bandwidth_gbps": 0.01}))
    monkeypatch.setenv("WALLPERF_CONF", str(root))
    return root


def test_a_wall_below_the_achieved_bandwidth_is_an_audit_error(slow_cpu_conf, tmp_path):
    out = tmp_path / "out"
    rc = main(["run", "--scenario", "SingleStream", "--mode", "performance", "--duration", "1",
               "--max-samples", "3", "--output-tokens", "8", "--wall-from-profile", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    wall = results["hardware_wall"]
    assert wall["source"] == "profile" and wall["bandwidth_gbps"] == 0.01 and "--wall-from-profile" in wall["how"]
    (run,) = results["runs"]
    rf = run["roofline"]
    assert rf["peak_bandwidth_gbps"] == 0.01 and rf["hardware_source"] == "profile"
    assert rf["decode_mbu"] > 1 and rf["trusted"] is False and rf["untrusted_reasons"]
    errors = [f for f in audit_results(results) if f.severity == "error" and f.code.endswith("_above_one")]
    assert errors and any("decode MBU" in f.message for f in errors)
    assert all("0.01 GB/s" in f.message and "profile" in f.message and "bytes per step" in f.message
               for f in errors)
