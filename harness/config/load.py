"""Loading conf/ YAML into the schema's dataclasses: type checks per key, named
lookups under conf/, and a run YAML resolved with everything it references."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import yaml

from wallperf.sut.models.families import family as model_family
from wallperf.harness.config.checks import (SCENARIOS, ConfigError, FieldError, canonical_dtype, conf_dir,
                                   plain_name_problem, shorten)
from wallperf.harness.config.schema import DatasetConfig, HardwareConfig, ModelConfig, RunConfig, ScenarioConfig

# Numbers beyond these are no one's setting, and overflow the C++ types LoadGen takes.
MAX_FLOAT = 1e12
MAX_INT = 2**63 - 1


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, file, key):
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, file, key)
    if origin is Literal:
        if isinstance(value, str) and canonical_dtype(value) in typing.get_args(tp):
            return canonical_dtype(value)
        if value not in typing.get_args(tp):
            raise ConfigError(file, key, f"{shorten(value)} is not allowed; allowed: {_type_name(tp)[7:]}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, file, f"{key}.")
    if tp is tuple:
        tp, value = list, list(value) if isinstance(value, (list, tuple)) else value
    expected = {float: (int, float), int: (int,), str: (str,), bool: (bool,), list: (list,), dict: (dict,)}[tp]
    if isinstance(value, bool) and tp is not bool or not isinstance(value, expected):
        raise ConfigError(file, key, f"expected {_type_name(tp)}, got {type(value).__name__} {shorten(value)}")
    if tp is float and not (math.isfinite(value) and abs(value) <= MAX_FLOAT):
        raise ConfigError(file, key, f"expected a finite number of magnitude at most {MAX_FLOAT:g}, got {shorten(value)}")
    if tp is int and abs(value) > MAX_INT:
        raise ConfigError(file, key, f"expected an integer of magnitude at most 2**63 - 1, got {shorten(value)}")
    return float(value) if tp is float else value


def build(cls, data, file=None, prefix: str = ""):
    """Build dataclass `cls` from a mapping; unknown, missing or ill-typed keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(file, prefix or None, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(file, f"{prefix}{unknown[0]}", f"unknown key; allowed keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(file, key, "missing required key")
            continue
        kwargs[name] = _convert(data[name], hints[name], file, key)
    try:
        return cls(**kwargs)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        key = f"{prefix}{e.key}" if isinstance(e, FieldError) else prefix.rstrip(".") or None
        raise ConfigError(file, key, str(e)) from None


# conf/'s files are a few KiB; a bigger file is not a configuration, and is not read whole.
MAX_YAML_BYTES = 1 << 20
# Values a file may hold once its aliases are expanded: an anchor used ten times in each
# of nine nested levels (billion laughs) is 10**9 values, held as shared references
# until a check or a message walks it.
MAX_YAML_VALUES = 100_000


class _AliasBomb(Exception):
    pass


def _expanded_values(root: yaml.Node) -> int:
    """How many values the document holds with every alias expanded, counted once per node."""
    counted: dict[int, int | None] = {}

    def count(node) -> int:
        if id(node) in counted:
            if counted[id(node)] is None:
                raise _AliasBomb("an alias refers to a value that contains it")
            return counted[id(node)]
        counted[id(node)] = None
        total = 1
        if isinstance(node, yaml.MappingNode):
            total += sum(count(k) + count(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(count(v) for v in node.value)
        if total > MAX_YAML_VALUES:
            raise _AliasBomb(f"its aliases expand to more than {MAX_YAML_VALUES} values")
        counted[id(node)] = total
        return total

    return count(root)


def _safe_load(text: str):
    """yaml.safe_load, refusing a document whose aliases expand past MAX_YAML_VALUES."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_values(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(path, None, "file not found")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
        if len(raw) > MAX_YAML_BYTES:
            raise ConfigError(path, None, f"larger than {MAX_YAML_BYTES >> 20} MiB: not a wallperf configuration")
        data = _safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                          "save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(path, None, f"cannot read it: {e.strerror or e}") from None
    except _AliasBomb as e:
        raise ConfigError(path, None, f"not accepted: {e}; write the values out") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(path, None, f"not valid YAML: {shorten(str(e))}") from None
    if not isinstance(data, dict):
        raise ConfigError(path, None, "expected a mapping at the top level")
    return data


def available(kind: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / kind).glob("*.yaml"))


def _load_named(kind: str, name: str, cls, file=None, key=None):
    if kind == "models" and _looks_like_a_path(name) and not Path(name).expanduser().exists():
        raise ConfigError(file, key, f"{shorten(name)}: no such file or folder; models by name: "
                          f"{', '.join(available('models')) or 'none'}")
    if problem := plain_name_problem(name):
        raise ConfigError(file, key, problem)
    path = conf_dir() / kind / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(available(kind)) or "none"
        what = {"models": "model", "datasets": "dataset", "hardware": "hardware",
                "scenarios": "scenario"}[kind]
        raise ConfigError(file, key, f"unknown {what} {name!r} (no {path}); available: {names}")
    return build(cls, read_yaml(path), path)


def load_model_config(name: str, file=None, key=None) -> ModelConfig:
    return _load_named("models", name, ModelConfig, file, key)


def load_dataset_config(name: str, file=None, key=None) -> DatasetConfig:
    return _load_named("datasets", name, DatasetConfig, file, key)


def load_hardware_config(name: str, file=None, key=None) -> HardwareConfig:
    return _load_named("hardware", name, HardwareConfig, file, key)


def load_scenario_config(name: str, file=None, key=None) -> ScenarioConfig:
    if name not in SCENARIOS:
        raise ConfigError(file, key, f"unknown scenario {shorten(name)}; allowed: {', '.join(SCENARIOS)}")
    return _load_named("scenarios", name.lower(), ScenarioConfig, file, key)


@dataclass(frozen=True)
class ResolvedRun:
    """A run YAML with every name it references loaded and validated."""

    path: Path
    run: RunConfig
    model: ModelConfig
    hardware: HardwareConfig
    dataset: DatasetConfig
    scenarios: tuple

    def to_dict(self) -> dict:
        return {
            "file": str(self.path),
            "run": dataclasses.asdict(self.run),
            "model": dataclasses.asdict(self.model),
            "hardware": dataclasses.asdict(self.hardware),
            "dataset": dataclasses.asdict(self.dataset),
            "scenarios": [dataclasses.asdict(s) for s in self.scenarios],
        }


def _check_tp(run: RunConfig, model: ModelConfig, file) -> None:
    """What tensor parallelism needs of the model (sut/tp.py); a checkpoint without a
    shape in conf/ is checked again once loaded."""
    if run.tp == 1:
        return
    if not model_family(model.family).plain_llama:
        raise ConfigError(file, "tp", f"tp {run.tp}: tensor parallelism shards the dense Llama decoder; "
                          f"model {model.name} is family {model.family} (use tp 1)")
    if model.shape is not None:
        from wallperf.sut.engine.tp import check_shardable

        try:
            check_shardable(model.shape, run.tp)
        except ValueError as e:
            raise ConfigError(file, "tp", f"tp {run.tp} does not fit model {model.name}: {e}") from None


def load_run(path: Path | None = None, overrides: dict | None = None,
             scenario_overrides: dict | None = None, dataset_overrides: dict | None = None,
             benchmark: str | None = None) -> ResolvedRun:
    """Load a run YAML (default conf/runs/default.yaml) and everything it names.

    `overrides` replace run keys, `scenario_overrides` keys of every scenario,
    `dataset_overrides` dataset keys and `benchmark` the model's; they are
    validated like the YAML itself.
    """
    path = Path(path) if path else conf_dir() / "runs" / "default.yaml"
    data = {**read_yaml(path), **(overrides or {})}
    _check_model_is_a_name(data.get("model"), "--model" if "model" in (overrides or {}) else path)
    run = build(RunConfig, data, path)
    model = load_model_config(run.model, path, "model")
    if benchmark is not None:
        model = build(ModelConfig, {**_shallow(model), "benchmark": benchmark}, "--benchmark")
    _check_tp(run, model, path)
    hardware = load_hardware_config(run.hardware, path, "hardware")
    dataset = load_dataset_config(run.dataset, path, "dataset")
    if dataset_overrides:
        dataset = build(DatasetConfig, {**_shallow(dataset), **dataset_overrides}, "command line")
    if dataset.format != "mmlu_jsonl" and "accuracy" in run.modes:
        raise ConfigError(path, "modes", f"dataset {dataset.name} has no reference answers to score: "
                          "run it in performance mode only (--mode performance)")
    scenarios = []
    for i, name in enumerate(run.scenarios):
        sc = load_scenario_config(name, path, f"scenarios[{i}]")
        if scenario_overrides:
            sc = build(ScenarioConfig, {**_shallow(sc), **scenario_overrides}, "command line")
        scenarios.append(sc)
    return ResolvedRun(path, run, model, hardware, dataset, tuple(scenarios))


def _looks_like_a_path(name) -> bool:
    return isinstance(name, str) and ("/" in name or name.endswith((".gguf", ".safetensors")))


def _check_model_is_a_name(model, where) -> None:
    """A run names its model from conf/models; a path given instead gets an answer about the path."""
    if not _looks_like_a_path(model):
        return
    how = (f"a run names a model from conf/models ({', '.join(available('models')) or 'none'}); a checkpoint of "
           "your own goes in a conf/models YAML as source: {kind: path, path: ...}")
    if not Path(model).expanduser().exists():
        raise ConfigError(where, "model", f"{shorten(model)}: no such file or folder; {how}")
    raise ConfigError(where, "model", f"{shorten(model)} is a path, not a plain name; {how}")


def _shallow(obj) -> dict:
    """A dataclass as a mapping of its fields, nested dataclasses kept as mappings."""
    return {f.name: (dataclasses.asdict(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else v)
            for f in dataclasses.fields(obj)}
