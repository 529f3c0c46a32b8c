"""The vocabulary the configuration schema checks against: allowed values,
the errors that locate a problem by file and key, names that may become paths,
the number rule of command-line flags, and where conf/ lives."""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Optional

from wallperf.sut.scenarios import SCENARIO_NAMES

SCENARIOS = SCENARIO_NAMES
MODES = ("performance", "accuracy")
DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8")
# The usual short names, accepted wherever a dtype is named (YAML and command line).
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def canonical_dtype(name: str) -> str:
    """The dtype a name means: a short name's full one, any other name as it is."""
    return DTYPE_ALIASES.get(name, name)
BACKENDS = ("native", "openai", "hf", "llamacpp")
# The GGUF the llamacpp backend runs: the model's own file, or its BF16 export.
GGUF_CHOICES = ("source", "bf16")


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
    return (f"{value!r} is not a plain name: use letters, digits, '.', '_' and '-' (at most 128, not starting "
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


def positive(kind, zero_ok: bool = False):
    """An argparse type: a finite number of `kind` (int or float) above 0, or from 0
    with `zero_ok`. Anything else (nan, inf, a negative) is argparse's one line naming
    the flag and the value, exit 2."""
    bound = ">= 0" if zero_ok else "> 0"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not ((0 <= value) if zero_ok else (0 < value)) or not value < math.inf:
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number {bound}")
        return value
    return parse


def positive_list(kind, zero_ok: bool = False):
    """An argparse type: a comma list of `positive(kind, zero_ok)` numbers, at least one."""
    one = positive(kind, zero_ok)

    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r}: need a comma list of numbers")
        return [one(x) for x in items]
    return parse


def conf_dir() -> Path:
    """conf/: beside the packages in a checkout, inside the wallperf package in a wheel
    (the same relative path from here); or $WALLPERF_CONF."""
    return Path(os.environ.get("WALLPERF_CONF", Path(__file__).resolve().parents[2] / "conf"))


def check_sha256(key: str, value: Optional[str]) -> None:
    if value is not None and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
        raise ValueError(f"{key} must be 64 lowercase hex digits, got {value!r}")
