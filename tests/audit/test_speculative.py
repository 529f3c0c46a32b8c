"""audit/speculative.py: the exactness comparison, its verdict and the roofline's
predicted speedup; end to end on a tiny synthetic engine with a correct and a
deliberately wrong speculative candidate."""
import json

import pytest
import torch

from wallperf.audit import speculative as audit
from wallperf.sut.engine.engine import Engine, Speculation
from wallperf.sut.engine.sequence import SamplingParams
from wallperf.sut.engine.speculative import DraftModelDrafter, NgramDrafter, accepted_prefix
from wallperf.sut.loading.weights import build_model
from wallperf.sut.models.llama import LlamaConfig, synthetic_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = LlamaConfig(n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, ffn_size=128, vocab_size=64,
                  rms_eps=1e-5, max_position=256)


def test_identical_outputs_pass_and_one_divergence_fails():
    ref = {"a": [1, 2, 3], "b": [4, 5], "c": [6]}
    assert audit.compare(ref, dict(ref)).verdict == "PASS"
    cand = {"a": [1, 2, 3], "b": [4, 9, 7], "c": [6]}
    result = audit.compare(ref, cand, {"b": [0.5, 0.25]}, {"b": [0.5, 0.125, 3.0]})
    assert (result.identical, result.prompts, result.verdict) == (2, 3, "FAIL")
    [d] = result.divergences
    assert (d.prompt, d.position, d.reference_token, d.candidate_token) == ("b", 1, 5, 9)
    assert (d.reference_margin, d.candidate_margin) == (0.25, 0.125)
    assert "b | 1 | 5 | 9" in result.summary()


def test_a_prefix_diverges_where_the_shorter_output_ends():
    [d] = audit.compare({"x": [1, 2]}, {"x": [1, 2, 3]}).divergences
    assert (d.position, d.reference_token, d.candidate_token) == (2, None, 3)


def test_min_identical_is_the_threshold_and_is_printed():
    ref = {i: [i] for i in range(10)}
    cand = {**ref, 0: [99]}
    assert audit.compare(ref, cand).verdict == "FAIL"
    loose = audit.compare(ref, cand, min_identical=0.9)
    assert loose.verdict == "PASS" and "--min-identical 0.9000" in loose.summary()
    assert audit.compare(ref, cand, min_identical=0.95).verdict == "FAIL"


def test_prompt_sets_must_match():
    with pytest.raises(ValueError, match="different prompts"):
        audit.compare({"a": [1]}, {"b": [1]})


def test_predicted_speedup_is_bytes_per_emitted_token():
    # Prompt lookup reads no weights: the speedup is the acceptance length.
    assert audit.predicted_speedup(1000, 0, 4, 2.5) == 2.5
    # Bytes per emitted token = (T + k D) / L; the speedup is T over that.
    t, d, k, length = 3.0e9, 1.0e9, 4, 3.0
    assert audit.predicted_speedup(t, d, k, length) == pytest.approx(t / ((t + k * d) / length))


def test_weight_bytes_leave_out_a_separate_embedding_table():
    model = build_model(CFG, synthetic_state_dict(CFG, seed=0, dtype=torch.float32), torch.float32)
    every = sum(p.numel() * 4 for p in model.parameters())
    assert audit.weight_bytes(model) == every - CFG.vocab_size * CFG.hidden_size * 4


@pytest.fixture(scope="module")
def engines():
    model = build_model(CFG, synthetic_state_dict(CFG, seed=0, dtype=torch.bfloat16), torch.bfloat16)
    draft = build_model(CFG, synthetic_state_dict(CFG, seed=5, dtype=torch.bfloat16), torch.bfloat16)
    prompts = {f"p{i}": torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(i)).tolist()
               for i, n in enumerate([4, 19, 33])}
    return model, draft, prompts


def test_the_native_engine_with_a_drafter_passes(engines):
    model, draft, prompts = engines
    ref, ref_m, _ = audit.run_greedy(Engine(model, [1], 1, 96), prompts, 24)
    for drafter in (NgramDrafter(), DraftModelDrafter(draft, 1, 96, 3, "cpu")):
        cand, cand_m, _ = audit.run_greedy(Engine(model, [1], 1, 96, speculation=Speculation(drafter, 3)), prompts, 24)
        result = audit.compare(ref, cand, ref_m, cand_m)
        assert result.verdict == "PASS", result.summary()
        assert cand_m == ref_m  # the margins too: same logits


def test_a_wrong_candidate_fails_naming_its_first_divergence(engines, monkeypatch):
    model, draft, prompts = engines
    ref, _, _ = audit.run_greedy(Engine(model, [1], 1, 96), prompts, 24)
    real = accepted_prefix
    monkeypatch.setattr("wallperf.sut.engine.engine.accepted_prefix", lambda d, t: min(len(d), real(d, t) + 1))
    cand, _, _ = audit.run_greedy(Engine(model, [1], 1, 96, speculation=Speculation(
        DraftModelDrafter(draft, 1, 96, 3, "cpu"), 3)), prompts, 24)
    result = audit.compare(ref, cand)
    assert result.verdict == "FAIL" and result.divergences
    for d in result.divergences:
        assert ref[d.prompt][:d.position] == cand[d.prompt][:d.position]
        assert ref[d.prompt][d.position] != cand[d.prompt][d.position]


