"""`wallperf serve`: load a model and serve it with sut.server until a signal.

The server itself (HTTP, request checks, the engine loop) is in sut/server.py;
this is the command around it: arguments, model lookup in conf/, signals.
"""
from __future__ import annotations

import gc
import signal
import sys
from pathlib import Path

from harness.artifacts import resolve_model_file
from harness.config import load_model_config
from sut.loading import DTYPES, load_model
from sut.server import start_server


def add_serve_parser(subparsers):
    p = subparsers.add_parser("serve", help="serve the native engine over an OpenAI-compatible HTTP API",
                              description="Serve POST /v1/completions (streaming or not, greedy) and "
                                          "GET /v1/models over the native engine.")
    p.add_argument("--model", default="smollm2-135m", help="model name from conf/models, or a .gguf file or "
                   "HF checkpoint folder")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-seq-len", type=int, default=2048, help="prompt + output tokens per request "
                   "(capped at the model's context)")
    return p


def cmd_serve(args) -> int:
    path, name = Path(args.model), args.model
    if not path.exists():
        path = resolve_model_file(load_model_config(args.model, "command line", "--model"))
    else:
        name = path.stem
    loaded = load_model(path, args.dtype)
    server, url, stop = start_server(loaded, args.host, args.port, args.max_batch, args.max_seq_len, name,
                                     engine_thread=False)
    loop = server.service.loop
    # SIGTERM too: what container runtimes and service managers send to stop a server.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: loop.request_stop())
    print(f"wallperf: serving {name} ({args.dtype}) at {url}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    gc.collect()
    gc.freeze()  # the loaded model's objects: see harness/driver/run.py
    try:
        loop.run()  # the engine on the main thread, until a signal
    finally:
        stop()
    print("wallperf: stopped", file=sys.stderr)
    return 0
