"""An OpenAI-compatible server (vLLM, SGLang, `wallperf serve`, ...) as a backend.

The backend offers the engine interface the LoadGen adapter drives
(free_slots, add_request, has_unfinished, step): `add_request` hands the
request to a pool of worker threads, one per allowed concurrent request, which
stream it from one of the endpoints over pooled keep-alive connections;
`step()` returns the TokenEvents that arrived since the last call, waiting a
few milliseconds at most.

What LoadGen measures is the first token (TTFT) and the end of the answer, so
the first token on any channel (text or reasoning_content) goes out the moment
it arrives, and the rest go out together when the stream ends, the last one
marked finished.

Token ids: LoadGen's response carries token ids. They come from the stream's
`choices[0].token_ids` (vLLM's return_token_ids; `wallperf serve` always sends
them). A server that sends text only is re-tokenized with the model's
tokenizer: the first id is that of the first chunk's text, the rest from the
whole text. Re-tokenizing text need not give back the ids the server decoded
(BPE merges across chunk boundaries, normalization, special tokens hidden by
the detokenizer), so such counts are approximate; the usage field is checked
against them and every mismatch is recorded.

Failures: a request that fails (connection refused or reset, no data within
`timeout_s`, HTTP errors, a broken stream) is retried on the next endpoint
while no token has reached LoadGen yet, up to `retries` times. A request that
still fails is recorded with its reason and finished for the adapter with
placeholder tokens (EOS, two of them: LoadGen needs at least two), so LoadGen
can complete the sample; any failure makes
the run INVALID (see `stats()["failures"]`).

The API key is read from the environment variable named by `api_key_env` and
sent as a bearer token; it never appears in repr, stats or failure reasons:
every reason and URL passes through sut/redact.py. The stream itself is parsed
in sut/backends/sse.py.
"""
from __future__ import annotations

import http.client
import itertools
import json
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from wallperf.sut.backends.openai_endpoint import Endpoint
from wallperf.sut.backends.sse import (DONE, MAX_REASON_CHARS, RequestFailed, choice_content, choices, error_message,
                             parse_event, usage)
from wallperf.sut.engine.engine import SamplingParams, TokenEvent
from wallperf.sut.redact import hold_back, redact, register_secret

ROUTINGS = ("round_robin", "least_outstanding")
# How long step() waits for the first event: short, so new samples are admitted promptly.
STEP_WAIT_S = 0.002
# Failure and mismatch examples kept in stats (the counts are complete).
MAX_EXAMPLES = 10
# Bytes of an error body kept (redacted, then cut to MAX_REASON_CHARS).
MAX_ERROR_BODY = 2000
# One server-sent event is one token's chunk, a few hundred bytes: a server that sends
# far more without a newline is broken or hostile, and must not fill the memory.
MAX_LINE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class _Job:
    request_id: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(slots=True)
class _Stream:
    """What one request has received so far."""

    first_sent: bool = False
    # "ids" when the server streams token ids, "text" when they are re-tokenized.
    mode: str | None = None
    ids: list = field(default_factory=list)
    text: list = field(default_factory=list)
    usage: dict | None = None
    finish_reason: str | None = None


