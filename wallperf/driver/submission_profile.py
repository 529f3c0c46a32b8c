"""`wallperf run --submission`: a run config turned into an MLPerf submission run
for the benchmark its model stands for (conf/runs/submission.yaml says what)."""
from __future__ import annotations

import dataclasses

from wallperf.harness.config import ConfigError, OutputLength, ResolvedRun, load_scenario_config
from wallperf.harness.config.benchmarks import BENCHMARKS


def submission_run(resolved: ResolvedRun, checker_version: str, scenarios_given: bool,
                   max_samples: int | None = None) -> ResolvedRun:
    """Outputs stopped at EOS after the benchmark's max_new_tokens (at least 2
    tokens), the data set cut to the benchmark's size (its QSL and accuracy run)
    unless --max-samples asks for fewer (a trial run: submission_valid says the
    sample counts fall short), and, unless --scenario named them, the scenarios
    the checker requires."""
    name = resolved.model.benchmark
    if name is None:
        raise ConfigError(resolved.path, "benchmark", f"model {resolved.model.name} stands for no MLPerf "
                          f"benchmark; pass --benchmark, one of: {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    required = bench.required_scenarios.get(checker_version)
    if required is None:
        raise ConfigError(None, "--checker-version", f"benchmark {name} is not in checker {checker_version}'s "
                          f"list; it is in: {', '.join(bench.required_scenarios)}")
    if resolved.model.format == "synthetic":
        raise ConfigError(resolved.path, "model", f"{resolved.model.name} has synthetic weights, which are "
                          "never a submission result")
    dataset = dataclasses.replace(resolved.dataset, per_subject=None, max_samples=max_samples or bench.dataset_size,
                                  max_new_tokens=bench.max_new_tokens,
                                  output_length=OutputLength("eos", bench.max_new_tokens))
    scenarios = resolved.scenarios
    if not scenarios_given:
        scenarios = tuple(load_scenario_config(s, resolved.path, "scenarios") for s in required)
    run = dataclasses.replace(resolved.run, scenarios=[s.name for s in scenarios])
    return dataclasses.replace(resolved, run=run, dataset=dataset, scenarios=scenarios)
