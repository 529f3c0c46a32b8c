"""The requests a run issues, from its data set: tokenized prompts, and where the
data set has them, its own output lengths.

MMLU gives chat prompts with a scored answer (harness.loadgen.qsl); ShareGPT
gives conversations whose replies set each request's output length
(harness.loadgen.sharegpt). A run records the length distributions of what
LoadGen actually issued (`length_distribution`), since a Server or Offline
test draws samples with repeats from this set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wallperf.harness.config import DatasetConfig
from wallperf.harness.loadgen.qsl import build_prompts, load_mmlu, select_per_subject
from wallperf.harness.loadgen.sharegpt import sample_sharegpt


@dataclass(frozen=True)
class Workload:
    prompts: list
    # MMLU questions, to score accuracy runs; None for data sets without answers.
    questions: list | None = None
    # The data set's own output length per sample; None where it has none.
    output_lengths: list | None = None
    # How the samples were chosen, for results.json.
    description: dict = field(default_factory=dict)


def load_workload(dataset: DatasetConfig, path: Path, tokenizer, seed: int) -> Workload:
    """The samples of `dataset`; `description` holds how they were chosen and the length
    distributions of the whole set (what LoadGen draws from)."""
    if dataset.format == "sharegpt_json":
        chosen = sample_sharegpt(path, tokenizer, dataset.max_samples, seed)
        lengths = {"input": length_distribution(map(len, chosen.prompts)),
                   "output": length_distribution(chosen.output_lengths)}
        return Workload(chosen.prompts, output_lengths=chosen.output_lengths,
                        description={"name": dataset.name, **chosen.stats, "lengths": lengths})
    questions = select_per_subject(load_mmlu(path), dataset.per_subject)[: dataset.max_samples]
    prompts = build_prompts(questions, tokenizer)
    return Workload(prompts, questions=questions,
                    description={"name": dataset.name, "sampled": len(questions),
                                 "lengths": {"input": length_distribution(map(len, prompts))}})


def length_distribution(lengths) -> dict | None:
    """min, mean, p50, p90 and max of token counts (numpy's linear percentiles)."""
    values = np.asarray(list(lengths), dtype=np.float64)
    if not values.size:
        return None
    return {"count": int(values.size), "min": int(values.min()), "mean": float(values.mean()),
            "p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
            "max": int(values.max())}
