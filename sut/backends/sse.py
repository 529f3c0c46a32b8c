"""The client side of an OpenAI completions stream: server-sent events read
line by line into chunks, and a chunk's choice into its text, token ids and
finish reason.

A server is not trusted: any line it sends gives a chunk, nothing, the end of
the stream, or a RequestFailed whose reason is redacted (a hostile or broken
server may echo the request's Authorization header into an error or a chunk).
"""
from __future__ import annotations

import json

from wallperf.sut.redact import redact

# The end of the stream: `data: [DONE]`.
DONE = "[DONE]"
# Characters of a server's text kept in a failure reason (after redaction).
MAX_REASON_CHARS = 500


class RequestFailed(Exception):
    def __init__(self, reason: str, retryable: bool):
        super().__init__(reason)
        self.reason, self.retryable = reason, retryable


def parse_event(line: bytes):
    """One line of the stream: a chunk (dict), DONE, or None for a line that carries
    no data (comments, `event:`, blank lines). A malformed chunk or one carrying
    an error raises RequestFailed (the error is retryable: the caller decides
    whether a retry is still possible)."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if payload == DONE.encode():
        return DONE
    try:
        chunk = json.loads(payload)
    except (ValueError, RecursionError):
        chunk = None
    if not isinstance(chunk, dict):
        text = redact(payload.decode("utf-8", errors="replace"), MAX_REASON_CHARS)
        raise RequestFailed(f"malformed stream chunk: {text!r}", retryable=False)
    if "error" in chunk:
        raise RequestFailed(f"error in stream: {error_message(chunk['error'])}", retryable=True)
    return chunk


def choices(chunk: dict) -> list[dict]:
    """The chunk's choices, each checked to be an object."""
    found = chunk.get("choices") or []
    if not isinstance(found, list) or not all(isinstance(c, dict) for c in found):
        raise RequestFailed("malformed stream chunk: 'choices' is not a list of objects", retryable=False)
    return found


def usage(chunk: dict) -> dict | None:
    found = chunk.get("usage")
    if found is not None and not isinstance(found, dict):
        raise RequestFailed("malformed stream chunk: 'usage' is not an object", retryable=False)
    return found or None


def choice_content(choice: dict) -> tuple[str, list[int], str | None]:
    """(text, token ids, finish_reason) of one choice. Text is every channel a
    server may use (reasoning models stream reasoning_content first)."""
    delta = choice.get("delta") or {}
    if not isinstance(delta, dict):
        raise RequestFailed("malformed stream chunk: 'delta' is not an object", retryable=False)
    text = "".join(t for t in (choice.get("reasoning_content"), delta.get("reasoning_content"),
                               delta.get("reasoning"), choice.get("text"), delta.get("content"))
                   if isinstance(t, str))
    ids = choice.get("token_ids") or []
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                            for t in ids):
        raise RequestFailed("malformed stream chunk: 'token_ids' is not a list of token ids", retryable=False)
    reason = choice.get("finish_reason")
    if reason is not None and not isinstance(reason, str):
        raise RequestFailed("malformed stream chunk: 'finish_reason' is not a string", retryable=False)
    return text, ids, reason


def error_message(body, kept: int | None = None) -> str:
    """The message of an OpenAI-style error (a body's text, or its parsed `error`), redacted.
    `kept`: a body read past the length kept (see redact.hold_back) is redacted whole, then cut to it."""
    if isinstance(body, (bytes, str)):
        text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
        try:
            body = json.loads(text)
        except (ValueError, RecursionError):
            return redact(redact(text, kept).strip(), MAX_REASON_CHARS)
    err = body.get("error", body) if isinstance(body, dict) else body
    message = err.get("message", err) if isinstance(err, dict) else err
    return redact(message if isinstance(message, str) else _compact(message), MAX_REASON_CHARS)


def _compact(obj) -> str:
    try:
        return json.dumps(obj)
    except (TypeError, ValueError, RecursionError):
        return repr(obj)
