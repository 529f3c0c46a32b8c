"""harness/config/benchmarks.py against the official sources: the submission
checker's constants and mlperf.conf (the shared copies in mlcommons-inference),
and the mlperf.conf the installed LoadGen embeds."""
import re
from pathlib import Path

import pytest

from wallperf.harness.config.benchmarks import BENCHMARKS, CHECKER_VERSIONS, MIN_QUERIES, SEEDS
from wallperf.harness.loadgen.settings import embedded_mlperf_conf

INFERENCE = Path(__file__).resolve().parents[4] / "shared" / "mlcommons-inference"
if not INFERENCE.is_dir():
    INFERENCE = Path("/work/shared/mlcommons-inference")
pytestmark = pytest.mark.skipif(not INFERENCE.is_dir(), reason="no mlcommons-inference copy")


@pytest.fixture(scope="module")
def checker(checker_constants):
    return checker_constants.MODEL_CONFIG


def conf_keys(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([\w.\-*]+)\.([\w*]+)\.(\w+)\s*=\s*(\S+)", line.split("#")[0])
        if m:
            out[m.groups()[:3]] = m.group(4)
    return out


def test_embedded_mlperf_conf_is_the_shared_copy():
    assert embedded_mlperf_conf() == (INFERENCE / "loadgen" / "mlperf.conf").read_text()


@pytest.mark.parametrize("version", CHECKER_VERSIONS)
def test_benchmarks_match_the_checker(checker, version):
    cfg = checker[version]
    for b in BENCHMARKS.values():
        if version not in b.required_scenarios:
            assert b.checker_name not in cfg["models"]
            continue
        assert cfg["model_mapping"].get(b.name, b.name) in (b.checker_name, b.name)
        required = {**cfg["required-scenarios-datacenter"], **cfg["required-scenarios-edge"]}
        assert set(b.required_scenarios[version]) == set(required[b.checker_name])
        assert b.dataset_size == cfg["dataset-size"][b.checker_name]
        assert b.dataset_size == cfg["performance-sample-count"][b.checker_name]
        tests = tuple(t for t in ("TEST06", "TEST07", "TEST09") if b.checker_name in cfg[f"models_{t}"])
        assert b.compliance_tests[version] == tests
        assert set(b.accuracy_metrics) == set(cfg["accuracy-target"][b.checker_name][::2])
        for scenario, n in cfg["min-queries"][b.checker_name].items():
            assert MIN_QUERIES[scenario] == n
    assert cfg["seeds"] == SEEDS[version]


def test_benchmark_names_and_seeds_are_mlperf_conf_s():
    keys = conf_keys(embedded_mlperf_conf())
    models = {m for m, _, _ in keys}
    assert set(BENCHMARKS) <= models
    for key, seed in SEEDS["v6.1"].items():
        assert int(keys[("*", "*", key)]) == seed
    for name, b in BENCHMARKS.items():
        assert int(keys[(name, "*", "performance_sample_count_override")]) == b.dataset_size
