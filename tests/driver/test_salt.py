"""Per-query salt (MLPerf Endpoints 2.9.5.1): 64 bits between the system prompt and
the user's content, read back from the ids, with SmolLM2's own tokenizer and chat
template (the reference: its template's text, decoded from the salted ids)."""
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sut" / "serving"))
from test_server import tiny_tokenizer  # noqa: E402

from wallperf.driver.salt import salt_bits, salt_plan  # noqa: E402


def smollm2_tokenizer():
    from wallperf.harness.artifacts import resolve_model_file
    from wallperf.harness.config import load_model_config
    from wallperf.sut.loading.load import load_tokenizer

    try:
        return load_tokenizer(resolve_model_file(load_model_config("smollm2-135m", "test", "model")))
    except Exception as e:  # noqa: BLE001 - no artifact here: say so
        pytest.skip(f"SmolLM2's tokenizer is not available: {e}")


def test_salt_sits_after_the_system_prompt_and_reads_back():
    tok = smollm2_tokenizer()
    users = ["What is 2 + 2?", "Name a colour.", "The following is a question."]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": u}])) for u in users]
    plan = salt_plan(prompts, tok)
    rng = random.Random(7)
    for i, (user, prompt) in enumerate(zip(users, prompts)):
        bits = salt_bits(rng)
        salted = plan.salted(i, prompt, bits)
        text = tok.decode(salted, skip_special_tokens=False)
        head = tok.apply_chat_template([{"role": "user", "content": "\x00"}])
        head = head[:head.index("\x00")]
        # The system prompt and the user turn's header, then the salt, then the user's content as it was.
        assert text.startswith(head + "salt:" + f"{bits:016x}")
        assert text.endswith(tok.decode(prompt, skip_special_tokens=False)[len(head):])
        assert plan.read(salted) == bits


def test_without_a_chat_template_the_salt_follows_the_shared_prefix():
    tok = tiny_tokenizer()
    prompts = [tok.encode("hello world " + s) for s in ("a", "bb", "ccc")]
    plan = salt_plan(prompts, tok)
    shared = len(tok.encode("hello world "))
    assert set(plan.positions) == {shared}
    bits = (1 << 64) - 12345
    salted = plan.salted(1, prompts[1], bits)
    assert salted[:shared] == prompts[1][:shared] and salted[-2:] == prompts[1][-2:]
    assert plan.read(salted) == bits
    assert len(salted) - len(prompts[1]) == len(plan.marker) + 16
