"""`wallperf run`: every test of a run config under LoadGen, one process per test.

Data flow, in each test's process (harness.driver.one_test): artifacts -> model and
tokenizer -> the data set's prompts -> a backend, a scenario queue, the LoadGen SUT
and QSL -> LoadGen's logs -> the test's record.

The parent plans the tests (each scenario and mode, --find-peak's tries, and under
--submission the compliance tests the checker requires), runs each in a fresh
process (harness.driver.test_process.run_test) and assembles results.json from
their records. results.json exists with `complete: false` before the first test
and is rewritten atomically after each one, so an interrupted run keeps every
finished result; Ctrl-C and SIGTERM end the running test (harness.driver.interrupt).
"""
from __future__ import annotations

import dataclasses
import shutil
import signal
import time
from pathlib import Path

from audit.report import write_run_reports
from audit.submission.system_desc import host_facts
from harness.config import ResolvedRun
from harness.config.benchmarks import BENCHMARKS
from harness.driver.find_peak import find_peak, format_curve, try_log_dir
from harness.driver.model import check_synthetic
from harness.driver.one_test import TestSpec, calibrate, log_dir_for
from harness.driver.options import RunOptions
<<<<<<< HEAD
from harness.driver.peers import (check_peer, format_dict, kv_format, kv_storage_bytes, peer_format,
                                  roofline_counts, weight_format)
from harness.driver.progress import Progress, say
from harness.hardware.energy import EnergyMeter
from harness.hardware.front import step_cost
from harness.hardware.profiles import system_hardware
from harness.hardware.roofline import run_roofline
from harness.hardware.wall import run_wall
from harness.loadgen.queries import goodput, issued_lengths
from harness.loadgen.qsl import LoadGenQSL
from harness.loadgen.results import (accuracy_record, counter_delta, decode_roofline, performance_record,
                                     submission_notes, summary_line, wallperf_version, write_json_atomic)
from harness.loadgen.settings import build_test_settings, log_settings
from harness.loadgen.workload import Workload, load_workload
from sut.adapter import LoadGenSUT
from sut.backends import create
from sut.engine import SamplingParams
from sut.quant import choose_format, kv_cache_dtype
from sut.queues import queue_for

