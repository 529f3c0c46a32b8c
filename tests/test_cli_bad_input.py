"""Bad input from a hostile but fair user: each case is one line on stderr that
names the file, key or flag, exit code 2, no traceback, nothing written, and
no model loaded (the checks come first). The run itself is replaced by a spy, so
reaching it counts as a failure to refuse."""
import shutil
from pathlib import Path

import pytest

import wallperf.driver.run
import wallperf.tools.serve
from wallperf.cli import main

REPO_CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture
def no_run(monkeypatch):
    """The run and the model loading of serve, which no refused input may reach."""
    reached = []
    monkeypatch.setattr(wallperf.driver.run, "run_benchmark", lambda *a: reached.append("run"))
    monkeypatch.setattr(wallperf.tools.serve, "load_model", lambda *a: reached.append("load_model"))
    return reached


def refused(argv, capsys, *expected) -> str:
    with pytest.raises(SystemExit) as e:
        rc = main(argv)
        raise SystemExit(rc)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("wallperf")]
    assert e.value.code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    for text in expected:
        assert text in lines[0], err
    return lines[0]


def run_yaml(tmp_path: Path, **changes) -> Path:
    text = (REPO_CONF / "runs" / "default.yaml").read_text()
    path = tmp_path / "bad.yaml"
    path.write_text(text + "".join(f"\n{k}: {v}" for k, v in changes.items()))
    return path


@pytest.mark.parametrize("flag,value", [("--duration", "nan"), ("--target-qps", "nan"), ("--duration", "inf"),
                                        ("--target-qps", "-inf"), ("--peak-tolerance", "nan")])
def test_non_finite_numbers_on_the_command_line(flag, value, tmp_path, capsys, no_run):
    refused(["run", f"{flag}={value}", "--out", str(tmp_path / "out")], capsys, flag, "finite")
    assert not no_run and not (tmp_path / "out").exists()


@pytest.mark.parametrize("line,key", [("min_duration_s: .nan", "min_duration_s"),
                                      ("target_qps: 1.0e+400", "target_qps"), ("ttft_ms: -.inf", "ttft_ms")])
def test_non_finite_numbers_in_yaml(line, key, tmp_path, capsys, no_run, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(REPO_CONF, conf)
    offline = conf / "scenarios" / "offline.yaml"
    offline.write_text(f"name: Offline\n{line}\n")
    monkeypatch.setenv("WALLPERF_CONF", str(conf))
    refused(["run", "--scenario", "Offline", "--out", str(tmp_path / "out")], capsys, str(offline),
            f"key '{key}'", "finite")
    assert not no_run and not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes,key", [({"system": "../../../escape-sys"}, "system"),
                                         ({"system": ".."}, "system"),
                                         ({"hardware": "../runs/default"}, "hardware"),
                                         ({"model": "/etc/passwd"}, "model")])
def test_names_that_become_paths_are_plain(changes, key, tmp_path, capsys, no_run):
    refused(["run", "--config", str(run_yaml(tmp_path, **changes)), "--out", str(tmp_path / "out")], capsys,
            f"key '{key}'", "not a plain name")
    assert not no_run and not (tmp_path / "out").exists()


