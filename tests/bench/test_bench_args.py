"""`wallperf bench ...` refuses a number that is not finite or not in range: one
line naming the flag and the value, exit 2, before any measurement starts (each
benchmark's measuring function is replaced by a spy that fails the test)."""
import importlib

import pytest

from wallperf.cli import main

BENCHES = ("client", "decode", "gemv", "mmlu", "mome")

BAD = [
    ("client", "--seconds", "nan"), ("client", "--seconds", "inf"), ("client", "--seconds", "-1"),
    ("client", "--seconds", "0"), ("client", "--output-tokens", "0"), ("client", "--prompt-tokens", "-3"),
    ("client", "--concurrency", "0"), ("client", "--concurrency", "1,-4"), ("client", "--concurrency", "1,x"),
    ("decode", "--context", "0"), ("decode", "--tokens", "-1"), ("decode", "--repeats", "nan"),
    ("gemv", "--repeats", "0"), ("gemv", "--warmup", "-1"), ("gemv", "--warmup", "nan"),
    ("mmlu", "--questions", "0"), ("mmlu", "--max-tokens", "-5"), ("mmlu", "--repeats", "inf"),
    ("mome", "--experts", "0"), ("mome", "--topk", "-1"), ("mome", "--query-dim", "nan"),
    ("mome", "--cache-experts", "0"), ("mome", "--tokens", "0"), ("mome", "--prompt-tokens", "-1"),
    ("mome", "--repeats", "0"), ("mome", "--probe-tokens", "0"), ("mome", "--threads", "0"),
    ("mome", "--layers", "-1"), ("mome", "--layers", "1,x"),
]


@pytest.fixture
def no_measurement(monkeypatch):
    """Every benchmark's measuring function, which no refused flag may reach."""
    reached = []
    for what in BENCHES:
        module = importlib.import_module(f"wallperf.bench.{what}")
        name = "measure" if what == "client" else "bench"
        monkeypatch.setattr(module, name, lambda *a, _what=what, **k: reached.append(_what) or 1 / 0)
    return reached


@pytest.mark.parametrize("what,flag,value", BAD)
def test_bad_numbers_are_refused_naming_flag_and_value(what, flag, value, capsys, no_measurement):
    with pytest.raises(SystemExit) as e:
        main(["bench", what, f"{flag}={value}"])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("wallperf")]
    bad_item = value.split(",")[-1]
    assert line.startswith(f"wallperf bench {what}: error: argument {flag}: '{bad_item}'"), line
    assert not no_measurement


def test_zero_warmup_passes_are_allowed(no_measurement):
    """Zero is refused only where it means nothing: no warm-up is a valid choice."""
    with pytest.raises(ZeroDivisionError):
        main(["bench", "gemv", "--warmup=0", "--repeats=1"])
    assert no_measurement == ["gemv"]
