"""The sweep table's row from a run record, and the Pareto chart."""
import errno
import json
import os
from pathlib import Path

import pytest

from wallperf.audit.pareto import read_sweep, series_front, sweep_point, write_pareto_png
from wallperf.harness.config import ConfigError
from wallperf.harness.hardware.front import StepCost
from wallperf.harness.loadgen.results import OutputError

COST = StepCost(weight_bytes=2.7e8, kv_bytes_per_position=23040.0, flops_per_token=2.7e8,
                flops_per_position=34560.0, bandwidth_bytes_per_s=32e9, peak_flops_per_s=4e11)


def record(tps=400.0, tpot_p50=25.0, batch=10.0, context=300.0):
    return {"scenario": "Server", "mode": "performance", "valid": False, "log_dir": "x",
            "metrics": {"tokens_per_second": tps, "samples_per_second": 1.5,
                        "ttft_ms": {"p50": 100.0, "p90": 200.0, "p99": 300.0},
                        "tpot_ms": {"p50": tpot_p50, "p90": 30.0, "p99": 40.0}},
            "roofline": {"decode_mbu": 0.4, "step_cost": COST.to_dict()},
            "engine": {"mean_decode_batch": batch, "mean_decode_context": context},
            "goodput": {"share": 0.75, "tokens_per_second": 300.0, "queries": 40}}


def test_sweep_point_from_a_record():
    p = sweep_point(2.0, record(), COST)
    assert p["target_qps"] == 2.0 and p["tokens_per_second"] == 400.0
    assert p["tokens_per_second_per_user"] == pytest.approx(40.0)  # 1 / 25 ms
    assert p["ttft_ms_p99"] == 300.0 and p["tpot_ms_p90"] == 30.0
    assert p["goodput_share"] == 0.75 and p["goodput_tokens_per_second"] == 300.0
    # One step at batch 10, context 300 per 25 ms, over 32 GB/s.
    assert p["decode_mbu"] == pytest.approx((2.7e8 + 10 * 23040 * 300) / 0.025 / 32e9)
    # 10 rows x (2.7e8 + 34560 x 300) FLOPs per 25 ms step, over 0.4 TFLOP/s.
    assert p["decode_mfu"] == pytest.approx(10 * (2.7e8 + 34560 * 300) / 0.025 / 4e11)
    # The front at 40 tokens/s per user: the batch whose step takes 25 ms.
    assert COST.step_s(p["front_batch"], 300) == pytest.approx(0.025)
    assert p["front_share"] == pytest.approx(400.0 / (p["front_batch"] * 40.0))


def test_a_record_without_figures_gives_nulls_not_errors():
    p = sweep_point(1.0, {"scenario": "Server", "metrics": {}, "roofline": None, "engine": None}, None)
    assert p["tokens_per_second_per_user"] is None and p["decode_mfu"] is None and p["front_share"] is None


def test_pareto_png(tmp_path):
    points = [sweep_point(q, record(tps=100 * q, tpot_p50=10 * q), COST) for q in (1, 2, 4)]
    series = [{"label": "native", "points": points, "front": series_front(points, COST)},
              {"label": "llamacpp", "points": points[:2], "front": None}]
    path = tmp_path / "pareto.png"
    write_pareto_png(path, series)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert series[0]["front"]["context"] == pytest.approx(300.0)


def test_pareto_png_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """Drawn in memory, written to a temp file in the same folder, renamed over the old
    chart: an interrupted write leaves the previous pareto.png and no stray file."""
    points = [sweep_point(q, record(tps=100 * q, tpot_p50=10 * q), COST) for q in (1, 2)]
    series = [{"label": "native", "points": points, "front": series_front(points, COST)}]
    path = tmp_path / "pareto.png"
    path.write_bytes(b"previous chart")
    real_replace, renames = os.replace, []

    def interrupted(src, dst):
        renames.append((Path(src), Path(dst)))
        raise OSError(errno.EIO, "interrupted before the rename")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(OutputError, match=f"cannot write {path}"):
        write_pareto_png(path, series)
    assert path.read_bytes() == b"previous chart" and [p.name for p in tmp_path.iterdir()] == ["pareto.png"]
    (src, dst), = renames
    assert src.parent == tmp_path and dst == path
    monkeypatch.setattr(os, "replace", real_replace)
    write_pareto_png(path, series)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_mode & 0o777 == 0o644


