"""Fuzzing every parser that reads what a user or a server sends (hypothesis).

The property is the same for each: any input gives a result or the project's
own error type for that input (ConfigError, LogParseError, RequestError,
RequestFailed), never another exception, so a bad input is one clear line and
never a traceback. Inputs mix arbitrary values with near-valid ones (real key
names, real MLLOG keys, real stream chunks) so the parsers get past their first
check. EXAMPLES per target keeps CI time small; WALLPERF_FUZZ_EXAMPLES=5000 fuzzes
deeper, and `--hypothesis-seed` replays a run.
"""
import json
import os
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wallperf.harness.config import ConfigError, ModelConfig, RunConfig, ScenarioConfig, build, read_yaml
from wallperf.harness.loadgen.logs import LogParseError, read_detail_log, scenario_metrics
from wallperf.harness.loadgen.settings import check_user_conf
from wallperf.sut.backends.sse import DONE, RequestFailed, choice_content, choices, error_message, parse_event, usage
from wallperf.sut.serving.completion_request import RequestError, decode_json_body, parse_completion_request

EXAMPLES = int(os.environ.get("WALLPERF_FUZZ_EXAMPLES", 150))
fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# JSON-like values: what YAML and JSON parsers hand over.
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def near(keys) -> st.SearchStrategy:
    """Mappings whose keys are mostly the real ones, with values of any type."""
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), json_values, max_size=len(keys) + 2)


# -- the config loader ----------------------------------------------------------

RUN_KEYS = ["model", "hardware", "dataset", "scenarios", "system", "backend", "openai", "gguf", "dtype",
            "device", "modes", "seed", "tp"]
SCENARIO_KEYS = ["name", "min_duration_s", "min_query_count", "max_batch", "target_qps", "ttft_ms", "tpot_ms",
                 "offline_expected_qps", "expected_latency_ms", "samples_per_query"]
MODEL_KEYS = ["name", "family", "format", "source", "shape", "published_dtype", "benchmark", "tokenizer_from",
              "mome"]


@fuzz
@given(cls_keys=st.sampled_from([(RunConfig, RUN_KEYS), (ScenarioConfig, SCENARIO_KEYS),
                                 (ModelConfig, MODEL_KEYS)]), data=st.data())
def test_config_build_gives_a_config_or_config_error(cls_keys, data):
    cls, keys = cls_keys
    mapping = data.draw(near(keys) | json_values)
    try:
        built = build(cls, mapping, "fuzz.yaml")
    except ConfigError:
        return
    assert isinstance(built, cls)


@fuzz
@given(raw=st.binary(max_size=300) | st.text(alphabet=string.printable + "é\u2028[]{}:-&*!|>", max_size=300)
       .map(str.encode))
def test_read_yaml_gives_a_mapping_or_config_error(raw, tmp_path):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(raw)
    try:
        assert isinstance(read_yaml(path), dict)
    except ConfigError:
        pass


# -- the user.conf checker ------------------------------------------------------

conf_lines = st.one_of(
    st.text(max_size=60),
    st.builds(lambda m, s, k, v: f"{m}.{s}.{k} = {v}",
              st.sampled_from(["*", "llama3_1-8b", "m.x"]) | st.text(max_size=6),
              st.sampled_from(["*", "Server", "Offline", "SingleStream"]) | st.text(max_size=6),
              st.sampled_from(["target_qps", "min_duration", "min_query_count"]) | st.text(max_size=6),
              st.sampled_from(["1", "nan", "inf", "-0", "1e400", "0x10"]) | st.text(max_size=6)))


@fuzz
@given(lines=st.lists(conf_lines, max_size=6), junk=st.binary(max_size=8))
def test_user_conf_check_passes_or_gives_config_error(lines, junk, tmp_path):
    path = tmp_path / "user.conf"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + junk)
    try:
        check_user_conf(path)
    except ConfigError:
        pass


# -- the detail-log parser --------------------------------------------------------

MLLOG_KEYS = ["effective_scenario", "effective_test_mode", "result_validity", "result_samples_per_second",
              "result_completed_samples_per_sec", "result_50.00_percentile_latency_ns", "early_stopping_met",
              "result_min_duration_met", "early_stopping_result", "result_query_count",
              "generated_samples_per_query", "result_first_token_99.00_percentile_latency_ns"]
mllog_entries = st.fixed_dictionaries(
    {"key": st.sampled_from(MLLOG_KEYS) | json_values, "value": json_values},
    optional={"metadata": json_values | st.fixed_dictionaries({"is_error": st.booleans(),
                                                                "is_warning": st.booleans()})})
