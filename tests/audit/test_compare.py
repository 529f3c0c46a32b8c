"""`wallperf compare` on hand-written results.json folders.

The fixtures' figures are chosen so the expected ratios are exact by hand
(40 of 160 tok/s is 0.25), never taken from the code under test.
"""
import json

import pytest

from wallperf.cli import main

MISSING = "–"


def perf(scenario, tps, backend="native", hardware="cpu", dtype="bfloat16", weight_format=None, valid=True,
         sps=None, ttft=None, tpot=None, mbu=None, model="smollm2-135m", **extra):
    record = {
        "scenario": scenario, "mode": "performance", "model": model, "backend": backend, "dtype": dtype,
        "weight_format": weight_format or dtype, "fp8_emulated": False, "hardware": hardware, "system": "s",
        "valid": valid, "invalid_reasons": [] if valid else ["minimum duration not met"],
        "submission_notes": [], "log_dir": f"/logs/{scenario}/{tps}",
        "metrics": {"samples_per_second": sps, "tokens_per_second": tps,
                    "ttft_ms": None if ttft is None else {"p50": 1.0, "p90": 2.0, "p99": ttft},
                    "tpot_ms": None if tpot is None else {"p50": 1.0, "p90": 2.0, "p99": tpot},
                    "latency_ms": None, "sample_count": 10, "mmlu_accuracy": None},
        "roofline": None if mbu is None else {"mbu": mbu, "memory_wall_tokens_per_second": 119.0,
                                              "achieved_bandwidth_gbps": 10.0,
                                              "decode_mbu": None if tpot is None else 2 * mbu},
    }
    record.update(extra)
    return record


def acc(scenario, correct, total, backend="native"):
    return {"scenario": scenario, "mode": "accuracy", "model": "smollm2-135m", "backend": backend,
            "dtype": "bfloat16", "weight_format": "bfloat16", "hardware": "cpu", "valid": None,
            "invalid_reasons": [], "metrics": {"tokens_per_second": None, "mmlu_accuracy": correct / total},
            "mmlu": {"accuracy": correct / total, "correct": correct, "total": total, "unparsed": 0},
            "roofline": None}


def write(tmp_path, name, runs, **top):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"complete": True, "runs": runs, **top}))
    return folder


@pytest.fixture
def two_engines(tmp_path):
    """A native and an OpenAI run of Server and Offline; only the native one has MBU."""
    native = write(tmp_path, "native", [
        perf("Server", 30.0, sps=0.5, ttft=250.0, tpot=40.0, mbu=0.3),
        perf("Offline", 40.0, sps=2.0, mbu=0.125),
        acc("Offline", 30, 120),
    ])
    remote = write(tmp_path, "remote", [
        perf("Offline", 160.0, backend="openai", sps=8.0),
        perf("Server", 120.0, backend="openai", sps=2.0, ttft=900.0, tpot=20.0, valid=False),
    ])
    return native, remote


