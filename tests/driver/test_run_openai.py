"""`wallperf run --endpoint URL` against `wallperf serve` on loopback: the whole
network path under LoadGen, checked against the native engine's greedy tokens."""
import json

import numpy as np
import pytest
import torch

from wallperf.cli import main
from wallperf.sut.loading.load import load_model
from wallperf.sut.engine.engine import Engine, SamplingParams
from wallperf.sut.serving.server import start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(smollm2_gguf_path):
    loaded = load_model(smollm2_gguf_path, "float32")
    threads = torch.get_num_threads()
    server, url, stop = start_server(loaded, host="127.0.0.1", port=0, max_batch=4, max_seq_len=1024,
                                     model_name="smollm2-135m")
    yield loaded, url
    stop()
    torch.set_num_threads(threads)


def test_run_over_openai_endpoint(server, tmp_path, mmlu_path):
    loaded, url = server
    out = tmp_path / "out"
    rc = main(["run", "--endpoint", url, "--scenario", "Server", "--duration", "1", "--max-samples", "4",
               "--output-tokens", "6", "--target-qps", "1", "--out", str(out), "--no-progress",
               "--wall-from-profile"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    perf, acc = results["runs"]
    assert perf["backend"] == "openai" and perf["client"]["failures"] == 0
    assert perf["metrics"]["tokens_per_second"] > 0
    assert acc["compliance"]["test06"]["passed"]
    # The served tokens are the native engine's greedy tokens for the same prompts.
    from wallperf.harness.loadgen.qsl import build_prompts, load_mmlu, select_per_subject

    prompts = build_prompts(select_per_subject(load_mmlu(mmlu_path), 1)[:4], loaded.tokenizer)
    entries = json.load(open(f"{acc['log_dir']}/mlperf_log_accuracy.json"))
    engine = Engine(loaded.model, loaded.tokenizer.eos_token_ids, max_batch=1, max_seq_len=1024)
    for e in entries:
        served = np.frombuffer(bytes.fromhex(e["data"]), dtype="<i4").tolist()
        native = engine.generate(prompts[e["qsl_idx"]], SamplingParams(max_new_tokens=48, min_new_tokens=2))
        assert served == native