log_lines = st.one_of(mllog_entries.map(lambda e: ":::MLLOG " + json.dumps(e)),
                      json_values.map(lambda v: ":::MLLOG " + json.dumps(v)),
                      st.text(max_size=40).map(lambda t: ":::MLLOG " + t), st.text(max_size=40))


@fuzz
@given(lines=st.lists(log_lines, max_size=8), junk=st.binary(max_size=6))
def test_detail_log_gives_metrics_or_log_parse_error(lines, junk, tmp_path):
    path = tmp_path / "mlperf_log_detail.txt"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + junk)
    try:
        log = read_detail_log(path)
        scenario_metrics(log)
    except LogParseError:
        pass


# -- the completion-request parser --------------------------------------------------

REQUEST_KEYS = ["model", "prompt", "max_tokens", "min_tokens", "temperature", "stream", "stream_options",
                "ignore_eos", "n", "stop", "top_p", "logit_bias", "seed", "echo", "logprobs"]
prompts = st.one_of(st.text(max_size=40), st.lists(st.integers(-5, 70000), max_size=8),
                    st.lists(st.text(max_size=10) | st.lists(st.integers(0, 100), max_size=3), max_size=2))


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf_path):
    from wallperf.sut.loading.load import load_tokenizer

    return load_tokenizer(smollm2_gguf_path)


@fuzz
@given(body=near(REQUEST_KEYS) | json_values, prompt=prompts, with_prompt=st.booleans())
def test_completion_request_gives_a_request_or_request_error(tokenizer, body, prompt, with_prompt):
    if with_prompt and isinstance(body, dict):
        body = {**body, "prompt": prompt}
    try:
        parse_completion_request(body, tokenizer, tokenizer.vocab_size, 64, "tiny", max_prompt_chars=64 * 16)
    except RequestError as e:
        assert 400 <= e.status < 500 and json.dumps(e.body())


@fuzz
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
       | st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth))
def test_json_body_gives_a_value_or_request_error(raw):
    try:
        decode_json_body(raw)
    except RequestError as e:
        assert e.status == 400


# -- the SSE client parser -----------------------------------------------------------

stream_choices = st.fixed_dictionaries({}, optional={
    "text": json_values, "token_ids": st.lists(st.integers(-2, 10**20), max_size=4) | json_values,
    "finish_reason": st.sampled_from(["stop", "length", None]) | json_values,
    "delta": json_values | st.fixed_dictionaries({}, optional={"content": json_values}),
    "reasoning_content": json_values})
chunks = st.fixed_dictionaries({}, optional={"choices": st.lists(stream_choices, max_size=2) | json_values,
                                             "usage": json_values, "error": json_values})
sse_lines = st.one_of(chunks.map(lambda c: b"data: " + json.dumps(c).encode()),
                      json_values.map(lambda v: b"data: " + json.dumps(v).encode()),
                      st.binary(max_size=60).map(lambda b: b"data: " + b), st.binary(max_size=60),
                      st.just(b"data: [DONE]"))


@fuzz
@given(line=sse_lines)
def test_sse_line_gives_a_chunk_or_request_failed(line):
    try:
        chunk = parse_event(line)
        if chunk is None or chunk is DONE:
            return
        usage(chunk)
        for choice in choices(chunk):
            text, ids, reason = choice_content(choice)
            assert isinstance(text, str) and all(isinstance(t, int) for t in ids)
    except RequestFailed as e:
        assert isinstance(e.reason, str)


@fuzz
@given(body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()) | json_values)
def test_error_message_is_always_a_string(body):
    assert isinstance(error_message(body), str)


# -- redaction at a cut: a key planted at every offset around MAX_ERROR_BODY --------------

FUZZ_KEY = "sk-fuzz-9f3b1c7d2e8a4b6c"


class _ErrorServer:
    """A server that answers every completion with 401 and the body it was given."""

    def __init__(self):
        import http.server
        import threading

        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(401)
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                self.wfile.write(owner.body)

            def log_message(self, *args):
                pass

        self.body = b""
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@pytest.fixture(scope="module")
def error_server():
    server = _ErrorServer()
    yield server
    server.httpd.shutdown()


def _fragments(secret: str) -> set[str]:
    """Every prefix and suffix of the key 4 characters or longer, lower-cased: what a cut can leave."""
    return {secret[:k].lower() for k in range(4, len(secret) + 1)} | \
        {secret[-k:].lower() for k in range(4, len(secret) + 1)}


def _failure_reason(url: str) -> str:
    from wallperf.sut.backends.openai import OpenAIBackend
    from wallperf.sut.engine.engine import SamplingParams

    with OpenAIBackend([url], "m", max_concurrency=1, timeout_s=10, retries=0) as backend:
        backend.add_request(1, [1, 2], SamplingParams(max_new_tokens=2))
        while backend.has_unfinished():
            backend.step()
        return json.dumps(backend.stats())