def compare_json(capsys, *args):
    assert main(["compare", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_rows_grouped_by_scenario_with_ratio_to_the_best(two_engines, capsys):
    native, remote = two_engines
    rows = compare_json(capsys, native, remote)
    perf_rows = [r for r in rows if r["mode"] == "performance"]
    # MLPerf's scenario order, then the highest tokens/s first within a scenario.
    assert [(r["scenario"], r["backend"]) for r in perf_rows] == [
        ("Offline", "openai"), ("Offline", "native"), ("Server", "openai"), ("Server", "native")]
    assert [r["ratio"] for r in perf_rows] == pytest.approx([1.0, 0.25, 1.0, 0.25])
    assert {r["ratio_to"] for r in perf_rows} == {"best"}
    offline_native = perf_rows[1]
    assert offline_native["run"] == str(native) and offline_native["mbu"] == 0.125
    assert offline_native["results"] == str(native / "results.json")
    assert perf_rows[2]["valid"] is False and perf_rows[2]["invalid_reasons"] == ["minimum duration not met"]
    assert perf_rows[3]["ttft_p99_ms"] == 250.0 and perf_rows[3]["tpot_p99_ms"] == 40.0
    # Missing figures are null, and every row has the same keys.
    assert perf_rows[0]["mbu"] is None and perf_rows[0]["ttft_p99_ms"] is None
    assert len({tuple(sorted(r)) for r in rows}) == 1
    (accuracy,) = [r for r in rows if r["mode"] == "accuracy"]
    assert accuracy["mmlu_accuracy"] == 0.25 and (accuracy["mmlu_correct"], accuracy["mmlu_total"]) == (30, 120)
    assert accuracy["ratio"] is None


def test_ratio_to_the_first_run_dir_keeps_command_line_order(two_engines, capsys):
    native, remote = two_engines
    rows = [r for r in compare_json(capsys, native, remote, "--vs", "first") if r["mode"] == "performance"]
    assert [(r["scenario"], r["backend"]) for r in rows] == [
        ("Offline", "native"), ("Offline", "openai"), ("Server", "native"), ("Server", "openai")]
    assert [r["ratio"] for r in rows] == pytest.approx([1.0, 4.0, 1.0, 4.0])
    assert {r["ratio_to"] for r in rows} == {"first"}


def test_text_table(two_engines, capsys):
    native, remote = two_engines
    assert main(["compare", str(native), str(remote)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("scenario"))
    for name in ("run", "backend", "hardware", "format", "tokens/s", "x best", "samples/s", "TTFT p99 ms",
                 "TPOT p99 ms", "MBU", "LoadGen"):
        assert name in header
    split = lines.index("Accuracy")
    rows = [line.split() for line in lines[:split] if line.startswith(("Offline ", "Server "))]
    assert rows[0] == ["Offline", str(remote), "openai", "cpu", "bfloat16", "160.0", "1.00x", "8.0",
                       MISSING, MISSING, MISSING, MISSING, "VALID"]
    assert rows[1] == ["Offline", str(native), "native", "cpu", "bfloat16", "40.0", "0.25x", "2.0",
                       MISSING, MISSING, "12.5%", MISSING, "VALID"]
    # Server has TPOT, hence a decode MBU beside the whole run's.
    assert rows[2][-1] == "INVALID" and rows[3][-3:] == ["30.0%", "60.0%", "VALID"]
    (acc_row,) = [line.split() for line in lines[split:] if line.startswith("Offline ")]
    assert acc_row == ["Offline", str(native), "native", "cpu", "bfloat16", "25.0%", "30", "/", "120"]


def test_markdown_table_and_model_column(tmp_path, capsys):
    a = write(tmp_path, "a", [perf("Server", 10.0, model="m|1")])
    b = write(tmp_path, "b", [perf("Server", 20.0, model="m2", weight_format="fp8_e4m3fn", fp8_emulated=True)])
    assert main(["compare", str(a), str(b), "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("## Performance") + 1
    header, rule, first, second = lines[start:start + 4]
    assert header.startswith("| scenario | run | model | backend |")
    assert rule.startswith("|---|---|---|---|") and "---:" in rule
    # `|` in a cell is escaped, so the row keeps its column count.
    assert "m\\|1" in second and second.count(" | ") == header.count(" | ")
    assert "fp8_e4m3fn/bfloat16 (emulated)" in first and "| 1.00x |" in first and "| 0.50x |" in second


def test_find_peak_tries_left_out_but_the_peak(tmp_path, capsys):
    tries = [perf("Server", tps, valid=v, find_peak_try=True, log_dir=f"/p/qps_{q}")
             for q, tps, v in ((0.5, 10.0, True), (4, 50.0, False), (2, 30.0, True))]
    curve = [{"qps": q, "valid": v, "log_dir": f"/p/qps_{q}"} for q, v in ((0.5, True), (2, True), (4, False))]
    folder = write(tmp_path, "peak", [perf("Offline", 70.0), *tries],
                   find_peak={"Server": {"peak_qps": 2, "curve": curve}})
    rows = compare_json(capsys, folder)
    assert [(r["scenario"], r["tokens_per_second"], r["find_peak_qps"]) for r in rows] == [
        ("Offline", 70.0, None), ("Server", 30.0, 2)]
    assert main(["compare", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"{folder} (peak 2 QPS)" in out
    assert "2 find-peak tries left out" in out


def test_a_results_json_file_may_be_named_directly(two_engines, capsys):
    native, _ = two_engines
    rows = compare_json(capsys, native / "results.json")
    assert {r["backend"] for r in rows} == {"native"}


def test_folder_without_results_json(tmp_path, two_engines, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", str(two_engines[0]), str(empty)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(empty) in captured.err and "no results.json" in captured.err


def test_malformed_json_names_the_file(tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "results.json").write_text('{"runs": [\n{"scenario": "Server",,}]}')
    assert main(["compare", str(folder)]) == 2
    err = capsys.readouterr().err
    assert str(folder / "results.json") in err and "malformed JSON at line 2" in err


@pytest.mark.parametrize("content, message", [
    ({"complete": True, "runs": [acc("Offline", 1, 4)]}, "no performance runs to compare (it holds 1 accuracy"),
    ({"complete": False, "runs": []}, "'runs' list is empty and the run did not complete"),
    ([1, 2], "not a wallperf results.json"),
    ({"runs": {"scenario": "Server"}}, "not a wallperf results.json"),
], ids=["accuracy-only", "interrupted", "a-list", "runs-not-a-list"])
def test_results_without_performance_runs(tmp_path, capsys, content, message):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(content))
    assert main(["compare", str(folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(folder / "results.json") in err


def test_values_of_the_wrong_type_print_as_missing(tmp_path, capsys):
    record = perf("Server", 12.0)
    record["metrics"]["samples_per_second"] = "fast"
    record["metrics"]["ttft_ms"] = [1, 2]
    record["valid"] = "yes"
    del record["hardware"]
    odd_try = perf("Server", 99.0, find_peak_try=True, log_dir=["not", "a", "path"])
    folder = write(tmp_path, "odd", [record, odd_try], find_peak={"Server": {"peak_qps": 1, "curve": 7}})
    assert main(["compare", str(folder)]) == 0
    (row,) = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("Server ")]
    assert row == ["Server", str(folder), "native", MISSING, "bfloat16", "12.0", "1.00x", MISSING, MISSING,
                   MISSING, MISSING, MISSING, MISSING]


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["compare", "x", "--json", "--markdown"])
    assert e.value.code == 2


def test_ratios_against_a_weak_baseline_are_marked(tmp_path, capsys):
    # Baseline: memory-bound at decode MBU 2 x 0.1 = 20% (< 50%); the other one at 2 x 0.4 = 80%.
    weak = write(tmp_path, "weak", [perf("SingleStream", 50.0, tpot=10.0, mbu=0.1)])
    strong = write(tmp_path, "strong", [perf("SingleStream", 150.0, tpot=10.0, mbu=0.4)])
    assert main(["compare", str(weak), str(strong), "--vs", "first", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["run"].rsplit("/", 1)[-1], r["ratio"], r["weak_baseline"]) for r in rows] == [
        ("weak", 1.0, False), ("strong", 3.0, True)]
    assert "decode MBU 20% of its memory wall" in rows[1]["baseline_note"]
    assert main(["compare", str(weak), str(strong), "--vs", "first"]) == 0
    text = capsys.readouterr().out
    assert "3.00x*" in text and "* measured against an unoptimized baseline" in text
    assert main(["compare", str(weak), str(strong), "--vs", "first", "--markdown"]) == 0
    markdown = capsys.readouterr().out
    assert "| 3.00x\\* |" in markdown and "\n* measured against an unoptimized baseline" in markdown


def test_a_baseline_near_its_wall_is_not_marked(tmp_path, capsys):
    strong = write(tmp_path, "strong", [perf("SingleStream", 150.0, tpot=10.0, mbu=0.4)])
    weak = write(tmp_path, "weak", [perf("SingleStream", 50.0, tpot=10.0, mbu=0.1)])
    assert main(["compare", str(strong), str(weak), "--vs", "first", "--json"]) == 0
    assert [r["weak_baseline"] for r in json.loads(capsys.readouterr().out)] == [False, False]


def test_a_compute_bound_baseline_is_judged_by_mfu(tmp_path, capsys):
    def offline(tps, mfu):
        run = perf("Offline", tps, mbu=0.05)
        run["roofline"].update(bound="compute", mfu=mfu)
        return run

    base = write(tmp_path, "base", [offline(100.0, 0.2)])
    other = write(tmp_path, "other", [offline(200.0, 0.4)])
    assert main(["compare", str(base), str(other), "--vs", "first", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[1]["weak_baseline"] and "compute-bound at MFU 20%" in rows[1]["baseline_note"]
    good = write(tmp_path, "good", [offline(100.0, 0.35)])
    assert main(["compare", str(good), str(other), "--vs", "first", "--json"]) == 0
    assert not any(r["weak_baseline"] for r in json.loads(capsys.readouterr().out))


def test_an_untrusted_roofline_is_flagged_not_printed_quietly(tmp_path, capsys):
    # A decode MBU of 2 x 0.55 = 110%: the run's own record says its wall was below what it achieved.
    run = perf("SingleStream", 9.6, tpot=97.0, mbu=0.55)
    run["roofline"].update(trusted=False, untrusted_reasons=["decode MBU (at TPOT p50) 1.11: achieved 41.33 GB/s "
                                                             "exceeds the peak 37.15 GB/s"])
    bad = write(tmp_path, "bad", [run])
    good = write(tmp_path, "good", [perf("SingleStream", 8.7, tpot=97.0, mbu=0.4)])
    assert main(["compare", str(bad), str(good), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["roofline_trusted"], len(r["untrusted_reasons"])) for r in rows] == [(False, 1), (None, 0)]
    assert main(["compare", str(bad), str(good)]) == 0
    text = capsys.readouterr().out
    assert "110.0%!" in text and "80.0%!" not in text and "80.0%" in text
    assert f"! {bad} SingleStream: roofline NOT TRUSTED" in text and "exceeds the peak 37.15 GB/s" in text
    assert main(["compare", str(bad), str(good), "--markdown"]) == 0
    assert "| 110.0%! |" in capsys.readouterr().out
