"""The `wallperf` command line."""
from __future__ import annotations

import os

# Before anything loads libgomp (torch): the fused CPU decode step's threads
# meet at ~150 OpenMP barriers a token, and libgomp's default spin there (about
# 3 ms) starves whatever shares the cores. 10,000 spins cost nothing measurable
# alone and cut a step beside another OpenMP job from seconds to a fifth of one
# (docs/hardware.md). A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse
import atexit
import json
import logging
import math
import sys
import time
from pathlib import Path

from wallperf.harness.config import (BACKENDS, DTYPES, GGUF_CHOICES, MODES, SCENARIOS, ConfigError, canonical_dtype,
                            check_out_folder, positive)
from wallperf.harness.config.schema import MAX_BATCH, MAX_OUTPUT_TOKENS
from wallperf.harness.config.benchmarks import CHECKER_VERSIONS

EXIT_BAD_INPUT = 2

_RUN_HELP = """\
Run the MLPerf scenarios of a run config under LoadGen and write LoadGen's logs
and results.json. With no arguments: conf/runs/default.yaml (SmolLM2-135M,
bf16, CPU; Offline, Server and SingleStream, performance and accuracy), with
durations far below MLPerf's, so results are marked not valid for submission.

Output: OUT/<system>/<model>/<scenario>/performance/run_1/ and .../accuracy/
(LoadGen's mlperf_log_* files) and OUT/results.json.
"""