log = logging.getLogger(__name__)
=======
from harness.driver.peers import check_peer
from harness.driver.progress import say
from harness.driver.interrupt import Interrupts, TestInterrupted
from harness.driver.test_process import BAD_INPUT, run_in_process, run_test
from harness.driver.tp_run import check_tp
from harness.hardware.wall import run_wall
from harness.loadgen.results import wallperf_version, write_json_atomic
>>>>>>> 295f906 (MLPerf conformance: one LoadGen test per process (every backend, find-peak try, tp ranks); Ctrl-C/SIGTERM end the test and keep what finished (exit 130/143); output-length policy (dataset output_length); benchmark key from mlperf.conf; USER_CONF_KEYS = FromConfig's keys; audit_config_filename set on every test; official settings take no YAML numbers; TEST06 run and verified as officially; submission_valid from effective_* per checker version; wallperf run --submission and wallperf submission (official tree, --check))


def run_benchmark(resolved: ResolvedRun, opts: RunOptions) -> dict:
    """Every test of the run; results.json's content. Raises TestInterrupted
    (after writing what finished) when a signal stopped the run."""
    run = resolved.run
    preflight(resolved)
    started = time.time()
    # The wall is measured once, here; every test process is given it.
    opts = dataclasses.replace(opts, wall=opts.wall or run_wall(resolved.hardware, opts.wall_from_profile))
    say(f"memory wall: {opts.wall.hardware.bandwidth_gbps:g} GB/s ({opts.wall.source}: {opts.wall.how})")
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
        def test(sc, mode, log_dir=None, compliance=None) -> dict:
            log_dir = log_dir or log_dir_for(opts.out_dir, resolved, sc.name, mode, compliance)
            spec = TestSpec(resolved, opts, sc, mode, log_dir, compliance)
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

        try:
            if opts.calibrate:
                # The performance tests' load, measured on this machine (in a process of its own).
                resolved, calibration = run_in_process("the calibration", calibrate, (resolved, opts), interrupts)
                results["config"] = _config(resolved, opts)
                results["calibration"] = calibration.to_dict() if calibration else None
                write_json_atomic(results_path, results)
            for sc in resolved.scenarios:
                for mode in run.modes:
                    if opts.find_peak and mode == "performance" and sc.name in ("Server", "Interactive"):
                        results.setdefault("find_peak", {})[sc.name] = _find_peak(resolved, sc, opts, test)
                        write_json_atomic(results_path, results)
                    else:
                        test(sc, mode)
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


def _config(resolved: ResolvedRun, opts: RunOptions) -> dict:
    dataset = resolved.dataset
    return {**resolved.to_dict(), "user_conf": str(opts.user_conf) if opts.user_conf else None,
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
<<<<<<< HEAD


def _one_test(resolved, sc, mode, loaded, workload: Workload, max_seq_len, opts, choice, log_dir=None,
              tp_session=None) -> dict:
    run, prompts = resolved.run, workload.prompts
    log_dir = folder_inside(opts.out_dir, log_dir or log_dir_for(opts.out_dir, resolved, sc.name, mode))
    model_name = resolved.model.mlperf_name or resolved.model.name
    settings = build_test_settings(sc, mode, model_name, len(prompts), opts.user_conf)
    if tp_session is not None:
        backend = tp_session.engine(max_batch=_max_batch(sc),
                                    max_seq_len=min(max_seq_len, loaded.config.max_position))
    else:
        backend = create(run.backend, loaded, max_batch=_max_batch(sc), max_seq_len=max_seq_len,
                         openai=run.openai, kv_dtype=kv_cache_dtype(resolved.hardware, run.kv_dtype))
    params = sampling_params(mode, resolved.dataset, workload.output_lengths)
    queue = queue_for(sc.name, [len(p) for p in prompts])
    expected = len(prompts) if mode == "accuracy" else None
    expert_stats = getattr(loaded.model, "expert_stats", None)
    experts_before = expert_stats() if expert_stats else None
    t0 = time.monotonic()
    with LoadGenQSL(len(prompts), len(prompts)) as qsl, \
            LoadGenSUT(backend, queue, prompts, params, report_first_token=sc.name != "Offline") as sut, \
            Progress(f"{sc.name} {mode}", sut.stats, expected, enabled=opts.progress), \
            EnergyMeter(getattr(loaded, "device", "cpu")) as meter:
        sut.run_test(lambda: lg.StartTestWithLogSettings(sut.handle, qsl.handle, settings, log_settings(log_dir)))
    elapsed = time.monotonic() - t0

    client = engine = stats = None
    if run.backend == "openai":
        client = backend.stats()
        backend.close()
    else:
        stats = backend.stats
        if hasattr(backend, "close"):
            backend.close()
        engine = {"mean_decode_batch": stats.mean_decode_batch, "mean_decode_context": stats.mean_decode_context,
                  "preemptions": stats.preemptions, "kv_blocks": stats.kv_blocks, "block_size": stats.block_size}
    experts = counter_delta(experts_before, expert_stats()) if expert_stats else None
    if mode == "performance":
        body = performance_record(log_dir)
        body["goodput"] = goodput(sut.queries.values(), sc.ttft_ms, sc.tpot_ms, body["metrics"]["tokens_per_second"])
        body["roofline"] = (None if stats is None else
                            _roofline(resolved, loaded, choice.dtype, body["metrics"], stats, opts.wall, prompts,
                                      params, experts))
    else:
        body = accuracy_record(log_dir, workload.questions, loaded.tokenizer)
        body["roofline"] = None
        body["compliance"] = {"test06": check_test06(
            log_dir / "mlperf_log_accuracy.json", loaded.tokenizer.eos_token_id,
            scenario="Server" if sc.name == "Interactive" else sc.name).to_dict()}
    if sut.stats.error:
        body["valid"] = False
        body["invalid_reasons"].insert(0, f"the SUT failed: {sut.stats.error}")
    if client and client["failures"]:
        body["valid"] = False
        body["invalid_reasons"].insert(0, f"{client['failures']} of {client['requests']} requests failed: " +
                                       "; ".join(f"{r} (x{n})" for r, n in client["failure_reasons"].items()))
    record = {
        "scenario": sc.name,
        "mode": mode,
        "model": resolved.model.name,
        "backend": run.backend,
        "tp": run.tp,
        "dtype": choice.dtype,
        "weight_format": weight_format(loaded, choice),
        "fp8_emulated": choice.emulated,
        "kv_dtype": kv_format(resolved, choice),
        "hardware": resolved.hardware.name,
        "system": run.system,
        **{k: body[k] for k in ("valid", "invalid_reasons")},
        "submission_notes": submission_notes(sc, opts.user_conf, body["valid"]),
        "log_dir": str(log_dir),
        **_output_policy(params),
        "lengths": issued_lengths(sut.queries.values(), prompts, workload.output_lengths),
        "elapsed_s": round(elapsed, 1),
        "engine": engine,
        "client": client,
        # The whole test, idle time included, as the hardware's own counters report it.
        "energy": meter.result(sut.stats.tokens),
        "expert_cache": experts,
        **{k: v for k, v in body.items() if k not in ("valid", "invalid_reasons")},
    }
    if client and client["token_count_mismatches"]:
        record["submission_notes"].append(f"{client['token_count_mismatches']} responses' usage token counts "
                                          "differ from the streamed tokens")
    record["submission_valid"] = not record["submission_notes"]
    say(summary_line(record))
    return record


def _calibration_params(dataset, workload: Workload) -> SamplingParams:
    """What a calibration decodes per request: the run's performance setting, or with the
    data set's own lengths, their mean (one setting for every request it times)."""
    params = sampling_params("performance", dataset, workload.output_lengths)
    if isinstance(params, SamplingParams):
        return params
    n = max(2, round(sum(workload.output_lengths) / len(workload.output_lengths)))
    return SamplingParams(max_new_tokens=n, min_new_tokens=n, ignore_eos=True)


def _output_policy(params) -> dict:
    """How long answers were allowed to be: one max_new_tokens, or the data set's own per sample."""
    if isinstance(params, SamplingParams):
        return {"max_new_tokens": params.max_new_tokens, "ignore_eos": params.ignore_eos, "output_lengths": "run"}
    return {"max_new_tokens": max(p.max_new_tokens for p in params), "ignore_eos": all(p.ignore_eos for p in params),
            "output_lengths": "dataset"}


def _roofline(resolved, loaded, dtype, metrics, stats, wall, prompts, params, expert_cache=None) -> dict | None:
    """The run against its real bound, at the decode batch and context it held, with the
    bytes the engine's tensors really hold and the prompts' prefill work counted.
    Where LoadGen measured TPOT, the decode phase alone is set against the wall too."""
    tokens_per_second = metrics["tokens_per_second"]
    if not tokens_per_second or not stats.decode_tokens:
        return None
    hardware, tp_note = wall.hardware, None
    if resolved.run.tp > 1:
        hardware, tp_note = system_hardware(hardware, resolved.run.tp, loaded.device)
    samples_per_second = metrics["samples_per_second"]
    output_tokens = (tokens_per_second / samples_per_second if samples_per_second
                     else _output_policy(params)["max_new_tokens"])
    shape, counts = model_shape(resolved, loaded), roofline_counts(
        loaded, expert_cache, kv_storage_bytes(loaded, kv_cache_dtype(resolved.hardware, resolved.run.kv_dtype)))
    record = run_roofline(shape, hardware, dtype, tokens_per_second,
                          batch=max(1, round(stats.mean_decode_batch)), context=round(stats.mean_decode_context),
                          prompt_tokens=sum(map(len, prompts)) / len(prompts), output_tokens=output_tokens, **counts)
    record.update(decode_roofline(record["bytes_per_step"], hardware.bandwidth_gbps, metrics["tpot_ms"]))
    # What it takes to redraw the roofline's Pareto front at any batch and context.
    record["step_cost"] = step_cost(shape, hardware, dtype, **counts).to_dict()
    record = {**record, "hardware": hardware.name, "hardware_source": wall.source, "hardware_how": wall.how,
              "peak_bandwidth_gbps": hardware.bandwidth_gbps, **({"tp_note": tp_note} if tp_note else {})}
    return {**record, **roofline_trust(record)}


def _freeze_heap() -> None:
    """Move everything loaded so far (tokenizer tables, GGUF metadata, modules:
    ~300k objects) out of the garbage collector's reach. A full collection of
    them took ~190 ms here, and one landing mid-test is a latency outlier that
    has nothing to do with the engine; what the tests allocate is still collected."""
    gc.collect()
    gc.freeze()
=======
>>>>>>> 295f906 (MLPerf conformance: one LoadGen test per process (every backend, find-peak try, tp ranks); Ctrl-C/SIGTERM end the test and keep what finished (exit 130/143); output-length policy (dataset output_length); benchmark key from mlperf.conf; USER_CONF_KEYS = FromConfig's keys; audit_config_filename set on every test; official settings take no YAML numbers; TEST06 run and verified as officially; submission_valid from effective_* per checker version; wallperf run --submission and wallperf submission (official tree, --check))
