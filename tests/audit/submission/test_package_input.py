"""`wallperf submission` on bad input: one clear line, exit 2, nothing written."""
import json

import pytest

from wallperf.cli import main

SYSTEM = {"system_name": "vm", "status": "available", "host_memory_configuration": "x",
          "host_storage_capacity": "1 GB", "host_storage_type": "disk", "host_networking": "N/A",
          "host_network_card_count": "0", "host_networking_topology": "N/A", "cooling": "air"}


def fake_run(path, benchmark="llama3_1-8b-edge", complete=True):
    """A results.json as `wallperf run --submission` writes it (records only; no logs needed
    to be refused)."""
    path.mkdir()
    runs = [{"scenario": s, "mode": m, "model": "smollm2-135m", "benchmark": benchmark, "system": "cpu-native",
             "log_dir": str(path / s / m)} for s in ("SingleStream", "Offline") for m in ("performance", "accuracy")]
    (path / "results.json").write_text(json.dumps({"wallperf_version": "0", "complete": complete,
                                                   "config": {"user_conf": str(path / "user.conf")},
                                                   "runs": runs}))
    return path


def submission(tmp_path, run_dir, *extra, system=SYSTEM):
    desc = tmp_path / "system.yaml"
    desc.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in system.items()))
    return main(["submission", str(run_dir), "--out", str(tmp_path / "tree"), "--submitter", "org",
                 "--system-desc", str(desc), *extra])


@pytest.mark.parametrize("case,match", [
    ("unknown_benchmark", "stands for no known MLPerf benchmark"),
    ("not_a_run", "not a wallperf run"),
    ("missing_fields", "lacks host_storage_type, cooling"),
    ("incomplete", "did not finish"),
    ("closed", "closed: wallperf's data set is MMLU"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, match):
    run_dir = tmp_path / "run"
    system = SYSTEM
    extra = ()
    if case == "not_a_run":
        run_dir.mkdir()
        (run_dir / "results.json").write_text('{"something": "else"}')
    else:
        fake_run(run_dir, benchmark="resnet50" if case == "unknown_benchmark" else "llama3_1-8b-edge",
                 complete=case != "incomplete")
    if case == "missing_fields":
        system = {k: v for k, v in SYSTEM.items() if k not in ("cooling", "host_storage_type")}
    if case == "closed":
        extra = ("--division", "closed")
    assert submission(tmp_path, run_dir, *extra, system=system) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "tree").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tree")] == []


def test_existing_out_is_refused(tmp_path, capsys):
    (tmp_path / "tree").mkdir()
    assert submission(tmp_path, fake_run(tmp_path / "run")) == 2
    assert "exists" in capsys.readouterr().err


def test_unknown_benchmark_on_run_is_refused(tmp_path, capsys):
    assert main(["run", "--benchmark", "llama9-1t", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unknown MLPerf benchmark 'llama9-1t'" in err and "llama3_1-8b-edge" in err
    assert not (tmp_path / "out").exists()