def test_read_sweep_errors(tmp_path):
    with pytest.raises(ConfigError, match="sweep.json not found"):
        read_sweep(tmp_path)
    (tmp_path / "sweep.json").write_text(json.dumps({"points": 3}))
    with pytest.raises(ConfigError, match="'points' list"):
        read_sweep(tmp_path)


def test_compare_draws_several_sweeps_on_one_chart(tmp_path, capsys):
    from wallperf.cli import main

    dirs = []
    for backend, scale in (("native", 1.0), ("llamacpp", 0.5)):
        points = [sweep_point(q, record(tps=100 * q * scale, tpot_p50=10 * q), COST) for q in (1, 2, 4)]
        sweep = {"backend": backend, "model": "smollm2-135m", "points": points, "front": series_front(points, COST)}
        d = tmp_path / backend
        d.mkdir()
        runs = [{**record(tps=100 * q * scale), "backend": backend, "sweep_target_qps": q} for q in (1, 2, 4)]
        (d / "results.json").write_text(json.dumps({"runs": runs, "sweep": sweep}))
        dirs.append(str(d))
    png = tmp_path / "both.png"
    assert main(["compare", *dirs, "--pareto", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "results.json").write_text(json.dumps({"runs": [record()]}))
    assert main(["compare", str(plain), "--pareto", str(tmp_path / "x.png")]) == 2
    assert "none of the RUN_DIRs was written by `wallperf sweep`" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_concurrency_table_counts_each_replicas_requests():
    from wallperf.audit.endpoints import point_figures
    from wallperf.audit.pareto import concurrency_table

    def req(t, url, error=None):
        return {"scheduled": t, "sent": t, "first": None if error else t + 0.1, "last": None if error else t + 0.5,
                "done": t + 0.5, "tokens": 0 if error else 5, "tokens_in_window": 0 if error else 5,
                "error": error, "url": url}
    # Three requests answered by a; two sent to b, one of them refused.
    reqs = [req(0.0, "http://a"), req(0.5, "http://a"), req(1.0, "http://a"), req(0.0, "http://b"),
            req(0.5, "http://b", error="HTTP 503")]
    point = point_figures(reqs, (0.0, 1.5), 2)
    two = concurrency_table({"backend": "openai", "model": "m", "endpoints": ["http://a", "http://b"],
                             "points": [point]})
    header, rule, row = two.splitlines()[2:5]
    assert "per replica: sent/completed/failed" in header
    assert header.count("|") == rule.count("|") == row.count("|") == 17
    assert "| http://a: 3/3/0; http://b: 2/1/1 | no: 1 requests failed" in row
    one = concurrency_table({"backend": "openai", "model": "m", "endpoints": ["http://a"], "points": [point]})
    assert "per replica" not in one and one.splitlines()[4].count("|") == 16


def test_the_step_function_claims_no_throughput_beyond_a_points_per_user_speed():
    from wallperf.audit.pareto import concurrency_figure

    # c=1: 55 tok/s at 50 tok/s per user; c=8: 100 tok/s at 10 per user. Between 10 and 50 tok/s per
    # user only c=1 was fast enough, so the curve there is c=1's 55, and c=8's 100 holds below 10.
    points = [{"concurrency": 1, "system_tokens_per_second": 55.0, "tokens_per_second_per_user": 50.0,
               "valid": True},
              {"concurrency": 8, "system_tokens_per_second": 100.0, "tokens_per_second_per_user": 10.0,
               "valid": True}]
    fig = concurrency_figure([{"label": "s", "points": points, "front": None}])
    vertices = fig.axes[0].lines[0].get_path().vertices
    between = [y for x, y in vertices if 10.0 < x <= 50.0]
    assert between and set(between) == {55.0}
    assert max(y for x, y in vertices if x <= 10.0) == 100.0
