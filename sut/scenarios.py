"""The MLPerf scenarios as one table: each scenario is an object that knows how
LoadGen runs it, how the SUT queues and batches it, and where the detail log
keeps its throughput. Code asks a scenario for these facts; nothing else names
or compares scenario strings.

Interactive is not a LoadGen scenario: it is LoadGen's Server run under the
mlperf.conf model name "<model>-interactive", where the tighter TTFT/TPOT
limits live. Every figure below is held to LoadGen's own enum, mlperf.conf and
the submission checker's constants by tests/sut/test_scenarios.py.
"""
from __future__ import annotations

from dataclasses import dataclass

# How the SUT's queue (sut.queues) orders what LoadGen issued.
QUEUE_FIFO = "fifo"              # first in, first out
QUEUE_BY_LENGTH = "by_length"    # the one big query sorted by prompt length
QUEUE_WHOLE_QUERY = "whole_query"  # a query's samples admitted together or not at all
QUEUES = (QUEUE_FIFO, QUEUE_BY_LENGTH, QUEUE_WHOLE_QUERY)

# How many sequences the engine decodes together.
BATCH_ONE = "one"                # one sequence at a time: LoadGen waits for each answer
BATCH_CONFIGURED = "configured"  # up to the scenario config's max_batch
BATCH_QUERY = "whole_query"      # at least one query's samples, so a query always fits
BATCHES = (BATCH_ONE, BATCH_CONFIGURED, BATCH_QUERY)


@dataclass(frozen=True)
class Scenario:
    # The name in wallperf's configs, results.json and output folders.
    name: str
    # LoadGen's TestScenario member this runs as (and the scenario mlperf.conf keys name).
    loadgen_name: str
    # Appended to the mlperf.conf model name: where mlperf.conf keeps this scenario's limits.
    model_suffix: str
    # Queries arrive at a target rate and are judged on TTFT/TPOT limits.
    server_like: bool
    # The SUT calls FirstTokenComplete before QuerySamplesComplete (LoadGen logs an error
    # where it is missing; TEST06 checks the first token).
    reports_first_token: bool
    queue: str
    batch: str
    # The detail-log keys of its samples/s and tokens/s (None: LoadGen logs none).
    samples_per_second_key: str | None
    tokens_per_second_key: str
    # The submission checker's minimum query count for the LLM benchmarks.
    min_query_count: int

    def __post_init__(self):
        if self.queue not in QUEUES:
            raise ValueError(f"scenario {self.name}: queue {self.queue!r}; allowed: {', '.join(QUEUES)}")
        if self.batch not in BATCHES:
            raise ValueError(f"scenario {self.name}: batch {self.batch!r}; allowed: {', '.join(BATCHES)}")

    @property
    def loadgen_enum(self):
        """mlperf_loadgen.TestScenario's member (imported here only: the table is plain data)."""
        import mlperf_loadgen as lg
        return getattr(lg.TestScenario, self.loadgen_name)

    def loadgen_model(self, model_name: str) -> str:
        """The mlperf.conf model name this scenario's settings are read under."""
        return model_name + self.model_suffix

    def max_batch(self, configured: int, samples_per_query: int | None = None) -> int:
        """The engine's batch size for this scenario given the config's max_batch."""
        if self.batch == BATCH_ONE:
            return 1
        if self.batch == BATCH_QUERY:
            return max(configured, samples_per_query or 1)
        return configured


# The checker scores result_samples_per_second (Offline) and result_completed_samples_per_sec
# (Server; note "_sec"); SingleStream is scored by latency, and its logged throughput is the
# "QPS w/ loadgen overhead" line; MultiStream logs no samples/s at all. In tokens/s, the LLM
# benchmarks' score, SingleStream and MultiStream's with-overhead figure pairs with that QPS;
# LoadGen 6.0.17's result_token_throughput is off by 1e9 (tokens per ns), so it is not used.
OFFLINE = Scenario("Offline", "Offline", "", server_like=False, reports_first_token=False,
                   queue=QUEUE_BY_LENGTH, batch=BATCH_CONFIGURED,
                   samples_per_second_key="result_samples_per_second",
                   tokens_per_second_key="result_tokens_per_second", min_query_count=1)
SERVER = Scenario("Server", "Server", "", server_like=True, reports_first_token=True,
                  queue=QUEUE_FIFO, batch=BATCH_CONFIGURED,
                  samples_per_second_key="result_completed_samples_per_sec",
                  tokens_per_second_key="result_completed_tokens_per_second", min_query_count=270336)
INTERACTIVE = Scenario("Interactive", "Server", "-interactive", server_like=True, reports_first_token=True,
                       queue=QUEUE_FIFO, batch=BATCH_CONFIGURED,
                       samples_per_second_key="result_completed_samples_per_sec",
                       tokens_per_second_key="result_completed_tokens_per_second", min_query_count=270336)
SINGLE_STREAM = Scenario("SingleStream", "SingleStream", "", server_like=False, reports_first_token=True,
                         queue=QUEUE_FIFO, batch=BATCH_ONE,
                         samples_per_second_key="result_qps_with_loadgen_overhead",
                         tokens_per_second_key="result_token_throughput_with_loadgen_overhead",
                         min_query_count=1024)
MULTI_STREAM = Scenario("MultiStream", "MultiStream", "", server_like=False, reports_first_token=True,
                        queue=QUEUE_WHOLE_QUERY, batch=BATCH_QUERY, samples_per_second_key=None,
                        tokens_per_second_key="result_token_throughput_with_loadgen_overhead",
                        min_query_count=270336)

# In the order reports list them.
SCENARIOS = {s.name: s for s in (OFFLINE, SERVER, INTERACTIVE, SINGLE_STREAM, MULTI_STREAM)}
SCENARIO_NAMES = tuple(SCENARIOS)
# LoadGen's own scenarios (what a detail log's effective_scenario and a user.conf name):
# each is the scenario of the same name.
LOADGEN_SCENARIOS = {s.name: s for s in SCENARIOS.values() if s.name == s.loadgen_name}


def scenario(name: str) -> Scenario:
    """The scenario of that name; a ValueError lists the allowed ones."""
    try:
        return SCENARIOS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown scenario {name!r:.80}; allowed: {', '.join(SCENARIO_NAMES)}") from None


def loadgen_scenario(name: str) -> Scenario:
    """The scenario LoadGen calls `name` (a detail log's effective_scenario, a user.conf's key)."""
    try:
        return LOADGEN_SCENARIOS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown LoadGen scenario {name!r:.80}; allowed: {', '.join(LOADGEN_SCENARIOS)}") \
            from None
