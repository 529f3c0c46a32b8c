"""`wallperf compare` over a `wallperf sweep --concurrency` folder beside a LoadGen
sweep: the concurrency sweep's table, the Endpoints chart with both series, and
its points in --json."""
import json

from wallperf.audit.endpoints import point_figures
from wallperf.audit.pareto import concurrency_table, series_front, sweep_point
from wallperf.cli import main

from test_pareto import COST, record  # noqa: E402  (tests/audit is on sys.path under pytest)


def concurrency_sweep(tmp_path):
    points = []
    for c in (1, 4):
        # c users, each answering 11 tokens in 1 s after a 0.1 s TTFT, back to back in a 3 s window.
        reqs = [{"scheduled": t, "sent": t, "first": t + 0.1, "last": t + 1.0, "done": t + 1.0, "tokens": 11,
                 "tokens_in_window": 11, "error": None, "url": "http://a"} for t in (0.0, 1.0, 2.0) for _ in range(c)]
        points.append({**point_figures(reqs, (0.0, 3.0), c), "region": "ultra_low"})
    sweep = {"kind": "concurrency", "backend": "openai", "model": "smollm2-135m", "endpoints": ["http://a"],
             "points": points, "front": None}
    d = tmp_path / "conc"
    d.mkdir()
    (d / "sweep.json").write_text(json.dumps(sweep))
    return d, sweep


def loadgen_sweep(tmp_path):
    points = [sweep_point(q, record(tps=100 * q, tpot_p50=10 * q), COST) for q in (1, 2)]
    sweep = {"backend": "native", "model": "smollm2-135m", "points": points, "front": series_front(points, COST)}
    d = tmp_path / "loadgen"
    d.mkdir()
    runs = [{**record(tps=100 * q), "backend": "native", "sweep_target_qps": q} for q in (1, 2)]
    (d / "results.json").write_text(json.dumps({"runs": runs, "sweep": sweep}))
    return d


def test_compare_overlays_a_concurrency_sweep_and_a_loadgen_sweep(tmp_path, capsys):
    conc, sweep = concurrency_sweep(tmp_path)
    png = tmp_path / "both.png"
    assert main(["compare", str(conc), str(loadgen_sweep(tmp_path)), "--pareto", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "Performance" in out and concurrency_table(sweep) in out
    # 11 tokens a second per user: 1000 / TPOT p90 = 1000 / 90 ms.
    assert "| 4 | ultra_low | 44.0 | 11.11 |" in out


def test_compare_json_carries_the_concurrency_points(tmp_path, capsys):
    conc, _ = concurrency_sweep(tmp_path)
    assert main(["compare", str(conc), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["concurrency"] for r in rows] == [1, 4]
    assert all(r["concurrency_sweep"].startswith("openai, smollm2-135m") for r in rows)
