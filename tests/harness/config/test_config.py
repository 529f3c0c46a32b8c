"""wallperf.harness.config: YAML files validated into frozen dataclasses; every error
names the file and the key. Each test works on a copy of conf/ (WALLPERF_CONF)
and writes its broken YAML there; expected values are read from the YAML
files themselves with PyYAML, not from the loader.
"""
import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from wallperf.harness import config
from wallperf.harness.config import ConfigError, load_model_config, load_run

REPO_CONF = Path(__file__).resolve().parents[3] / "conf"


@pytest.fixture
def conf(tmp_path, monkeypatch) -> Path:
    dest = tmp_path / "conf"
    shutil.copytree(REPO_CONF, dest)
    monkeypatch.setenv("WALLPERF_CONF", str(dest))
    return dest


def default_run(conf: Path) -> dict:
    return yaml.safe_load((conf / "runs" / "default.yaml").read_text())


def write_yaml(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def run_yaml(conf: Path, name="bad", **changes) -> Path:
    data = {**default_run(conf), **changes}
    return write_yaml(conf / "runs" / f"{name}.yaml", {k: v for k, v in data.items() if v is not None})


def model_yaml(conf: Path, name: str, **changes) -> Path:
    data = yaml.safe_load((conf / "models" / "smollm2-135m.yaml").read_text())
    data.update(changes, name=name)
    return write_yaml(conf / "models" / f"{name}.yaml", data)


def test_default_run_loads_what_the_yaml_says(conf):
    raw = default_run(conf)
    resolved = load_run()
    assert resolved.path == conf / "runs" / "default.yaml"
    assert (resolved.run.model, resolved.run.dtype, resolved.run.scenarios) == (
        raw["model"], raw["dtype"], raw["scenarios"])
    assert resolved.model.name == raw["model"]
    model = yaml.safe_load((conf / "models" / f"{raw['model']}.yaml").read_text())
    assert resolved.model.source.sha256 == model["source"]["sha256"]
    assert resolved.model.shape.n_kv_heads == model["shape"]["n_kv_heads"]
    assert [s.name for s in resolved.scenarios] == raw["scenarios"]
    for sc in resolved.scenarios:
        want = yaml.safe_load((conf / "scenarios" / f"{sc.name.lower()}.yaml").read_text())
        assert {k: getattr(sc, k) for k in want} == want
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.run.dtype = "float32"


def test_unknown_key_names_file_and_key_and_lists_allowed(conf):
    path = run_yaml(conf, colour="red")
    with pytest.raises(ConfigError) as e:
        load_run(path)
    msg = str(e.value)
    assert e.value.file == str(path) and e.value.key == "colour"
    assert str(path) in msg and "'colour'" in msg and "unknown key" in msg
    allowed = msg.split("allowed keys:")[1]
    for f in dataclasses.fields(config.RunConfig):
        assert f.name in allowed


def test_nested_unknown_key_is_dotted(conf):
    path = model_yaml(conf, "nested", source={"kind": "path", "path": "/x", "bogus": 1})
    with pytest.raises(ConfigError) as e:
        load_model_config("nested")
    assert e.value.key == "source.bogus" and str(path) in str(e.value)


def test_nested_unknown_key_lists_allowed_keys(conf):
    path = model_yaml(conf, "nested", source={"kind": "path", "path": "/x", "bogus": 1})
    with pytest.raises(ConfigError) as e:
        load_model_config("nested")
    msg = str(e.value)
    assert str(path) in msg and "bogus" in msg
    for f in dataclasses.fields(config.ArtifactSource):
        assert f.name in msg.split("allowed keys:")[1]


@pytest.mark.parametrize("key, value, expect", [
    ("seed", "abc", "expected int, got str 'abc'"),
    ("seed", True, "expected int, got bool"),
    ("seed", 1.5, "expected int, got float"),
    ("system", 7, "expected str, got int"),
    ("scenarios", "Offline", "expected list, got str"),
    ("dtype", "float64", "'float64' is not allowed; allowed: 'auto', 'float32', 'bfloat16', 'float16', 'fp8'"),
    ("backend", "vllm", "unknown backend 'vllm'; available: native, openai, hf, llamacpp"),
])
def test_wrong_type_names_file_key_and_expected_type(conf, key, value, expect):
    path = run_yaml(conf, **{key: value})
    with pytest.raises(ConfigError) as e:
        load_run(path)
    assert e.value.file == str(path) and e.value.key == key
    assert f"{path}: key '{key}': " in str(e.value) and expect in str(e.value)


def test_wrong_type_in_a_scenario_file(conf):
    path = conf / "scenarios" / "offline.yaml"
    data = yaml.safe_load(path.read_text())
    write_yaml(path, {**data, "max_batch": 2.5})
    with pytest.raises(ConfigError) as e:
        load_run()
    assert e.value.file == str(path) and e.value.key == "max_batch"
    assert "expected int, got float 2.5" in str(e.value)


def test_missing_required_key(conf):
    path = run_yaml(conf, model=None)
    with pytest.raises(ConfigError) as e:
        load_run(path)
    assert e.value.file == str(path) and e.value.key == "model"
    assert "missing required key" in str(e.value)


def test_unknown_scenario_name_lists_allowed(conf):
    path = run_yaml(conf, scenarios=["Offline", "Bogus"])
    with pytest.raises(ConfigError) as e:
        load_run(path)
    msg = str(e.value)
    assert str(path) in msg and "'Bogus'" in msg
    for name in config.SCENARIOS:
        assert name in msg


def test_unknown_model_name_lists_available(conf):
    model_yaml(conf, "another-model")
    path = run_yaml(conf, model="no-such-model")
    with pytest.raises(ConfigError) as e:
        load_run(path)
    msg = str(e.value)
    assert e.value.file == str(path) and e.value.key == "model"
    names = sorted(p.stem for p in (conf / "models").glob("*.yaml"))
    assert "another-model" in names
    assert "unknown model 'no-such-model'" in msg and f"available: {', '.join(names)}" in msg


def test_missing_files(conf, tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        load_run(missing)
    assert e.value.file == str(missing) and "file not found" in str(e.value)

    shutil.rmtree(conf / "hardware")
    with pytest.raises(ConfigError) as e:
        load_run()
    assert e.value.key == "hardware" and "'cpu'" in str(e.value) and "available: none" in str(e.value)
    assert str(conf / "runs" / "default.yaml") in str(e.value)


def test_unknown_hardware_is_spelled_right(conf):
    with pytest.raises(ConfigError) as e:
        load_run(run_yaml(conf, hardware="tpu"))
    assert "unknown hardware 'tpu'" in str(e.value)


@pytest.mark.parametrize("bad", ["B179C9523D0E6A0F98A330C7562B682750A6F8C8C15E5BC70EA373728110DB53",
                                 "b179c9523d0e", "z" * 64])
def test_bad_sha256_format(conf, bad):
    source = yaml.safe_load((conf / "models" / "smollm2-135m.yaml").read_text())["source"]
    path = model_yaml(conf, "badsha", source={**source, "sha256": bad})
    with pytest.raises(ConfigError) as e:
        load_model_config("badsha")
    msg = str(e.value)
    assert e.value.file == str(path) and e.value.key == "source"
    assert "sha256 must be 64 lowercase hex digits" in msg and repr(bad) in msg


def test_load_run_with_overrides(conf):
    server = yaml.safe_load((conf / "scenarios" / "server.yaml").read_text())
    resolved = load_run(overrides={"dtype": "float32", "scenarios": ["Server"], "modes": ["accuracy"]},
                        scenario_overrides={"max_batch": 4, "min_duration_s": 5.0},
                        dataset_overrides={"per_subject": 3})
    assert resolved.run.dtype == "float32" and resolved.run.modes == ["accuracy"]
    (sc,) = resolved.scenarios
    assert (sc.name, sc.max_batch, sc.min_duration_s) == ("Server", 4, 5.0)
    assert (sc.target_qps, sc.ttft_ms, sc.tpot_ms) == (server["target_qps"], server["ttft_ms"], server["tpot_ms"])
    assert resolved.dataset.per_subject == 3
    # Untouched keys keep the YAML's values.
    assert resolved.run.model == default_run(conf)["model"]


@pytest.mark.parametrize("kwargs, key", [
    (dict(overrides={"dtype": "float64"}), "dtype"),
    (dict(overrides={"scenarios": ["Nope"]}), None),
    (dict(scenario_overrides={"max_batch": "four"}), "max_batch"),
    (dict(dataset_overrides={"max_new_tokens": 1}), None),
])
def test_bad_overrides_are_config_errors(conf, kwargs, key):
    with pytest.raises(ConfigError) as e:
        load_run(**kwargs)
    if key is not None:
        assert e.value.key == key


def test_invalid_yaml_syntax(conf):
    path = conf / "runs" / "broken.yaml"
    path.write_text("model: smollm2-135m\nscenarios: [Offline, Server\n")
    with pytest.raises(ConfigError) as e:
        load_run(path)
    assert e.value.file == str(path) and "not valid YAML" in str(e.value)

    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError) as e:
        load_run(path)
    assert e.value.file == str(path) and "expected a mapping" in str(e.value)


def test_cli_run_with_bad_config_exits_2_and_writes_nothing(conf, tmp_path, capsys):
    from wallperf.cli import main

    path = run_yaml(conf, colour="red")
    out = tmp_path / "out"
    assert main(["run", "--config", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'colour'" in err and "allowed keys" in err
    assert not out.exists()
