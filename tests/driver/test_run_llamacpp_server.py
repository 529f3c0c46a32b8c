"""`wallperf run --endpoint URL` against llama.cpp's own OpenAI-compatible server
(llama-cpp-python's, on the same SmolLM2 GGUF), where it is installed.

That server takes text prompts only (it answers token-id prompts with a 500 from
its request validation), streams no usage, and by default cuts a streaming
request when a new one arrives; it is started with interrupt_requests off, as a
benchmark needs. The client falls back to text prompts and the LoadGen tests
complete without failed requests.
"""
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from wallperf.cli import main

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'wallperf[peers]')")
pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python's server extras are not installed "
                    "(pip install 'llama-cpp-python[server]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llamacpp_server(smollm2_gguf_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("llamacpp") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf_path),
                                 "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                                 "--model_alias", "smollm2-135m", "--interrupt_requests", "False"],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama.cpp's server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"llama.cpp's server did not answer within 120 s: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_run_against_llamacpp_server(llamacpp_server, tmp_path):
    out = tmp_path / "out"
    rc = main(["run", "--endpoint", llamacpp_server, "--scenario", "Offline", "--mode", "both",
               "--max-samples", "4", "--output-tokens", "8", "--duration", "1", "--out", str(out),
               "--no-progress", "--wall-from-profile"])
    assert rc == 0
    perf, acc = json.loads((out / "results.json").read_text())["runs"]
    assert perf["backend"] == "openai" and perf["client"]["failures"] == 0, perf["client"]
    assert perf["client"]["text_prompt_fallbacks"] >= 1
    # LoadGen's verdict may still be INVALID on duration on a fast or slow machine; no request failed.
    assert not any("failed" in r for r in perf["invalid_reasons"]) and perf["metrics"]["tokens_per_second"] > 0
    assert acc["client"]["failures"] == 0 and acc["compliance"]["test06"]["passed"]
    assert acc["mmlu"]["total"] == 4
