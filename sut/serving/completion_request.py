"""The requests `wallperf serve` takes: an OpenAI /v1/completions body checked
field by field into a CompletionRequest, or a RequestError naming the field
(HTTP 400), the model (404) or the engine's state (503).

Any body gives one or the other: JSON nested too deep for the parser is a 400,
and a text prompt too long to fit the context whatever it tokenizes to is
refused by its length in characters, before the tokenizer spends time on it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from wallperf.sut.engine.engine import SamplingParams

# OpenAI's default for the legacy completions endpoint.
DEFAULT_MAX_TOKENS = 16
MAX_BODY_BYTES = 16 << 20
# Fields that would change what greedy decoding returns: each with the only value served.
_FIXED_FIELDS = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None,), "suffix": (None, ""),
                 "stop": (None, [], ""), "stop_token_ids": (None, []), "top_p": (None, 1), "top_k": (None, -1, 0),
                 "min_p": (None, 0), "logit_bias": (None, {}), "presence_penalty": (None, 0),
                 "frequency_penalty": (None, 0), "repetition_penalty": (None, 1), "seed": (None,)}


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 503: "server_error"}.get(
            self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


def max_token_chars(tokenizer) -> int:
    """The most characters one token can stand for (its longest vocabulary entry): a
    text of more than max_seq_len times this many characters cannot fit the context."""
    return max(map(len, tokenizer.backend.get_vocab(with_added_tokens=True)), default=1)


def decode_json_body(data: bytes):
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, "the body is not valid JSON: nested too deeply") from None
    _check_text(body)
    return body


def _check_text(body) -> None:
    """JSON's \\u escapes can spell a lone UTF-16 surrogate (\\ud800), which is no Unicode
    character: no tokenizer can encode it, so it is the client's error (400)."""
    pending = [body]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RequestError(400, f"the body holds a lone surrogate ({value[e.start]!a}), which is not "
                                   "Unicode text") from None
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


@dataclass(frozen=True)
class CompletionRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_completion_request(body, tokenizer, vocab_size: int, max_seq_len: int, model_name: str,
                             max_prompt_chars: int | None = None) -> CompletionRequest:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    if body.get("model") not in (None, model_name):
        raise RequestError(404, f"the model {_short(body['model'])} does not exist; served: {model_name!r}", "model")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or temperature != 0):
        raise RequestError(400, f"only greedy decoding is served: temperature must be 0 or absent, "
                                f"got {_short(temperature)}", "temperature")
    for name, allowed in _FIXED_FIELDS.items():
        if body.get(name, allowed[0]) not in allowed:
            raise RequestError(400, f"{name}={_short(body[name])} is not supported (greedy decoding, one "
                                    f"completion per request)", name)
    prompt_ids = _prompt_ids(body.get("prompt"), tokenizer, vocab_size, max_prompt_chars)
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


def _prompt_ids(prompt, tokenizer, vocab_size: int, max_chars: int | None) -> list[int]:
    # OpenAI's batch forms are accepted only with one prompt in them.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if max_chars is not None and len(prompt) > max_chars:
            raise RequestError(400, f"the prompt has {len(prompt)} characters; at most {max_chars} can fit this "
                                    "model's context", "prompt")
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
        raise RequestError(400, f"{name} must be an integer >= {minimum}, got {_short(value)}", name)
    return value


def _bool_field(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(400, f"{name} must be true or false, got {_short(value)}", name)
    return value


def _short(value, limit: int = 100) -> str:
    """A client's value quoted in an error: cut short, since the client sent it and may have sent a lot."""
    try:
        text = repr(value)
    except RecursionError:
        return "(a value nested too deeply to show)"
    return text if len(text) <= limit else text[:limit] + "..."
