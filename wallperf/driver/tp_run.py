"""`wallperf run --tp N`: one LoadGen test on rank 0 of N tensor-parallel ranks.

Every test runs in a process of its own (wallperf.driver.test_process); for --tp
that process calls `run_tp_test`, which checks what it can without a model, then
spawns the ranks on this host (wallperf.driver.tp_launch.launch: gloo on the CPU,
nccl on GPUs with rank r on GPU r). Every rank loads the same model and keeps its
shard (sut.tp). Rank 0 runs the test (wallperf.driver.one_test.execute: QSL,
LoadGen, logs, the record) with a TPLeader over its engine as the backend; ranks
1..N-1 follow. The test starts with rank 0 broadcasting the engine's arguments,
so every rank builds an engine with the same KV pool; rank 0 ends the test and
the session (tp_launch.TPSession). The ranks live in the test process's group,
so ending that group (Ctrl-C in the parent) ends them too.

An error on any rank ends every rank, and the parent raises it: a ConfigError
reads as any other. A rank that waits longer than TIMEOUT_S on another (in a
collective, or a follower waiting for rank 0's next step) fails, so a stuck rank
cannot hang the run.
"""
from __future__ import annotations

import contextlib
import io

import torch

from wallperf.harness.config import ConfigError, ResolvedRun
from wallperf.driver.model import choose_device, load_for_run
from wallperf.driver.one_test import TestSpec, execute
from wallperf.driver.progress import say
from wallperf.driver.tp_launch import TPContext, TPSession, default_backend, follow_session, launch
from wallperf.sut.quant.fp8 import choose_format
from wallperf.sut.engine.tp import shard_model_

TIMEOUT_S = 600.0


def check_tp(resolved: ResolvedRun) -> None:
    """What can be refused before any rank starts (the parent checks it before the first test)."""
    run = resolved.run
    device = choose_device(run.device)
    if device == "cuda" and torch.cuda.device_count() < run.tp:
        raise ConfigError(resolved.path, "tp", f"tp {run.tp} needs {run.tp} GPUs (one per rank); torch sees "
                          f"{torch.cuda.device_count()}")
    hardware = resolved.hardware
    if choose_format(hardware, run.dtype, resolved.model.published_dtype).fp8_dtype is not None:
        raise ConfigError(resolved.path, "tp", f"tp {run.tp} with fp8 weights is not supported yet (dtype "
                          f"{run.dtype!r} on {hardware.name} means fp8); pass --dtype bfloat16 or float32")


def run_tp_test(spec: TestSpec) -> dict:
    """The test's {"record", "format"}, as rank 0 returned them."""
    run = spec.resolved.run
    check_tp(spec.resolved)
    backend = default_backend(choose_device(run.device))
    say(f"tensor parallel: {run.tp} ranks over {backend}; rank 0 drives LoadGen")
    return launch(_rank_main, run.tp, backend, args=(spec,), timeout_s=TIMEOUT_S)[0]


def _rank_main(ctx: TPContext, spec: TestSpec) -> dict | None:
    resolved = spec.resolved
    if ctx.rank == 0:
        return execute(spec, tp_session_for=lambda loaded: leader_session(loaded, ctx, resolved))
    run = resolved.run
    choice = choose_format(resolved.hardware, run.dtype, resolved.model.published_dtype)
    # Rank 0 says what is loaded; N copies of it would only be noise.
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = load_for_run(resolved, choose_device(run.device), choice)
    shard(loaded, ctx, resolved)
    follow_session(loaded.model, ctx, loaded.tokenizer.eos_token_ids)
    return None


def shard(loaded, ctx: TPContext, resolved: ResolvedRun) -> None:
    """Keep this rank's shard of the loaded model (in place)."""
    try:
        shard_model_(loaded.model, ctx.rank, ctx.world_size, ctx.group)
    except (TypeError, ValueError) as e:
        raise ConfigError(resolved.path, "tp", f"tp {ctx.world_size} does not fit {resolved.model.name}: "
                          f"{e}") from None


def leader_session(loaded, ctx: TPContext, resolved: ResolvedRun) -> TPSession:
    """Rank 0: shard the loaded model and lead the followers through the run's tests."""
    shard(loaded, ctx, resolved)
    return TPSession(loaded.model, ctx, loaded.tokenizer.eos_token_ids)
