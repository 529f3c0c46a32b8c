"""accuracy.txt read as mlcommons' submission checker reads it (its own ACC_PATTERN and
accuracy targets, from the shared copy): the metrics the results line fills are exactly
the ones the notes call reported, the notes match no pattern of the checker's, and a run
without an MMLU score is refused rather than written as 0."""
import json
import re
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from wallperf.audit.submission.accuracy_txt import write_accuracy_dir
from wallperf.audit.submission.package import source_state
from wallperf.cli import main
from wallperf.harness.config import ConfigError
from wallperf.harness.config.benchmarks import BENCHMARKS

INFERENCE = Path(__file__).resolve().parents[4] / "shared" / "mlcommons-inference"
needs_checker = pytest.mark.skipif(not INFERENCE.is_dir(), reason="no mlcommons-inference copy")


@pytest.fixture(scope="module")
def checker(checker_constants):
    return checker_constants.ACC_PATTERN, checker_constants.MODEL_CONFIG


def accuracy_run(folder: Path, token_counts, accuracy=0.4, benchmark="llama3_1-8b"):
    """An accuracy run's logs as LoadGen writes them, and its results.json record."""
    folder.mkdir(parents=True)
    entries = [{"seq_id": i, "qsl_idx": i, "token_count": n,
                "data": np.arange(n, dtype=np.int32).tobytes().hex().upper()} for i, n in enumerate(token_counts)]
    (folder / "mlperf_log_accuracy.json").write_text(json.dumps(entries))
    for name in ("mlperf_log_summary.txt", "mlperf_log_detail.txt"):
        (folder / name).write_text(f"{name}\n")
    total = len(token_counts)
    return {"scenario": "Offline", "mode": "accuracy", "benchmark": benchmark, "log_dir": str(folder),
            "mmlu": {"accuracy": accuracy, "correct": None if accuracy is None else round(accuracy * total),
                     "total": total, "unparsed": 0}}


@needs_checker
@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_the_checker_finds_the_reported_metrics_and_only_those(tmp_path, checker, name):
    patterns, model_config = checker
    bench = BENCHMARKS[name]
    version = next(iter(bench.required_scenarios))
    targets = model_config[version]["accuracy-target"][bench.checker_name]
    record = accuracy_run(tmp_path / "run", [3, 5, 10], accuracy=0.4, benchmark=name)
    write_accuracy_dir(record, tmp_path / "run", tmp_path / "out")
    lines = (tmp_path / "out" / "accuracy.txt").read_text().splitlines()

    found = {}
    for metric in targets[::2]:
        values = [m.group(1) for line in lines if (m := re.match(patterns[metric], line))]
        if values:
            found[metric] = float(values[0])
    reported = {line.split(":")[0][2:] for line in lines if re.match(r"# \w+: reported", line)}
    assert set(found) == reported
    # The line's values, read back through the checker's patterns.
    assert found.get("exact_match", 40.0) == pytest.approx(40.0)
    assert found.get("TOKENS_PER_SAMPLE", 6.0) == pytest.approx(6.0)
    assert re.match(patterns["exact_match"], lines[2]) and re.match(patterns["TOKENS_PER_SAMPLE"], lines[2])
    # Every metric the checker wants is named, with whether it is reported; no note is parsed as a figure.
    notes = [line for line in lines if line.startswith("#")]
    for metric in targets[::2]:
        assert sum(line.startswith(f"# {metric}: ") for line in notes) == 1
    assert not [(n, k) for n in notes for k, p in patterns.items() if re.match(p, n)]
    assert "open-division" in notes[0] and "MMLU" in notes[0]
    assert sum(bool(re.match(r"^hash=([\w\d]+)$", line)) for line in lines) == 1


def test_a_run_without_an_mmlu_score_is_refused(tmp_path):
    record = accuracy_run(tmp_path / "run", [], accuracy=None)
    with pytest.raises(ConfigError) as exc:
        write_accuracy_dir(record, tmp_path / "run", tmp_path / "out")
    assert str(tmp_path / "run") in str(exc.value) and "no MMLU score" in str(exc.value)
    assert "rerun" in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_submission_refuses_it_with_one_line_and_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    records = []
    for scenario in ("SingleStream", "Offline"):
        for mode in ("performance", "accuracy"):
            r = accuracy_run(run / scenario / mode, [4], accuracy=None if mode == "accuracy" else 0.5,
                             benchmark="llama3_1-8b-edge")
            records.append({**r, "scenario": scenario, "mode": mode, "model": "smollm2-135m", "system": "vm"})
    (run / "results.json").write_text(json.dumps({"wallperf_version": "0", "complete": True,
                                                  "config": {"user_conf": str(run / "user.conf")}, "runs": records}))
    desc = tmp_path / "system.yaml"
    desc.write_text("system_name: vm\nstatus: available\nhost_memory_configuration: x\nhost_storage_capacity: 1 GB\n"
                    "host_storage_type: disk\nhost_networking: N/A\nhost_network_card_count: '0'\n"
                    "host_networking_topology: N/A\ncooling: air\n")
    assert main(["submission", str(run), "--out", str(tmp_path / "tree"), "--submitter", "org",
                 "--system-desc", str(desc)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no MMLU score" in err[0] and "/accuracy" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "system.yaml"]


def git(repo: Path, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def checkout(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "package.py").write_text("x = 1\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    return repo


def test_source_state_of_a_clean_and_a_dirty_checkout(checkout):
    head = git(checkout, "rev-parse", "HEAD").strip()
    src = checkout / "pkg" / "package.py"
    assert source_state(src) == f"the wallperf repository at commit {head}, working tree clean"
    src.write_text("x = 2\n")
    (checkout / "new.py").write_text("")
    changed = len(git(checkout, "status", "--porcelain").splitlines())
    assert changed == 2
    assert source_state(src) == (f"the wallperf repository at commit {head}, working tree dirty, "
                                 f"{changed} changed or untracked files not in that commit")


def test_source_state_outside_a_checkout_is_unknown_with_the_installed_version(tmp_path, checkout):
    loose = tmp_path / "site" / "package.py"
    loose.parent.mkdir()
    loose.write_text("")
    # Inside another repository's tree but not tracked there: that repository's commit is not ours.
    stray = checkout / "venv" / "package.py"
    stray.parent.mkdir()
    stray.write_text("")
    for path in (loose, stray):
        state = source_state(path)
        assert state.startswith(f"installed wallperf {metadata.version('wallperf')},") and "unknown" in state
