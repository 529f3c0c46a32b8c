"""The vocabulary the configuration schema checks against: allowed values,
the errors that locate a problem by file and key, names that may become paths,
the number rule of command-line flags, and where conf/ lives."""
from __future__ import annotations

import argparse
import math
import os
import re
import reprlib
from pathlib import Path
from typing import Optional

from wallperf.sut.backends import BACKENDS  # noqa: F401 (the CLI's choices)
from wallperf.sut.scenarios import SCENARIO_NAMES



SCENARIOS = SCENARIO_NAMES
MODES = ("performance", "accuracy")
DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8")
# The usual short names, accepted wherever a dtype is named (YAML and command line).
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def canonical_dtype(name: str) -> str:
    """The dtype a name means: a short name's full one, any other name as it is."""
    return DTYPE_ALIASES.get(name, name)
# The GGUF the llamacpp backend runs: the model's own file, or its BF16 export.
GGUF_CHOICES = ("source", "bf16")


# A value quoted in an error message is cut to this: a file's value may be megabytes,
# or (YAML aliases) a structure whose full repr is gigabytes.
SHORT_REPR_CHARS = 80
_short = reprlib.Repr()
_short.maxlevel, _short.maxdict, _short.maxlist, _short.maxtuple, _short.maxset = 2, 3, 3, 3, 3
_short.maxstring, _short.maxother, _short.maxlong = SHORT_REPR_CHARS, SHORT_REPR_CHARS, 40


def shorten(value) -> str:
    """repr(value), bounded in length and in the work to make it (a shared sub-structure is not expanded)."""
    text = _short.repr(value)
    return text if len(text) <= 2 * SHORT_REPR_CHARS else text[:2 * SHORT_REPR_CHARS] + "..."


class FieldError(ValueError):
    """Raised in a dataclass's __post_init__ to blame one of its keys."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


class ConfigError(ValueError):
    """A configuration problem, located by file and key."""

    def __init__(self, file: str | Path | None, key: str | None, message: str):
        self.file, self.key, self.message = (str(file) if file else None), key, message
        where = ": ".join(x for x in (self.file, f"key '{key}'" if key else None) if x)
        super().__init__(f"{where}: {message}" if where else message)

    def __reduce__(self):
        # Rebuilt from its three parts when a tensor-parallel rank sends it to the parent.
        return type(self), (self.file, self.key, self.message)


# Names that become parts of paths (output folders, files under conf/ and the cache):
# letters, digits, '.', '_', '-', not starting with '.', so none can climb out of its folder.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def plain_name_problem(value) -> str | None:
    """Why `value` cannot be a name that becomes a path, or None when it can."""
    if isinstance(value, str) and PLAIN_NAME.fullmatch(value):
        return None
    return (f"{shorten(value)} is not a plain name: use letters, digits, '.', '_' and '-' (at most 128, not starting "
            "with '.'); it becomes part of a path")


def check_plain_names(obj, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and (problem := plain_name_problem(value)):
            raise FieldError(key, problem)


def folder_inside(root: Path, folder: Path) -> Path:
    """`folder`, created, after checking that it resolves inside `root` (the run's --out)."""
    if not folder.resolve().is_relative_to(root.resolve()):
        raise ConfigError(None, "--out", f"{folder} resolves outside {root}: check the run's 'system' and the "
                          "model's 'name' (plain names only)")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_out_folder(out: Path) -> None:
    """--out names a folder to create, or an empty one: checked before any test runs, so a
    bad --out costs nothing (a file in its path, a full folder, no write permission)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(None, "--out", f"{out} is a file; --out names a folder to create")
    if out.is_dir():
        if any(out.iterdir()):
            raise ConfigError(None, "--out", f"{out} exists and is not empty; choose a new folder")
        existing = out
    else:
        existing = next(p for p in out.absolute().parents if p.exists() or p == p.parent)
        if not existing.is_dir():
            raise ConfigError(None, "--out", f"cannot create {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(None, "--out", f"cannot create {out}: no write permission in {existing}")


def positive(kind, zero_ok: bool = False, most=None):
    """An argparse type: a finite number of `kind` (int or float) above 0, or from 0
    with `zero_ok`, and at most `most`. Anything else (nan, inf, a negative, too big)
    is argparse's one line naming the flag, the value and the range, exit 2."""
    bound = ">= 0" if zero_ok else "> 0"
    bound += f" and <= {most}" if most is not None else ""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{shorten(text)} is not {'an integer' if kind is int else 'a number'}") from None
        if not ((0 <= value) if zero_ok else (0 < value)) or not value < math.inf or most is not None and value > most:
            raise argparse.ArgumentTypeError(f"{shorten(text)} must be a finite number {bound}")
        return value
    return parse


def positive_list(kind, zero_ok: bool = False):
    """An argparse type: a comma list of `positive(kind, zero_ok)` numbers, at least one."""
    one = positive(kind, zero_ok)

    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{shorten(text)}: need a comma list of numbers")
        return [one(x) for x in items]
    return parse


def conf_dir() -> Path:
    """conf/: beside the packages in a checkout, inside the wallperf package in a wheel
    (the same relative path from here); or $WALLPERF_CONF."""
    return Path(os.environ.get("WALLPERF_CONF", Path(__file__).resolve().parents[2] / "conf"))


def check_sha256(key: str, value: Optional[str]) -> None:
    if value is not None and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
        raise ValueError(f"{key} must be 64 lowercase hex digits, got {shorten(value)}")
