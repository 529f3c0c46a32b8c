"""The prompts `wallperf audit speculative` runs: HumanEval, MMLU and ShareGPT, alone or mixed.

Exactness has to hold on any prompt, and the sets stress it differently: code
repeats its own context (prompt lookup accepts long runs, a drafter agrees often),
MMLU questions are short chat turns, ShareGPT's first turns are long and varied.
A mix (`--prompts humaneval,mmlu,sharegpt`) takes the sets in turn, prompt by
prompt, so that any count is a balanced sample of them; a set that runs out
leaves the others to fill the count.

Each prompt has an id that says where it came from (HumanEval's task id, MMLU's
subject and position, ShareGPT's conversation id), so a divergence can be found
again. HumanEval has 164 prompts; past them it offers each task again as a chat
turn ("Complete this function:" through the chat template), a distinct prompt of
the same kind, for 328 in all.
"""
from __future__ import annotations

import math

PROMPT_SETS = ("humaneval", "mmlu", "sharegpt")
# MMLU has 57 subjects: questions are taken as evenly over them as the count allows.
_MMLU_SUBJECTS = 57


def parse_prompt_sets(text: str) -> tuple[str, ...]:
    """`--prompts humaneval,mmlu` as a tuple of set names (ValueError naming a bad one)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in PROMPT_SETS]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"--prompts {text!r}: give one or more of {', '.join(PROMPT_SETS)}, comma-separated, "
                         "each once")
    return names


def audit_prompts(tokenizer, sets: tuple[str, ...], n: int, seed: int = 0) -> dict:
    """{prompt id: token ids} for `n` prompts taken from `sets` in turn (ValueError when
    the sets together have fewer than `n`)."""
    share = math.ceil(n / len(sets))
    pools = [list(_LOADERS[name](tokenizer, share if len(sets) > 1 else n, seed).items()) for name in sets]
    # A set short of its share leaves the rest to the others: fetch theirs in full then.
    if sum(map(len, pools)) < n and len(sets) > 1:
        pools = [list(_LOADERS[name](tokenizer, n, seed).items()) for name in sets]
    out = {}
    for i in range(max(map(len, pools))):
        for pool in pools:
            if i < len(pool) and len(out) < n:
                out.setdefault(*pool[i])
    if len(out) < n:
        raise ValueError(f"--num-prompts {n}: --prompts {','.join(sets)} has only {len(out)} prompts")
    return out


def _humaneval(tokenizer, n: int, seed: int) -> dict:
    from wallperf.harness.loadgen.humaneval import humaneval_path, read_prompts

    records = read_prompts(humaneval_path())
    out = {}
    for i in range(min(n, 2 * len(records))):
        rec = records[i % len(records)]
        if i < len(records):
            out[rec.task_id] = tokenizer.encode(rec.prompt)
        else:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "Complete this function:\n" +
                                                   rec.prompt}])
            out[f"{rec.task_id}/chat"] = tokenizer.encode(text)
    return out


def _mmlu(tokenizer, n: int, seed: int) -> dict:
    from wallperf.harness.artifacts import resolve_dataset_file
    from wallperf.harness.config.load import load_dataset_config
    from wallperf.harness.loadgen.qsl import build_prompts, load_mmlu, select_per_subject

    questions = select_per_subject(load_mmlu(resolve_dataset_file(load_dataset_config("mmlu"))),
                                   math.ceil(n / _MMLU_SUBJECTS))
    # Subject by subject in turn, so a short count still spans the subjects.
    by_subject: dict = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    order = [(s, i, qs[i]) for i in range(max(map(len, by_subject.values())))
             for s, qs in by_subject.items() if i < len(qs)][:n]
    prompts = build_prompts([q for _, _, q in order], tokenizer)
    return {f"mmlu/{s}/{i}": p.tolist() for (s, i, _), p in zip(order, prompts)}


def _sharegpt(tokenizer, n: int, seed: int) -> dict:
    from wallperf.harness.artifacts import resolve_dataset_file
    from wallperf.harness.config.load import load_dataset_config
    from wallperf.harness.loadgen.sharegpt import sample_sharegpt

    chosen = sample_sharegpt(resolve_dataset_file(load_dataset_config("sharegpt")), tokenizer, n, seed)
    return {f"sharegpt/{cid}": p.tolist() for cid, p in zip(chosen.ids, chosen.prompts)}


_LOADERS = {"humaneval": _humaneval, "mmlu": _mmlu, "sharegpt": _sharegpt}
