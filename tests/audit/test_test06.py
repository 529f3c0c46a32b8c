"""wallperf.audit.test06 (the official TEST06 procedure) against the official files:
our audit.config says what compliance/TEST06/audit.config says, LoadGen reads it
in a real run (the null SUT), and our verification writes what the official
run_verification.py writes, on passing and on failing runs."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from wallperf.audit.test06 import audit_config_was_read, audit_config_text, verify_test06

NULL_SUT = Path(__file__).parents[1] / "harness" / "loadgen" / "loadgen_null_sut.py"
TEST06 = Path("/work/shared/mlcommons-inference/compliance/TEST06")
pytestmark = pytest.mark.skipif(not TEST06.is_dir(), reason="no mlcommons-inference copy")
EOS = 2


def settings(text: str) -> dict:
    return dict(re.match(r"^\s*([\w.*]+)\s*=\s*(\S+)", line).groups()
                for line in text.splitlines() if line.split("#")[0].strip())


def test_audit_config_is_the_official_one():
    assert settings(audit_config_text()) == settings((TEST06 / "audit.config").read_text())


def compliance_run(outdir: Path, scenario: str, fault: str) -> Path:
    """A TEST06 run of the null SUT, as the driver starts one: the audit.config in its folder."""
    outdir.mkdir(parents=True)
    (outdir / "audit.config").write_text(audit_config_text())
    proc = subprocess.run([sys.executable, str(NULL_SUT), "--outdir", str(outdir), "--scenario", scenario,
                           "--mode", "PerformanceOnly", "--token-latencies", "--eos", str(EOS), "--fault", fault,
                           "--min-duration-ms", "60000", "--min-query-count", "100000"],
                          capture_output=True, text=True, timeout=120, cwd=outdir)
    assert proc.returncode == 0, proc.stderr
    return outdir


@pytest.mark.parametrize("scenario,fault", [("Offline", "none"), ("Server", "none"), ("Server", "two_eos"),
                                            ("Offline", "token_count"), ("SingleStream", "first_token"),
                                            ("Offline", "first_token")])
def test_verification_writes_what_the_official_script_writes(tmp_path, scenario, fault):
    run = compliance_run(tmp_path / "run", scenario, fault)
    # The audit.config overrode the huge duration and query count the run asked for.
    assert audit_config_was_read(run)
    passed, ours = verify_test06(run, tmp_path / "ours", scenario, EOS)
    subprocess.run([sys.executable, str(TEST06 / "run_verification.py"), "-c", str(run), "-o",
                    str(tmp_path / "official"), "-s", scenario], check=True, capture_output=True, timeout=60)
    official = tmp_path / "official" / "TEST06"
    assert (ours / "verify_accuracy.txt").read_text() == (official / "verify_accuracy.txt").read_text()
    assert (ours / "accuracy" / "mlperf_log_accuracy.json").read_bytes() == \
        (official / "accuracy" / "mlperf_log_accuracy.json").read_bytes()
    # Offline has no first token to compare, so that fault passes there, as officially.
    assert passed == (fault == "none" or (scenario, fault) == ("Offline", "first_token"))
