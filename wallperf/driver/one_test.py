"""One LoadGen test, in the process that runs it: the model loaded, the prompts
built, the backend, queue, SUT and QSL for that test, and its result record.

Each test runs in a fresh process (wallperf.driver.test_process): LoadGen applies
mlperf.conf only on the first FromConfig of a process, so a second test in the
same process would run without the official seeds and equal-issue settings.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass
from pathlib import Path

from wallperf.audit.compliance import check_test06
from wallperf.audit.perf_audit import roofline_trust
from wallperf.audit.speculative_run import engine_figures
from wallperf.audit.test06 import audit_config_text, audit_config_was_read, verify_test06
from wallperf.harness.artifacts import resolve_dataset_file
from wallperf.harness.config import ConfigError, ResolvedRun, ScenarioConfig, folder_inside
from wallperf.harness.config.benchmarks import benchmark_for
from wallperf.driver.calibrate import calibrated_run
from wallperf.driver.model import choose_device, load_for_run, model_shape
from wallperf.driver.options import RunOptions
from wallperf.driver.peers import (check_peer, format_dict, kv_format, kv_storage_bytes, peer_format,
                                  roofline_counts, weight_format)
from wallperf.driver.progress import Progress, say
from wallperf.harness.hardware.disturbance import HostMonitor
from wallperf.harness.hardware.energy import EnergyMeter
from wallperf.harness.hardware.front import step_cost
from wallperf.harness.hardware.profiles import system_hardware
from wallperf.harness.hardware.quiet import cores as usable_cores
from wallperf.harness.hardware.roofline import run_roofline
from wallperf.harness.loadgen.logs import read_detail_log
from wallperf.harness.loadgen.queries import goodput, issued_lengths
from wallperf.harness.loadgen.qsl import LoadGenQSL
from wallperf.harness.loadgen.workload import Workload, load_workload
from wallperf.audit.submission.rules import submission_notes
from wallperf.harness.loadgen.results import accuracy_record, counter_delta, decode_roofline, performance_record, summary_line
from wallperf.harness.loadgen.settings import build_test_settings, start_test
from wallperf.kernels.cpu_linear import cpu_isa
from wallperf.sut.backends import backend_spec
from wallperf.sut import scenarios
from wallperf.sut.adapter import LoadGenSUT
from wallperf.sut.backends import create
from wallperf.sut.engine.engine import SamplingParams
from wallperf.sut.quant.fp8 import choose_format, kv_cache_dtype
from wallperf.sut.queues import queue_for


@dataclass(frozen=True)
class TestSpec:
    """Everything a test process needs: picklable, built by the parent."""

    resolved: ResolvedRun
    opts: RunOptions
    scenario: ScenarioConfig
    mode: str
    log_dir: Path
    # A compliance test's name (TEST06): its audit.config goes into log_dir and is read.
    compliance: str | None = None
    # The same test without speculation, beside a speculative one (audit.speculative_run).
    speculative_baseline: bool = False


def sampling_params(mode: str, dataset, output_lengths=None) -> SamplingParams | list[SamplingParams]:
    """Accuracy runs stop at EOS; performance runs follow the data set's output-length
    policy: stop at EOS, a fixed length with EOS ignored, or (policy `dataset`, e.g.
    ShareGPT) each sample's own length with EOS ignored, as vLLM's benchmark does: then
    a list with one SamplingParams per sample."""
    output = dataset.output_length
    if mode != "performance":
        return SamplingParams(max_new_tokens=dataset.max_new_tokens, min_new_tokens=2)
    if output.policy == "fixed":
        return SamplingParams(max_new_tokens=output.max_tokens, min_new_tokens=output.max_tokens, ignore_eos=True)
    if output.policy == "eos":
        return SamplingParams(max_new_tokens=output.max_tokens, min_new_tokens=2)
    if output_lengths is None:
        raise ConfigError(None, "output_length", f"policy 'dataset': data set {dataset.name} has no output lengths")
    cap = output.max_tokens or max(output_lengths)
    return [SamplingParams(max_new_tokens=min(max(2, n), cap), min_new_tokens=min(max(2, n), cap), ignore_eos=True)
            for n in output_lengths]


def output_policy(dataset, mode: str, params) -> dict:
    """How long answers were allowed to be: the policy, one max_new_tokens or the data set's own per sample."""
    policy = dataset.output_length.policy if mode == "performance" else "eos"
    if isinstance(params, SamplingParams):
        return {"output_length": {"policy": policy, "max_tokens": params.max_new_tokens},
                "max_new_tokens": params.max_new_tokens, "ignore_eos": params.ignore_eos, "output_lengths": "run"}
    longest = max(p.max_new_tokens for p in params)
    return {"output_length": {"policy": policy, "max_tokens": longest}, "max_new_tokens": longest,
            "ignore_eos": all(p.ignore_eos for p in params), "output_lengths": "dataset"}


