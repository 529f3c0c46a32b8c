"""MLPerf compliance TEST06 as its README describes it (mlcommons/inference
compliance/TEST06): a performance run that reads TEST06's audit.config, then the
verification, which writes `TEST06/verify_accuracy.txt` and keeps the run's
accuracy log as `TEST06/accuracy/mlperf_log_accuracy.json`.

The run driver starts the run (with `audit_config_text()` as its audit.config);
this module judges what it wrote, with audit.compliance's checks, and writes the
verification in the official script's format, which the submission checker reads.
tests/audit/test_test06.py holds both to the official audit.config and
run_verification.py (pass and fail cases).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from wallperf.audit.compliance import Test06Result, check_test06
from wallperf.sut import scenarios

# TEST06's audit.config settings: a performance run (mode 2) of at least 100
# queries, every response logged (sampling target 100), no minimum duration and
# equal issue off.
AUDIT_CONFIG = {
    "mode": "2",
    "accuracy_log_rng_seed": "720381539243781796",
    "accuracy_log_sampling_target": "100",
    "min_query_count": "100",
    "min_duration": "0",
    "sample_concatenate_permutation": "0",
}
# LoadGen's line in the detail log when it read an audit.config.
AUDIT_CONFIG_FOUND = "Found Audit Config file"


def audit_config_text() -> str:
    return "# MLPerf compliance TEST06 (compliance/TEST06/audit.config)\n" + "".join(
        f"*.*.{key} = {value}\n" for key, value in AUDIT_CONFIG.items())


def audit_config_was_read(run_dir: Path) -> bool:
    """LoadGen says in the detail log whether it found the audit.config."""
    detail = Path(run_dir) / "mlperf_log_detail.txt"
    return detail.is_file() and AUDIT_CONFIG_FOUND in detail.read_text(encoding="utf-8", errors="replace")


def verification_text(result: Test06Result, scenario: str) -> str:
    """verify_accuracy.txt as the official run_verification.py words it."""
    first = ("Skipped" if not scenarios.scenario(scenario).reports_first_token
             else str(result.first_token.status != "failed"))
    eos, length = result.eos.status != "failed", result.sample_length.status != "failed"
    passed = eos and length and first != "False"
    return (f"First token check pass: {first}\nEOS check pass: {eos}\nSample length check pass: {length}\n"
            f"TEST06 verification {'complete' if passed else 'failed'}\n")


def verify_test06(run_dir: Path, output_dir: Path, scenario: str, eos_token_id: int) -> tuple[bool, Path]:
    """Verify a TEST06 run in `run_dir`; write OUTPUT_DIR/TEST06/verify_accuracy.txt
    and OUTPUT_DIR/TEST06/accuracy/mlperf_log_accuracy.json. (passed, that folder)."""
    scenario = scenarios.scenario(scenario).loadgen_name
    result = check_test06(Path(run_dir) / "mlperf_log_accuracy.json", eos_token_id, scenario=scenario)
    text = verification_text(result, scenario)
    out = Path(output_dir) / "TEST06"
    (out / "accuracy").mkdir(parents=True, exist_ok=True)
    (out / "verify_accuracy.txt").write_text(text)
    shutil.copy2(Path(run_dir) / "mlperf_log_accuracy.json", out / "accuracy" / "mlperf_log_accuracy.json")
    return text.endswith("complete\n"), out