def _csv(allowed):
    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: allowed values: {', '.join(allowed)}")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wallperf", description="MLPerf-style LLM inference benchmark, "
                                "with every figure set against the memory wall.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run scenarios under LoadGen", description=_RUN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--config", type=Path, help="run YAML (default: conf/runs/default.yaml)")
    r.add_argument("--scenario", type=_csv(SCENARIOS), help=f"comma list of: {', '.join(SCENARIOS)}")
    r.add_argument("--mode", choices=(*MODES, "both"), help="performance, accuracy or both (default: config)")
    r.add_argument("--accuracy-scenarios", choices=("all", "first"), help="the accuracy test in every scenario, "
                   "as a submission needs, or in the first only (default: config; the default run: first)")
    r.add_argument("--model", help="model name from conf/models")
    r.add_argument("--hardware", help="hardware profile from conf/hardware (the memory wall's figures)")
    r.add_argument("--dtype", type=canonical_dtype, choices=DTYPES, help="auto (default: fp8 weights where the "
                   "hardware has fp8 math, else the published format), or force one (bf16, fp16 and fp32 name "
                   "bfloat16, float16 and float32); fp8 without fp8 math is emulated")
    r.add_argument("--no-calibrate", action="store_true", help="keep the YAML's load settings (Offline's "
                   "expected QPS, Server's target QPS, SingleStream's expected latency, query counts) instead "
                   "of choosing them from a short calibration on this machine; --duration, --target-qps, "
                   "--min-queries, --user-conf and --find-peak keep them too")
    wall = r.add_mutually_exclusive_group()
    wall.add_argument("--wall-from-profile", action="store_true", help="set every figure against the hardware "
                      "profile's bandwidth and peaks as written, instead of measuring this machine (a CPU) or "
                      "reusing its measurement from the last hour")
    # `wallperf sweep` gives each point its one measurement of the wall in a file (harness.hardware.wall).
    wall.add_argument("--wall-file", type=Path, help=argparse.SUPPRESS)
    r.add_argument("--kv-dtype", choices=("auto", "fp8"), help="native engine's KV cache: auto (the model's "
                   "dtype, default) or fp8 (e4m3 keys and values with a scale per token and head; e4m3fnuz on "
                   "MI300X; emulated where the hardware has no fp8)")
    r.add_argument("--target-qps", type=positive(float), help="Server/Interactive target QPS")
    r.add_argument("--duration", type=positive(float), help="LoadGen min_duration in seconds")
    r.add_argument("--min-queries", type=positive(int), help="LoadGen min_query_count: e.g. ~480 lets a "
                   "Server run's early stopping judge p99 latencies (about 460 queries with none over the limit)")
    r.add_argument("--max-batch", type=positive(int, most=MAX_BATCH), help="engine batch size (not SingleStream)")
    r.add_argument("--tp", type=positive(int), metavar="N", help="tensor parallelism: shard the model over N "
                   "processes on this host, one GPU each (nccl), or sharing the CPU (gloo); rank 0 drives "
                   "LoadGen. Native backend, dense Llama models whose heads, KV heads and FFN width divide "
                   "by N, no fp8 (default 1)")
    r.add_argument("--dataset", help="data set from conf/datasets: mmlu (default) or sharegpt (conversations, "
                   "each request decoding its reply's length; performance mode only)")
    r.add_argument("--per-subject", type=positive(int), help="MMLU questions per subject")
    r.add_argument("--max-samples", type=positive(int), help="use at most N samples (quick runs)")
    r.add_argument("--output-tokens", type=positive(int, most=MAX_OUTPUT_TOKENS), help="output length of performance runs: exactly N "
                   "tokens with EOS ignored, or with --output-policy eos at most N (stopped at EOS)")
    r.add_argument("--output-policy", choices=("eos", "fixed"), help="performance runs' outputs: stop at EOS "
                   "(eos) or decode a fixed length ignoring EOS (fixed); default: the data set's output_length")
    r.add_argument("--backend", choices=BACKENDS, help="the SUT: native (our engine), openai (OpenAI-compatible "
                   "endpoints, --endpoint), or a peer engine in process: hf (HF transformers on the same "
                   "weights, static batches) or llamacpp (llama.cpp on the GGUF, see --gguf); the peers need "
                   "pip install 'wallperf[peers]'")
    r.add_argument("--gguf", choices=GGUF_CHOICES, help="--backend llamacpp: run the model's own GGUF (source, "
                   "default; SmolLM2's is Q4_1) or the same weights as a BF16 GGUF (bf16: the native engine's "
                   "bf16 numbers, written once by `wallperf export-gguf` into $WALLPERF_CACHE/gguf)")
    r.add_argument("--endpoint", action="append", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000 "
                   "(repeat for several servers); implies --backend openai")
    r.add_argument("--served-model", help="the model name the endpoints serve (default: --model's name)")
    r.add_argument("--find-peak", action="store_true", help="Server/Interactive: bisect target QPS for the "
                   "highest load LoadGen judges VALID; every try's logs are kept")
    r.add_argument("--peak-range", default="0.1,10", help="LO,HI target QPS for --find-peak (default 0.1,10)")
    r.add_argument("--peak-tolerance", type=positive(float), default=0.1, help="QPS resolution of --find-peak")
    r.add_argument("--peak-max-runs", type=positive(int), default=8, help="at most this many LoadGen tests")
    r.add_argument("--user-conf", type=Path, help="MLPerf user.conf applied over mlperf.conf")
    r.add_argument("--submission", action="store_true", help="an MLPerf submission run (conf/runs/submission.yaml "
                   "unless --config): needs --user-conf; EOS-stopped outputs, the benchmark's sample counts, "
                   "required scenarios and compliance tests; package it with `wallperf submission`")
    r.add_argument("--benchmark", help="the MLPerf benchmark the model stands for (mlperf.conf name, e.g. "
                   "llama3_1-8b-edge); default: the model YAML's `benchmark`")
    r.add_argument("--checker-version", choices=CHECKER_VERSIONS, default="v6.1",
                   help="the submission checker version whose rules judge submission_valid (default v6.1)")
    r.add_argument("--draft-model", metavar="NAME", help="speculative decoding in the native engine, drafted by "
                   "this model (conf/models, same tokenizer); check exactness with 'wallperf audit speculative'")
    r.add_argument("--draft", choices=("model", "ngram"), help="the drafter: ngram (prompt lookup) or model")
    r.add_argument("--num-draft-tokens", type=int, default=4, metavar="K", help="drafted tokens per verify (4)")
    r.add_argument("--adaptive-draft", action="store_true", help="adapt k per sequence within 1..K")
    r.add_argument("--draft-vocab", type=positive(int), metavar="N", help="the draft model proposes only the first "
                   "N token ids (a BPE's most frequent; its head reads only those rows): fewer bytes a draft "
                   "step, the output unchanged (the target verifies every draft)")
    r.add_argument("--no-speculative-baseline", action="store_true", help="with speculation, skip the same "
                   "performance test without it (by default each runs again without, for tokens/s with and "
                   "without and the measured speedup beside the roofline's prediction)")
    r.add_argument("--out", type=Path, help="output folder (default: results/<timestamp>)")
    r.add_argument("--no-progress", action="store_true", help="no progress display")

    b = sub.add_parser("bench", help="micro-benchmarks: gemv (CPU bf16 GEMV vs PyTorch), decode (the "
                       "engine's batch-1 decode step, fused C++ vs eager, against the memory wall), mome "
                       "(memory experts), client (the OpenAI client against a local mock), mmlu (the "
                       "audit's MMLU scoring against HF transformers)")
    b.add_argument("what", choices=("gemv", "decode", "mome", "client", "mmlu"))
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see its --help)")

    g = sub.add_parser("generate", help="greedy generation with the native engine")
    g.add_argument("--model", default="smollm2-135m", help="model name from conf/models, or a .gguf "
                   "file or HF checkpoint folder")
    g.add_argument("--prompt", required=True, help="user message (the chat template is applied)")
    g.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    g.add_argument("--max-new-tokens", type=positive(int), default=64)
    g.add_argument("--dtype", type=canonical_dtype, choices=("float32", "bfloat16"), default="float32",
                   help="float32 (fp32) or bfloat16 (bf16)")
    g.add_argument("--json", action="store_true",
                   help='print {"prompt_tokens": [...], "output_tokens": [...], "text": "..."}')
    from wallperf.audit.gate import add_audit_parser
    from wallperf.audit.score import add_mmlu_parser
    from wallperf.audit.report import add_report_parser
    from wallperf.tools.gguf_export import add_export_parser
    from wallperf.tools.quant_check import add_quant_check_parser
    from wallperf.harness.hardware.probe_cmd import add_probe_parser
    from wallperf.audit.compare import add_compare_parser
    from wallperf.audit.submission.command import add_submission_parser
    from wallperf.harness.hardware.roofline_cmd import add_roofline_parser
    from wallperf.tools.serve import add_serve_parser
    from wallperf.driver.sweep import add_sweep_parser

    add_sweep_parser(sub)
    add_roofline_parser(sub)
    add_compare_parser(sub)
    add_probe_parser(sub)
    add_report_parser(sub)
    add_serve_parser(sub)
    add_audit_parser(sub)
    add_mmlu_parser(sub)
    add_quant_check_parser(sub)
    add_export_parser(sub)
    add_submission_parser(sub)
    return p


