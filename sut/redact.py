"""Secrets kept out of everything wallperf writes: logs, results, reports, stderr.

API keys are read from the environment only (a command-line flag would show
in `ps` and in shell history). Whatever text may carry one on its way out (a
server's error message, a malformed stream chunk, an exception, an endpoint
URL with user-info) passes through `redact`; files are written through
`redact_obj` (each string of the object tree, before it is serialized: text
already serialized is never rewritten, so a mask cannot break its syntax), and
`install` puts the same filter on logging and on uncaught exceptions.

A cut must not leak part of a key. Text is redacted whole before it is cut to
length; a reader that takes only the first N bytes of a server's text reads
`hold_back()` bytes more, so a key that starts before the cut is whole in what
is redacted. As a second line, a fragment of a key is masked too: a prefix at
the very end of a text or a suffix at its very start (what a cut leaves), and
anywhere at least half a key long. Matching ignores case (a server may echo a
key upper-cased).

URLs: user-info (user:password@, whatever characters the password holds) and
credential-like query values are masked in any text; an endpoint is shown as
`public_url` (scheme, host, port and path only), and its credentials are
registered as secrets.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
import traceback
from urllib.parse import parse_qsl, unquote

# Environment variables whose values are keys wherever they are set.
KEY_ENV_VARS = ("OPENAI_API_KEY", "WALLPERF_API_KEY")
MASK = "***"
# Shorter values would blank ordinary words out of every message.
MIN_SECRET_CHARS = 6
# The shortest piece of a key masked where a cut leaves it (at a text's edge).
MIN_EDGE_FRAGMENT = 4
# user:password@ in a URL: everything from :// to the last @ before white space, so a
# password holding '/', '#', '?', '"' or '@' is masked whole.
_USERINFO = re.compile(r"(?<=://)[^\s@]*@")
# A token ends at white space, a quote, a backslash (of an escape), a comma or a semicolon.
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"'\\,;]+")
# Query or fragment parameters that carry credentials (?api_key=..., &token=...).
_QUERY_CREDENTIAL = re.compile(
    r"(?i)([?&;#](?:api[_-]?key|key|access[_-]?token|token|auth|authorization|password|passwd|pwd|secret"
    r"|client[_-]?secret|signature|sig)=)[^&#\s\"']+")

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


def hold_back() -> int:
    """How many characters past a cut a reader must take so that a key starting before the cut is whole."""
    known = secrets()
    return len(known[0]) if known else 0


@functools.lru_cache(maxsize=64)
def _anchors(secret: str) -> re.Pattern:
    """A key's first and last halves, case-insensitive: where a fragment of it may start or end."""
    half = max(MIN_SECRET_CHARS, (len(secret) + 1) // 2)
    return re.compile(f"(?P<head>{re.escape(secret[:half])})|(?P<tail>{re.escape(secret[-half:])})", re.I)


def _same(a: str, b: str) -> bool:
    return a.lower() == b.lower()


def _secret_spans(text: str, secret: str) -> list[tuple[int, int]]:
    """Spans of `text` holding the key or a fragment of it: the key's first half
    grown forwards, its last half grown backwards, and a shorter prefix ending the
    text or suffix starting it."""
    spans, n = [], len(secret)
    for m in _anchors(secret).finditer(text):
        start, end = m.span()
        if m.group("head") is not None:
            k = end - start
            while k < n and end < len(text) and _same(text[end], secret[k]):
                end, k = end + 1, k + 1
        else:
            k = n - (end - start)
            while k > 0 and start > 0 and _same(text[start - 1], secret[k - 1]):
                start, k = start - 1, k - 1
        spans.append((start, end))
    if (k := _edge_prefix(text[-(n - 1):], secret)) is not None:
        spans.append((len(text) - k, len(text)))
    if (k := _edge_suffix(text[:n - 1], secret)) is not None:
        spans.append((0, k))
    return spans


def _lower(text: str) -> str:
    """`text` lower-cased character for character (str.lower turns a few characters into two)."""
    low = text.lower()
    return low if len(low) == len(text) else "".join(c.lower()[0] for c in text)


def _edge_prefix(tail: str, secret: str) -> int | None:
    """The length of the longest prefix of `secret` (MIN_EDGE_FRAGMENT or more) that ends `tail`."""
    low, key = _lower(tail), secret.lower()
    start = low.find(key[0])
    while 0 <= start <= len(low) - MIN_EDGE_FRAGMENT:
        if key.startswith(low[start:]):
            return len(low) - start
        start = low.find(key[0], start + 1)
    return None


def _edge_suffix(head: str, secret: str) -> int | None:
    """The length of the longest suffix of `secret` (MIN_EDGE_FRAGMENT or more) that starts `head`."""
    low, key = _lower(head), secret.lower()
    if not low:
        return None
    i = key.find(low[0], max(len(key) - len(low), 1))
    while 0 <= i <= len(key) - MIN_EDGE_FRAGMENT:
        if low.startswith(key[i:]):
            return len(key) - i
        i = key.find(low[0], i + 1)
    return None


def _mask_spans(text: str, spans: list[tuple[int, int]]) -> str:
    out, pos = [], 0
    for start, end in sorted(spans):
        if end <= pos:
            continue
        out.append(text[pos:max(start, pos)])
        if start >= pos:
            out.append(MASK)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _mask_secrets(text: str, known: list[str]) -> str:
    spans = [span for secret in known for span in _secret_spans(text, secret)]
    return _mask_spans(text, spans) if spans else text


def redact(text, limit: int | None = None) -> str:
    """`text` (any object, as str) with secrets (and fragments of them), URL user-info,
    credential query values and bearer tokens masked, then cut to `limit`."""
    return _redact(str(text), secrets(), limit)


def _redact(text: str, known: list[str], limit: int | None = None) -> str:
    text = _mask_secrets(text, known)
    text = _QUERY_CREDENTIAL.sub(lambda m: m.group(1) + MASK, _USERINFO.sub(MASK + "@", text))
    text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    if limit is None or len(text) <= limit:
        return text
    # What the cut leaves at the end is checked again: a prefix of a key may end the piece kept.
    return _mask_secrets(text[:limit], known) + "..."


def redact_obj(obj, known: list[str] | None = None):
    """A JSON-like value with every string in it (keys too) redacted."""
    known = secrets() if known is None else known
    if isinstance(obj, str):
        return _redact(obj, known)
    if isinstance(obj, dict):
        return {_redact(k, known) if isinstance(k, str) else k: redact_obj(v, known) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [v if isinstance(v, (int, float)) else redact_obj(v, known) for v in obj]
    return obj


def split_url(url: str) -> tuple[str, str, str]:
    """(scheme, user-info, the rest) of `url`. The user-info runs to the LAST '@' of the
    authority-and-path, so a password holding '/', '#', '?' or '@' is taken whole."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", url
    userinfo, at, hostpart = rest.rpartition("@")
    return (scheme, userinfo, hostpart) if at else (scheme, "", rest)


def register_url(url: str) -> None:
    """A URL's user-info, its password and its query and fragment values become secrets."""
    _, userinfo, rest = split_url(url)
    if userinfo:
        register_secret(userinfo)
        _, _, password = userinfo.partition(":")
        for value in (password, unquote(password), unquote(userinfo)):
            register_secret(value)
    for part in (re.split(r"[?#]", rest, maxsplit=1)[1:] or []):
        for _, value in parse_qsl(part.replace("#", "&"), keep_blank_values=True):
            register_secret(value)


def public_url(url: str) -> str:
    """What may be shown of a URL: scheme, host, port and path, never user-info, query or fragment."""
    scheme, _, rest = split_url(url)
    rest = re.split(r"[?#\s]", rest, maxsplit=1)[0]
    return f"{scheme}://{rest}" if scheme else rest


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
