"""`wallperf run`: every (scenario, mode) of a run config under LoadGen.

Data flow: artifacts -> model and tokenizer -> MMLU prompts -> per scenario and
mode, a backend, a scenario queue, the LoadGen SUT and QSL -> LoadGen's logs ->
result records. results.json is rewritten atomically after each LoadGen test,
so an interrupted run keeps every finished result ("complete": false).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlperf_loadgen as lg
import torch

from audit.compliance import check_test06
from audit.report import write_run_reports
from harness.artifacts import cache_dir, resolve_dataset_file, resolve_model_file
from harness.config import (ConfigError, HardwareConfig, ModelShape, ResolvedRun, ScenarioConfig, build,
                            load_model_config, read_yaml)
from harness.energy import EnergyMeter
from harness.find_peak import find_peak, format_curve, try_log_dir
from harness.peers import check_peer, format_dict, load_llamacpp_model, peer_format, roofline_counts, weight_format
from harness.progress import Progress
from harness.probe import measured_profile_path
from harness.qsl import LoadGenQSL, build_prompts, load_mmlu, select_per_subject
from harness.results import (accuracy_record, counter_delta, decode_roofline, performance_record, submission_notes,
                             summary_line, wallperf_version, write_json_atomic)
from harness.roofline import run_roofline
from harness.settings import build_test_settings, log_settings
from sut.adapter import LoadGenSUT
from sut.backends import create
from sut.backends.native import DTYPES, load_model, load_mome, load_synthetic, load_tokenizer
from sut.engine import SamplingParams
from sut.models.llama import LlamaConfig
from sut.models.mixtral import MixtralConfig
from sut.quant import choose_format
from sut.queues import queue_for
from sut.weights import load_checkpoint, synthetic_state_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    out_dir: Path
    user_conf: Path | None = None
    progress: bool = True
    # Server/Interactive: bisect target QPS for the highest VALID load.
    find_peak: bool = False
    peak_range: tuple = (0.1, 10.0)
    peak_tolerance: float = 0.1
    peak_max_runs: int = 8


@dataclass(frozen=True)
class RemoteModel:
    """What a run over a remote server needs of the model: its tokenizer."""

    tokenizer: object
    model: None = None


def sampling_params(mode: str, dataset) -> SamplingParams:
    """Accuracy runs stop at EOS; performance runs may decode a fixed length (ignore_eos)."""
    fixed = dataset.performance_output_tokens
    if mode == "performance" and fixed is not None:
        return SamplingParams(max_new_tokens=fixed, min_new_tokens=fixed, ignore_eos=True)
    return SamplingParams(max_new_tokens=dataset.max_new_tokens, min_new_tokens=2)


def log_dir_for(out_dir: Path, resolved: ResolvedRun, scenario: str, mode: str) -> Path:
    base = out_dir / resolved.run.system / resolved.model.name / scenario
    return base / "performance" / "run_1" if mode == "performance" else base / "accuracy"


def _max_batch(sc: ScenarioConfig) -> int:
    if sc.name == "SingleStream":
        return 1
    if sc.name == "MultiStream":
        return max(sc.max_batch, sc.samples_per_query)
    return sc.max_batch


def hardware_profile(configured: HardwareConfig) -> tuple[HardwareConfig, str]:
    """The profile `wallperf probe` measured on this machine, if any, else conf/'s."""
    measured = measured_profile_path(configured.name)
    if measured.is_file():
        return build(HardwareConfig, read_yaml(measured), measured), f"measured ({measured})"
    return configured, f"conf/hardware/{configured.name}.yaml"


def model_shape(resolved: ResolvedRun, loaded) -> ModelShape:
    """The published shape from conf/, or the loaded checkpoint's own."""
    if resolved.model.shape is not None:
        return resolved.model.shape
    c = loaded.config
    return ModelShape(n_layers=c.n_layers, hidden_size=c.hidden_size, n_heads=c.n_heads,
                      n_kv_heads=c.n_kv_heads, ffn_size=c.ffn_size, vocab_size=c.vocab_size,
                      tie_embeddings=c.tie_embeddings, head_dim=c.head_dim, rope_theta=c.rope_theta,
                      max_position=c.max_position)


def choose_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(None, "device", "cuda was asked for, but torch sees no GPU")
    return requested


