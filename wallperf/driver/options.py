"""What the command line adds to a run YAML: where results go and how the run is driven."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wallperf.harness.hardware.wall import Wall


@dataclass(frozen=True)
class SpeculationOptions:
    """`--draft-model NAME` / `--draft ngram`, `--num-draft-tokens K`, `--adaptive-draft`:
    the native engine speculates in every test of the run (sut.engine.speculative)."""

    draft: str  # "model" or "ngram"
    k: int
    draft_model: str | None = None
    adaptive: bool = False
    draft_vocab: int | None = None  # --draft-vocab: the draft model proposes only ids below it

    def __post_init__(self):
        if self.draft not in ("model", "ngram") or (self.draft == "model") != (self.draft_model is not None):
            raise ValueError("speculation needs --draft-model NAME, or --draft ngram without one")
        if self.draft_vocab is not None and self.draft != "model":
            raise ValueError("--draft-vocab limits a draft model's vocabulary; prompt lookup (--draft ngram) has none")
        if self.draft_vocab is not None and self.draft_vocab < 16:
            raise ValueError(f"--draft-vocab {self.draft_vocab}: give at least 16 token ids")
        if self.k < 1:
            raise ValueError(f"--num-draft-tokens {self.k}: give K >= 1")

    def build(self, target, max_batch: int, max_seq_len: int, seed: int = 0):
        """A Speculation for an engine over `target` (a LoadedModel): the drafter loaded
        once per process in the target's dtype and device (a synthetic drafter from
        `seed`, the run's), its cache sized to the engine."""
        from wallperf.sut.engine.speculative import DraftModelDrafter, NgramDrafter, Speculation

        if self.draft == "ngram":
            return Speculation(NgramDrafter(), self.k, self.adaptive)
        draft = _draft_model(self.draft_model, target.dtype, target.device, seed)
        if draft.tokenizer.vocab_size != target.tokenizer.vocab_size:
            raise ValueError(f"--draft-model {self.draft_model}: its vocabulary ({draft.tokenizer.vocab_size}) is "
                             f"not the target's ({target.tokenizer.vocab_size}); a drafter must share the tokenizer")
        return Speculation(DraftModelDrafter(draft.model, max_batch, max_seq_len, self.k, target.device,
                                             vocab=self.draft_vocab), self.k, self.adaptive)


_DRAFTS: dict = {}


def _draft_model(name: str, dtype: str, device: str, seed: int):
    from wallperf.harness.artifacts import resolve_model_file
    from wallperf.harness.config.load import load_model_config
    from wallperf.sut.loading.load import load_model, load_synthetic, load_tokenizer

    key = (name, dtype, device, seed)
    if key not in _DRAFTS:
        cfg = load_model_config(name, None, "--draft-model")
        if cfg.format == "synthetic":
            tokenizer = load_tokenizer(resolve_model_file(load_model_config(cfg.tokenizer_from)))
            _DRAFTS[key] = load_synthetic(cfg.shape, tokenizer, dtype, device, seed=seed)
        else:
            _DRAFTS[key] = load_model(resolve_model_file(cfg), dtype, device)
    return _DRAFTS[key]


@dataclass(frozen=True)
class RunOptions:
    out_dir: Path
    user_conf: Path | None = None
    progress: bool = True
    # Server/Interactive: bisect target QPS for the highest VALID load.
    find_peak: bool = False
    peak_range: tuple = (0.1, 10.0)
    peak_tolerance: float = 0.1
    peak_max_runs: int = 8
    # Choose the performance tests' load settings from a short run on this machine (wallperf.driver.calibrate).
    calibrate: bool = False
    # Take the hardware profile's figures as written instead of measuring this machine.
    wall_from_profile: bool = False
    # The figures the run is set against, once the run has resolved them or was given them
    # (harness.hardware.wall; `wallperf sweep` gives every point its one measurement).
    wall: Wall | None = None
    # The MLPerf submission checker version whose rules judge submission_valid.
    checker_version: str = "v6.1"
    # --submission: mlperf.conf + user.conf, EOS-stopped outputs, the benchmark's
    # sample counts and scenarios, and the compliance tests the checker requires.
    submission: bool = False
    # Speculative decoding in the native engine (None: none).
    speculation: SpeculationOptions | None = None
    # With speculation, each performance test again without it, as a test of its own, for the
    # tokens/s with and without at the same settings (audit.speculative_run).
    speculative_baseline: bool = True
