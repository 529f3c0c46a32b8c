"""wallperf.audit.compliance (TEST06) on accuracy logs written by the real LoadGen.

The oracle is `reference_test06`, a plain transcription of the rules in
mlcommons/inference compliance/nvidia/TEST06/run_verification.py (walk back from
the end while i > 0; compare first tokens with zip; len(data) == token_count),
decoding with struct instead of numpy. The null SUT breaks exactly the samples
with qsl_idx % 4 == 1, so each fault also has a known set of failing indices.
"""
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from wallperf.audit.compliance import MAX_LISTED_FAILURES, check_test06

NULL_SUT = Path(__file__).parents[1] / "harness" / "loadgen" / "loadgen_null_sut.py"
EOS = 2
TOTAL = 30
FAULTY = {i for i in range(TOTAL) if i % 4 == 1}
CHECKS = ("first_token", "eos", "sample_length")


def run_accuracy(outdir: Path, scenario: str, fault: str = "none") -> Path:
    proc = subprocess.run(
        [sys.executable, str(NULL_SUT), "--outdir", str(outdir), "--scenario", scenario, "--mode", "AccuracyOnly",
         "--token-latencies", "--eos", str(EOS), "--total-samples", str(TOTAL), "--fault", fault],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return outdir / "mlperf_log_accuracy.json"


def reference_test06(path: Path, eos: int, scenario: str) -> dict[str, set[int] | None]:
    """qsl indices failing each TEST06 check; None for a check TEST06 skips."""

    def tokens(hex_data: str) -> list[int]:
        raw = bytes.fromhex(hex_data)
        return list(struct.unpack(f"<{len(raw) // 4}i", raw))

    def eos_ok(data: list[int]) -> bool:
        i, n_eos = len(data) - 1, 0
        while i > 0:
            if data[i] == eos:
                n_eos += 1
            if n_eos >= 2:
                return len(data) == 2
            if data[i] != eos:
                break
            i -= 1
        return True

    failing = {"eos": set(), "sample_length": set(), "first_token": None if scenario == "Offline" else set()}
    for sample in json.loads(path.read_text()):
        data = tokens(sample["data"])
        if not eos_ok(data):
            failing["eos"].add(sample["qsl_idx"])
        if len(data) != int(sample["token_count"]):
            failing["sample_length"].add(sample["qsl_idx"])
        if failing["first_token"] is not None:
            first = tokens(sample["token_data"])
            if any(a != b for a, b in zip(data, first)):
                failing["first_token"].add(sample["qsl_idx"])
    return failing


def failing_indices(result, check: str) -> set[int] | None:
    outcome = getattr(result, check)
    if outcome.status == "skipped":
        return None
    assert outcome.failed == len(outcome.failures) <= MAX_LISTED_FAILURES, "test expects every failure listed"
    return {f.qsl_idx for f in outcome.failures}


def assert_agrees_with_reference(result, path: Path, scenario: str) -> None:
    reference = reference_test06(path, EOS, scenario)
    for check in CHECKS:
        assert failing_indices(result, check) == reference[check], check
    assert result.passed == all(not reference[c] for c in CHECKS)


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return run_accuracy(tmp_path_factory.mktemp("server"), "Server")


def test_correct_server_sut_passes(server_log):
    result = check_test06(server_log, EOS, scenario="Server")
    assert_agrees_with_reference(result, server_log, "Server")
    assert result.passed and result.strict_passed
    assert result.entries == TOTAL
    assert result.first_token.status == "passed" and result.first_token.checked == TOTAL
    # Without a scenario the first tokens present in the log are checked all the same.
    assert check_test06(server_log, EOS).first_token.checked == TOTAL


def test_offline_log_has_no_first_tokens(tmp_path):
    path = run_accuracy(tmp_path, "Offline")
    result = check_test06(path, EOS)
    assert_agrees_with_reference(result, path, "Offline")
    assert result.passed and result.first_token.status == "skipped"
    assert "no first tokens" in result.first_token.note
    assert check_test06(path, EOS, scenario="Offline").first_token.status == "skipped"
    # A streaming scenario requires them: TEST06 errors out on a missing token_data.
    required = check_test06(path, EOS, scenario="Server").first_token
    assert required.status == "failed" and required.failed == TOTAL


@pytest.mark.parametrize("fault, failing_check", [
    ("two_eos", "eos"),
    ("token_count", "sample_length"),
    ("first_token", "first_token"),
])
def test_broken_sut_fails_the_right_check(tmp_path, fault, failing_check):
    path = run_accuracy(tmp_path, "Server", fault)
    result = check_test06(path, EOS, scenario="Server")
    assert_agrees_with_reference(result, path, "Server")
    assert not result.passed
    for check in CHECKS:
        assert failing_indices(result, check) == (FAULTY if check == failing_check else set()), check


def test_eos_in_the_middle_passes_test06_but_not_the_strict_check(tmp_path):
    path = run_accuracy(tmp_path, "Server", "eos_in_middle")
    result = check_test06(path, EOS, scenario="Server")
    assert_agrees_with_reference(result, path, "Server")
    assert result.passed and not result.strict_passed
    assert failing_indices(result, "text_after_eos") == FAULTY
    assert "followed by" in result.text_after_eos.failures[0].reason


def rewrite(source: Path, target: Path, qsl_idx: int, **fields) -> Path:
    entries = json.loads(source.read_text())
    for entry in entries:
        if entry["qsl_idx"] == qsl_idx:
            entry.update(fields)
    target.write_text(json.dumps(entries))
    return target


def hex_tokens(tokens: list[int]) -> str:
    return struct.pack(f"<{len(tokens)}i", *tokens).hex().upper()


@pytest.mark.parametrize("tokens, eos_passes", [
    ([7, 8, EOS], True),
    ([7, 8], True),
    ([7, EOS, EOS], False),
    ([7, 8, EOS, EOS, EOS], False),
    ([EOS, EOS], True),  # TEST06 never examines position 0
    ([EOS, EOS, EOS], False),
    ([EOS], True),
    ([], True),
])
def test_hand_edited_eos_endings(server_log, tmp_path, tokens, eos_passes):
    path = rewrite(server_log, tmp_path / "acc.json", 3,
                   data=hex_tokens(tokens), token_data=hex_tokens(tokens[:1]), token_count=len(tokens))
    result = check_test06(path, EOS, scenario="Server")
    assert_agrees_with_reference(result, path, "Server")
    assert (result.eos.status == "passed") is eos_passes
    assert result.passed is eos_passes


def test_hand_edited_count_and_first_token(server_log, tmp_path):
    entry = next(e for e in json.loads(server_log.read_text()) if e["qsl_idx"] == 6)
    path = rewrite(server_log, tmp_path / "count.json", 6, token_count=entry["token_count"] - 1)
    result = check_test06(path, EOS)
    assert_agrees_with_reference(result, path, "Server")
    assert result.sample_length.failures[0].qsl_idx == 6 and result.sample_length.failed == 1
    path = rewrite(server_log, tmp_path / "first.json", 6, token_data=hex_tokens([99999]))
    result = check_test06(path, EOS)
    assert_agrees_with_reference(result, path, "Server")
    assert result.first_token.failed == 1 and "99999" in result.first_token.failures[0].reason


def test_unreadable_data_fails_every_check(server_log, tmp_path):
    path = rewrite(server_log, tmp_path / "odd.json", 4, data="0102030405")
    result = check_test06(path, EOS, scenario="Server")
    assert not result.passed
    for check in CHECKS:
        assert getattr(result, check).failed == 1, check


def test_int64_log_and_to_dict(tmp_path):
    tokens = [5, 6, 7, EOS]
    path = tmp_path / "int64.json"
    path.write_text(json.dumps([{
        "seq_id": 0, "qsl_idx": 0, "token_count": len(tokens),
        "data": struct.pack("<4q", *tokens).hex(), "token_data": struct.pack("<q", 5).hex(),
    }]))
    result = check_test06(path, EOS, dtype="int64")
    assert result.passed and result.first_token.checked == 1
    as_dict = json.loads(json.dumps(result.to_dict()))
    assert as_dict["passed"] is True and as_dict["dtype"] == "int64"
    assert set(as_dict["checks"]) == {"first_token", "eos", "sample_length", "text_after_eos"}
    assert as_dict["checks"]["eos"]["status"] == "passed"


def test_rejects_empty_log_and_bad_arguments(server_log, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="no responses logged"):
        check_test06(empty, EOS)
    with pytest.raises(ValueError, match="dtype"):
        check_test06(server_log, EOS, dtype="uint8")
    with pytest.raises(ValueError, match="scenario"):
        check_test06(server_log, EOS, scenario="Interactive")