def load_for_run(resolved: ResolvedRun, device: str, choice):
    """The model a run names, in the format `choice` (sut.quant.FormatChoice) says:
    its checkpoint, or synthetic weights of its published shape; for MoME, that
    base with its memory experts."""
    model_cfg, run = resolved.model, resolved.run
    dtype, fp8 = choice.dtype, choice.fp8_dtype
    if run.backend == "openai":
        source = model_cfg if model_cfg.format != "synthetic" else load_model_config(model_cfg.tokenizer_from)
        _say(f"SUT: {', '.join(run.openai.endpoints)} (model {run.openai.model}); tokenizer of {source.name}")
        return RemoteModel(load_tokenizer(resolve_model_file(source)))
    if run.backend == "llamacpp":
        loaded = load_llamacpp_model(resolved)
        _say(f"SUT: llama.cpp on {loaded.path.name} ({loaded.weight_format})")
        return loaded
    if model_cfg.format == "synthetic":
        if "accuracy" in run.modes:
            raise ConfigError(resolved.path, "modes", f"{model_cfg.name} has synthetic (random) weights: "
                              "accuracy means nothing; run modes: [performance]")
        donor = load_model_config(model_cfg.tokenizer_from, resolved.path, "tokenizer_from")
        tokenizer = load_tokenizer(resolve_model_file(donor))
        cfg = _config_from_shape(model_cfg)
        _say(f"building {model_cfg.name} with synthetic weights, {choice.weight_format}, on {device}")
        if model_cfg.family != "mome":
            return load_synthetic(cfg, tokenizer, dtype, device, seed=run.seed, fp8_dtype=fp8)
        sd = synthetic_state_dict(cfg, run.seed, DTYPES[dtype], device)
        path = Path("synthetic")
    else:
        path = resolve_model_file(model_cfg)
        _say(f"loading {model_cfg.name} ({path.name}), {choice.weight_format}, on {device}")
        if model_cfg.family != "mome":
            return load_model(path, dtype, device, fp8_dtype=fp8)
        cfg, sd, _ = load_checkpoint(path)
        tokenizer = load_tokenizer(path)
    from sut.models.mome import MemoryConfig

    if fp8 is not None:
        raise ConfigError(resolved.path, "dtype", "fp8 weights are not supported for MoME models yet; "
                          "use bfloat16 or float32")
    memory = MemoryConfig(**dataclasses.asdict(model_cfg.mome))
    _say(f"{memory.n_experts:,} memory experts in layers {list(memory.layers)}; the bank is "
         f"created once under {cache_dir() / 'mome'}")
    return load_mome(cfg, sd, tokenizer, memory, cache_dir(), dtype, device, path)


def _config_from_shape(model_cfg) -> LlamaConfig:
    s = model_cfg.shape
    if model_cfg.family == "mixtral":
        return MixtralConfig.from_shape(s)
    return LlamaConfig(n_layers=s.n_layers, hidden_size=s.hidden_size, n_heads=s.n_heads,
                       n_kv_heads=s.n_kv_heads, ffn_size=s.ffn_size, vocab_size=s.vocab_size,
                       rope_theta=s.rope_theta, head_dim=s.head_dim, tie_embeddings=s.tie_embeddings,
                       max_position=s.max_position)


def run_benchmark(resolved: ResolvedRun, opts: RunOptions, tp=None) -> dict:
    """Every test of the run; results.json's content. With run.tp > 1 this spawns
    the ranks (harness.tp_run), and rank 0 comes back here with `tp`, its TPContext."""
    run, dataset = resolved.run, resolved.dataset
    if run.tp > 1 and tp is None:
        from harness.tp_run import run_tp_benchmark

        return run_tp_benchmark(resolved, opts)
    started = time.time()
    device = choose_device(run.device)
    hardware, _ = hardware_profile(resolved.hardware)
    check_peer(resolved)
    choice = peer_format(resolved, choose_format(hardware, run.dtype, resolved.model.published_dtype))
    _say(f"format: {choice.reason}")
    dataset_path = resolve_dataset_file(dataset)
    loaded = load_for_run(resolved, device, choice)
    tp_session = None
    if tp is not None:
        from harness.tp_run import leader_session

        tp_session = leader_session(loaded, tp, resolved)
    questions = select_per_subject(load_mmlu(dataset_path), dataset.per_subject)[: dataset.max_samples]
    prompts = build_prompts(questions, loaded.tokenizer)
    if resolved.model.format == "synthetic":
        # A borrowed tokenizer may know more ids than the shape's vocab: fold them in
        # (random weights: the ids only need to be valid, not meaningful).
        prompts = [p % resolved.model.shape.vocab_size for p in prompts]
    lengths = [len(p) for p in prompts]
    longest_output = max(dataset.max_new_tokens, dataset.performance_output_tokens or 0)
    max_seq_len = max(lengths) + longest_output
    _say(f"{len(prompts)} MMLU prompts, {min(lengths)}-{max(lengths)} tokens; output dir {opts.out_dir}")
    _freeze_heap()

    results = {
        "wallperf_version": wallperf_version(),
        "device": device,
        "tp": run.tp,
        "format": format_dict(loaded, choice),
        "config": {**resolved.to_dict(), "user_conf": str(opts.user_conf) if opts.user_conf else None,
                   "performance_output_tokens": dataset.performance_output_tokens,
                   "ignore_eos_in_performance": dataset.performance_output_tokens is not None},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "complete": False,
        "runs": [],
    }
    results_path = opts.out_dir / "results.json"

    def test(sc, mode, log_dir=None):
        record = _one_test(resolved, sc, mode, loaded, prompts, questions, max_seq_len, opts, choice, log_dir,
                           tp_session)
        results["runs"].append(record)
        write_json_atomic(results_path, results)
        return record

    for sc in resolved.scenarios:
        for mode in run.modes:
            if opts.find_peak and mode == "performance" and sc.name in ("Server", "Interactive"):
                results.setdefault("find_peak", {})[sc.name] = _find_peak(resolved, sc, opts, test)
                write_json_atomic(results_path, results)
            else:
                test(sc, mode)
    if tp_session is not None:
        tp_session.end()
    results["complete"] = True
    results["wall_time_s"] = round(time.time() - started, 1)
    write_json_atomic(results_path, results)
    html, md = write_run_reports(opts.out_dir)
    _say(f"reports: {html}, {md}")
    return results


