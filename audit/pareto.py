"""The Pareto view of serving: tokens/s per user against tokens/s of the system,
each measured point beside the roofline's front (harness.hardware.front).

`sweep_point` turns one Server run record into the sweep table's row; the
chart draws one series per backend (a sweep is one backend) and each series'
predicted front at its mean decode context, with the batch where the memory
floor gives way to the compute floor marked on it.
"""
from __future__ import annotations

import json
from pathlib import Path

from wallperf.harness.config import ConfigError
from wallperf.harness.hardware.front import StepCost, decode_mfu, front_rows, place_on_front
from wallperf.harness.hardware.roofline import utilization_problems
from wallperf.harness.loadgen.results import write_figure_atomic

# Batches the predicted front is drawn through.
FRONT_BATCHES = tuple(range(1, 17)) + (20, 24, 32, 48, 64, 96, 128, 192, 256)


def _p(metrics: dict, key: str, p: str):
    return (metrics.get(key) or {}).get(p)


def sweep_point(target_qps: float, record: dict, cost: StepCost | None) -> dict:
    """One point of a sweep: LoadGen's throughput and latencies, goodput, the engine's
    decode batch and context, and against `cost` (the sweep's wall): decode MBU and MFU
    at TPOT p50 and the distance to the front."""
    m = record.get("metrics") or {}
    engine = record.get("engine") or {}
    good = record.get("goodput") or {}
    tps, tpot_p50 = m.get("tokens_per_second"), _p(m, "tpot_ms", "p50")
    per_user = 1e3 / tpot_p50 if tpot_p50 else None
    batch, context = engine.get("mean_decode_batch"), engine.get("mean_decode_context")
    point = {
        "target_qps": target_qps,
        "samples_per_second": m.get("samples_per_second"),
        "tokens_per_second": tps,
        "tokens_per_second_per_user": per_user,
        **{f"{name}_ms_{p}": _p(m, f"{name}_ms", p) for name in ("ttft", "tpot") for p in ("p50", "p90", "p99")},
        "goodput_share": good.get("share"),
        "goodput_tokens_per_second": good.get("tokens_per_second"),
        "queries": good.get("queries"),
        "mean_decode_batch": batch,
        "mean_decode_context": context,
        "decode_mbu": None,
        "decode_mfu": None,
        "untrusted_reasons": [],
        "front_batch": None, "front_system_tokens_per_second": None, "front_share": None,
        "valid": record.get("valid"),
        "log_dir": record.get("log_dir"),
    }
    if cost is not None and batch and context is not None and tpot_p50:
        # The run's own decode MBU reads one step at its batch and context, both rounded: so here.
        point["decode_mbu"] = cost.memory_floor_s(max(1, round(batch)), round(context)) / (tpot_p50 / 1e3)
        point["decode_mfu"] = decode_mfu(cost, batch, context, tpot_p50 / 1e3)
        point["untrusted_reasons"] = utilization_problems(point)
        if tps and per_user:
            point.update(place_on_front(cost, context, tps, per_user))
    return point


def step_cost_of(record: dict) -> StepCost | None:
    data = (record.get("roofline") or {}).get("step_cost")
    return StepCost(**data) if isinstance(data, dict) else None


def series_front(points: list[dict], cost: StepCost) -> dict:
    """The front at the series' mean decode context (its points' average)."""
    contexts = [p["mean_decode_context"] for p in points if p.get("mean_decode_context") is not None]
    context = sum(contexts) / len(contexts) if contexts else 0.0
    return {"context": context, "crossing_batch": cost.crossing_batch(context),
            "rows": front_rows(cost, context, FRONT_BATCHES)}


def series_of(sweep: dict) -> dict:
    """A sweep as one series of the chart, labelled by backend, weight format and model."""
    label = sweep.get("backend") or "?"
    if sweep.get("weight_format"):
        label += f" ({sweep['weight_format']})"
    return {"label": f"{label}, {sweep.get('model', '?')}", "points": sweep.get("points") or [],
            "front": sweep.get("front")}


def read_sweep(path: Path) -> dict:
    """A sweep.json (or the folder holding it), checked for shape."""
    path = path / "sweep.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(path, None, "sweep.json not found; give a folder written by `wallperf sweep`")
    try:
        sweep = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(path, None, f"not a sweep.json: {e}") from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("points"), list):
        raise ConfigError(path, "points", "not a wallperf sweep.json: expected an object with a 'points' list")
    return sweep


