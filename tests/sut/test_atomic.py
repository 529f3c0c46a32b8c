"""wallperf.sut.atomic: the one atomic-write helper (results, caches, exports, test records)."""
import stat

import pytest

from wallperf.sut.atomic import atomic_file, atomic_path


def test_a_completed_block_replaces_the_file_with_the_given_mode(tmp_path):
    dest = tmp_path / "sub" / "out.bin"
    with atomic_file(dest, mode=0o600) as f:
        f.write(b"new")
    assert dest.read_bytes() == b"new"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert [p.name for p in dest.parent.iterdir()] == ["out.bin"]


def test_a_failure_inside_the_block_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk"):
        with atomic_file(dest) as f:
            f.write(b"half a fi")
            raise RuntimeError("disk full")
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_path_hands_a_path_to_writers_that_want_one(tmp_path):
    dest = tmp_path / "model.safetensors"
    with atomic_path(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.safetensors.")
        assert not dest.exists()
        tmp.write_text("whole")
    assert dest.read_text() == "whole"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644


def test_an_interrupt_is_not_swallowed_and_removes_the_temporary(tmp_path):
    dest = tmp_path / "x"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(dest) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
