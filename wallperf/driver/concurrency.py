"""`wallperf sweep --concurrency`: the MLPerf Endpoints way of comparing systems,
a Pareto curve of fixed-concurrency points.

Each point holds N requests in flight for a warm-up and then a steady-state
window (wallperf.driver.concurrency_points: the rules' 600 s / 1,200 s with
--official, short ones otherwise) and reports, by audit.endpoints: system
tokens/s, tokens/s per user (1000 / TPOT p90), TTFT p50/p90/p99 at the first
non-empty fragment, goodput against the Server scenario's TTFT and TPOT limits,
failures per replica, the client's self-check, and the servers' prefix-cache
hit rate where they expose one (wallperf.driver.prefix_cache). With --accuracy, each
point the rules name (section 5.3: the lowest, and one in each of the low, medium
and high regions; concurrency_points.accuracy_points) is followed by an MMLU
exact-match pass at the same concurrency (unsalted, every question once), as the
rules ask of single-turn benchmarks.

Where the load goes:
- OpenAI-compatible endpoints (--endpoint URL1,URL2 or a file of URLs): sent
  by --client-workers processes (wallperf.driver.client_workers), or ray:N
  actors on a Ray cluster (wallperf.driver.ray_workers), requests spread over
  the replicas by least outstanding requests;
- any other backend (native, hf, llamacpp): in this process through the
  engine interface (wallperf.driver.in_process_load), a fresh backend per
  point; the engine's mean decode batch and context give decode MBU and MFU
  against the wall measured at the sweep's start, and the roofline's front.

The rules' counts (wallperf.driver.concurrency_points.count_check): a point
issues a whole number of passes over the data set (each client worker, or the
in-process loop, keeps issuing past the window until its count is whole, and
waits for those answers) and completes at least --min-queries of them (one
pass by default); a point short of either is invalid, with the reason.

Output: OUT/sweep.json (points, regions, the rules' checks, the front),
OUT/points/c<N>.json (every request of a point), OUT/pareto.png and OUT/sweep.md.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from wallperf.audit.endpoints import point_figures
from wallperf.audit.pareto import FRONT_BATCHES, concurrency_series, concurrency_table, write_concurrency_png
from wallperf.harness.config import ConfigError
from wallperf.harness.hardware.front import StepCost, decode_mfu, front_rows, place_on_front, step_cost
from wallperf.harness.hardware.roofline import utilization_problems
from wallperf.harness.hardware.wall import run_wall
from wallperf.harness.loadgen.qsl import parse_answer_letter
from wallperf.harness.loadgen.results import wallperf_version, write_json_atomic
from wallperf.driver.client_workers import Load, worker_rows, worker_specs
from wallperf.driver.workers_arg import open_workers
from wallperf.driver.concurrency_points import accuracy_points, check_points, count_check, place_points, window_s
from wallperf.driver.in_process_load import answer_all, closed_loop
from wallperf.driver.model import model_shape
from wallperf.driver.one_test import prepare, sampling_params
from wallperf.driver.peers import kv_storage_bytes, roofline_counts
from wallperf.driver.prefix_cache import hit_rate, scrape
from wallperf.driver.progress import say
from wallperf.driver.salt import salt_plan
from wallperf.sut.backends import backend_spec, create
from wallperf.sut.engine.engine import SamplingParams
from wallperf.sut.quant.fp8 import kv_cache_dtype
from wallperf.sut.scenarios import SERVER, scenario


def concurrency_levels(args) -> list[int]:
    if args.concurrency == "auto":
        try:
            return place_points(args.max_concurrency, args.points)
        except ValueError as e:
            raise ConfigError(None, "--max-concurrency/--points", f"{e}") from None
    try:
        levels = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    except ValueError:
        levels = []
    if not levels or levels[0] < 1:
        raise ConfigError(None, "--concurrency", f"{args.concurrency!r}: expected 'auto' or a comma list of "
                          "positive integers, e.g. 1,2,4,8,16,32,64")
    return levels


def run_concurrency_sweep(args, resolved, wall_from_profile: bool) -> int:
    levels = concurrency_levels(args)
    workers = open_workers(args.client_workers, args.ray_address)
    out = args.out or Path("results") / time.strftime("sweep-%Y%m%d-%H%M%S")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(None, "--out", f"{out} exists and is not an empty folder; choose a new folder")
    remote = backend_spec(resolved.run.backend).weights == "remote"
    if not remote and workers.kind != "local":
        raise ConfigError(None, "--client-workers", f"{args.client_workers!r}: Ray client workers send to "
                          f"endpoints; the backend {resolved.run.backend!r} runs in this process (use --backend "
                          "openai with --endpoint)")
    try:
        if not remote:
            return _sweep(args, resolved, levels, None, out, wall_from_profile)
        # Ray's cluster is reached here, before anything is written: no cluster, no folder.
        with workers:
            return _sweep(args, resolved, levels, workers, out, wall_from_profile)
    except ConfigError:
        if not (out / "sweep.json").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _sweep(args, resolved, levels, workers, out: Path, wall_from_profile: bool) -> int:
    run = resolved.run
    regions, problems = check_points(levels)
    for p in problems:
        say(f"sweep: not as the Endpoints rules ask: {p}")
    loaded, choice, workload = prepare(resolved)
    prompts = [list(map(int, p)) for p in workload.prompts]
    params = sampling_params("performance", resolved.dataset, workload.output_lengths)
    plan = salt_plan(prompts, loaded.tokenizer) if args.salt else None
    server = next((s for s in resolved.scenarios if scenario(s.name) is SERVER), None)
    limits = (server.ttft_ms, server.tpot_ms) if server else (None, None)
    remote = backend_spec(run.backend).weights == "remote"
    # Our engine's points are set against the wall measured now, recorded as the LoadGen sweep records it.
    wall = None if remote else run_wall(resolved.hardware, wall_from_profile, fresh=True)
    if wall is not None:
        say(f"sweep: memory wall {wall.hardware.bandwidth_gbps:g} GB/s ({wall.source}: {wall.how})")
    cost = None if remote else _step_cost(resolved, loaded, choice, wall)
    sweep = {"wallperf_version": wallperf_version(), "kind": "concurrency", "backend": run.backend,
             "model": resolved.model.name, "dtype": choice.dtype, "hardware": resolved.hardware.name,
             "dataset": resolved.dataset.name, "endpoints": list(run.openai.endpoints) if remote else None,
             "client_workers": workers.describe() if remote else None, "official_windows": args.official,
             "salted": args.salt, "limits_ms": {"ttft": limits[0], "tpot": limits[1]},
             "wall": None if wall is None else wall.to_dict(),
             "regions": regions.to_dict() if regions else None, "rules_problems": problems,
             "accuracy_points": sorted(accuracy_points(levels, regions)) if args.accuracy else [],
             "complete": False, "points": [], "front": None}
    started = time.time()
    for i, c in enumerate(levels, 1):
        span = window_s(c, args.official, args.window)
        say(f"sweep: point {i}/{len(levels)}: concurrency {c}, {args.warmup:g} s warm-up + {span:g} s window")
        if remote:
            before = [scrape(u) for u in run.openai.endpoints]
            records, window, lags, per_worker = _remote_point(args, resolved, prompts, params, plan, c, workers,
                                                              span)
            cache = hit_rate(before, [scrape(u) for u in run.openai.endpoints])
            engine = None
        else:
            records, window, engine = _local_point(args, resolved, loaded, prompts, params, plan, c, span)
            lags = per_worker = None
        point = point_figures(records, window, c, limits, lags, args.lag_limit_ms)
        point["counts"] = count_check(records, window, len(prompts), args.min_queries)
        if point["counts"]["reasons"]:
            point["valid"] = False
            point["invalid_reasons"] += point["counts"]["reasons"]
        point["workers"] = per_worker
        point["region"] = regions.region_of(c) if regions else None
        point["prefix_cache"] = cache if remote else None
        point.update(_engine_figures(engine, cost, point))
        if c in sweep["accuracy_points"] and workload.questions:
            point["accuracy"] = _accuracy(resolved, loaded, workload, c)
        write_json_atomic(out / "points" / f"c{c}.json", {"concurrency": c, "window": window, "requests": records})
        sweep["points"].append(point)
        say(f"sweep: {_point_line(point)}")
        write_json_atomic(out / "sweep.json", sweep)
    if cost is not None:
        contexts = [p["mean_decode_context"] for p in sweep["points"] if p.get("mean_decode_context") is not None]
        context = sum(contexts) / len(contexts) if contexts else 0.0
        sweep["front"] = {"context": context, "crossing_batch": cost.crossing_batch(context),
                          "rows": front_rows(cost, context, FRONT_BATCHES)}
    sweep["wall_time_s"] = round(time.time() - started, 1)
    sweep["complete"] = True
    write_json_atomic(out / "sweep.json", sweep)
    write_concurrency_png(out / "pareto.png", [concurrency_series(sweep)])
    (out / "sweep.md").write_text(concurrency_table(sweep), encoding="utf-8")
    say(f"sweep: wrote {out / 'sweep.json'}, {out / 'pareto.png'}, {out / 'sweep.md'}")
    print(json.dumps({"sweep": str(out / "sweep.json"), "points": len(sweep["points"])}))
    return 0


def _remote_point(args, resolved, prompts, params, plan, c, workers, span):
    openai = resolved.run.openai
    key = os.environ.get(openai.api_key_env)
    per = [params[i] if isinstance(params, list) else params for i in range(len(prompts))]
    load = Load(tuple(openai.endpoints), openai.model, tuple(map(tuple, prompts)),
                tuple(p.max_new_tokens for p in per), tuple(p.min_new_tokens for p in per),
                ignore_eos=per[0].ignore_eos, timeout_s=openai.timeout_s,
                headers=(("Authorization", f"Bearer {key}"),) if key else (), salt=plan, seed=resolved.run.seed)
    results = workers.run(load, worker_specs(c, workers.count, args.warmup, span, len(prompts),
                                             timeout_s=openai.timeout_s))
    records = [r for w in results for r in w.requests]
    lags = [x for w in results for x in w.loop_lag_s]
    return records, results[0].window, lags, worker_rows(results, args.lag_limit_ms)


def _local_point(args, resolved, loaded, prompts, params, plan, c, span):
    backend = _backend(resolved, loaded, prompts, params, c)
    # Untimed: a first request builds what the engine builds on first use (kernels, caches).
    answer_all(backend, prompts[:1], SamplingParams(max_new_tokens=2, min_new_tokens=2, ignore_eos=True), 1)
    records, window = closed_loop(backend, prompts, params, c, args.warmup, span, resolved.run.seed, plan,
                                  issue_multiple=len(prompts))
    stats = getattr(backend, "stats", None)
    engine = None
    if stats is not None and not callable(stats):
        engine = {"mean_decode_batch": stats.mean_decode_batch, "mean_decode_context": stats.mean_decode_context}
    if hasattr(backend, "close"):
        backend.close()
    return records, window, engine


def _backend(resolved, loaded, prompts, params, concurrency: int):
    run = resolved.run
    per = params if isinstance(params, list) else [params]
    # Room for a salt ("salt:" and 16 digits) on the longest prompt.
    longest = max(map(len, prompts)) + max(p.max_new_tokens for p in per) + 32
    return create(run.backend, loaded, max_batch=concurrency, max_seq_len=longest, openai=run.openai,
                  kv_dtype=None if not backend_spec(run.backend).native_engine else kv_cache_dtype(resolved.hardware, run.kv_dtype))


def _step_cost(resolved, loaded, choice, wall) -> StepCost | None:
    if getattr(loaded, "model", None) is None:
        return None
    counts = roofline_counts(loaded, None, kv_storage_bytes(loaded, kv_cache_dtype(resolved.hardware,
                                                                                   resolved.run.kv_dtype)))
    return step_cost(model_shape(resolved, loaded), wall.hardware, choice.dtype, **counts)


def _engine_figures(engine: dict | None, cost: StepCost | None, point: dict) -> dict:
    """The engine's decode batch and context, and against the wall: decode MBU and MFU at
    TPOT p50, and where the point sits against the roofline's front."""
    fig = {"mean_decode_batch": None, "mean_decode_context": None, "decode_mbu": None, "decode_mfu": None,
           "front_share": None}
    if not engine:
        return fig
    batch, context = engine["mean_decode_batch"], engine["mean_decode_context"]
    fig.update(mean_decode_batch=batch, mean_decode_context=context)
    tpot = (point.get("tpot_ms") or {}).get("p50")
    if cost is None or not batch or context is None or not tpot:
        return fig
    fig["decode_mbu"] = cost.memory_floor_s(max(1, round(batch)), round(context)) / (tpot / 1e3)
    fig["decode_mfu"] = decode_mfu(cost, batch, context, tpot / 1e3)
    fig["untrusted_reasons"] = utilization_problems(fig)
    if point["system_tokens_per_second"] and point["tokens_per_second_per_user"]:
        placed = place_on_front(cost, context, point["system_tokens_per_second"], point["tokens_per_second_per_user"])
        fig["front_share"] = placed.get("front_share")
    return fig


