"""Launching tensor-parallel ranks, and keeping their engines in lockstep.

`launch` spawns one process per rank on this host (torch.multiprocessing, spawn),
joins them into a torch.distributed world over 127.0.0.1 and a free port, and
returns what each rank's function returned. The backend is "nccl" on GPUs (torch
maps the name to RCCL on ROCm) and "gloo" on the CPU. Rank r drives GPU r.

Every rank runs the whole engine: the same scheduler over the same requests, and
the model's forward in which the ranks meet at two all-reduces per block. Only
rank 0 talks to the outside (LoadGen): `TPLeader` wraps its engine as the backend
the adapter drives, and each step first broadcasts the requests admitted since the
last step; the other ranks `follow`, adding those requests and stepping. No token
crosses: with replicated logits every rank samples the same tokens, so the
schedulers never diverge as long as they start equal (`lockstep_engine` makes their
KV pools the same size). Control messages are pickled Python objects broadcast
over a gloo group, so they never occupy the GPU stream nor need device tensors.

A run of several tests (`wallperf run --tp`, harness/driver/tp_run.py) is a TPSession:
rank 0 announces each test's engine arguments, every rank builds a fresh engine
with them, and rank 0 finally ends the session (`follow_session` on the others).
"""
from __future__ import annotations

import os
import pickle
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wallperf.sut.engine.engine import Engine, SamplingParams
from wallperf.sut.engine.kv_cache import SlotKVCache
from wallperf.sut.models.llama import LlamaConfig
from wallperf.sut.engine.tp import shard_model_
from wallperf.sut.loading.weights import build_model
from wallperf.sut.models.llama import synthetic_state_dict


@dataclass(frozen=True, eq=False)
class TPContext:
    """What a rank's function is given."""

    rank: int
    world_size: int
    device: torch.device
    # The ranks' group for the model's all-reduces (None: the default world group).
    group: object
    # A gloo group for pickled control messages (None: the default group is gloo).
    control: object


def default_backend(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def free_port() -> int:
    """A port free now on 127.0.0.1 (another process may still take it before
    rank 0 binds it; a clash fails the launch loudly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn, world_size: int, backend: str = "gloo", args: tuple = (), timeout_s: float = 1800.0) -> list:
    """Run fn(ctx, *args) in `world_size` spawned processes; their results by rank.

    `fn` and `args` are pickled to the children, so fn must be importable at module
    level. If a rank raises, the others are terminated and that rank's exception is
    raised here (chained to torch's report, which carries the rank's traceback); if
    it cannot be pickled, torch's report is. `timeout_s` bounds any one collective,
    including a follower's wait for the leader's next step."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    results = mp.get_context("spawn").SimpleQueue()
    procs = mp.start_processes(_rank_main, args=(world_size, backend, free_port(), timeout_s, fn, args, results),
                               nprocs=world_size, join=False, start_method="spawn")
    by_rank, errors = {}, {}

    def drain():
        # While waiting too: a child blocks on a full pipe until its message is read.
        while not results.empty():
            rank, ok, value = results.get()
            (by_rank if ok else errors)[rank] = value

    try:
        while not procs.join(timeout=0.05):
            drain()
    except mp.ProcessRaisedException as failure:
        drain()
        raised = _unpickled(errors.get(failure.error_index))
        if raised is None:
            raise
        raise raised from failure
    except mp.ProcessExitedException as failure:
        # Killed (e.g. out of memory) or exited without a Python exception to report.
        raise RuntimeError(f"tensor-parallel rank {failure.error_index} of {world_size} ended early "
                           f"({failure}); every other rank was stopped") from None
    except BaseException:
        # Interrupted here (Ctrl-C): a rank blocked in a collective would not see it.
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
        raise
    drain()
    missing = sorted(set(range(world_size)) - set(by_rank))
    if missing:
        raise RuntimeError(f"ranks {missing} exited without a result")
    return [pickle.loads(by_rank[r]) for r in range(world_size)]


def _unpickled(payload: bytes | None) -> BaseException | None:
    try:
        return None if payload is None else pickle.loads(payload)
    except Exception:  # noqa: BLE001 - an exception that does not rebuild falls back to torch's report
        return None


def _rank_main(rank, world_size, backend, port, timeout_s, fn, args, results):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        device = torch.device("cpu")
        # One process per share of the cores: more threads than cores spin-wait against
        # each other (tests/sut/test_engine.py measured ~10x slower on shared cores).
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))
    else:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    try:
        control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        value = fn(TPContext(rank, world_size, device, None, control), *args)
        # Plain pickle copies tensors by value: torch's queue pickler would share them
        # through file descriptors that die with this process.
        results.put((rank, True, pickle.dumps(value)))
    except Exception as e:
        # No destroy_process_group here: with a peer gone it may wait on it; exiting frees all.
        results.put((rank, False, _pickled(e)))
        raise
    dist.destroy_process_group()
    # The result is delivered; end here rather than through interpreter finalization,
    # where a gloo thread object still joinable aborts the process now and then
    # ("terminate called without an active exception", SIGABRT, about 1 launch in 15),
    # which would turn a finished rank into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _pickled(e: Exception) -> bytes | None:
    try:
        return pickle.dumps(e)
    except Exception:  # noqa: BLE001 - torch's report (the traceback as text) still reaches the parent
        return None


