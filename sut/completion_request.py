"""The requests `wallperf serve` takes: an OpenAI /v1/completions body checked
field by field into a CompletionRequest, or a RequestError naming the field
(HTTP 400), the model (404) or the engine's state (503)."""
from __future__ import annotations

from dataclasses import dataclass

from sut.engine import SamplingParams

# OpenAI's default for the legacy completions endpoint.
DEFAULT_MAX_TOKENS = 16
MAX_BODY_BYTES = 16 << 20
# Fields that would change what greedy decoding returns: each with the only value served.
_FIXED_FIELDS = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None,), "suffix": (None, ""),
                 "stop": (None, [], ""), "stop_token_ids": (None, [])}


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = {404: "not_found_error", 503: "server_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


@dataclass(frozen=True)
class CompletionRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_completion_request(body, tokenizer, vocab_size: int, max_seq_len: int,
                             model_name: str) -> CompletionRequest:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    if body.get("model") not in (None, model_name):
        raise RequestError(404, f"the model {body['model']!r} does not exist; served: {model_name!r}", "model")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or temperature != 0):
        raise RequestError(400, f"only greedy decoding is served: temperature must be 0 or absent, "
                                f"got {temperature!r}", "temperature")
    for name, allowed in _FIXED_FIELDS.items():
        if body.get(name, allowed[0]) not in allowed:
            raise RequestError(400, f"{name}={body[name]!r} is not supported (greedy decoding, one "
                                    f"completion per request)", name)
    prompt_ids = _prompt_ids(body.get("prompt"), tokenizer, vocab_size)
    max_tokens = _int_field(body, "max_tokens", DEFAULT_MAX_TOKENS, minimum=1)
    min_tokens = _int_field(body, "min_tokens", 0, minimum=0)
    if min_tokens > max_tokens:
        raise RequestError(400, f"min_tokens {min_tokens} exceeds max_tokens {max_tokens}", "min_tokens")
    if len(prompt_ids) + max_tokens > max_seq_len:
        raise RequestError(400, f"this model's maximum context length is {max_seq_len} tokens; the prompt "
                                f"has {len(prompt_ids)} and max_tokens asks for {max_tokens}", "max_tokens")
    ignore_eos, stream = _bool_field(body, "ignore_eos"), _bool_field(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise RequestError(400, "stream_options must be an object and needs stream: true", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))
    params = SamplingParams(max_new_tokens=max_tokens, min_new_tokens=min_tokens, ignore_eos=ignore_eos)
    return CompletionRequest(tuple(prompt_ids), params, stream, include_usage)


def _prompt_ids(prompt, tokenizer, vocab_size: int) -> list[int]:
    # OpenAI's batch forms are accepted only with one prompt in them.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = prompt
        if any(not 0 <= t < vocab_size for t in ids):
            raise RequestError(400, f"prompt token ids must lie in [0, {vocab_size})", "prompt")
    else:
        raise RequestError(400, "prompt must be a string or a list of token ids (one prompt per request)",
                           "prompt")
    if not ids:
        raise RequestError(400, "the prompt is empty", "prompt")
    return ids


def _int_field(body: dict, name: str, default: int, minimum: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RequestError(400, f"{name} must be an integer >= {minimum}, got {value!r}", name)
    return value


def _bool_field(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(400, f"{name} must be true or false, got {value!r}", name)
    return value
