"""`wallperf run`: every test of a run config under LoadGen, one process per test.

Data flow, in each test's process (wallperf.driver.one_test): artifacts -> model and
tokenizer -> the data set's prompts -> a backend, a scenario queue, the LoadGen SUT
and QSL -> LoadGen's logs -> the test's record.

The parent plans the tests (each scenario and mode, --find-peak's tries, and under
--submission the compliance tests the checker requires), runs each in a fresh
process (wallperf.driver.test_process.run_test) and assembles results.json from
their records. results.json exists with `complete: false` before the first test
and is rewritten atomically after each one, so an interrupted run keeps every
finished result; Ctrl-C and SIGTERM end the running test (wallperf.driver.interrupt).

A calibrated run gives a performance test that came out INVALID one second try
where its budget has room (wallperf.driver.retry); the attempt stays in
results.json's `retried`.

With speculative decoding, each performance test is followed by the same test
without it (its own process and record, `speculative_baseline: true`, logs under
no_speculation/), and the speculative record gets the two tokens/s, the measured
speedup and the roofline's prediction side by side (audit.speculative_run).
"""
from __future__ import annotations

import dataclasses
import shutil
import signal
import time
from pathlib import Path

from wallperf.audit.report import write_run_reports
from wallperf.audit.speculative_run import versus_baseline
from wallperf.audit.submission.system_desc import host_facts
from wallperf.harness.config import ResolvedRun
from wallperf.harness.config.benchmarks import BENCHMARKS
from wallperf.driver.calibrate import accuracy_scenarios, planned_run, replan
from wallperf.driver.find_peak import find_peak, format_curve, try_log_dir
from wallperf.driver.model import check_synthetic
from wallperf.driver.one_test import TestSpec, calibrate, log_dir_for
from wallperf.driver.options import RunOptions
from wallperf.driver.peers import check_peer
from wallperf.driver.progress import say
from wallperf.driver.retry import plan_retry
from wallperf.driver.interrupt import Interrupts, TestInterrupted
from wallperf.driver.test_process import BAD_INPUT, run_in_process, run_test
from wallperf.driver.tp_run import check_tp
from wallperf.harness.hardware.wall import run_wall
from wallperf.harness.loadgen.results import wallperf_version, write_json_atomic
from wallperf.sut.scenarios import scenario


def run_benchmark(resolved: ResolvedRun, opts: RunOptions) -> dict:
    """Every test of the run; results.json's content. Raises TestInterrupted
    (after writing what finished) when a signal stopped the run."""
    run = resolved.run
    preflight(resolved)
    started = time.time()
    # The wall is measured once, here, unless the run was given one; every test process is given it.
    opts = dataclasses.replace(opts, wall=opts.wall or run_wall(resolved.hardware, opts.wall_from_profile))
    given = f"; given by {opts.wall.given_by}" if opts.wall.given_by else ""
    say(f"memory wall: {opts.wall.hardware.bandwidth_gbps:g} GB/s ({opts.wall.source}: {opts.wall.how}{given})")
    results = {
        "wallperf_version": wallperf_version(),
        "tp": run.tp,
        "format": None,
        "host": host_facts(),
        "config": _config(resolved, opts),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "hardware_wall": opts.wall.to_dict(),
        "calibration": None,
        "complete": False,
        "runs": [],
    }
    results_path = opts.out_dir / "results.json"
    created = not opts.out_dir.exists()
    write_json_atomic(results_path, results)
    say(f"output dir {opts.out_dir}; each LoadGen test runs in a process of its own")

    with Interrupts() as interrupts:
        def test(sc, mode, log_dir=None, compliance=None, baseline=False) -> dict:
            log_dir = log_dir or log_dir_for(opts.out_dir, resolved, sc.name, mode, compliance, baseline)
            spec = TestSpec(resolved, dataclasses.replace(opts, speculation=None) if baseline else opts, sc, mode,
                            log_dir, compliance, speculative_baseline=baseline)
            try:
                out = run_test(spec, interrupts)
            except TestInterrupted as e:
                results.setdefault("interrupted", []).append(
                    {"scenario": sc.name, "mode": mode, "compliance_test": compliance, "log_dir": str(log_dir),
                     "interrupted": True, "signal": signal.Signals(e.signum).name})
                raise
            results["format"] = results["format"] or out["format"]
            results["dataset"] = results.get("dataset") or out["dataset"]
            results["runs"].append(out["record"])
            write_json_atomic(results_path, results)
            return out["record"]

        calibration = None
        done = set()  # "<scenario> <mode>" of the tests run so far
        try:
            if opts.calibrate:
                # The performance tests' load, measured on this machine (in a process of its own), then
                # planned again with what the run spent so far and what that process took to start.
                before = time.time()
                resolved, calibration = run_in_process("the calibration", calibrate, (resolved, opts), interrupts)
                if calibration:
                    startup = max(time.time() - before - calibration.measurement.seconds, 0.0)
                    calibration = replan(calibration, time.time() - started, startup)
                    resolved = planned_run(resolved, calibration)
                    say(calibration.plan.text())
                results["config"] = _config(resolved, opts)
                results["calibration"] = calibration.to_dict() if calibration else None
                write_json_atomic(results_path, results)
            for sc in resolved.scenarios:
                for mode in run.modes:
                    if mode == "accuracy" and sc.name not in accuracy_scenarios(resolved):
                        continue
                    if opts.find_peak and mode == "performance" and scenario(sc.name).server_like:
                        results.setdefault("find_peak", {})[sc.name] = _find_peak(resolved, sc, opts, test)
                        write_json_atomic(results_path, results)
                    else:
                        record, used = test(sc, mode), sc
                        done.add(f"{sc.name} {mode}")
                        if mode == "performance" and not record["valid"] and calibration:
                            used, record = _retry(sc, record, calibration.plan, done, started, opts, results,
                                                  results_path, test)
                        if mode == "performance" and with_baseline(opts):
                            record["speculative"] = versus_baseline(record, test(used, mode, baseline=True))
                            say(speculative_line(sc.name, record["speculative"]))
                            write_json_atomic(results_path, results)
                for name in compliance_tests(resolved, opts):
                    test(sc, "performance", compliance=name)
        except TestInterrupted as e:
            _finish(results, results_path, started, complete=False, signal_name=signal.Signals(e.signum).name)
            raise
        except BAD_INPUT:
            # Bad input found by the first test's process: leave nothing half-written.
            if not results["runs"]:
                shutil.rmtree(opts.out_dir) if created else results_path.unlink(missing_ok=True)
            raise
    _finish(results, results_path, started, complete=True)
    return results