def lockstep_engine(model, ctx: TPContext, eos_token_ids, **engine_kwargs) -> Engine:
    """An Engine whose KV pool has the same number of blocks on every rank. Each rank
    sizes its pool from its own free memory; the smallest wins, because a rank that
    could admit a request another cannot would leave the schedulers out of step."""
    engine = Engine(model, eos_token_ids, device=ctx.device, **engine_kwargs)
    n = torch.tensor([engine.blocks.num_blocks])
    dist.all_reduce(n, op=dist.ReduceOp.MIN, group=ctx.control)
    if int(n) != engine.blocks.num_blocks:
        del engine
        engine = Engine(model, eos_token_ids, device=ctx.device, **{**engine_kwargs, "num_blocks": int(n)})
    return engine


class TPLeader:
    """Rank 0's engine as the backend the LoadGen adapter drives (add_request,
    step, has_unfinished, free_slots, stats, ...). Requests are buffered and sent
    to the followers with the step that first schedules them."""

    def __init__(self, engine: Engine, ctx: TPContext):
        if ctx.rank != 0:
            raise ValueError(f"the leader is rank 0, not rank {ctx.rank}")
        self.engine, self.ctx = engine, ctx
        self._admitted: list[tuple[int, list, SamplingParams]] = []

    def __getattr__(self, name):
        # Everything but add_request/step/close reads the leader's own engine.
        return getattr(self.engine, name)

    def add_request(self, request_id: int, prompt_ids, params: SamplingParams) -> None:
        prompt = list(prompt_ids)
        # First on the leader: a request it rejects never reaches the followers.
        self.engine.add_request(request_id, prompt, params)
        self._admitted.append((request_id, prompt, params))

    def step(self):
        _broadcast(("step", self._admitted), self.ctx)
        self._admitted = []
        return self.engine.step()

    def close(self) -> None:
        """Release the followers from `follow`."""
        _broadcast(("stop", []), self.ctx)


def follow(engine: Engine, ctx: TPContext, on_events=None) -> int:
    """A follower's loop: apply each step the leader broadcasts until it stops.
    `on_events`, if given, sees every step's TokenEvents. Returns the steps taken."""
    steps = 0
    while True:
        command, admitted = _broadcast(None, ctx)
        if command == "stop":
            return steps
        for request_id, prompt, params in admitted:
            engine.add_request(request_id, prompt, params)
        events = engine.step()
        steps += 1
        if on_events is not None:
            on_events(events)


