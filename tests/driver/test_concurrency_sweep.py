"""`wallperf sweep --concurrency`: the in-process closed loop on the native engine,
the refusals of bad options (one line, exit 2, nothing written), and the Endpoints
chart's inputs (a LoadGen sweep's points on the same axes)."""
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sut" / "serving"))
from test_server import MAX_SEQ_LEN, prompt_of, tiny_loaded_model  # noqa: E402

from wallperf.audit.endpoints import point_figures  # noqa: E402
from wallperf.audit.pareto import loadgen_series, write_concurrency_png  # noqa: E402
from wallperf.cli import main  # noqa: E402
from wallperf.driver.in_process_load import closed_loop  # noqa: E402
from wallperf.sut.backends.native import NativeBackend  # noqa: E402
from wallperf.sut.engine.engine import SamplingParams  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_closed_loop_holds_the_concurrency_on_the_native_engine():
    loaded = tiny_loaded_model()[0]
    prompts = [prompt_of(3 + i, seed=i) for i in range(4)]
    params = SamplingParams(max_new_tokens=5, min_new_tokens=5, ignore_eos=True)
    backend = NativeBackend(loaded, max_batch=3, max_seq_len=MAX_SEQ_LEN)
    records, window = closed_loop(backend, prompts, params, concurrency=3, warmup_s=0.3, window_s=1.5)
    done = [r for r in records if not r.get("cut_at_window_end")]
    assert done and all(r["tokens"] == 5 for r in done)
    # Never more than 3 in flight: at each send, fewer than 3 others were still open.
    for r in records:
        open_then = [o for o in records if o is not r and o["sent"] <= r["sent"] < o["done"]]
        assert len(open_then) < 3
    p = point_figures(records, window, 3)
    assert p["client"]["achieved_concurrency"] > 0.98 * 3, p["client"]
    # In process the step is the loop: no event-loop lag to report.
    assert p["client"]["loop_lag_ms"] is None


def test_closed_loop_issues_whole_passes_and_answers_them():
    """The rules' count in process: from the window's start, a multiple of the data set's
    size (7 here, over 3 prompts) is issued, past the window if need be, and all answered."""
    loaded = tiny_loaded_model()[0]
    prompts = [prompt_of(3 + i, seed=i) for i in range(3)]
    params = SamplingParams(max_new_tokens=4, min_new_tokens=4, ignore_eos=True)
    backend = NativeBackend(loaded, max_batch=2, max_seq_len=MAX_SEQ_LEN)
    records, window = closed_loop(backend, prompts, params, concurrency=2, warmup_s=0.2, window_s=0.4,
                                  issue_multiple=7)
    counted = [r for r in records if r["counted"]]
    assert len(counted) % 7 == 0 and len(counted) >= 7
    assert all(r["sent"] >= window[0] for r in counted)
    assert all(r["tokens"] == 4 and not r.get("cut_at_window_end") for r in records)
    # Rounded up, never further: what was issued past the window is less than one more pass.
    assert sum(r["sent"] >= window[1] for r in counted) < 7


def test_a_window_the_warm_up_requests_outlast_still_issues_a_pass():
    """Every slot is busy with a warm-up request till past the window's end (each step
    takes 20 ms, a request 8 of them, the warm-up and window 50 ms each): none is issued
    inside the window, and the loop goes on until it has issued one whole pass (3) and
    answered it, as the rules ask a positive multiple of the data set's size."""
    import time as clock

    class Slow(NativeBackend):
        def step(self):
            clock.sleep(0.02)
            return super().step()

    loaded = tiny_loaded_model()[0]
    prompts = [prompt_of(3 + i, seed=i) for i in range(3)]
    params = SamplingParams(max_new_tokens=8, min_new_tokens=8, ignore_eos=True)
    records, window = closed_loop(Slow(loaded, max_batch=2, max_seq_len=MAX_SEQ_LEN), prompts, params,
                                  concurrency=2, warmup_s=0.05, window_s=0.05, issue_multiple=3)
    counted = [r for r in records if r["counted"]]
    assert not any(window[0] <= r["sent"] < window[1] for r in records)
    assert len(counted) == 3 and all(r["tokens"] == 8 for r in counted)
    p = point_figures(records, window, 2)
    assert p["measured"] == 3 and p["tpot_ms"] is not None


