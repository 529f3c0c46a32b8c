"""harness/loadgen/humaneval.py: prompts read from HumanEval's gzipped JSON lines."""
import gzip
import json

import pytest

from wallperf.harness.loadgen.humaneval import read_prompts
from wallperf.harness.loadgen.qsl import DatasetError


def write(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_prompts_in_file_order(tmp_path):
    recs = [{"task_id": f"T/{i}", "prompt": f"def f{i}():\n", "test": "assert False"} for i in range(3)]
    got = read_prompts(write(tmp_path / "h.jsonl.gz", [json.dumps(r) for r in recs]))
    assert [(p.task_id, p.prompt) for p in got] == [(r["task_id"], r["prompt"]) for r in recs]


@pytest.mark.parametrize("line, said", [("{", "not JSON"), ('{"task_id": 1, "prompt": "x"}', "string 'task_id'")])
def test_a_bad_record_names_its_line(tmp_path, line, said):
    path = write(tmp_path / "h.jsonl.gz", [json.dumps({"task_id": "a", "prompt": "b"}), line])
    with pytest.raises(DatasetError, match=f":2: .*{said}"):
        read_prompts(path)


def test_a_file_that_is_not_gzip_is_refused(tmp_path):
    path = tmp_path / "h.jsonl.gz"
    path.write_text("plain")
    with pytest.raises(DatasetError, match="gzip"):
        read_prompts(path)


@pytest.mark.slow
def test_the_pinned_file_holds_164_prompts():
    from wallperf.harness.loadgen.humaneval import humaneval_path

    prompts = read_prompts(humaneval_path())
    assert len(prompts) == 164 and prompts[0].task_id == "HumanEval/0"
    # Each prompt holds the signature of the function to complete.
    assert all("def " in p.prompt and p.prompt.rstrip().endswith(('"""', "'''")) for p in prompts)
