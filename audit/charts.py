"""The report's charts, drawn with matplotlib's Agg canvas (no pyplot, no display)
and embedded as base64 PNGs: the roofline with the measured runs under it, and
TTFT/TPOT against the scenario's limits, each over a list of audit.report.RunFolder.
audit.pareto draws the Pareto front with the same helpers.
"""
from __future__ import annotations

import base64
import io

from wallperf.audit.perf_audit import LATENCY_SCENARIOS, run_label, scenario_config

PERCENTILES = ("p50", "p90", "p99")


def roof_of(run: dict, results: dict) -> tuple[str, float, float | None]:
    """(hardware, GB/s, peak TFLOP/s) a run's roofline was drawn against. The peak is
    achieved TFLOP/s / MFU where the record has MFU, else the config's profile peak."""
    rf = run["roofline"]
    if rf.get("mfu"):
        # To 3 digits, so the runs of one profile share one roof despite rounding in the quotient.
        peak = float(f"{rf['achieved_tflops'] / rf['mfu']:.3g}")
    else:
        peaks = ((results.get("config") or {}).get("hardware") or {}).get("peak_tflops") or {}
        peak = peaks.get(rf.get("compute_dtype") or run.get("dtype"))
    return str(rf.get("hardware", "?")), rf["peak_bandwidth_gbps"], peak


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def new_figure(width: float, height: float):
    # The Agg canvas without pyplot: no global state, no display, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def chart_text(text: str, limit: int = 90) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "\u2026"
    return text.replace("$", r"\$")  # `$` would start mathtext, and a model name is not a formula


def legend(fig, handles, labels) -> None:
    # One entry a line below the axes: labels are long, and a comparison has many.
    fig.legend(handles, labels, fontsize=7, loc="outside lower left", ncols=1, frameon=False)


ROOF_STYLES = ("-", "--", "-.", ":")
FOLDER_MARKERS = ("x", "+", "^", "s", "D", "v", "o")


def roofline_chart(folders: list) -> str | None:
    """Log-log roofline: each profile's memory-bound line and compute ceiling, runs at their
    arithmetic intensity and achieved TFLOP/s (one marker shape per folder)."""
    import numpy as np

    points = [(i, f, run) for i, f in enumerate(folders) for run in f.results["runs"]
              if isinstance(run.get("roofline"), dict) and run["roofline"].get("arithmetic_intensity")
              and run["roofline"].get("achieved_tflops") and run["roofline"].get("peak_bandwidth_gbps")]
    if not points:
        return None
    roofs = sorted({roof_of(run, f.results) for _, f, run in points}, key=lambda r: (r[0], r[1], r[2] or 0))
    xs = [run["roofline"]["arithmetic_intensity"] for _, _, run in points]
    xs += [peak * 1e3 / bw for _, bw, peak in roofs if peak]
    grid = np.geomspace(min(xs) / 10, max(xs) * 10, 256)
    fig = new_figure(8, 3.8 + 0.14 * (len(roofs) + len(points)))
    ax = fig.add_subplot()
    for (name, bw, peak), style in zip(roofs, ROOF_STYLES * len(roofs)):
        roof = bw / 1e3 * grid if peak is None else np.minimum(peak, bw / 1e3 * grid)
        ceiling = "no compute peak known" if peak is None else f"{peak:g} TFLOP/s"
        ax.loglog(grid, roof, color="0.2", linestyle=style, linewidth=1.5,
                  label=chart_text(f"roof of {name}: {bw:g} GB/s, {ceiling}"))
    for i, f, run in points:
        rf = run["roofline"]
        ax.scatter([rf["arithmetic_intensity"]], [rf["achieved_tflops"]], marker=FOLDER_MARKERS[i % 7], s=60,
                   zorder=3, label=chart_text(f"{f.label}: {run_label(0, run)}, batch {rf.get('batch', '?')}"))
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title("measured runs under the roofline")
    ax.grid(True, which="major", alpha=0.3)
    legend(fig, *ax.get_legend_handles_labels())
    return png(fig)


def latency_chart(folders: list) -> str | None:
    """TTFT and TPOT at p50/p90/p99 per run, with the Server/Interactive limits as dashed lines."""
    series = [(i, f, run) for i, f in enumerate(folders) for run in f.results["runs"]
              if isinstance((run.get("metrics") or {}).get("ttft_ms"), dict)]
    if not series:
        return None
    fig = new_figure(8, 3.2 + 0.14 * len(series))
    axes = fig.subplots(1, 2)
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms"), ("TTFT", "TPOT")):
        for i, f, run in series:
            values = [(p, (run["metrics"].get(key) or {}).get(p)) for p in PERCENTILES]
            values = [(p, v) for p, v in values if isinstance(v, (int, float))]
            label = chart_text(f"{f.label}: {run.get('scenario') or '?'}")
            line, = ax.plot([p for p, _ in values], [v for _, v in values], marker=FOLDER_MARKERS[i % 7],
                            label=label)
            limit = scenario_config(f.results, run.get("scenario")).get(key)
            if run.get("scenario") in LATENCY_SCENARIOS and isinstance(limit, (int, float)):
                ax.axhline(limit, color=line.get_color(), linestyle="--", linewidth=1)
        ax.set_title(f"{title} ms (dashed: the scenario's limit)", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    legend(fig, *axes[0].get_legend_handles_labels())
    return png(fig)


AUDIT_MARKERS = {"reference": "o", "candidate": "s", "baseline": "^"}


def accuracy_wall_chart(audit: dict) -> str | None:
    """Accuracy (with its 95% CI) against memory-wall tokens/s, one point per model of an
    audit (`wallperf audit --json`'s `models`): what each format or model size buys."""
    models = audit.get("models")
    if not isinstance(models, dict):
        return None
    points = [(role, m) for role, m in models.items() if isinstance(m, dict)
              and all(isinstance(m.get(k), (int, float)) for k in ("accuracy", "memory_wall_tokens_per_second"))]
    if not points:
        return None
    fig = new_figure(6.5, 3.6 + 0.14 * len(points))
    ax = fig.add_subplot()
    for role, m in points:
        ci = m.get("accuracy_ci95") or [m["accuracy"]] * 2
        acc = 100 * m["accuracy"]
        ax.errorbar([m["memory_wall_tokens_per_second"]], [acc], yerr=[[acc - 100 * ci[0]], [100 * ci[1] - acc]],
                    marker=AUDIT_MARKERS.get(role, "x"), capsize=4, linestyle="none",
                    label=chart_text(f"{role}: {m.get('spec', '?')}, {acc:.1f}%"))
    chance = audit.get("chance")
    if isinstance(chance, (int, float)):
        ax.axhline(100 * chance, color="0.5", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel(f"memory-wall tokens/s at batch 1 ({audit.get('hardware', '?')})")
    ax.set_ylabel("MMLU accuracy (%), 95% CI")
    ax.set_title("accuracy against the memory wall")
    ax.grid(True, alpha=0.3)
    legend(fig, *ax.get_legend_handles_labels())
    return png(fig)