def test_model_yaml_name_is_plain(tmp_path, capsys, no_run, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(REPO_CONF, conf)
    model = conf / "models" / "smollm2-135m.yaml"
    model.write_text(model.read_text().replace("name: smollm2-135m", "name: ../../outside"))
    monkeypatch.setenv("WALLPERF_CONF", str(conf))
    refused(["run", "--out", str(tmp_path / "out")], capsys, str(model), "key 'name'", "not a plain name")


def test_hardware_flag_cannot_climb_out_of_conf(tmp_path, capsys, no_run):
    refused(["run", "--hardware", "../runs/default", "--out", str(tmp_path / "out")], capsys, "hardware",
            "not a plain name")


def test_files_that_are_not_utf8(tmp_path, capsys, no_run):
    bad = run_yaml(tmp_path)
    bad.write_bytes(bad.read_bytes() + b"\nsystem: caf\xe9\n")
    refused(["run", "--config", str(bad), "--out", str(tmp_path / "out")], capsys, str(bad), "not UTF-8")
    conf = tmp_path / "user.conf"
    conf.write_bytes(b"*.Server.target_qps = 1 # \xff\n")
    refused(["run", "--user-conf", str(conf), "--out", str(tmp_path / "out")], capsys, str(conf), "not UTF-8")
    assert not no_run


def test_out_naming_a_file(tmp_path, capsys, no_run):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    refused(["run", "--out", str(afile)], capsys, "--out", "is a file")
    assert afile.read_text() == "keep me" and not no_run


@pytest.mark.parametrize("content, words", [
    ("{\"hardware\": \"cpu\", ", "not a JSON wall"),
    ('{"hardware": "h100-sxm", "source": "measured", "how": "x", "bandwidth_gbps": 40.0}', "key 'hardware'"),
    ('{"hardware": "cpu", "source": "measured", "how": "x", "bandwidth_gbps": -40.0}', "key 'bandwidth_gbps'"),
])
def test_a_malformed_wall_file(content, words, tmp_path, capsys, no_run):
    """The wall file `wallperf sweep` gives each point's run, checked as any input."""
    wall = tmp_path / "wall.json"
    wall.write_text(content)
    refused(["run", "--wall-file", str(wall), "--out", str(tmp_path / "out")], capsys, str(wall), words)
    assert not no_run and not (tmp_path / "out").exists()


def test_a_missing_wall_file_or_two_walls(tmp_path, capsys, no_run):
    missing = tmp_path / "none.json"
    refused(["run", "--wall-file", str(missing), "--out", str(tmp_path / "out")], capsys, str(missing),
            "cannot read it")
    refused(["run", "--wall-file", str(missing), "--wall-from-profile"], capsys, "not allowed with")
    assert not no_run and not (tmp_path / "out").exists()


@pytest.mark.parametrize("url", ["http://[::1", "http://host:99999", "ftp://host", "http://"])
def test_endpoint_urls(url, tmp_path, capsys, no_run):
    refused(["run", "--endpoint", url, "--out", str(tmp_path / "out")], capsys, "endpoints[0]", "URL")
    assert not no_run


@pytest.mark.parametrize("peak_range", ["5,1", "nan,2", "0,1", "1", "1,inf"])
def test_peak_range_is_checked_before_anything_loads(peak_range, tmp_path, capsys, no_run):
    refused(["run", "--scenario", "Server", "--find-peak", "--peak-range", peak_range,
             "--out", str(tmp_path / "out")], capsys, "--peak-range")
    assert not no_run


@pytest.mark.parametrize("args,flag", [(["--port", "99999"], "--port"), (["--port", "-1"], "--port"),
                                       (["--host", "256.1.1.1"], "--host"), (["--max-batch", "0"], "--max-batch"),
                                       (["--max-seq-len", "-1"], "--max-seq-len"),
                                       (["--read-timeout", "nan"], "--read-timeout"),
                                       (["--request-timeout", "0"], "--request-timeout"),
                                       (["--request-timeout", "inf"], "--request-timeout"),
                                       (["--max-connections", "0"], "--max-connections")])
def test_serve_arguments_are_checked_before_the_model_loads(args, flag, capsys, no_run):
    refused(["serve", *args], capsys, flag)
    assert not no_run


@pytest.mark.parametrize("name", ["truncated.gguf", "random.gguf", "header-only.gguf", "hf", "bad-config"])
def test_corrupt_checkpoints(name, broken_checkpoints, capsys):
    path = broken_checkpoints / name
    refused(["generate", "--model", str(path), "--prompt", "hi"], capsys, str(path), "cannot load it as",
            "download or export it again")


def test_corrupt_checkpoint_in_an_audit(broken_checkpoints, capsys):
    path = broken_checkpoints / "truncated.gguf"
    refused(["audit", "--reference", str(path), "--candidate", f"{path}@fp8", "--max-questions", "4",
             "--no-progress"], capsys, str(path), "cannot load it as")


@pytest.mark.parametrize("backend", ["hf", "llamacpp"])
def test_corrupt_checkpoint_under_a_peer_backend(backend, broken_checkpoints, tmp_path, capfd, monkeypatch):
    """A model YAML naming a local file without a sha256 lets a truncated GGUF reach
    the peer's own loader (in the test's process): one line naming the file, exit 2."""
    pytest.importorskip({"hf": "transformers", "llamacpp": "llama_cpp"}[backend])
    path = broken_checkpoints / "truncated.gguf"
    conf = tmp_path / "conf"
    shutil.copytree(REPO_CONF, conf)
    (conf / "models" / "broken.yaml").write_text(f"name: broken\nfamily: llama\nformat: gguf\npublished_dtype: "
                                                 f"bfloat16\nsource:\n  kind: path\n  path: {path}\n")
    monkeypatch.setenv("WALLPERF_CONF", str(conf))
    out = tmp_path / "out"
    rc = main(["run", "--backend", backend, "--model", "broken", "--scenario", "SingleStream", "--mode",
               "performance", "--duration", "1", "--no-calibrate", "--wall-from-profile", "--no-progress",
               "--out", str(out)])
    err = capfd.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"wallperf: error: {path}: cannot load it as a GGUF file"), err
    assert "download or export it again" in errors[0]
    assert not out.exists()


@pytest.mark.parametrize("record", ['{"runs": [{"mode": "performance", "metrics": 5}]}',
                                    '{"runs": [{}], "config": 3}', '{"runs": "x"}', '{"runs": [', "\xff"])
def test_report_on_a_malformed_record(record, tmp_path, capsys):
    (tmp_path / "results.json").write_text(record, encoding="latin-1")
    refused(["report", str(tmp_path)], capsys, str(tmp_path))
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "report.md").exists()