def _accuracy(resolved, loaded, workload, concurrency: int) -> dict:
    """MMLU exact match (the answer letter parsed from the text) over every question once."""
    params = sampling_params("accuracy", resolved.dataset)
    backend = _backend(resolved, loaded, workload.prompts, params, concurrency)
    try:
        answers = answer_all(backend, workload.prompts, params, concurrency)
    finally:
        if hasattr(backend, "close"):
            backend.close()
    letters = [parse_answer_letter(loaded.tokenizer.decode(a)) for a in answers]
    right = sum(letter == q.answer for letter, q in zip(letters, workload.questions))
    return {"questions": len(letters), "exact_match": right / len(letters),
            "unparsed": sum(letter is None for letter in letters), "concurrency": concurrency}


def _f(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _point_line(p: dict) -> str:
    ck = p["client"]
    return (f"concurrency {p['concurrency']}: {_f(p['system_tokens_per_second'], '.1f')} tok/s, "
            f"{_f(p['tokens_per_second_per_user'], '.2f')} tok/s per user, TTFT p90 "
            f"{_f((p['ttft_ms'] or {}).get('p90'), '.0f')} ms, achieved concurrency "
            f"{ck['achieved_concurrency']:.2f}, send lag p99 {_f((ck['send_lag_ms'] or {}).get('p99'), '.2f')} ms, "
            + ("valid" if p["valid"] else "INVALID: " + "; ".join(p["invalid_reasons"])))