def _calibration_params(dataset, workload: Workload) -> SamplingParams:
    """What a calibration decodes per request: the run's performance setting, or with the
    data set's own lengths, their mean (one setting for every request it times)."""
    params = sampling_params("performance", dataset, workload.output_lengths)
    if isinstance(params, SamplingParams):
        return params
    n = max(2, round(sum(p.max_new_tokens for p in params) / len(params)))
    return SamplingParams(max_new_tokens=n, min_new_tokens=n, ignore_eos=True)


def _max_seq_len(prompts, params) -> int:
    if isinstance(params, SamplingParams):
        return max(map(len, prompts)) + params.max_new_tokens
    return max(len(p) + q.max_new_tokens for p, q in zip(prompts, params))


def log_dir_for(out_dir: Path, resolved: ResolvedRun, scenario: str, mode: str, compliance: str | None = None,
                speculative_baseline: bool = False) -> Path:
    base = out_dir / resolved.run.system / resolved.model.name / scenario
    if speculative_baseline:
        # Beside, not inside, the scenario's performance/: its logs are not the run's result.
        return base / "no_speculation" / mode
    if compliance:
        return base / "compliance" / compliance
    return base / "performance" / "run_1" if mode == "performance" else base / "accuracy"


def _max_batch(sc: ScenarioConfig) -> int:
    return scenarios.scenario(sc.name).max_batch(sc.max_batch, sc.samples_per_query)


def loadgen_name(resolved: ResolvedRun, scenario: str) -> str:
    """The model name LoadGen looks settings up under: the benchmark the model stands for."""
    return benchmark_for(resolved.model.benchmark, scenario) or resolved.model.name


def prepare(resolved: ResolvedRun):
    """The model in its format and the run's samples: (loaded, choice, workload)."""
    run, dataset = resolved.run, resolved.dataset
    check_peer(resolved)
    choice = peer_format(resolved, choose_format(resolved.hardware, run.dtype, resolved.model.published_dtype))
    say(f"format: {choice.reason}")
    loaded = load_for_run(resolved, choose_device(run.device), choice)
    workload = load_workload(dataset, resolve_dataset_file(dataset), loaded.tokenizer, run.seed)
    if resolved.model.format == "synthetic":
        # A borrowed tokenizer may know more ids than the shape's vocab: fold them in
        # (random weights: the ids only need to be valid, not meaningful).
        workload = dataclasses.replace(workload, prompts=[p % resolved.model.shape.vocab_size
                                                          for p in workload.prompts])
    lengths = [len(p) for p in workload.prompts]
    say(f"{len(lengths)} {dataset.name} prompts, {min(lengths)}-{max(lengths)} tokens")
    _freeze_heap()
    return loaded, choice, workload


def execute(spec: TestSpec, tp_session_for=None) -> dict:
    """Load, run the one test, and return {"record", "format", "dataset"}. A tensor-parallel
    test (wallperf.driver.tp_run) comes here on rank 0 with `tp_session_for`."""
    loaded, choice, workload = prepare(spec.resolved)
    tp_session = tp_session_for(loaded) if tp_session_for is not None else None
    try:
        record = _one_test(spec, loaded, workload, choice, tp_session)
    finally:
        if tp_session is not None:
            tp_session.end()
    return {"record": record, "format": format_dict(loaded, choice), "dataset": workload.description}


