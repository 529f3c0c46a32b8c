"""wallperf.sut.redact: what it masks (keys from the environment or registered, URL
user-info, bearer tokens), that it masks before it cuts, and that logging and
uncaught exceptions go through it once installed."""
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
