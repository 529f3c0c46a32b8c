"""wallperf.sut.redact: what it masks (keys from the environment or registered, URL
user-info, bearer tokens), that it masks before it cuts, and that logging and
uncaught exceptions go through it once installed."""
import json
import logging
import sys
import threading

import pytest

from wallperf.sut import redact as r

KEY = "sk-test-redact-abcdef123456"


@pytest.fixture(autouse=True)
def key_in_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def test_keys_user_info_and_bearer_tokens_are_masked():
    r.register_secret("registered-secret-42")
    text = (f"echo: {KEY} and Bearer other-token-xyz, url http://bob:hunter2@host:80/v1, "
            "plain http://host/v1 and registered-secret-42")
    masked = r.redact(text)
    for secret in (KEY, "other-token-xyz", "bob:hunter2", "registered-secret-42"):
        assert secret not in masked
    assert "http://***@host:80/v1" in masked and "http://host/v1" in masked and "Bearer ***" in masked


def test_short_values_are_not_secrets(monkeypatch):
    monkeypatch.setenv("WALLPERF_API_KEY", "abc")
    assert r.redact("abc is an ordinary word") == "abc is an ordinary word"


def test_masked_before_cut_so_no_half_key_leaks():
    text = "x" * 10 + KEY
    cut = r.redact(text, limit=20)
    assert KEY[:10] not in cut and cut.startswith("x" * 10 + r.MASK)


def test_objects_are_masked_in_keys_and_values():
    obj = {"reasons": {f"HTTP 401: {KEY}": 3}, "list": [KEY, 1, None], "n": 2.5}
    assert r.redact_obj(obj) == {"reasons": {"HTTP 401: ***": 3}, "list": ["***", 1, None], "n": 2.5}


def test_installed_filter_masks_messages_args_and_tracebacks(capsys):
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    hooks = sys.excepthook, threading.excepthook
    try:
        r.install()
        log = logging.getLogger("test_redact")
        log.warning("server said %s", KEY)
        try:
            raise RuntimeError(f"failed with {KEY}")
        except RuntimeError:
            log.exception("request failed")
        try:
            raise ValueError(KEY)
        except ValueError:
            sys.excepthook(*sys.exc_info())
    finally:
        logging.getLogger().removeHandler(handler)
        sys.excepthook, threading.excepthook = hooks
    err = capsys.readouterr().err
    assert KEY not in err
    assert "server said ***" in err and "RuntimeError: failed with ***" in err and "ValueError: ***" in err


def fragments(secret: str, shortest: int = r.MIN_EDGE_FRAGMENT) -> set[str]:
    """Every prefix and suffix of `secret` at least `shortest` long, lower-cased: what a cut may leave."""
    return {secret[:k].lower() for k in range(shortest, len(secret) + 1)} | \
        {secret[-k:].lower() for k in range(shortest, len(secret) + 1)}


def leaked(text: str, secret: str) -> set[str]:
    low = text.lower()
    return {f for f in fragments(secret) if f in low}


def test_a_key_cut_at_any_offset_leaves_no_piece_of_it():
    """A text cut before it was redacted (a reader that took N bytes) ends or starts inside the key."""
    text = "error: " + KEY + " was rejected"
    for cut in range(len(text) + 1):
        for piece in (text[:cut], text[cut:]):
            assert not leaked(r.redact(piece), KEY), (cut, r.redact(piece))
        # A cut made by redact itself, at every limit.
        assert not leaked(r.redact(text, limit=cut), KEY), cut


def test_a_key_in_another_case_or_half_of_it_is_masked():
    for text in (KEY.upper(), KEY.swapcase(), f"x{KEY[:len(KEY) // 2 + 1]}y", f"x{KEY[len(KEY) // 2 - 1:]}y"):
        assert not leaked(r.redact(text), KEY) and r.MASK in r.redact(text), text


def test_ordinary_text_is_left_alone():
    text = "the server said: model not found (HTTP 404) after 3 retries, p99 > limit"
    assert r.redact(text) == text


@pytest.mark.parametrize("password", ["p@ss@word", "pa/ss/wd", "pa#ss#wd", "pa?ss=1", 'pa"ss"wd', "pa ss wd",
                                      "p@/#?\" x"])
def test_a_url_password_never_shows_whatever_it_holds(password):
    url = f"http://alice:{password}@gpu-box.example:8000/v1"
    r.register_url(url)
    assert r.public_url(url) == "http://gpu-box.example:8000/v1"
    for text in (url, f"connect to {url} failed", repr(url), f"endpoint '{url}' refused"):
        masked = r.redact(text)
        for piece in [password, *password.split()]:
            if len(piece) >= r.MIN_SECRET_CHARS:
                assert piece.lower() not in masked.lower(), masked
        assert "alice" not in masked or password not in masked


def test_query_credentials_are_secrets_and_never_shown():
    url = "https://host.example/v1?api_key=qk-123456789&mode=x#token=frag-987654321"
    r.register_url(url)
    assert r.public_url(url) == "https://host.example/v1"
    masked = r.redact(f"GET {url} failed; key was qk-123456789")
    assert "qk-123456789" not in masked and "frag-987654321" not in masked
    assert "api_key=***" in masked


def test_hold_back_covers_the_longest_secret(monkeypatch):
    r.register_secret("a-registered-secret-much-longer-than-the-env-key-0123456789")
    assert r.hold_back() >= len("a-registered-secret-much-longer-than-the-env-key-0123456789")


def test_objects_are_redacted_before_serializing_so_json_stays_valid():
    """A bearer token beside an escaped quote: a mask over the JSON text would eat the backslash."""
    obj = {"reason": 'HTTP 401: {"error": "Authorization: Bearer tok-xyz-123\\"}', "n": 1,
           "nested": [{"message": {"Bearer abc\"def": f'"{KEY}"\\'}}]}
    text = json.dumps(r.redact_obj(obj))
    back = json.loads(text)
    assert back["reason"] == 'HTTP 401: {"error": "Authorization: Bearer ***\\"}'
    assert back["nested"] == [{"message": {'Bearer ***"def': '"***"\\'}}]
    assert KEY not in text and "tok-xyz" not in text