def calibrate(resolved: ResolvedRun, opts: RunOptions) -> tuple:
    """wallperf.driver.calibrate's short measurement, in a process of its own like a
    test: (the run with calibrated scenarios, the Calibration or None)."""
    loaded, _, workload = prepare(resolved)
    params = _calibration_params(resolved.dataset, workload)
    max_seq_len = max(_max_seq_len(workload.prompts, params),
                      _max_seq_len(workload.prompts, sampling_params("performance", resolved.dataset,
                                                                      workload.output_lengths)))
    kv_dtype = kv_cache_dtype(resolved.hardware, resolved.run.kv_dtype)
    return calibrated_run(resolved, opts, lambda batch: create(resolved.run.backend, loaded, max_batch=batch,
                                                               max_seq_len=max_seq_len, openai=resolved.run.openai,
                                                               kv_dtype=kv_dtype),
                          workload.prompts, params)


def _one_test(spec: TestSpec, loaded, workload: Workload, choice, tp_session=None) -> dict:
    resolved, sc, mode, opts = spec.resolved, spec.scenario, spec.mode, spec.opts
    run, prompts = resolved.run, workload.prompts
    log_dir = folder_inside(opts.out_dir, spec.log_dir)
    audit_config = None
    if spec.compliance == "TEST06":
        audit_config = log_dir / "audit.config"
        audit_config.write_text(audit_config_text())
    settings = build_test_settings(sc, mode, loadgen_name(resolved, sc.name), len(prompts), opts.user_conf)
    params = sampling_params(mode, resolved.dataset, workload.output_lengths)
    max_seq_len = _max_seq_len(prompts, params)
    if tp_session is not None:
        backend = tp_session.engine(max_batch=_max_batch(sc),
                                    max_seq_len=min(max_seq_len, loaded.config.max_position))
    else:
        backend = create(run.backend, loaded, max_batch=_max_batch(sc), max_seq_len=max_seq_len,
                         openai=run.openai, kv_dtype=kv_cache_dtype(resolved.hardware, run.kv_dtype))
        if opts.speculation is not None:
            backend.enable_speculation(opts.speculation.build(loaded, _max_batch(sc), backend.max_seq_len, run.seed))
    queue = queue_for(sc.name, [len(p) for p in prompts])
    expected = len(prompts) if mode == "accuracy" else None
    expert_stats = getattr(loaded.model, "expert_stats", None)
    experts_before = expert_stats() if expert_stats else None
    label = f"{sc.name} {spec.compliance or mode}"
    t0 = time.monotonic()
    with LoadGenQSL(len(prompts), len(prompts)) as qsl, \
            LoadGenSUT(backend, queue, prompts, params, report_first_token=scenarios.scenario(sc.name).reports_first_token) as sut, \
            Progress(label, sut.stats, expected, enabled=opts.progress), \
            EnergyMeter(getattr(loaded, "device", "cpu")) as meter, \
            HostMonitor(usable_cores()) as host:
        sut.run_test(lambda: start_test(sut.handle, qsl.handle, settings, log_dir, audit_config))
    elapsed = time.monotonic() - t0

    client = engine = stats = None
    if backend_spec(run.backend).weights == "remote":
        client = backend.stats()
        backend.close()
    else:
        stats = backend.stats
        if hasattr(backend, "close"):
            backend.close()
        engine = {"mean_decode_batch": stats.mean_decode_batch, "mean_decode_context": stats.mean_decode_context,
                  "preemptions": stats.preemptions, "kv_blocks": stats.kv_blocks, "block_size": stats.block_size,
                  # The native engine's decode step (the fused C++ one, or eager PyTorch and why).
                  "decode_path": getattr(backend, "decode_path", None),
                  # The CPU kernels' instruction-set path (kernels/cpu_linear.py) the native engine took.
                  "cpu_isa": cpu_isa() if getattr(backend, "decode_path", None) and loaded.device == "cpu" else None}
        if getattr(backend, "spec_stats", None) is not None:
            # Acceptance, per-position acceptance, draft/verify time per step, and the bytes behind them.
            engine["speculative"] = engine_figures(backend.spec_stats, loaded.model, backend.speculation.drafter,
                                                   backend.runner.verify_path, opts.speculation.draft_model)
    eos = loaded.tokenizer.eos_token_id
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
    if spec.compliance == "TEST06" or mode == "accuracy":
        body["compliance"] = {"test06": check_test06(log_dir / "mlperf_log_accuracy.json", eos,
                                                     scenario=scenarios.scenario(sc.name).loadgen_name
                                                     ).to_dict()}
    if spec.compliance == "TEST06":
        body["audit_config_read"] = audit_config_was_read(log_dir)
        # TEST06/verify_accuracy.txt and TEST06/accuracy/ beside the scenario's runs, as the checker wants them.
        verify_test06(log_dir, log_dir.parents[1], sc.name, eos)
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
        **({"compliance_test": spec.compliance} if spec.compliance else {}),
        **({"speculative_baseline": True} if spec.speculative_baseline else {}),
        "model": resolved.model.name,
        "benchmark": benchmark_for(resolved.model.benchmark, sc.name),
        "loadgen_model": loadgen_name(resolved, sc.name),
        "backend": run.backend,
        "tp": run.tp,
        "dtype": choice.dtype,
        "weight_format": weight_format(loaded, choice),
        "synthetic_weights": resolved.model.format == "synthetic",
        "fp8_emulated": choice.emulated,
        "kv_dtype": kv_format(resolved, choice),
        "hardware": resolved.hardware.name,
        "system": run.system,
        "settings": "official" if opts.user_conf is not None else "wallperf",
        # What LoadGen actually ran with (mlperf.conf + user.conf, or the YAML's values).
        "loadgen_settings": effective_settings(log_dir),
        **{k: body[k] for k in ("valid", "invalid_reasons")},
        "log_dir": str(log_dir),
        "sample_count_qsl": len(prompts),
        "eos_token_id": eos,
        **output_policy(resolved.dataset, mode, params),
        "lengths": issued_lengths(sut.queries.values(), prompts, workload.output_lengths),
        "elapsed_s": round(elapsed, 1),
        "engine": engine,
        "client": client,
        # The whole test, idle time included, as the hardware's own counters report it.
        "energy": meter.result(sut.stats.tokens),
        # What else the machine did meanwhile (steal, iowait, major faults; harness.hardware.disturbance).
        "host": host.result(),
        "expert_cache": experts,
        **{k: v for k, v in body.items() if k not in ("valid", "invalid_reasons")},
    }
    record["submission_notes"] = submission_notes(record, opts.checker_version)
    if client and client["token_count_mismatches"]:
        record["submission_notes"].append(f"{client['token_count_mismatches']} responses' usage token counts "
                                          "differ from the streamed tokens")
    record["submission_valid"] = not record["submission_notes"]
    if record["host"].get("disturbed"):
        say(f"{label}: the machine was disturbed during the test: " + "; ".join(record["host"]["reasons"]))
    say(summary_line(record))
    return record


def effective_settings(log_dir: Path) -> dict:
    detail = read_detail_log(log_dir / "mlperf_log_detail.txt")
    return {k[len("effective_"):]: v for k, v in detail.values.items() if k.startswith("effective_")}


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
                     else output_policy(resolved.dataset, "performance", params)["max_new_tokens"])
    shape, counts = model_shape(resolved, loaded), roofline_counts(
        loaded, expert_cache, kv_storage_bytes(loaded, kv_cache_dtype(resolved.hardware, resolved.run.kv_dtype)))
    record = run_roofline(shape, hardware, dtype, tokens_per_second,
                          batch=max(1, round(stats.mean_decode_batch)), context=round(stats.mean_decode_context),
                          prompt_tokens=sum(map(len, prompts)) / len(prompts), output_tokens=output_tokens, **counts)
    # What it takes to redraw the roofline's Pareto front at any batch and context.
    record["step_cost"] = step_cost(shape, hardware, dtype, **counts).to_dict()
    record.update(decode_roofline(record["bytes_per_step"], hardware.bandwidth_gbps, metrics["tpot_ms"]))
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
