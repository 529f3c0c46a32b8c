"""`wallperf sweep`: Server (or Interactive) target QPS from underload to overload,
one LoadGen test per point, each a `wallperf run` in a fresh process.

A fresh process per point is what MLPerf conformance asks (LoadGen applies
mlperf.conf only on a process's first test), and it keeps one point's engine
state (caches, heap, OpenMP pool) out of the next one's figures. Every option
of `wallperf run` the sweep does not own is passed to each point unchanged, so
peers (`--backend llamacpp`, `--endpoint`) sweep the same points.

The sweep measures the machine's wall once, at its start and afresh
(harness.hardware.wall: never the last hour's measurement, which a busy hour
leaves low), records it as `wall` in sweep.json and gives every run (the
calibration and each point) that one wall in OUT/sweep/wall.json (`wallperf run
--wall-file`), so every point and the front share one yardstick and each run's
`hardware_wall` says where its figures came from (`given_by`). With
--wall-from-profile nothing is measured: every run takes the profile's figures.

`--qps auto` then runs an Offline test with the same options and takes its
samples/s as the peak: the points are AUTO_FACTORS of it. The output folder:

    OUT/sweep/wall.json         the wall every run is given (not with --wall-from-profile)
    OUT/sweep/calibration/      the Offline run (--qps auto only)
    OUT/sweep/qps_<x>/          each point's run: LoadGen's logs and results.json (qps_<x>.log: its output)
    OUT/sweep.json              the wall, the table (audit.pareto.sweep_point per point) and the front
    OUT/results.json            every point's run record, for `wallperf report` and `compare`
    OUT/pareto.png              measured points beside the roofline's front

Ctrl-C or SIGTERM ends the point in progress (its `wallperf run` runs in a session
of its own and is told with SIGTERM, so it ends its own test process:
wallperf.driver.interrupt, nested), then sweep.json, results.json, pareto.png and
the reports are written from the points that finished, `complete: false`, and the
sweep exits 128 + the signal.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from wallperf.audit.pareto import series_front, series_of, step_cost_of, sweep_point, write_pareto_png
from wallperf.audit.report import write_run_reports
from wallperf.harness.config import ConfigError, HardwareConfig, positive_list
from wallperf.driver.concurrency_points import add_concurrency_options
from wallperf.driver.find_peak import qps_label
from wallperf.driver.interrupt import Interrupts, TestInterrupted
from wallperf.driver.progress import say
from wallperf.sut.scenarios import OFFLINE, SCENARIOS, SERVER
from wallperf.harness.hardware.wall import Wall, run_wall, write_wall
from wallperf.harness.loadgen.results import wallperf_version, write_json_atomic

AUTO_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
SWEEP_SCENARIOS = tuple(s.name for s in SCENARIOS.values() if s.server_like)
# `wallperf run` options a sweep sets itself for every point.
_OWNED = ("--scenario", "--mode", "--target-qps", "--out", "--find-peak", "--peak-range", "--peak-tolerance",
          "--peak-max-runs", "--no-progress", "--wall-file")


def _qps_list(text: str):
    if text == "auto":
        return "auto"
    try:
        return sorted(set(positive_list(float)(text)))
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}: expected 'auto' or a comma list of QPS, e.g. 0.5,1,2") from None


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep", help="Server target QPS from underload to overload: the Pareto front against the roofline",
        description="Run one Server (or Interactive) LoadGen test per target QPS, each a `wallperf run` in a "
                    "fresh process, and tabulate per point: tokens/s of the system and per user (1/TPOT p50), "
                    "TTFT and TPOT p50/p90/p99, goodput (the share of queries within the scenario's TTFT and "
                    "TPOT limits, from the SUT's own per-query timing, and the tokens/s they delivered), the "
                    "mean decode batch and context, decode MBU and MFU, and how far each point sits from the "
                    "roofline's Pareto front. Any other `wallperf run` option (--model, --backend, --dataset, "
                    "--duration, --min-queries, --max-batch, ...) is passed to every point. Writes "
                    "OUT/sweep/qps_<x>/, OUT/sweep.json, OUT/results.json, OUT/pareto.png and the reports.")
    p.add_argument("--qps", type=_qps_list, help="comma list of target QPS, or 'auto': an "
                   "Offline calibration run, then " + ", ".join(f"{f:g}" for f in AUTO_FACTORS) +
                   " x its samples/s")
    p.add_argument("--scenario", choices=SWEEP_SCENARIOS, default=SERVER.name, help="default Server")
    p.add_argument("--out", type=Path, help="output folder (default: results/sweep-<timestamp>); must be new")
    add_concurrency_options(p)
    return p


def run_sweep(args, run_args: list[str], hardware: HardwareConfig, wall_from_profile: bool = False) -> int:
    """The sweep of `wallperf sweep` ARGS, `run_args` (already parsed as `wallperf run`'s) passed to each
    point, on `hardware` (the profile the points run on), its wall measured here unless `wall_from_profile`."""
    owned = [a for a in run_args if a.split("=")[0] in _OWNED]
    if owned:
        raise ConfigError("command line", owned[0], "the sweep sets this for every point itself; leave it out")
    # --min-queries is also the concurrency mode's, so the sweep's parser takes it: here it is LoadGen's, each run's.
    if args.min_queries is not None:
        run_args = [*run_args, "--min-queries", str(args.min_queries)]
    out = args.out or Path("results") / time.strftime("sweep-%Y%m%d-%H%M%S")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(None, "--out", f"{out} exists and is not an empty folder; choose a new folder")
    try:
        with Interrupts(nested=True) as interrupts:
            return _sweep(args, run_args, out, hardware, wall_from_profile, interrupts)
    except TestInterrupted as e:
        say(f"sweep: {e}; the finished points are in {out / 'sweep.json'} (complete: false)")
        return 128 + e.signum
    except ConfigError:
        # Refused before any point ran: leave nothing behind.
        if not (out / "sweep.json").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _sweep(args, run_args: list[str], out: Path, hardware: HardwareConfig, wall_from_profile: bool,
           interrupts: Interrupts) -> int:
    wall = run_wall(hardware, from_profile=wall_from_profile, fresh=True)
    say(f"sweep: memory wall {wall.hardware.bandwidth_gbps:g} GB/s ({wall.source}: {wall.how}), for every run")
    # Each run is given this wall; with --wall-from-profile (passed through) each takes the same profile's.
    given = run_args
    if not wall_from_profile:
        wall_file = (out / "sweep" / "wall.json").resolve()
        write_wall(wall_file, wall)
        given = [*run_args, "--wall-file", str(wall_file)]
    calibration = None
    qps = args.qps
    if qps == "auto":
        calibration = _calibrate(given, out / "sweep" / "calibration", wall, interrupts)
        peak = calibration["samples_per_second"]
        qps = [float(f"{f * peak:.3g}") for f in AUTO_FACTORS]
        say(f"sweep: calibrated peak {peak:.3g} samples/s (Offline); points {', '.join(f'{q:g}' for q in qps)} QPS")
    sweep = {"wallperf_version": wallperf_version(), "scenario": args.scenario, "run_args": run_args,
             "wall": wall.to_dict(), "calibration": calibration, "complete": False, "points": [], "front": None}
    results = {"wallperf_version": wallperf_version(), "complete": False, "runs": [], "sweep": sweep}
    started = time.time()
    try:
        for i, q in enumerate(qps, 1):
            say(f"sweep: point {i}/{len(qps)}: {args.scenario} at {q:g} QPS")
            record, run_results = _point(given, args.scenario, q, out / "sweep" / qps_label(q), wall, interrupts)
            point = sweep_point(q, record, step_cost_of(record))
            sweep["points"].append(point)
            results["runs"].append({**record, "sweep_target_qps": q})
            results.setdefault("config", run_results.get("config"))
            sweep.update(_identity(record, run_results))
            say(f"sweep: {_point_line(point)}")
            write_json_atomic(out / "sweep.json", sweep)
            write_json_atomic(out / "results.json", results)
    except TestInterrupted:
        results["wall_time_s"] = round(time.time() - started, 1)
        if sweep["points"]:
            finish_sweep(out, sweep, results, complete=False)
        raise
    results["wall_time_s"] = round(time.time() - started, 1)
    finish_sweep(out, sweep, results)
    print(json.dumps({"sweep": str(out / "sweep.json"), "points": len(sweep["points"])}))
    return 0


def finish_sweep(out: Path, sweep: dict, results: dict, complete: bool = True) -> None:
    """The front (every point's run had the sweep's one wall, so any point's step cost
    draws it); then sweep.json, results.json, pareto.png and the reports (`complete`
    false: of the points an interrupted sweep finished)."""
    cost = next((c for c in map(step_cost_of, results["runs"]) if c is not None), None)
    if cost is not None:
        sweep["front"] = series_front(sweep["points"], cost)
    sweep["complete"] = results["complete"] = complete
    results["sweep"] = sweep
    write_json_atomic(out / "sweep.json", sweep)
    write_json_atomic(out / "results.json", results)
    write_pareto_png(out / "pareto.png", [series_of(sweep)])
    html, md = write_run_reports(out)
    say(f"sweep: wrote {out / 'sweep.json'}, {out / 'pareto.png'}, {html}, {md}")


def _identity(record: dict, run_results: dict) -> dict:
    dataset = (run_results.get("dataset") or {}).get("name")
    return {"backend": record.get("backend"), "model": record.get("model"), "hardware": record.get("hardware"),
            "dtype": record.get("dtype"), "weight_format": record.get("weight_format"), "dataset": dataset,
            "limits_ms": {k: (record.get("goodput") or {}).get(f"{k}_limit_ms") for k in ("ttft", "tpot")}}


def _point_line(p: dict) -> str:
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)
    return (f"{p['target_qps']:g} QPS: {f(p['tokens_per_second'], '.1f')} tok/s, "
            f"{f(p['tokens_per_second_per_user'], '.1f')} tok/s per user, TTFT p99 {f(p['ttft_ms_p99'], '.0f')} ms, "
            f"TPOT p99 {f(p['tpot_ms_p99'], '.0f')} ms, goodput {f(p['goodput_share'], '.0%')}, "
            f"decode batch {f(p['mean_decode_batch'], '.1f')}, decode MBU {f(p['decode_mbu'], '.0%')}, "
            f"MFU {f(p['decode_mfu'], '.0%')}, {f(p['front_share'], '.0%')} of the front"
            + ("; NOT TRUSTED: " + "; ".join(p["untrusted_reasons"]) if p.get("untrusted_reasons") else ""))


def _child(run_args: list[str], extra: list[str], out: Path, interrupts: Interrupts) -> dict:
    """One `wallperf run` in a fresh process writing into `out`; its results.json.
    What it prints goes to `out`.log beside it. It runs in a session of its own: a
    signal reaches it through `interrupts` only, as SIGTERM, which it answers by
    ending its own test process (a SIGKILL would orphan that process)."""
    interrupts.check()
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_name(out.name + ".log")
    cmd = [sys.executable, "-m", "wallperf.cli", "run", *run_args, *extra, "--mode", "performance",
           "--out", str(out), "--no-progress"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                start_new_session=True)
        with interrupts.guarding(proc):
            proc.wait()
    interrupts.check()
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-5:])
        if proc.returncode == 2:
            raise ConfigError("command line", None, f"`wallperf run` refused the options:\n{tail}")
        raise RuntimeError(f"`wallperf run` failed (exit {proc.returncode}); see {log_path}:\n{tail}")
    return json.loads((out / "results.json").read_text())


def _performance_record(results: dict, scenario: str, out: Path) -> dict:
    records = [r for r in results.get("runs", []) if r.get("scenario") == scenario and r.get("mode") == "performance"]
    if not records:
        raise RuntimeError(f"{out / 'results.json'} has no {scenario} performance record")
    return records[0]


def _same_wall(results: dict, wall: Wall, out: Path) -> dict:
    """`results` (a run's), refused unless the run was set against the sweep's wall."""
    def figures(d):
        return {k: v for k, v in (d or {}).items() if k != "given_by"}
    if figures(results.get("hardware_wall")) != figures(wall.to_dict()):
        raise RuntimeError(f"{out / 'results.json'}: the run was set against another wall than the sweep's "
                           f"({results.get('hardware_wall')} against {wall.to_dict()})")
    return results


def _calibrate(run_args: list[str], out: Path, wall: Wall, interrupts: Interrupts) -> dict:
    say("sweep: calibrating the peak with an Offline run")
    results = _same_wall(_child(run_args, ["--scenario", OFFLINE.name], out, interrupts), wall, out)
    record = _performance_record(results, OFFLINE.name, out)
    sps = record["metrics"]["samples_per_second"]
    if not sps:
        raise RuntimeError(f"the Offline calibration run logged no samples/s; see {out}")
    return {"samples_per_second": sps, "tokens_per_second": record["metrics"]["tokens_per_second"],
            "log_dir": record.get("log_dir")}


def _point(run_args: list[str], scenario: str, qps: float, out: Path, wall: Wall,
           interrupts: Interrupts) -> tuple[dict, dict]:
    results = _same_wall(_child(run_args, ["--scenario", scenario, "--target-qps", f"{qps:g}"], out, interrupts),
                         wall, out)
    return _performance_record(results, scenario, out), results