def pareto_figure(series: list[dict]):
    """Per-user tokens/s (y) against system tokens/s (x), log-log: each series' points
    (labelled with their target QPS) and its predicted front, dashed."""
    from wallperf.audit.charts import chart_text, new_figure

    fig = new_figure(8, 4.2 + 0.14 * 2 * len(series))
    ax = fig.add_subplot()
    for i, s in enumerate(series):
        pts = [p for p in s["points"] if p.get("tokens_per_second") and p.get("tokens_per_second_per_user")]
        line, = ax.plot([p["tokens_per_second"] for p in pts], [p["tokens_per_second_per_user"] for p in pts],
                        marker="o", label=chart_text(f"measured: {s['label']}"))
        for p in pts:
            ax.annotate(f"{p['target_qps']:g} QPS", (p["tokens_per_second"], p["tokens_per_second_per_user"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = s.get("front")
        if front:
            rows = front["rows"]
            ax.plot([r["system_tokens_per_second"] for r in rows], [r["per_user_tokens_per_second"] for r in rows],
                    linestyle="--", color=line.get_color(), alpha=0.8,
                    label=chart_text(f"roofline front: {s['label']}, context {front['context']:.0f}"))
            crossing = front.get("crossing_batch")
            if crossing:
                cross = min(rows, key=lambda r: abs(r["batch"] - crossing))
                ax.scatter([cross["system_tokens_per_second"]], [cross["per_user_tokens_per_second"]], marker="D",
                           color=line.get_color(), zorder=3,
                           label=chart_text(f"memory floor meets compute floor: batch {crossing:.0f}"))
    return _log_log(fig, ax, "system tokens/s", "tokens/s per user (1 / TPOT p50)",
                    "Pareto front: measured against the roofline")


def _log_log(fig, ax, xlabel: str, ylabel: str, title: str):
    """Both Pareto charts' finish: log axes, labels, grid and the shared legend."""
    from wallperf.audit.charts import legend

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    legend(fig, *ax.get_legend_handles_labels())
    return fig


def write_pareto_png(path: Path, series: list[dict]) -> None:
    write_figure_atomic(path, pareto_figure(series), metadata={"Software": None})


def loadgen_series(sweep: dict) -> dict:
    """A LoadGen Server sweep on the Endpoints axes: tokens/s per user as 1000 / TPOT p90,
    each point labelled by its target QPS, so the two load models read side by side."""
    points = [{"system_tokens_per_second": p.get("tokens_per_second"),
               "tokens_per_second_per_user": 1e3 / p["tpot_ms_p90"] if p.get("tpot_ms_p90") else None,
               "label": f"{p['target_qps']:g} QPS", "valid": p.get("valid")} for p in sweep.get("points") or []]
    s = series_of(sweep)
    return {**s, "label": f"LoadGen Server: {s['label']}", "points": points}


def concurrency_figure(series: list[dict]):
    """The MLPerf Endpoints chart: system tokens/s (y) against tokens/s per user (x), log-log,
    each series as the rules' step function, invalid points hollow, beside its roofline front
    (dashed) where it has one. A point's throughput is held from it toward lower per-user
    speeds, down to the next point's (as the rules hold the last value from one concurrency to
    the next higher): the curve never shows a throughput at a per-user speed no point reached."""
    from wallperf.audit.charts import chart_text, new_figure

    fig = new_figure(8, 4.4 + 0.14 * 2 * len(series))
    ax = fig.add_subplot()
    for s in series:
        pts = sorted((p for p in s["points"] if p.get("system_tokens_per_second")
                      and p.get("tokens_per_second_per_user")), key=lambda p: p["tokens_per_second_per_user"])
        if not pts:
            continue
        xs = [p["tokens_per_second_per_user"] for p in pts]
        ys = [p["system_tokens_per_second"] for p in pts]
        line, = ax.step(xs, ys, where="pre", label=chart_text(f"measured (step function): {s['label']}"))
        color = line.get_color()
        for p, x, y in zip(pts, xs, ys):
            ax.scatter([x], [y], color=color if p.get("valid") else "none", edgecolors=color, zorder=3)
            ax.annotate(p.get("label") or f"c={p['concurrency']}", (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        front = s.get("front")
        if front:
            rows = front["rows"]
            ax.plot([r["per_user_tokens_per_second"] for r in rows], [r["system_tokens_per_second"] for r in rows],
                    linestyle="--", color=color, alpha=0.8,
                    label=chart_text(f"roofline front: {s['label']}, context {front['context']:.0f}"))
    return _log_log(fig, ax, "tokens/s per user (1000 / TPOT p90)", "system tokens/s",
                    "Pareto curve at fixed concurrency (hollow: invalid point)")


def write_concurrency_png(path: Path, series: list[dict]) -> None:
    write_figure_atomic(path, concurrency_figure(series), metadata={"Software": None})


def concurrency_series(sweep: dict) -> dict:
    label = f"{sweep.get('backend', '?')}, {sweep.get('model', '?')}"
    if sweep.get("endpoints"):
        label += f", {len(sweep['endpoints'])} replica(s)"
    return {"label": label, "points": sweep.get("points") or [], "front": sweep.get("front")}


def read_concurrency_sweep(path: Path) -> dict | None:
    """The sweep.json of a `wallperf sweep --concurrency` folder (or the file), or None when
    `path` is not one (a LoadGen run or sweep folder)."""
    path = path / "sweep.json" if path.is_dir() else path
    if path.name != "sweep.json" or not path.is_file():
        return None
    sweep = read_sweep(path)
    return sweep if sweep.get("kind") == "concurrency" else None


def _fmt(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def concurrency_table(sweep: dict) -> str:
    """The sweep as a Markdown table, one row a point; over several replicas, each one's
    requests (sent/completed/failed) in a column of its own before `valid`."""
    replicas = len(sweep.get("endpoints") or []) > 1
    lines = [f"# Concurrency sweep: {concurrency_series(sweep)['label']}", "",
             "| concurrency | region | system tok/s | tok/s per user (1000/TPOT p90) | TTFT p50/p90/p99 ms | "
             "goodput | decode batch | MBU | MFU | achieved conc. | send lag p99 ms | loop lag p99 ms | "
             "accuracy | prefix-cache hits | " + ("per replica: sent/completed/failed | " if replicas else "")
             + "valid |", "|" + "---|" * (15 + replicas)]
    for p in sweep["points"]:
        t, ck = p.get("ttft_ms") or {}, p["client"]
        acc = p.get("accuracy")
        cells = [str(p["concurrency"]), p.get("region") or "-", _fmt(p["system_tokens_per_second"], ".1f"),
                 _fmt(p["tokens_per_second_per_user"], ".2f"),
                 "/".join(_fmt(t.get(k), ".0f") for k in ("p50", "p90", "p99")),
                 _fmt(p["goodput"]["share"], ".0%"), _fmt(p.get("mean_decode_batch"), ".1f"),
                 _fmt(p.get("decode_mbu"), ".0%") + ("!" if p.get("untrusted_reasons") else ""),
                 _fmt(p.get("decode_mfu"), ".1%") + ("!" if p.get("untrusted_reasons") else ""),
                 f"{ck['achieved_concurrency']:.2f}", _fmt((ck["send_lag_ms"] or {}).get("p99"), ".2f"),
                 _fmt((ck["loop_lag_ms"] or {}).get("p99"), ".2f"), _fmt(acc and acc["exact_match"], ".1%"),
                 _cache(p.get("prefix_cache")), "yes" if p["valid"] else "no: " + "; ".join(p["invalid_reasons"])]
        if replicas:
            cells.insert(-1, _per_replica(p.get("replicas") or {}))
        lines.append("| " + " | ".join(cells) + " |")
    untrusted = [f"! concurrency {p['concurrency']}: NOT TRUSTED: " + "; ".join(p["untrusted_reasons"])
                 for p in sweep["points"] if p.get("untrusted_reasons")]
    lines += ["", *untrusted] if untrusted else []
    if sweep.get("rules_problems"):
        lines += ["", "Not as the Endpoints rules ask: " + "; ".join(sweep["rules_problems"])]
    return "\n".join(lines) + "\n"


def _cache(cache: dict | None) -> str:
    if cache is None:
        return "-"
    return _fmt(cache["hit_rate"], ".0%") if cache["exposed"] else "not exposed"


def _per_replica(replicas: dict) -> str:
    return "; ".join(f"{url}: {r['requests']}/{r['completed']}/{r['failures']}" for url, r in replicas.items())
