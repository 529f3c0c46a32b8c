"""sut/scenarios.py against the sources it stands for: LoadGen's own TestScenario
enum and compiled library, the mlperf.conf it embeds, mlcommons' submission
checker and TEST06 verifier (the shared copies); and a scan of the source that
fails where a scenario name is compared, mapped or listed outside the table."""
import ast
import re
import typing
from pathlib import Path

import mlperf_loadgen as lg
import pytest

from wallperf.harness.config import SCENARIOS as SCENARIOS_ALLOWED
from wallperf.harness.config import ScenarioConfig
from wallperf.sut.scenarios import (INTERACTIVE, LOADGEN_SCENARIOS, OFFLINE, SCENARIO_NAMES, SCENARIOS, SERVER,
                                    loadgen_scenario, scenario)

REPO = Path(__file__).resolve().parents[2]
INFERENCE = Path(__file__).resolve().parents[3] / "shared" / "mlcommons-inference"
needs_inference = pytest.mark.skipif(not INFERENCE.is_dir(), reason="no mlcommons-inference copy")
CHECKER_VERSION = "v6.1"


@pytest.fixture(scope="module")
def checker(checker_constants):
    return checker_constants


def mlperf_conf_keys() -> set[tuple[str, str, str]]:
    text = (INFERENCE / "loadgen" / "mlperf.conf").read_text()
    keys = set()
    for line in text.splitlines():
        m = re.match(r"^\s*([\w.\-*]+)\.([\w*]+)\.(\w+)\s*=", line.split("#")[0])
        if m:
            keys.add(m.groups())
    return keys


def test_loadgen_scenarios_are_loadgen_s_enum():
    members = {name for name in dir(lg.TestScenario) if not name.startswith("_")
               and isinstance(getattr(lg.TestScenario, name), lg.TestScenario)}
    assert set(LOADGEN_SCENARIOS) == members
    for s in SCENARIOS.values():
        assert s.loadgen_enum == getattr(lg.TestScenario, s.loadgen_name)
    assert INTERACTIVE.loadgen_enum == lg.TestScenario.Server and INTERACTIVE.name not in members


@needs_inference
def test_the_table_and_mlperf_conf_agree():
    keys = mlperf_conf_keys()
    # Only Server carries TTFT/TPOT limits in mlperf.conf: the server-like scenarios run as it.
    with_token_limits = {sc for _, sc, key in keys if key in ("ttft_latency", "tpot_latency")}
    assert with_token_limits == {s.loadgen_name for s in SCENARIOS.values() if s.server_like} == {SERVER.name}
    assert {sc for _, sc, _ in keys} - {"*"} <= set(LOADGEN_SCENARIOS)
    # Interactive's limits live under "<model>-interactive", in the Server scenario, tighter than Server's.
    for model, sc, key in keys:
        if model.endswith(INTERACTIVE.model_suffix) and key == "ttft_latency":
            assert sc == INTERACTIVE.loadgen_name
            base = model[: -len(INTERACTIVE.model_suffix)]
            assert INTERACTIVE.loadgen_model(base) == model and SERVER.loadgen_model(base) == base
    assert any(m.endswith(INTERACTIVE.model_suffix) for m, _, _ in keys)
    assert not any(s.model_suffix for s in SCENARIOS.values() if s is not INTERACTIVE)


@needs_inference
def test_min_query_counts_are_the_checker_s(checker):
    cfg = checker.MODEL_CONFIG[CHECKER_VERSION]
    llms = [m for m in cfg["min-queries"] if m.startswith(("llama", "mixtral", "deepseek", "gpt-oss"))]
    assert llms
    for model in llms:
        for name, count in cfg["min-queries"][model].items():
            assert scenario(name).min_query_count == count, (model, name)
    # The checker lists no Interactive counts: an Interactive run is the Server run LoadGen makes of it.
    for s in SCENARIOS.values():
        kind = loadgen_scenario(s.loadgen_name)
        assert (s.min_query_count, s.tokens_per_second_key) == (kind.min_query_count, kind.tokens_per_second_key)


@needs_inference
def test_throughput_keys_are_the_checker_s_and_loadgen_s(checker):
    samples = checker.RESULT_FIELD_NEW[CHECKER_VERSION]
    for name in ("Offline", "Server", "Interactive"):
        assert scenario(name).samples_per_second_key == samples[name]
    tokens = checker.RESULT_FIELD_BENCHMARK_OVERWRITE[CHECKER_VERSION]["llama3.1-8b"]
    for name, key in tokens.items():
        assert loadgen_scenario(name).tokens_per_second_key == key
    # Every key is one LoadGen writes: its compiled library holds the name.
    library = Path(lg.__file__).read_bytes()
    for s in SCENARIOS.values():
        for key in (s.samples_per_second_key, s.tokens_per_second_key):
            assert key is None or key.encode() in library, key