def _find_peak(resolved, sc, opts, test) -> dict:
    """Bisect the Server target QPS; every try is a LoadGen test with its own logs."""
    perf_dir = log_dir_for(opts.out_dir, resolved, sc.name, "performance").parent

    def run_one(qps: float) -> dict:
        record = test(dataclasses.replace(sc, target_qps=qps), "performance", try_log_dir(perf_dir, qps))
        record["find_peak_try"] = True
        return record

    peak = find_peak(run_one, *opts.peak_range, opts.peak_tolerance, opts.peak_max_runs)
    _say(f"{sc.name} peak search:\n{format_curve(peak)}")
    return peak.to_dict()


def _one_test(resolved, sc, mode, loaded, prompts, questions, max_seq_len, opts, choice, log_dir=None,
              tp_session=None) -> dict:
    run = resolved.run
    log_dir = log_dir or log_dir_for(opts.out_dir, resolved, sc.name, mode)
    log_dir.mkdir(parents=True, exist_ok=True)
    model_name = resolved.model.mlperf_name or resolved.model.name
    settings = build_test_settings(sc, mode, model_name, len(prompts), opts.user_conf)
    if tp_session is not None:
        backend = tp_session.engine(max_batch=_max_batch(sc),
                                    max_seq_len=min(max_seq_len, loaded.config.max_position))
    else:
        backend = create(run.backend, loaded, max_batch=_max_batch(sc), max_seq_len=max_seq_len,
                         openai=run.openai)
    params = sampling_params(mode, resolved.dataset)
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
    if mode == "performance":
        body = performance_record(log_dir)
        body["roofline"] = (None if stats is None else
                            _roofline(resolved, loaded, sc.name, body["metrics"]["tokens_per_second"], stats,
                                      choice, body["metrics"]["tpot_ms"]))
    else:
        body = accuracy_record(log_dir, questions, loaded.tokenizer)
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
        "hardware": resolved.hardware.name,
        "system": run.system,
        **{k: body[k] for k in ("valid", "invalid_reasons")},
        "submission_notes": submission_notes(sc, opts.user_conf, body["valid"]),
        "log_dir": str(log_dir),
        "max_new_tokens": params.max_new_tokens,
        "ignore_eos": params.ignore_eos,
        "elapsed_s": round(elapsed, 1),
        "engine": engine,
        "client": client,
        # The whole test, idle time included, as the hardware's own counters report it.
        "energy": meter.result(sut.stats.tokens),
        "expert_cache": counter_delta(experts_before, expert_stats()) if expert_stats else None,
        **{k: v for k, v in body.items() if k not in ("valid", "invalid_reasons")},
    }
    if client and client["token_count_mismatches"]:
        record["submission_notes"].append(f"{client['token_count_mismatches']} responses' usage token counts "
                                          "differ from the streamed tokens")
    record["submission_valid"] = not record["submission_notes"]
    _say(summary_line(record))
    return record


def _roofline(resolved, loaded, scenario, tokens_per_second, stats, choice, tpot_ms=None) -> dict | None:
    """The run against the memory wall, at the decode batch and context it held.
    Emulated fp8 upcasts each weight before use, so it is counted at the math dtype.
    Where LoadGen measured TPOT, the decode phase alone is set against the wall too."""
    if not tokens_per_second or not stats.decode_tokens:
        return None
    hardware, source = hardware_profile(resolved.hardware)
    tp_note = None
    if resolved.run.tp > 1:
        from harness.tp_run import system_hardware

        hardware, tp_note = system_hardware(hardware, resolved.run.tp, loaded.device)
    dtype = "fp8" if choice.fp8_dtype is not None and not choice.emulated else choice.dtype
    record = run_roofline(model_shape(resolved, loaded), hardware, dtype, tokens_per_second,
                          batch=max(1, round(stats.mean_decode_batch)),
                          context=round(stats.mean_decode_context), scenario=scenario, **roofline_counts(loaded))
    record.update(decode_roofline(record["bytes_per_step"], hardware.bandwidth_gbps, tpot_ms))
    return {**record, "hardware": hardware.name, "hardware_source": source,
            "peak_bandwidth_gbps": hardware.bandwidth_gbps, **({"tp_note": tp_note} if tp_note else {})}


def _freeze_heap() -> None:
    """Move everything loaded so far (tokenizer tables, GGUF metadata, modules:
    ~300k objects) out of the garbage collector's reach. A full collection of
    them took ~190 ms here, and one landing mid-test is a latency outlier that
    has nothing to do with the engine; what the tests allocate is still collected."""
    gc.collect()
    gc.freeze()


def _say(msg: str) -> None:
    print(f"wallperf: {msg}", file=sys.stderr, flush=True)