@pytest.mark.parametrize("argv,needle", [
    (["--concurrency", "0,4"], "--concurrency"),
    (["--concurrency", "1,x"], "--concurrency"),
    (["--concurrency", "auto", "--max-concurrency", "16"], "above 32"),
    (["--concurrency", "auto", "--points", "40"], "7-32"),
    (["--concurrency", "4", "--client-workers", "ray:2"], "Ray client workers send to endpoints"),
    # Port 9 (discard) on loopback: nothing listens, so no Ray cluster answers there (or Ray is not installed).
    (["--concurrency", "4", "--endpoint", "http://127.0.0.1:9", "--client-workers", "ray:2", "--ray-address",
      "127.0.0.1:9"], "Ray"),
    (["--concurrency", "4", "--client-workers", "two"], "--client-workers"),
    (["--concurrency", "4", "--window", "nan"], "--window"),
    ([], "--qps"),
])
def test_bad_options_are_refused_in_one_line(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    try:
        rc = main(["sweep", *argv, "--out", str(out)])
    except SystemExit as e:  # argparse's own refusal: its usage, then one line
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert needle in err.splitlines()[-1], err
    assert not out.exists()


def test_a_loadgen_sweep_reads_on_the_endpoints_axes(tmp_path):
    sweep = {"backend": "native", "model": "m", "points": [
        {"target_qps": 1.0, "tokens_per_second": 50.0, "tpot_ms_p90": 40.0, "valid": True},
        {"target_qps": 2.0, "tokens_per_second": 80.0, "tpot_ms_p90": 80.0, "valid": False}]}
    s = loadgen_series(sweep)
    assert [p["tokens_per_second_per_user"] for p in s["points"]] == [25.0, 12.5]
    assert [p["system_tokens_per_second"] for p in s["points"]] == [50.0, 80.0]
    png = tmp_path / "pareto.png"
    concurrency = {"label": "c", "points": [{"concurrency": 1, "system_tokens_per_second": 30.0,
                                             "tokens_per_second_per_user": 30.0, "valid": True}], "front": None}
    write_concurrency_png(png, [concurrency, s])
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24])[0] > 100


def test_answer_all_gives_each_prompt_its_greedy_answer():
    from wallperf.driver.in_process_load import answer_all
    from wallperf.sut.engine.engine import Engine

    loaded = tiny_loaded_model()[0]
    prompts = [prompt_of(2 + 3 * i, seed=20 + i) for i in range(5)]
    params = SamplingParams(max_new_tokens=6, min_new_tokens=2)
    got = answer_all(NativeBackend(loaded, max_batch=3, max_seq_len=MAX_SEQ_LEN), prompts, params, concurrency=3)
    engine = Engine(loaded.model, loaded.tokenizer.eos_token_ids, max_batch=1, max_seq_len=MAX_SEQ_LEN)
    assert got == [engine.generate(p, params) for p in prompts]


@pytest.mark.slow
def test_sweep_of_the_native_engine_records_its_wall_and_checks_accuracy(tmp_path, monkeypatch, smollm2_gguf_path,
                                                                         mmlu_path, tiny_synthetic_yaml):
    """The whole command on a tiny synthetic model with three MMLU questions: the wall the
    points were set against is the profile's as conf/hardware/cpu.yaml writes it, each point
    issued whole passes over the three and answered them, and accuracy was checked where
    asked (every point: two points name no regions), over the three questions."""
    import json
    import shutil

    import yaml

    conf = Path(__file__).resolve().parents[2] / "conf"
    root = tmp_path / "conf"
    shutil.copytree(conf, root)
    (root / "models" / "tiny-synthetic.yaml").write_text(tiny_synthetic_yaml)
    monkeypatch.setenv("WALLPERF_CONF", str(root))
    out = tmp_path / "sweep"
    assert main(["sweep", "--concurrency", "1,2", "--window", "0.5", "--warmup", "0.2", "--accuracy",
                 "--model", "tiny-synthetic", "--max-samples", "3", "--output-tokens", "3", "--wall-from-profile",
                 "--out", str(out)]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    profile = yaml.safe_load((conf / "hardware" / "cpu.yaml").read_text())
    assert sweep["wall"]["source"] == "profile"
    assert sweep["wall"]["bandwidth_gbps"] == profile["bandwidth_gbps"]
    assert sweep["accuracy_points"] == [1, 2]
    for p in sweep["points"]:
        assert p["counts"]["issued"] % 3 == 0 and p["counts"]["completed"] == p["counts"]["issued"]
        assert p["accuracy"]["questions"] == 3 and p["accuracy"]["concurrency"] == p["concurrency"]
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
