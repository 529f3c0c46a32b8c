"""Secrets kept out of everything wallperf writes: logs, results, reports, stderr.

API keys are read from the environment only (a command-line flag would show
in `ps` and in shell history). Whatever text may carry one on its way out (a
server's error message, a malformed stream chunk, an exception, an endpoint
URL with user-info) passes through `redact`; files are written through
`redact_obj`, and `install` puts the same filter on logging and on uncaught
exceptions. Text is redacted whole before it is cut to length, so a key cut in
half never leaks its first half.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
import traceback

# Environment variables whose values are keys wherever they are set.
KEY_ENV_VARS = ("OPENAI_API_KEY", "WALLPERF_API_KEY")
MASK = "***"
# Shorter values would blank ordinary words out of every message.
MIN_SECRET_CHARS = 6
# user:password@ in a URL, and a bearer token in an echoed header.
_USERINFO = re.compile(r"(?<=://)[^/?#@\s\"]+@")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")

_registered: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """A key read from an environment variable not in KEY_ENV_VARS (e.g. the openai backend's api_key_env)."""
    if value and len(value) >= MIN_SECRET_CHARS:
        with _lock:
            _registered.add(value)


def secrets() -> list[str]:
    """Every known secret, longest first (so one that contains another is masked whole)."""
    found = {os.environ.get(name) for name in KEY_ENV_VARS}
    with _lock:
        found |= _registered
    return sorted((s for s in found if s and len(s) >= MIN_SECRET_CHARS), key=len, reverse=True)


def redact(text, limit: int | None = None) -> str:
    """`text` (any object, as str) with secrets, URL user-info and bearer tokens masked, then cut to `limit`."""
    text = str(text)
    for secret in secrets():
        text = text.replace(secret, MASK)
    text = _BEARER.sub(lambda m: m.group(1) + MASK, _USERINFO.sub(MASK + "@", text))
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


def redact_obj(obj):
    """A JSON-like value with every string in it (keys too) redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact(k) if isinstance(k, str) else k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """Formats each record's message and traceback, redacted, before any handler sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def _print_redacted(exc_type, exc, tb) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))


def install() -> None:
    """Redact every log handler's records and every uncaught exception's traceback (main thread and others)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    sys.excepthook = _print_redacted
    threading.excepthook = lambda args: _print_redacted(args.exc_type, args.exc_value, args.exc_traceback)
