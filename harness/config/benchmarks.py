"""The MLPerf LLM benchmarks a model can stand for, and what the submission checker
requires of each per checker version.

LoadGen's settings for a benchmark (latency limits, min_duration, min_query_count,
sample counts, seeds) are never copied here: they come from the mlperf.conf the
installed mlcommons-loadgen embeds and are read back from each detail log's
effective_* values. What is here is what no log says: the checker's name for the
benchmark, the reference SUT's output cap, the data set's size, the scenarios a
submission must carry per category, the compliance tests the checker requires,
and the accuracy.txt metrics it parses. tests/harness/config/test_benchmarks.py
holds every figure to the shared copies of mlperf.conf and the checker's constants.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from wallperf.sut import scenarios
from wallperf.sut.scenarios import OFFLINE, SERVER, SINGLE_STREAM

from wallperf.harness.config.checks import shorten

CHECKER_VERSIONS = ("v6.0", "v6.1")
CATEGORIES = ("datacenter", "edge")


@dataclass(frozen=True)
class Benchmark:
    # The mlperf.conf / LoadGen model name (llama3_1-8b).
    name: str
    # The checker's folder name for it (llama3.1-8b).
    checker_name: str
    # The reference SUT stops at EOS after at most this many tokens.
    max_new_tokens: int
    # The accuracy data set's size: the accuracy run must cover it (dataset_check).
    dataset_size: int
    category: str
    # Scenarios a submission must carry, per checker version (only where listed).
    required_scenarios: dict = field(default_factory=dict)
    # Compliance tests the checker requires, per checker version.
    compliance_tests: dict = field(default_factory=dict)
    # The accuracy.txt metrics the checker parses for this benchmark, in its line format.
    accuracy_metrics: tuple = ()


_ROUGE = ("ROUGE1", "ROUGE2", "ROUGEL", "ROUGELSUM", "GEN_LEN")

BENCHMARKS = {b.name: b for b in (
    Benchmark("llama3_1-8b", "llama3.1-8b", 128, 13368, "datacenter",
              {"v6.0": (OFFLINE.name,), "v6.1": (OFFLINE.name,)},
              {"v6.0": ("TEST06",), "v6.1": ("TEST06",)}, _ROUGE),
    Benchmark("llama3_1-8b-edge", "llama3.1-8b-edge", 128, 5000, "edge",
              {"v6.0": (SINGLE_STREAM.name, OFFLINE.name), "v6.1": (SINGLE_STREAM.name, OFFLINE.name)},
              {"v6.0": (), "v6.1": ()}, _ROUGE),
    Benchmark("llama2-70b", "llama2-70b-99", 1024, 24576, "datacenter",
              {"v6.0": (OFFLINE.name,)}, {"v6.0": ("TEST06",)},
              ("ROUGE1", "ROUGE2", "ROUGEL", "TOKENS_PER_SAMPLE")),
    Benchmark("mixtral-8x7b", "mixtral-8x7b", 1024, 15000, "datacenter",
              {"v6.0": (OFFLINE.name, SERVER.name)}, {"v6.0": ("TEST06",)},
              ("ROUGE1", "ROUGE2", "ROUGEL", "TOKENS_PER_SAMPLE", "gsm8k_accuracy", "mbxp_accuracy")),
    Benchmark("llama3_1-405b", "llama3.1-405b", 20000, 8313, "datacenter",
              {"v6.0": (OFFLINE.name,)}, {"v6.0": ("TEST06",)},
              ("ROUGEL", "exact_match", "TOKENS_PER_SAMPLE")),
)}


def benchmark(name: str) -> Benchmark:
    """The benchmark of that mlperf.conf name; a ValueError names the allowed ones."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown MLPerf benchmark {shorten(name)}; allowed: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


# The seeds each checker version requires of every run: that round's mlperf.conf's.
# The installed LoadGen (6.0.17) embeds the v6.1 seeds, so its runs fail v6.0's check.
SEEDS = {
    "v6.0": {"qsl_rng_seed": 2465351861681999779, "sample_index_rng_seed": 14276810075590677512,
             "schedule_rng_seed": 3936089224930324775},
    "v6.1": {"qsl_rng_seed": 2085463073848966840, "sample_index_rng_seed": 2747215439041700203,
             "schedule_rng_seed": 16159082839903944936},
}
# The checker's minimum query count per LoadGen scenario for the LLM benchmarks.
MIN_QUERIES = {s.name: s.min_query_count for s in scenarios.LOADGEN_SCENARIOS.values()}
SUBMISSION_MIN_DURATION_MS = 600_000


def benchmark_for(name: str | None, scenario: str) -> str | None:
    """The benchmark a test of `scenario` runs under: SingleStream exists only in
    the edge variant of a benchmark (llama3_1-8b's SingleStream is llama3_1-8b-edge)."""
    if name is not None and scenarios.scenario(scenario) is SINGLE_STREAM and f"{name}-edge" in BENCHMARKS:
        return f"{name}-edge"
    return name
