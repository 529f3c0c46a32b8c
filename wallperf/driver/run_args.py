"""`wallperf run`'s command line made into the run it asks for: the run YAML with
the options laid over it, checked before anything is written. `wallperf sweep`
resolves its points' options the same way, to know the hardware they run on."""
from __future__ import annotations

from wallperf.harness.config import MODES, ConfigError, ResolvedRun, conf_dir, load_run
from wallperf.sut.backends import backend_spec
from wallperf.driver.submission_profile import submission_run


def resolve_run_args(args) -> ResolvedRun:
    """The run `wallperf run ARGS` describes (ConfigError when the options are bad)."""
    overrides = {k: v for k, v in (("model", args.model), ("dtype", args.dtype), ("hardware", args.hardware),
                                   ("scenarios", args.scenario), ("tp", args.tp), ("dataset", args.dataset),
                                   ("kv_dtype", args.kv_dtype),
                                   ("accuracy_scenarios", getattr(args, "accuracy_scenarios", None)))
                 if v is not None}
    if args.endpoint or args.backend and backend_spec(args.backend).weights == "remote":
        if not args.endpoint:
            raise ConfigError(None, "--endpoint", f"--backend {args.backend} needs at least one --endpoint URL")
        overrides["backend"] = args.backend or "openai"
        overrides["openai"] = {"endpoints": args.endpoint,
                               "model": args.served_model or args.model or "smollm2-135m"}
    elif args.backend:
        overrides["backend"] = args.backend
    if args.gguf:
        overrides["gguf"] = args.gguf
    if args.mode:
        overrides["modes"] = list(MODES) if args.mode == "both" else [args.mode]
    scenario_overrides = {k: v for k, v in (("min_duration_s", args.duration), ("max_batch", args.max_batch),
                                            ("target_qps", args.target_qps),
                                            ("min_query_count", args.min_queries)) if v is not None}
    dataset_overrides = {k: v for k, v in (("per_subject", args.per_subject),
                                           ("max_samples", args.max_samples)) if v is not None}
    if args.output_tokens or args.output_policy:
        if args.output_policy == "eos" and not args.output_tokens:
            raise ConfigError(None, "--output-policy", "eos needs --output-tokens N (the most tokens per answer)")
        dataset_overrides["output_length"] = {"policy": args.output_policy or "fixed",
                                              "max_tokens": args.output_tokens}
    if args.submission and args.user_conf is None:
        raise ConfigError(None, "--submission", "needs --user-conf FILE (your MLPerf user.conf: target_qps, "
                          "target_latency); mlperf.conf is applied with it")
    config = args.config or (conf_dir() / "runs" / "submission.yaml" if args.submission else None)
    resolved = load_run(config, overrides, scenario_overrides, dataset_overrides, benchmark=args.benchmark)
    if args.submission:
        resolved = submission_run(resolved, args.checker_version, scenarios_given=args.scenario is not None,
                                  max_samples=args.max_samples)
    if args.user_conf is not None:
        from wallperf.harness.loadgen.settings import check_user_conf
        check_user_conf(args.user_conf)
    return resolved


def speculation_options(args, resolved: ResolvedRun):
    """--draft-model / --draft ngram and --num-draft-tokens as SpeculationOptions, or
    None when neither drafter is asked for (ConfigError when they do not fit the run)."""
    from wallperf.driver.options import SpeculationOptions

    draft = args.draft or ("model" if args.draft_model else None)
    if draft is None:
        return None
    if resolved.run.backend != "native":
        raise ConfigError(None, "--draft", f"speculative decoding is the native engine's; the run's backend is "
                          f"{resolved.run.backend} (a server's own speculation is audited with "
                          "'wallperf audit speculative --backend openai')")
    try:
        return SpeculationOptions(draft, args.num_draft_tokens, args.draft_model, args.adaptive_draft,
                                  args.draft_vocab)
    except ValueError as e:
        flag = ("--num-draft-tokens" if args.num_draft_tokens < 1 else
                "--draft-vocab" if "--draft-vocab" in str(e) else "--draft-model")
        raise ConfigError(None, flag, str(e)) from None