def _retry(sc, record: dict, plan, done: set, started: float, opts: RunOptions, results: dict, results_path: Path,
           test) -> tuple:
    """The settings and record that stand for INVALID performance test `record`: its own, or a
    second try's (wallperf.driver.retry), the attempt kept in results.json's `retried`."""
    rest = [k for k in plan.predicted_s if k not in done]
    still = sum(plan.predicted_s[k] for k in rest) + plan.overheads.per_test_s * len(rest)
    retry, why = plan_retry(sc, record, budget_s=plan.budget_s, elapsed_s=time.time() - started,
                            still_to_run_s=still, per_test_s=plan.overheads.per_test_s, submission=opts.submission,
                            cannot_be_valid=plan.cannot_be_valid)
    say(f"{sc.name} performance: INVALID; {why}")
    if retry is None:
        return sc, record
    # The attempt's logs move aside, so the try writes where a run's result belongs.
    first = Path(record["log_dir"])
    aside = next(first.with_name(f"invalid_{i}") for i in range(1, 1000) if not first.with_name(f"invalid_{i}").exists())
    if first.exists():
        first.rename(aside)
        record["log_dir"] = str(aside)
    results["runs"].remove(record)
    results.setdefault("retried", []).append(record)
    write_json_atomic(results_path, results)
    again = test(retry.scenario, "performance")
    again["retry_of"] = {"invalid_reasons": record["invalid_reasons"], "log_dir": record["log_dir"],
                         "changed": {k: {"before": a, "after": b} for k, (a, b) in retry.changed.items()},
                         "predicted_s": round(retry.predicted_s, 1)}
    write_json_atomic(results_path, results)
    return retry.scenario, again


def with_baseline(opts: RunOptions) -> bool:
    """Whether each speculative performance test is followed by the same test without
    speculation (audit.speculative_run): on by default; not in a submission run, whose
    tests are the ones the checker reads."""
    return opts.speculation is not None and opts.speculative_baseline and not opts.submission


def speculative_line(scenario: str, figures: dict) -> str:
    fig = lambda v, spec=".3g": "n/a" if v is None else format(v, spec)  # noqa: E731
    return (f"{scenario} speculation: {fig(figures['tokens_per_second'])} tokens/s against "
            f"{fig(figures['baseline_tokens_per_second'])} without, {fig(figures['measured_speedup'])}x "
            f"(the roofline predicts {fig(figures['predicted_speedup'])}x from the run's acceptance)")


def _config(resolved: ResolvedRun, opts: RunOptions) -> dict:
    dataset = resolved.dataset
    spec = opts.speculation
    return {**resolved.to_dict(), "user_conf": str(opts.user_conf) if opts.user_conf else None,
            "speculation": None if spec is None else {**dataclasses.asdict(spec),
                                                      "baseline": with_baseline(opts)},
            "submission": opts.submission, "checker_version": opts.checker_version,
            "output_length": dataclasses.asdict(dataset.output_length),
            "ignore_eos_in_performance": dataset.output_length.ignore_eos}


def preflight(resolved: ResolvedRun) -> None:
    """What can be refused before anything is written or any model loaded."""
    check_peer(resolved)
    check_synthetic(resolved)
    if resolved.run.tp > 1:
        check_tp(resolved)


def compliance_tests(resolved: ResolvedRun, opts: RunOptions) -> tuple:
    """The compliance tests a --submission run adds to each scenario: those the
    checker version requires for the benchmark (TEST06 for the LLMs wallperf can
    stand for; TEST07/TEST09 only for benchmarks it has no model for)."""
    bench = BENCHMARKS.get(resolved.model.benchmark or "")
    if not opts.submission or bench is None:
        return ()
    return tuple(t for t in bench.compliance_tests.get(opts.checker_version, ()) if t == "TEST06")


def _finish(results: dict, results_path: Path, started: float, complete: bool, signal_name: str | None = None):
    results["complete"] = complete
    if signal_name:
        results["interrupted_by"] = signal_name
    results["wall_time_s"] = round(time.time() - started, 1)
    write_json_atomic(results_path, results)
    html, md = write_run_reports(results_path.parent)
    say(f"reports: {html}, {md}" + ("" if complete else f" (from the {len(results['runs'])} finished tests)"))


def _find_peak(resolved, sc, opts, test) -> dict:
    """Bisect the Server target QPS; every try is a LoadGen test with its own logs and process."""
    perf_dir = log_dir_for(opts.out_dir, resolved, sc.name, "performance").parent

    def run_one(qps: float) -> dict:
        record = test(dataclasses.replace(sc, target_qps=qps), "performance", try_log_dir(perf_dir, qps))
        record["find_peak_try"] = True
        return record

    peak = find_peak(run_one, *opts.peak_range, opts.peak_tolerance, opts.peak_max_runs)
    say(f"{sc.name} peak search:\n{format_curve(peak)}")
    return peak.to_dict()