@needs_inference
def test_first_token_reporting_is_what_test06_checks():
    """TEST06's verifier checks the first token in every scenario but one; FACTS.md: every
    scenario but Offline calls FirstTokenComplete."""
    source = (INFERENCE / "compliance" / "TEST06" / "run_verification.py").read_text()
    skipped = re.findall(r'need_first_token_check = args\.scenario != "(\w+)"', source)
    assert skipped == [OFFLINE.name]
    choices = re.search(r'"--scenario",.*?choices=\[(.*?)\]', source, re.S).group(1)
    assert set(re.findall(r'"(\w+)"', choices)) == set(SCENARIO_NAMES)
    for s in SCENARIOS.values():
        assert s.reports_first_token == (s.name not in skipped)


def test_batch_rules():
    assert scenario("SingleStream").max_batch(16) == 1
    assert scenario("MultiStream").max_batch(4, samples_per_query=8) == 8
    assert scenario("MultiStream").max_batch(16, samples_per_query=8) == 16
    for name in ("Offline", "Server", "Interactive"):
        assert scenario(name).max_batch(16, samples_per_query=64) == 16


@pytest.mark.parametrize("bad", ["offline", "Serverish", "", None, 3])
def test_unknown_names_list_the_allowed_ones(bad):
    with pytest.raises(ValueError) as exc:
        scenario(bad)
    assert "unknown scenario" in str(exc.value) and ", ".join(SCENARIO_NAMES) in str(exc.value)
    with pytest.raises(ValueError, match="allowed: " + ", ".join(LOADGEN_SCENARIOS)):
        loadgen_scenario("Interactive")


# --- No scenario name outside the table -------------------------------------------------------

TABLE = REPO / "sut" / "scenarios.py"
PACKAGES = ("wallperf", "audit", "harness", "sut")


def _names_in(node) -> list[str]:
    """Scenario-name string literals that are `node` or elements of a literal container `node`."""
    if isinstance(node, ast.Constant) and node.value in SCENARIOS:
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [n for elt in node.elts for n in _names_in(elt)]
    return []


def scenario_literals(text: str) -> list[tuple[int, str]]:
    """(line, name) wherever a scenario name is compared (==, !=, in), used as a mapping's key
    or index, or listed (a literal container of two or more names); prose is not."""
    tree = ast.parse(text)
    # A typing.Literal of the names is allowed: test_the_config_literal_is_the_table holds it to the table.
    literal = {id(n) for node in ast.walk(tree) if isinstance(node, ast.Subscript)
               and isinstance(node.value, ast.Name) and node.value.id == "Literal" for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        hits = []
        if id(node) in literal:
            continue
        if isinstance(node, ast.Compare):
            hits = [n for operand in (node.left, *node.comparators) for n in _names_in(operand)]
        elif isinstance(node, ast.Dict):
            hits = [n for key in node.keys if key is not None for n in _names_in(key)]
        elif isinstance(node, ast.Subscript):
            hits = _names_in(node.slice)
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(_names_in(node)) >= 2:
            hits = _names_in(node)
        found += [(node.lineno, name) for name in hits]
    # A listed name inside a comparison is found twice (the comparison, the container).
    return sorted(set(found))


def test_the_scan_finds_what_it_forbids():
    text = ('a = x == "Offline"\nb = y in ("Server", "Interactive")\nc = {"SingleStream": 1}\n'
            'd = t["MultiStream"]\ne = ["Offline", "Server"]\nf = "Offline, in prose"\ng = ("Offline",)\n'
            'h: Literal["Offline", "Server"]\n')
    assert scenario_literals(text) == [(1, "Offline"), (2, "Interactive"), (2, "Server"), (3, "SingleStream"),
                                       (4, "MultiStream"), (5, "Offline"), (5, "Server")]


def test_the_config_literal_is_the_table():
    hints = typing.get_type_hints(ScenarioConfig)
    assert set(typing.get_args(hints["name"])) == set(SCENARIO_NAMES)
    assert SCENARIOS_ALLOWED == SCENARIO_NAMES


def test_no_scenario_name_is_compared_outside_the_table():
    found = [f"{path.relative_to(REPO)}:{line}: {name}" for package in PACKAGES
             for path in sorted((REPO / package).rglob("*.py")) if path != TABLE
             for line, name in scenario_literals(path.read_text())]
    assert not found, "scenario names outside sut/scenarios.py (ask the table instead):\n" + "\n".join(found)