def test_a_reference_file_is_read_and_checked(tmp_path):
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"outputs": {"a": [1, 2]}}))
    assert audit._read_reference(path, {"a": [0]}) == {"a": [1, 2]}
    with pytest.raises(ValueError, match="no output for prompt b"):
        audit._read_reference(path, {"a": [0], "b": [0]})
    path.write_text("[1, 2")
    with pytest.raises(ValueError, match="not a saved output file"):
        audit._read_reference(path, {"a": [0]})


def test_bad_flags_exit_2_with_one_line(capsys):
    assert audit.main(["--model", "qwen2.5-coder-1.5b", "--num-draft-tokens", "0", "--draft", "ngram"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--num-draft-tokens" in err[0]
    assert audit.main(["--model", "qwen2.5-coder-1.5b", "--draft", "ngram", "--draft-vocab", "1000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--draft-vocab limits the native engine's draft model" in err[0]


def test_the_command_passes_the_native_engine_end_to_end(tiny_llama_folder, capsys):
    """`wallperf audit speculative` on an HF folder, its own weights as the drafter and
    prompt lookup: PASS, exit 0, with the acceptance figures and the prediction."""
    from wallperf.cli import main

    for drafter in (["--draft-model", str(tiny_llama_folder)], ["--draft", "ngram"]):
        rc = main(["audit", "speculative", "--model", str(tiny_llama_folder), *drafter, "--dtype", "float32",
                   "--num-prompts", "3", "--max-new-tokens", "8", "--num-draft-tokens", "3", "--json"])
        out = json.loads(capsys.readouterr().out)
        assert rc == 0 and out["verdict"] == "PASS" and out["share_identical"] == 1.0, out
        figures = out["figures"]
        assert figures["predicted_speedup"] > 0 and figures["reference_tokens_per_s"] > 0
        if drafter[0] == "--draft-model":
            assert figures["acceptance_rate"] == 1.0 and figures["acceptance_by_position"] == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_openai_backend_against_two_servers_and_a_saved_file(tiny_llama_folder, tmp_path, capsys):
    """Two servers of the same model agree (PASS); the candidate against a saved file
    with one token changed is FAIL, naming that position."""
    from wallperf.sut.loading.load import load_model
    from wallperf.sut.serving.server import start_server

    threads = torch.get_num_threads()
    loaded = load_model(tiny_llama_folder, "float32")
    stops, urls = [], []
    for _ in range(2):
        _, url, stop = start_server(loaded, host="127.0.0.1", port=0, max_batch=1, max_seq_len=1024,
                                    model_name="tiny")
        stops.append(stop)
        urls.append(url)
    try:
        common = ["--backend", "openai", "--model", str(tiny_llama_folder), "--served-model", "tiny",
                  "--candidate-endpoint", urls[1], "--num-prompts", "2", "--max-new-tokens", "6", "--json"]
        saved = tmp_path / "cand.json"
        rc = audit.main([*common, "--reference-endpoint", urls[0], "--save", str(saved)])
        out = json.loads(capsys.readouterr().out)
        assert rc == 0 and out["verdict"] == "PASS", out
        data = json.loads(saved.read_text())
        pid = sorted(data["outputs"])[0]
        data["outputs"][pid][3] += 1
        saved.write_text(json.dumps(data))
        rc = audit.main([*common, "--reference-file", str(saved)])
        out = json.loads(capsys.readouterr().out)
        assert rc == 1 and out["verdict"] == "FAIL"
        assert [(d["prompt"], d["position"]) for d in out["divergences"]] == [(pid, 3)]
    finally:
        for stop in stops:
            stop()
        torch.set_num_threads(threads)


def spec_run(measured, predicted, verdict="PASS"):
    spec = {"measured_speedup": measured, "predicted_speedup": predicted}
    if verdict is not None:
        spec["exactness"] = {"verdict": verdict, "share_identical": 1.0 if verdict == "PASS" else 0.9}
    return {"scenario": "SingleStream", "mode": "performance", "metrics": {"tokens_per_second": 10.0},
            "speculative": spec}


def spec_codes(run) -> set:
    from wallperf.audit.perf_audit import audit_results

    return {f.code for f in audit_results({"runs": [run]})} & {
        "speedup_above_prediction", "speedup_without_exactness", "speculation_not_exact"}


def test_perf_audit_flags_a_speedup_above_the_prediction():
    assert spec_codes(spec_run(1.5, 1.6)) == set()
    assert spec_codes(spec_run(1.65, 1.6)) == set()  # within 5% of noise
    assert spec_codes(spec_run(1.8, 1.6)) == {"speedup_above_prediction"}


def test_perf_audit_flags_a_speedup_without_a_passing_exactness_audit():
    assert spec_codes(spec_run(1.5, 1.6, verdict=None)) == {"speedup_without_exactness"}
    assert spec_codes(spec_run(1.5, 1.6, verdict="FAIL")) == {"speculation_not_exact"}


def test_the_audit_writes_a_record_the_perf_audit_reads(tiny_llama_folder, tmp_path, capsys):
    from wallperf.audit.perf_audit import audit_results

    out = tmp_path / "results.json"
    rc = audit.main(["--model", str(tiny_llama_folder), "--draft", "ngram", "--dtype", "float32",
                     "--num-prompts", "2", "--max-new-tokens", "6", "--out", str(out)])
    assert rc == 0 and "-> PASS" in capsys.readouterr().out
    record = json.loads(out.read_text())
    [run] = record["runs"]
    assert run["speculative"]["exactness"]["verdict"] == "PASS"
    assert run["metrics"]["tokens_per_second"] == run["speculative"]["candidate_tokens_per_s"]
    assert not {f.code for f in audit_results(record)} & {"speedup_without_exactness", "speculation_not_exact"}


def test_the_command_fails_a_planted_off_by_one_naming_its_first_divergence(tiny_llama_folder, tmp_path,
                                                                            monkeypatch, capsys):
    """`wallperf audit speculative` against a candidate that accepts one draft too many:
    exit 1, FAIL, and per divergent prompt the position and tokens where the candidate
    first leaves greedy decoding, as found here from the engine without speculation."""
    from wallperf.audit.speculative_prompts import audit_prompts
    from wallperf.sut.loading.load import load_model

    real = accepted_prefix
    monkeypatch.setattr("wallperf.sut.engine.engine.accepted_prefix", lambda d, t: min(len(d), real(d, t) + 1))
    saved = tmp_path / "cand.json"
    rc = audit.main(["--model", str(tiny_llama_folder), "--draft", "ngram", "--num-prompts", "3",
                     "--max-new-tokens", "24", "--num-draft-tokens", "3", "--save", str(saved), "--no-progress"])
    summary = capsys.readouterr().out
    cand = json.loads(saved.read_text())["outputs"]
    loaded = load_model(tiny_llama_folder, "bfloat16")
    prompts = audit_prompts(loaded.tokenizer, ("humaneval",), 3)
    ref = {}
    for pid, ids in prompts.items():
        engine, out = Engine(loaded.model, loaded.tokenizer.eos_token_ids, 1, len(ids) + 24), []
        engine.add_request(0, ids, SamplingParams(max_new_tokens=24))
        while engine.has_unfinished():
            out.extend(ev.token_id for ev in engine.step())
        ref[pid] = out
    diverging = [pid for pid in prompts if ref[pid] != cand[pid]]
    assert rc == 1 and "-> FAIL" in summary and diverging, summary
    for pid in diverging:
        r, c = ref[pid], cand[pid]
        pos = next((i for i, (a, b) in enumerate(zip(r, c)) if a != b), min(len(r), len(c)))
        at = lambda seq: seq[pos] if pos < len(seq) else None  # noqa: E731
        assert f"{pid} | {pos} | {at(r)} | {at(c)} |" in summary, (pid, pos, summary)


def test_prompt_sets_are_taken_in_turn_and_a_short_one_leaves_the_rest_to_the_others(monkeypatch):
    from wallperf.audit import speculative_prompts as sp

    sizes = {"humaneval": 5, "mmlu": 100, "sharegpt": 100}
    monkeypatch.setattr(sp, "_LOADERS", {name: (lambda name: lambda tok, n, seed: {
        f"{name}/{i}": [i] for i in range(min(n, sizes[name]))})(name) for name in sizes})
    got = list(sp.audit_prompts(None, ("humaneval", "mmlu"), 4))
    assert got == ["humaneval/0", "mmlu/0", "humaneval/1", "mmlu/1"]
    got = list(sp.audit_prompts(None, ("humaneval", "mmlu", "sharegpt"), 21))
    assert got[:15] == [f"{s}/{i}" for i in range(5) for s in ("humaneval", "mmlu", "sharegpt")]
    assert len(got) == 21 and sum(p.startswith("humaneval") for p in got) == 5
    with pytest.raises(ValueError, match="has only 5 prompts"):
        sp.audit_prompts(None, ("humaneval",), 6)


@pytest.mark.parametrize("text", ["", "humaneval,gsm8k", "mmlu,mmlu"])
def test_bad_prompt_sets_exit_2_naming_the_flag(text, capsys):
    assert audit.main(["--model", "qwen2.5-coder-1.5b", "--draft", "ngram", "--prompts", text]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prompts" in err[0] and "humaneval, mmlu, sharegpt" in err[0]


def test_max_seconds_audits_the_prompts_done_by_then_and_says_so(tiny_llama_folder, capsys):
    rc = audit.main(["--model", str(tiny_llama_folder), "--draft", "ngram", "--num-prompts", "3",
                     "--max-new-tokens", "4", "--max-seconds", "1e-6", "--json", "--no-progress"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["prompts"] == 1 and out["identical"] == 1
    assert out["figures"]["prompts_asked"] == 3 and out["figures"]["stopped_by_max_seconds"] == 1e-6
