"""wallperf.harness.loadgen.results' writes: whole or not at all, synced before the
rename, 0644, redacted; a failed write is an OutputError naming the file and
leaves no temp file behind."""
import errno
import json
import os

import pytest

from wallperf.sut import atomic
from wallperf.harness.loadgen.results import OutputError, write_json_atomic, write_text_atomic


def test_json_is_synced_then_renamed_readable_by_all_and_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-results-write-0123456789")
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b)))
    path = tmp_path / "sub" / "results.json"
    write_json_atomic(path, {"reason": "HTTP 401: sk-results-write-0123456789", "url": "http://u:p4ss@h/v1"})
    # The file's data before the rename, the folder's entry after it.
    assert calls == ["fsync", "replace", "fsync"]
    assert json.loads(path.read_text()) == {"reason": "HTTP 401: ***", "url": "http://***@h/v1"}
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    write_text_atomic(path, "old\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(OutputError, match=f"cannot write {path}: No space left on device") as info:
        write_text_atomic(path, "new\n")
    assert info.value.errno == errno.ENOSPC
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


@pytest.mark.parametrize("reason", [
    'HTTP 401: {"detail": "Authorization: Bearer tok-abc\\"def"}',
    'Bearer \\"quoted\\" and a backslash \\\\ at the end \\',
    'message {"message": {"nested": "Bearer x\\u0022y"}}',
])
def test_results_json_stays_valid_json_whatever_the_strings_hold(tmp_path, monkeypatch, reason):
    """Strings are redacted in the object tree, then serialized: a mask never lands inside
    a JSON escape (issue: a bearer mask over the JSON text ate the backslash of \\")."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-results-write-0123456789")
    path = tmp_path / "results.json"
    write_json_atomic(path, {"failure_reasons": {reason: 1}, "examples": [{"reason": reason}]})
    back = json.loads(path.read_text())
    (key, count), = back["failure_reasons"].items()
    assert count == 1 and back["examples"][0]["reason"] == key and "tok-abc" not in key