class TPSession:
    """Rank 0's side of a run of several tests (a test: one engine's life). `engine`
    starts a test: every rank builds a fresh lockstep engine with the same arguments,
    and rank 0 gets its own as a TPLeader, whose close() ends the test. `end()`
    releases the followers, which wait in `follow_session` meanwhile."""

    def __init__(self, model, ctx: TPContext, eos_token_ids):
        if ctx.rank != 0:
            raise ValueError(f"the session is led by rank 0, not rank {ctx.rank}")
        self.model, self.ctx, self.eos_token_ids = model, ctx, tuple(eos_token_ids)

    def engine(self, **engine_kwargs) -> TPLeader:
        _broadcast(("engine", engine_kwargs), self.ctx)
        return TPLeader(lockstep_engine(self.model, self.ctx, self.eos_token_ids, **engine_kwargs), self.ctx)

    def end(self) -> None:
        _broadcast(("end", None), self.ctx)


def follow_session(model, ctx: TPContext, eos_token_ids) -> int:
    """A follower's side of a TPSession: for each test, a lockstep engine built with
    rank 0's arguments follows rank 0's steps. Returns the number of tests."""
    tests = 0
    while True:
        command, engine_kwargs = _broadcast(None, ctx)
        if command == "end":
            return tests
        if command != "engine":
            raise RuntimeError(f"rank {ctx.rank} expected a new test or the end, got {command!r}: "
                               "the ranks are out of step")
        engine = lockstep_engine(model, ctx, eos_token_ids, **engine_kwargs)
        follow(engine, ctx)
        # Freed before the next test's pool is sized from the free memory.
        del engine
        tests += 1


def _broadcast(message, ctx: TPContext):
    box = [message]
    dist.broadcast_object_list(box, src=0, group=ctx.control)
    return box[0]


def run_tp_generate(cfg: LlamaConfig, prompts: list, params: SamplingParams, world_size: int, seed: int = 0,
                    dtype: torch.dtype = torch.float32, backend: str = "gloo", **engine_kwargs) -> list[dict]:
    """Seeded synthetic weights of `cfg`, sharded over `world_size` ranks: every
    rank's {"tokens": greedy tokens per prompt (continuous batching, rank 0
    leading), "logits": float32 prefill logits (T, vocab) per prompt}."""
    return launch(_generate_rank, world_size, backend, args=(cfg, prompts, params, seed, dtype, engine_kwargs))


def _generate_rank(ctx: TPContext, cfg, prompts, params, seed, dtype, engine_kwargs) -> dict:
    # Every rank builds the full model and keeps its slice: simple, and fine for
    # test sizes; a large checkpoint would be sliced per rank while loading.
    model = build_model(cfg, synthetic_state_dict(cfg, seed, dtype), dtype)
    model = shard_model_(model, ctx.rank, ctx.world_size, ctx.group).to(ctx.device)
    logits = [_prefill_logits(model, p, ctx.device) for p in prompts]
    max_seq_len = max(len(p) for p in prompts) + params.max_new_tokens
    engine = lockstep_engine(model, ctx, eos_token_ids=(), max_seq_len=max_seq_len, **engine_kwargs)
    tokens = {i: [] for i in range(len(prompts))}

    def collect(events):
        for ev in events:
            tokens[ev.request_id].append(ev.token_id)

    if ctx.rank == 0:
        leader = TPLeader(engine, ctx)
        for i, p in enumerate(prompts):
            leader.add_request(i, p, params)
        while leader.has_unfinished():
            collect(leader.step())
        leader.close()
    else:
        follow(engine, ctx, collect)
    return {"tokens": [tokens[i] for i in range(len(prompts))], "logits": logits}


def _prefill_logits(model, prompt: list, device) -> torch.Tensor:
    """Logits at every position of one prompt, through a fresh one-slot cache sized
    by the model's (local) KV heads."""
    cfg = model.cfg
    cache = SlotKVCache(cfg.n_layers, 1, cfg.n_kv_heads, len(prompt), cfg.head_dim,
                        model.embed_tokens.weight.dtype, device)
    positions = torch.arange(len(prompt), device=device).unsqueeze(0)
    ids = torch.tensor([prompt], device=device)
    return model(ids, positions, cache.bind([0], positions))[0].cpu()
