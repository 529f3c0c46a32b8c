"""`wallperf run --submission` + `wallperf submission`, judged by mlcommons' own
submission checker (the shared copy), at v6.1 and v6.0: a short trial run (few
samples, 1 s durations) must give a tree with no structural error, and every
error the checker reports must be one that wallperf's submission_valid lists for
that test (sample counts, duration, early stopping; at v6.0 also the seeds,
because the installed LoadGen embeds v6.1's mlperf.conf)."""
import json
import re
from pathlib import Path

import pytest

from wallperf.audit.submission.package import package, run_checker
from wallperf.cli import main

pytestmark = pytest.mark.slow
INFERENCE = Path("/work/shared/mlcommons-inference")
USER_CONF = """\
# A short trial of a submission run: LoadGen's durations and counts cut down.
llama3_1-8b-edge.Offline.target_qps = 1
llama3_1-8b-edge.SingleStream.target_latency = 1000
*.*.min_duration = 1000
*.*.min_query_count = 3
*.*.performance_sample_count_override = 3
"""
SYSTEM = """\
system_name: test VM
status: available
host_memory_configuration: undisclosed
host_storage_capacity: 64 GB
host_storage_type: virtual disk
host_networking: N/A
host_network_card_count: "0"
host_networking_topology: N/A
cooling: air
"""
# What each checker error means, as the words wallperf's notes use for it.
MEANING = {
    r"performance_sample_count, found": "performance_sample_count is",
    r"(\w+_rng_seed) is wrong": None,  # the note names the same seed key
    r"Test duration less than 600s": "min_duration",
    r"does not cover all dataset": "the accuracy run covered",
    r"Early stopping condition was not met": "LoadGen judged the run INVALID",
}
SUMMARY_LINES = ("Checks failed for", "NoResults", "SUMMARY: submission has errors")


@pytest.fixture(scope="module")
def trial_run(tmp_path_factory, smollm2_gguf_path, mmlu_path):
    root = tmp_path_factory.mktemp("submission")
    (root / "user.conf").write_text(USER_CONF)
    (root / "system.yaml").write_text(SYSTEM)
    rc = main(["run", "--submission", "--user-conf", str(root / "user.conf"), "--max-samples", "3",
               "--out", str(root / "run"), "--no-progress"])
    assert rc == 0
    return root


def checker_errors(output: str) -> list[str]:
    return [line.split("ERROR]", 1)[1].strip() for line in output.splitlines() if "ERROR]" in line]


@pytest.mark.skipif(not INFERENCE.is_dir(), reason="no mlcommons-inference copy")
@pytest.mark.parametrize("version", ["v6.1", "v6.0"])
def test_checker_reports_only_what_submission_valid_lists(trial_run, version):
    results = json.loads((trial_run / "run" / "results.json").read_text())
    assert {(r["scenario"], r["mode"]) for r in results["runs"]} == {
        ("SingleStream", "performance"), ("SingleStream", "accuracy"), ("Offline", "performance"),
        ("Offline", "accuracy")}
    tree, notes = package([trial_run / "run"], trial_run / f"tree-{version}", "wallperf", "open", version,
                          trial_run / "system.yaml")
    rc, output = run_checker(INFERENCE, tree, version)
    errors = [e for e in checker_errors(output) if not any(s in e for s in SUMMARY_LINES)]
    assert errors and rc != 0  # a trial run is not a submission: the checker must say so
    all_notes = [n for test_notes in notes.values() for n in test_notes]
    for error in errors:
        m = re.search(r"/results/[^/]+/[^/]+/(\w+)/(performance|accuracy|TEST06)\b", error)
        candidates = notes[f"cpu-native/smollm2-135m/{m.group(1)}/{m.group(2)}"] if m else all_notes
        for pattern, words in MEANING.items():
            hit = re.search(pattern, error)
            if hit:
                assert any((words or hit.group(1)) in n for n in candidates), (error, candidates)
                break
        else:
            pytest.fail(f"the checker reports an error wallperf does not list (structural?): {error}")
    org = tree / "open" / "wallperf"
    assert json.loads((org / "model_mapping.json").read_text()) == {"smollm2-135m": "llama3.1-8b-edge"}
    for scenario in ("SingleStream", "Offline"):
        acc = (org / "results" / "cpu-native" / "smollm2-135m" / scenario / "accuracy" / "accuracy.txt").read_text()
        assert re.search(r"^hash=[0-9a-f]{64}$", acc, re.M) and "'exact_match':" in acc