def cmd_run(args) -> int:
    from wallperf.driver.options import RunOptions
    from wallperf.driver.run import run_benchmark
    from wallperf.driver.endpoints_arg import resolve_with_replicas
    from wallperf.driver.run_args import speculation_options
    from wallperf.driver.interrupt import TestInterrupted
    from wallperf.harness.hardware.wall import read_wall

    resolved = resolve_with_replicas(args)
    wall = read_wall(args.wall_file, resolved.hardware) if args.wall_file else None
    out = args.out or Path("results") / time.strftime("%Y%m%d-%H%M%S")
    check_out_folder(out)
    lo, hi = _peak_range(args.peak_range)
    opts = RunOptions(out, args.user_conf, progress=not args.no_progress, find_peak=args.find_peak,
                      peak_range=(lo, hi), peak_tolerance=args.peak_tolerance, peak_max_runs=args.peak_max_runs,
                      wall_from_profile=args.wall_from_profile, wall=wall,
                      calibrate=not (args.no_calibrate or args.find_peak or args.user_conf or any(
                          v is not None for v in (args.duration, args.target_qps, args.min_queries))),
                      checker_version=args.checker_version, submission=args.submission,
                      speculation=speculation_options(args, resolved),
                      speculative_baseline=not args.no_speculative_baseline)
    try:
        results = run_benchmark(resolved, opts)
    except TestInterrupted as e:
        print(f"wallperf: {e}; finished tests are in {out / 'results.json'} (complete: false)", file=sys.stderr)
        return 128 + e.signum
    print(json.dumps({"results": str(out / "results.json"), "wall_time_s": results["wall_time_s"]}))
    return 0


def _peak_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(None, "--peak-range", f"{text!r}: expected LO,HI, e.g. 0.1,10") from None
    if not 0 < lo < hi < math.inf:
        raise ConfigError(None, "--peak-range", f"{text!r}: need finite 0 < LO < HI target QPS, e.g. 0.1,10")
    return lo, hi


def cmd_sweep(args, run_args: list[str]) -> int:
    from wallperf.driver.endpoints_arg import resolve_with_replicas
    from wallperf.driver.sweep import run_sweep

    # The options passed through to each point, checked as `wallperf run` checks them (exit 2 when bad),
    # with the scenario and mode the sweep gives every point (a data set without reference answers,
    # such as ShareGPT, is refused in the default run's accuracy mode, which no point runs).
    run = build_parser().parse_args(["run", *run_args, "--scenario", args.scenario, "--mode", "performance"])
    if args.concurrency is not None:
        from wallperf.driver.concurrency import run_concurrency_sweep

        return run_concurrency_sweep(args, resolve_with_replicas(run), run.wall_from_profile)
    if args.qps is None:
        raise ConfigError(None, "--qps", "give --qps (LoadGen Server points) or --concurrency (fixed-concurrency "
                          "points, MLPerf Endpoints)")
    return run_sweep(args, run_args, resolve_with_replicas(run).hardware, run.wall_from_profile)