class OpenAIBackend:
    name = "openai"

    @classmethod
    def create(cls, loaded, *, max_batch: int, openai, **_):
        """Over the run's `openai:` section (harness.config.OpenAIConfig); `loaded` carries the tokenizer."""
        return cls(list(openai.endpoints), openai.model, max_concurrency=max_batch, timeout_s=openai.timeout_s,
                   retries=openai.retries, tokenizer=loaded.tokenizer, api_key_env=openai.api_key_env,
                   routing=openai.routing)

    def __init__(self, endpoints: list[str], model: str, max_concurrency: int, timeout_s: float = 60.0,
                 retries: int = 2, tokenizer=None, api_key_env: str = "OPENAI_API_KEY",
                 routing: str = "round_robin"):
        if not endpoints:
            raise ValueError("the openai backend needs at least one endpoint URL")
        if routing not in ROUTINGS:
            raise ValueError(f"routing {routing!r} is not one of {', '.join(ROUTINGS)}")
        if max_concurrency < 1 or timeout_s <= 0 or retries < 0:
            raise ValueError("need max_concurrency >= 1, timeout_s > 0 and retries >= 0")
        self.model, self.max_concurrency, self.timeout_s = model, max_concurrency, timeout_s
        self.retries, self.routing, self.tokenizer = retries, routing, tokenizer
        self.api_key_env = api_key_env
        self._api_key = os.environ.get(api_key_env) or None
        register_secret(self._api_key)
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                         **({"Authorization": f"Bearer {self._api_key}"} if self._api_key else {})}
        self._endpoints = [Endpoint(url, timeout_s) for url in endpoints]
        self._rotation = itertools.cycle(range(len(self._endpoints)))
        eos = getattr(tokenizer, "eos_token_id", None)
        self._placeholder_token = eos if eos is not None else 0
        self._lock = threading.Lock()
        self._outstanding = 0
        self._counts: Counter = Counter()
        self._failure_reasons: Counter = Counter()
        self._failure_examples: list = []
        self._mismatch_examples: list = []
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._work, name=f"wallperf-openai-{i}", daemon=True)
                         for i in range(max_concurrency)]
        for w in self._workers:
            w.start()

    def __repr__(self) -> str:
        return (f"OpenAIBackend(endpoints={[e.url for e in self._endpoints]}, model={self.model!r}, "
                f"max_concurrency={self.max_concurrency}, routing={self.routing!r})")

    # -- the engine interface ----------------------------------------------

    @property
    def free_slots(self) -> int:
        with self._lock:
            return self.max_concurrency - self._outstanding

    def has_unfinished(self) -> bool:
        with self._lock:
            return self._outstanding > 0

    def add_request(self, request_id: int, prompt_ids, params: SamplingParams) -> None:
        with self._lock:
            self._outstanding += 1
            self._counts["requests"] += 1
        self._jobs.put(_Job(request_id, tuple(int(t) for t in prompt_ids), params))

    def step(self) -> list[TokenEvent]:
        try:
            events = [self._events.get(timeout=STEP_WAIT_S)]
        except queue.Empty:
            return []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        finished = sum(ev.finished for ev in events)
        if finished:
            with self._lock:
                self._outstanding -= finished
        return events

    def stats(self) -> dict:
        """Counters for results.json; `failures` > 0 makes the run INVALID."""
        with self._lock:
            c = self._counts
            return {
                "endpoints": [e.url for e in self._endpoints],
                "routing": self.routing,
                "requests": c["requests"],
                "completed": c["completed"],
                "failures": c["failures"],
                "failure_reasons": dict(self._failure_reasons),
                "failure_examples": list(self._failure_examples),
                "retries": c["retries"],
                "text_prompt_fallbacks": c["text_prompt_fallbacks"],
                "token_ids_from": {"server": c["ids_from_server"], "retokenized": c["ids_retokenized"]},
                "usage_missing": c["usage_missing"],
                "token_count_mismatches": c["token_count_mismatches"],
                "mismatch_examples": list(self._mismatch_examples),
                "attempts_per_endpoint": {e.url: c[f"sent:{e.url}"] for e in self._endpoints},
            }

    def close(self) -> None:
        """Stop the workers (after the requests in hand) and close idle connections."""
        for _ in self._workers:
            self._jobs.put(None)
        for w in self._workers:
            w.join(self.timeout_s * (self.retries + 1))
        for e in self._endpoints:
            e.close()

    def __enter__(self) -> "OpenAIBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- workers -----------------------------------------------------------

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            for attempt in range(self.retries + 1):
                # Retried only while LoadGen has nothing of it: each attempt starts afresh.
                stream, endpoint = _Stream(), self._pick()
                try:
                    self._attempt(job, endpoint, stream)
                    break
                except RequestFailed as e:
                    failure = e
                except (OSError, http.client.HTTPException) as e:
                    failure = RequestFailed(self._transport_reason(e), retryable=True)
                except Exception as e:  # noqa: BLE001 - e.g. a chunk of the wrong shape; the request must end
                    failure = RequestFailed(redact(f"{type(e).__name__}: {e}", MAX_REASON_CHARS),
                                            retryable=False)
                finally:
                    with self._lock:
                        endpoint.outstanding -= 1
                # Once LoadGen has the first token, a retry would answer a different request.
                if not failure.retryable or stream.first_sent or attempt == self.retries:
                    self._fail(job, stream, endpoint, failure.reason)
                    break
                with self._lock:
                    self._counts["retries"] += 1
                time.sleep(min(0.05 * 2 ** attempt, 1.0))

    def _pick(self) -> Endpoint:
        with self._lock:
            if self.routing == "round_robin":
                endpoint = self._endpoints[next(self._rotation)]
            else:
                start = next(self._rotation)
                order = self._endpoints[start:] + self._endpoints[:start]
                endpoint = min(order, key=lambda e: e.outstanding)
            endpoint.outstanding += 1
            self._counts[f"sent:{endpoint.url}"] += 1
            return endpoint

    def _attempt(self, job: _Job, endpoint: Endpoint, stream: _Stream) -> None:
        as_text = endpoint.text_prompts
        resp, conn = endpoint.post(self._headers, self._body(job, as_text))
        if resp.status in (400, 422, 500) and not as_text and self.tokenizer is not None:
            # Some servers take text prompts only and reject ids as a bad request, or
            # (llama-cpp-python's server) as a 500 from their request validation:
            # try text; keep to it once it works.
            resp.read()
            endpoint.release(conn)
            resp, conn = endpoint.post(self._headers, self._body(job, as_text=True))
            if resp.status == 200:
                endpoint.text_prompts = True
                with self._lock:
                    self._counts["text_prompt_fallbacks"] += 1
        if resp.status != 200:
            # A key's length more than is kept: a key that starts before the cut is whole when redacted.
            detail = error_message(resp.read(MAX_ERROR_BODY + hold_back()), MAX_ERROR_BODY)
            conn.close()
            raise RequestFailed(f"HTTP {resp.status}: {detail}",
                                retryable=resp.status >= 500 or resp.status == 429)
        try:
            self._read_stream(job, resp, stream)
            resp.read()
        except BaseException:
            conn.close()
            raise
        endpoint.release(conn)
        self._finish(job, stream)

    def _body(self, job: _Job, as_text: bool) -> bytes:
        p = job.params
        body = {"model": self.model, "max_tokens": p.max_new_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "return_token_ids": True,
                # Special tokens of a chat template travel as their text; servers map them back.
                "prompt": self.tokenizer.decode(job.prompt_ids, skip_special_tokens=False) if as_text
                else list(job.prompt_ids)}
        # vLLM extensions, sent only when they change something, for servers that reject unknown fields.
        if p.min_new_tokens:
            body["min_tokens"] = p.min_new_tokens
        if p.ignore_eos:
            body["ignore_eos"] = True
        return json.dumps(body).encode()

    def _read_stream(self, job: _Job, resp, stream: _Stream) -> None:
        while True:
            line = resp.readline(MAX_LINE_BYTES + 1)
            if not line:
                raise RequestFailed("the stream ended without [DONE]", retryable=True)
            if len(line) > MAX_LINE_BYTES:
                raise RequestFailed(f"a stream line longer than {MAX_LINE_BYTES} bytes", retryable=False)
            chunk = parse_event(line)
            if chunk is DONE:
                return
            if chunk is None:
                continue
            stream.usage = usage(chunk) or stream.usage
            for choice in choices(chunk):
                self._take_choice(job, choice, stream)

    def _take_choice(self, job: _Job, choice: dict, stream: _Stream) -> None:
        text, ids, reason = choice_content(choice)
        stream.finish_reason = reason or stream.finish_reason
        if stream.mode is None and (ids or text):
            stream.mode = "ids" if ids else "text"
            if stream.mode == "text" and self.tokenizer is None:
                raise RequestFailed("the server sent no token ids and no tokenizer was given to "
                                    "re-tokenize its text", retryable=False)
            first = ids[0] if ids else self.tokenizer.encode(text)[0]
            stream.ids.append(first)
            ids = ids[1:]
            # Held back when it is the whole answer: it goes out once, marked finished.
            if not (stream.finish_reason and not ids):
                self._events.put(TokenEvent(job.request_id, first, 1, False))
                stream.first_sent = True
        stream.ids.extend(ids)
        stream.text.append(text)

    def _finish(self, job: _Job, stream: _Stream) -> None:
        if stream.mode is None:
            raise RequestFailed("the stream carried no tokens", retryable=False)
        tokens = stream.ids
        if stream.mode == "text":
            tokens = tokens[:1] + self.tokenizer.encode("".join(stream.text))[1:]
        rest = tokens[1:] if stream.first_sent else tokens
        if not rest:
            raise RequestFailed("the stream ended after its first token without a finish_reason",
                                retryable=False)
        with self._lock:
            self._counts["completed"] += 1
            self._counts["ids_from_server" if stream.mode == "ids" else "ids_retokenized"] += 1
            if stream.usage is None:
                self._counts["usage_missing"] += 1
            elif stream.usage.get("completion_tokens") != len(tokens):
                self._counts["token_count_mismatches"] += 1
                if len(self._mismatch_examples) < MAX_EXAMPLES:
                    self._mismatch_examples.append({"request_id": job.request_id, "streamed": len(tokens),
                                                    "usage": stream.usage.get("completion_tokens")})
        start = len(tokens) - len(rest) + 1
        for i, token in enumerate(rest):
            self._events.put(TokenEvent(job.request_id, token, start + i, i == len(rest) - 1))

    def _fail(self, job: _Job, stream: _Stream, endpoint: Endpoint, reason: str) -> None:
        with self._lock:
            self._counts["failures"] += 1
            self._failure_reasons[reason] += 1
            if len(self._failure_examples) < MAX_EXAMPLES:
                self._failure_examples.append({"request_id": job.request_id, "endpoint": endpoint.url,
                                               "reason": reason})
        # Two placeholder tokens when none reached LoadGen: it rejects a
        # response of fewer than 2 tokens with an error per sample.
        if not stream.first_sent:
            self._events.put(TokenEvent(job.request_id, self._placeholder_token, 1, False))
        self._events.put(TokenEvent(job.request_id, self._placeholder_token, 2, True))

    def _transport_reason(self, e: BaseException) -> str:
        if isinstance(e, TimeoutError):
            return f"timeout: no data within {self.timeout_s:g} s"
        return redact(f"{type(e).__name__}: {e}", MAX_REASON_CHARS)

