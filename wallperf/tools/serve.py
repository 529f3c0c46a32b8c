"""`wallperf serve`: load a model and serve it with sut.server until a signal.

The server itself (HTTP, request checks, the engine loop) is in sut/server.py;
this is the command around it: arguments, model lookup in conf/, signals.
"""
from __future__ import annotations

import gc
import os
import signal
import socket
import sys
from pathlib import Path

from wallperf.harness.artifacts import resolve_model_file
from wallperf.harness.config import ConfigError, load_model_config, positive
from wallperf.sut.serving.http_limits import DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT_S, REQUEST_TIMEOUT_MARGIN_S, ServerLimits
from wallperf.sut.loading.load import DTYPES, load_model
from wallperf.sut.serving.server import start_server

API_KEY_ENV = "WALLPERF_API_KEY"


def add_serve_parser(subparsers):
    p = subparsers.add_parser("serve", help="serve the native engine over an OpenAI-compatible HTTP API",
                              description="Serve POST /v1/completions (streaming or not, greedy) and "
                                          "GET /v1/models over the native engine.")
    p.add_argument("--model", default="smollm2-135m", help="model name from conf/models, or a .gguf file or "
                   "HF checkpoint folder")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only). "
                   f"Set {API_KEY_ENV} in the environment to require that key as a bearer token on every "
                   "request; without one, a non-loopback address gets a warning")
    p.add_argument("--port", type=int, default=8000, help="0-65535 (0: any free port)")
    p.add_argument("--max-batch", type=positive(int), default=16, help="sequences decoded together")
    p.add_argument("--max-seq-len", type=positive(int), default=2048, help="prompt + output tokens per request "
                   "(capped at the model's context)")
    p.add_argument("--read-timeout", type=positive(float), default=DEFAULT_READ_TIMEOUT_S, help="seconds a connection "
                   "may stay silent (a half-sent request, an idle keep-alive connection) before it is closed")
    p.add_argument("--request-timeout", type=positive(float), help="seconds a request's head and body may take to arrive "
                   "from its first byte (default: --read-timeout + "
                   f"{REQUEST_TIMEOUT_MARGIN_S:g}); a client still sending then, such as one trickling a byte "
                   "every few seconds, gets 408 and is closed")
    p.add_argument("--max-connections", type=positive(int), default=DEFAULT_MAX_CONNECTIONS, help="open connections "
                   "served at once; beyond them a new one gets 503")
    return p


def check_serve_args(args) -> ServerLimits:
    """Every argument checked before the model loads (numbers by their argparse type): one line naming the
    flag, exit 2."""
    if not 0 <= args.port <= 65535:
        raise ConfigError("command line", "--port", f"{args.port} is not a port (0-65535)")
    try:
        socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError("command line", "--host", f"{args.host!r} is not an address to listen on: {e}") from None
    return ServerLimits(args.read_timeout, args.max_connections, os.environ.get(API_KEY_ENV) or None,
                        args.request_timeout)


def cmd_serve(args) -> int:
    limits = check_serve_args(args)
    path, name = Path(args.model), args.model
    if not path.exists():
        path = resolve_model_file(load_model_config(args.model, "command line", "--model"))
    else:
        name = path.stem
    loaded = load_model(path, args.dtype)
    try:
        server, url, stop = start_server(loaded, args.host, args.port, args.max_batch, args.max_seq_len, name,
                                         engine_thread=False, limits=limits)
    except OSError as e:
        raise ConfigError("command line", "--host/--port", f"cannot listen on {args.host}:{args.port}: "
                          f"{e.strerror or e}") from None
    loop = server.service.loop
    # SIGTERM too: what container runtimes and service managers send to stop a server.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: loop.request_stop())
    print(f"wallperf: serving {name} ({args.dtype}) at {url}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    gc.collect()
    gc.freeze()  # the loaded model's objects: see harness/driver/one_test.py
    try:
        loop.run()  # the engine on the main thread, until a signal
    finally:
        stop()
    print("wallperf: stopped", file=sys.stderr)
    return 0