def cmd_generate(args) -> int:
    from wallperf.harness.artifacts import resolve_model_file
    from wallperf.harness.config import load_model_config
    from wallperf.sut.loading.load import load_model
    from wallperf.sut.engine.engine import Engine, SamplingParams

    path = Path(args.model)
    if not path.exists():
        path = resolve_model_file(load_model_config(args.model, "command line", "--model"))
    loaded = load_model(path, args.dtype)
    tok = loaded.tokenizer
    text = args.prompt if args.raw else tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt = tok.encode(text)
    engine = Engine(loaded.model, tok.eos_token_ids, max_batch=1,
                    max_seq_len=min(len(prompt) + args.max_new_tokens, loaded.config.max_position))
    output = engine.generate(prompt, SamplingParams(max_new_tokens=args.max_new_tokens))
    answer = tok.decode(output)
    if args.json:
        print(json.dumps({"prompt_tokens": prompt, "output_tokens": output, "text": answer}))
    else:
        print(answer)
    return 0


def cmd_bench(args) -> int:
    import importlib

    return importlib.import_module(f"wallperf.bench.{args.what}").main(args.rest)


def quiet_triton_exit() -> None:
    """Triton's nanobind bindings list hundreds of "leaked" objects when the interpreter
    exits (their own module state, freed by the exit anyway), burying what was printed
    last. They come after every atexit handler, so the last one sends stderr to
    /dev/null; tracebacks and pytest's summary are written before it runs."""
    def silence() -> None:
        if "triton" in sys.modules:
            sys.stderr.flush()
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)

    atexit.register(silence)


def main(argv=None) -> int:
    from wallperf.sut import redact

    logging.basicConfig(level=logging.WARNING, format="wallperf: %(levelname)s: %(message)s")
    # Keys never reach stderr: every log record and uncaught traceback is redacted.
    redact.install()
    # `audit speculative` has its own flags beside the MMLU gate's `audit` (audit/speculative.py).
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["audit", "speculative"]:
        from wallperf.audit.speculative import main as audit_speculative
        return audit_speculative(argv[2:])
    parser = build_parser()
    # `sweep` passes the options it does not know to each point's `wallperf run`.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "sweep":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    from wallperf.harness.artifacts import ArtifactError
    from wallperf.driver.test_process import TestProcessFailed
    from wallperf.harness.loadgen.logs import LogParseError
    from wallperf.harness.loadgen.qsl import DatasetError
    from wallperf.harness.loadgen.results import OutputError
    from wallperf.sut.loading.load import CheckpointError

    from wallperf.audit.gate import cmd_audit
    from wallperf.audit.score import cmd_mmlu
    from wallperf.audit.report import cmd_report
    from wallperf.tools.gguf_export import cmd_export_gguf
    from wallperf.tools.quant_check import cmd_quant_check
    from wallperf.harness.hardware.probe_cmd import cmd_probe
    from wallperf.audit.compare import cmd_compare
    from wallperf.audit.submission.command import cmd_submission
    from wallperf.harness.hardware.roofline_cmd import cmd_roofline
    from wallperf.tools.serve import cmd_serve

    handler = {"run": cmd_run, "generate": cmd_generate, "roofline": cmd_roofline, "probe": cmd_probe,
               "report": cmd_report, "serve": cmd_serve, "bench": cmd_bench, "audit": cmd_audit, "mmlu": cmd_mmlu,
               "quant-check": cmd_quant_check, "compare": cmd_compare, "export-gguf": cmd_export_gguf,
               "sweep": lambda a: cmd_sweep(a, unknown),
               "submission": cmd_submission}[args.command]
    quiet_triton_exit()
    try:
        return handler(args)
    except (ConfigError, ArtifactError, DatasetError, CheckpointError) as e:
        print(f"wallperf: error: {redact.redact(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OutputError as e:
        # Not the input's fault: a full disk or a folder without write permission.
        print(f"wallperf: error: {redact.redact(e)}", file=sys.stderr)
        return 1
    except LogParseError as e:
        # LoadGen writes its logs without reporting a failed write: a cut-off log is how a full disk shows.
        print(f"wallperf: error: cannot read what LoadGen wrote: {redact.redact(e)}; was the disk holding "
              "--out full, or did LoadGen stop early?", file=sys.stderr)
        return 1
    except TestProcessFailed as e:
        # A test process crashed or failed; its traceback is above, on the shared stderr.
        print(f"wallperf: error: {redact.redact(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("wallperf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