@fuzz
@given(offset=st.integers(-40, 40), form=st.sampled_from(["bare", "sentence", "json"]),
       case=st.sampled_from([str, str.upper, str.swapcase]), pad=st.sampled_from(" x\n"))
def test_a_key_planted_around_the_error_body_cut_never_leaks(error_server, monkeypatch, offset, form, case, pad):
    """The body is cut at MAX_ERROR_BODY bytes: the key starts `offset` characters from the
    cut (so it lies before, across or after it), in any case. No piece of it of 4 characters
    or more is in the failure reasons that go to results.json, reports and stderr."""
    from wallperf.sut.backends.openai import MAX_ERROR_BODY

    monkeypatch.setenv("OPENAI_API_KEY", FUZZ_KEY)
    key = case(FUZZ_KEY)
    said = {"bare": key, "sentence": f"Incorrect API key provided: {key}",
            "json": f'{{"error": {{"message": "Incorrect API key provided: {key}"}}}}'}[form]
    start = MAX_ERROR_BODY + offset - (len(said) - len(key))
    error_server.body = (pad * max(start, 0) + said + pad * 50).encode()
    reason = _failure_reason(error_server.url).lower()
    assert not {f for f in _fragments(FUZZ_KEY) if f in reason}, reason[-200:]


# -- user.conf: every value LoadGen reads as written, every other one refused --------------

# What TestSettings.FromConfig sets for each key (mlcommons-loadgen 6.0.17's Python names).
# Seeds are left out: LoadGen takes those from mlperf.conf whatever a user.conf says.
LOADGEN_FIELDS = {"min_duration": "min_duration_ms", "max_duration": "max_duration_ms",
                  "min_query_count": "min_query_count", "max_query_count": "max_query_count",
                  "performance_sample_count_override": "performance_sample_count_override"}
conf_values = st.one_of(st.integers(-2**70, 2**70).map(str), st.integers(0, 10**8).map(str),
                        st.sampled_from(["-5", "-1", "0", "010", "0x10", "1.5", "1e3", "+7", "99999999999999999999999",
                                         "18446744073709551615", "18446744073709551616", "nan", "-0"]))


@fuzz
@given(key=st.sampled_from(sorted(LOADGEN_FIELDS)), value=conf_values)
def test_user_conf_values_are_read_by_loadgen_as_written_or_refused(key, value, tmp_path):
    """The reference is LoadGen itself: a value the check accepts is the value FromConfig
    sets (no wrap of a negative, no octal, no overflow); a refused one is one line naming
    the key and the allowed range."""
    import mlperf_loadgen as lg

    path = tmp_path / "user.conf"
    path.write_text(f"fuzzmodel.Offline.{key} = {value}\n")
    try:
        check_user_conf(path)
    except ConfigError as e:
        assert e.key == key and "allowed: an integer from" in e.message and "\n" not in str(e)
        return
    s = lg.TestSettings()
    assert s.FromConfig(str(path), "fuzzmodel", "Offline") == 0
    assert getattr(s, LOADGEN_FIELDS[key]) == int(value)
    assert value == "0" or not value.lstrip("+").startswith("0")


# -- YAML aliases: bounded expansion ----------------------------------------------------

@fuzz
@given(width=st.integers(1, 12), depth=st.integers(1, 12))
def test_yaml_aliases_expand_to_the_cap_and_no_further(width, depth, tmp_path):
    """Nested anchors (billion laughs): a document of width**depth values once expanded is
    read as yaml.safe_load reads it while under the cap, and refused quickly beyond it,
    with a short message."""
    import time

    import yaml

    from wallperf.harness.config.load import MAX_YAML_VALUES

    lines = ["model: m", "a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, depth)]
    lines.append(f"scenarios: [*a{depth - 1}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    # Values once expanded: the last anchor's tree under `scenarios`, counted as the loader
    # counts (each list and each string one value), plus the smaller trees under the other keys.
    tree = [sum(width ** j for j in range(i + 2)) for i in range(depth)]
    expanded = sum(tree) + tree[-1] + 1 + 2 * (depth + 2) + 1
    start = time.monotonic()
    try:
        data = read_yaml(path)
    except ConfigError as e:
        assert expanded > MAX_YAML_VALUES and "aliases expand" in str(e) and len(str(e)) < 300
    else:
        assert expanded <= MAX_YAML_VALUES * 1.1 and data == yaml.safe_load(path.read_text())
    assert time.monotonic() - start < 5
