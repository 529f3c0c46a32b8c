"""`wallperf bench client`: how fast the OpenAI clients themselves can go: the
openai backend LoadGen runs drive, and (--client workers) the fixed-concurrency
client of `wallperf sweep --concurrency`.

A mock OpenAI server (standard library, loopback only) answers every streamed
completion at once: all its tokens, the usage chunk and [DONE] in one write.
With the server costing next to nothing, what limits the request rate is the
client (sut.backends.openai): its threads, HTTP parsing and event hand-off.
The mock runs in a child process so it does not share the client's GIL.

The measurement drives the backend as the LoadGen adapter does (fill the free
slots, step, repeat) in a closed loop at each concurrency, after a warm-up,
and reports completed requests/s and tokens/s; the highest is the ceiling the
client puts on any Server-scenario run through it. On a shared machine the
figure is low by whatever else ran; the load average is printed with it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from wallperf.harness.config import positive, positive_list
from wallperf.audit.endpoints import point_figures
from wallperf.driver.client_workers import Load, worker_rows, worker_specs
from wallperf.driver.workers_arg import open_workers
from wallperf.sut.backends.openai import OpenAIBackend
from wallperf.sut.engine.engine import SamplingParams
from wallperf.sut.serving.server import send_json

MOCK_MODEL = "mock"
# Token ids the mock streams: cycling past the few special ids a tokenizer puts first.
_FIRST_TOKEN_ID = 3
_TOKEN_CYCLE = 100
# How long the mock's child process may take to report its port.
MOCK_START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class MockOptions:
    # Stream `choices[0].token_ids` (vLLM's return_token_ids); off: text only.
    token_ids: bool = True
    # Off: a prompt of token ids gets a 400, as from servers that take text only.
    accept_token_prompts: bool = True
    # The text of every token: one character, so a byte-level tokenizer gives it back as one id.
    token_text: str = "a"


def mock_token_ids(n: int) -> list[int]:
    return [_FIRST_TOKEN_ID + i % _TOKEN_CYCLE for i in range(n)]


class _MockHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: with Nagle's algorithm the body waits for a delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args) -> None:
        pass

    def do_GET(self) -> None:
        send_json(self, 200, {"object": "list", "data": [{"id": MOCK_MODEL, "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.authorization.append(self.headers.get("Authorization"))
        opts = self.server.options
        if isinstance(body.get("prompt"), list) and not opts.accept_token_prompts:
            send_json(self, 400, {"error": {"message": "prompt must be a string", "type": "invalid_request_error"}})
            return
        data = self.server.stream_bytes(body.get("max_tokens") or 16)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)



class MockServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, address, options: MockOptions):
        super().__init__(address, _MockHandler)
        self.options = options
        # The Authorization header of every request, for tests of the API key.
        self.authorization: list = []
        self._streams: dict[int, bytes] = {}

    def stream_bytes(self, n: int) -> bytes:
        """The whole SSE answer of n tokens (built once per length)."""
        if n not in self._streams:
            events = []
            for i, token in enumerate(mock_token_ids(n)):
                choice = {"index": 0, "text": self.options.token_text, "logprobs": None,
                          "finish_reason": "length" if i == n - 1 else None}
                if self.options.token_ids:
                    choice["token_ids"] = [token]
                events.append({"id": "cmpl-mock", "object": "text_completion", "model": MOCK_MODEL,
                               "choices": [choice]})
            events.append({"id": "cmpl-mock", "object": "text_completion", "model": MOCK_MODEL, "choices": [],
                           "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}})
            self._streams[n] = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + \
                b"data: [DONE]\n\n"
        return self._streams[n]


def start_mock_server(options: MockOptions = MockOptions(), host: str = "127.0.0.1", port: int = 0):
    """The mock in background threads of this process: (server, url, stop function)."""
    server = MockServer((host, port), options)
    thread = threading.Thread(target=server.serve_forever, name="wallperf-mock", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return server, f"http://{host}:{server.server_address[1]}", stop


def _serve_mock_in_child(conn) -> None:
    server = MockServer(("127.0.0.1", 0), MockOptions())
    conn.send(server.server_address[1])
    server.serve_forever()


@dataclass(frozen=True)
class ClientRate:
    concurrency: int
    seconds: float
    requests: int
    tokens: int
    failures: int

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def measure(url: str, concurrency: int, seconds: float, output_tokens: int, prompt_tokens: int,
            warmup_s: float = 0.5) -> ClientRate:
    """Completed requests and tokens in `seconds` of a closed loop, driven as the adapter drives a backend."""
    params = SamplingParams(max_new_tokens=output_tokens, min_new_tokens=2, ignore_eos=True)
    prompt = list(range(prompt_tokens))
    backend = OpenAIBackend([url], MOCK_MODEL, max_concurrency=concurrency, timeout_s=10, retries=0)
    next_id = requests = tokens = 0
    start = time.perf_counter()
    counting_from = start + warmup_s
    end = counting_from + seconds
    try:
        while (now := time.perf_counter()) < end:
            for _ in range(backend.free_slots):
                backend.add_request(next_id, prompt, params)
                next_id += 1
            events = backend.step()
            if now >= counting_from:
                tokens += len(events)
                requests += sum(ev.finished for ev in events)
        failures = backend.stats()["failures"]
    finally:
        backend.close()
    return ClientRate(concurrency, seconds, requests, tokens, failures)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="wallperf bench client", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=positive_list(int), default="1,16,64",
                   help="comma list of concurrent requests to try")
    p.add_argument("--seconds", type=positive(float), default=3.0, help="measured time per concurrency")
    p.add_argument("--output-tokens", type=positive(int), default=16, help="tokens per answer")
    p.add_argument("--prompt-tokens", type=positive(int), default=128, help="token ids sent per prompt")
    p.add_argument("--client", choices=("backend", "workers"), default="backend", help="backend: the openai "
                   "backend LoadGen runs drive (default); workers: the fixed-concurrency client of `wallperf "
                   "sweep --concurrency`, its capacity at p99 send lag within --lag-ms")
    p.add_argument("--client-workers", default="1", help="workers: client processes, or ray:N for N actors on "
                   "a Ray cluster (the 'ray' extra); the mock listens on loopback, so the cluster's nodes must be this machine")
    p.add_argument("--ray-address", help="ray:N: the cluster's address (default: RAY_ADDRESS, else 'auto')")
    p.add_argument("--lag-ms", type=positive(float), default=1.0, help="workers: the p99 send lag a level may "
                   "show and count toward the capacity (default 1)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    workers = open_workers(args.client_workers, args.ray_address) if args.client == "workers" else None
    # fork: the child needs no imports of its own, and starts at once.
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    mock = ctx.Process(target=_serve_mock_in_child, args=(child,), daemon=True)
    mock.start()
    try:
        if not parent.poll(MOCK_START_TIMEOUT_S):
            raise RuntimeError(f"the mock server did not start within {MOCK_START_TIMEOUT_S:g} s")
        url = f"http://127.0.0.1:{parent.recv()}"
        if workers is not None:
            with workers:
                return _workers_capacity(url, args, workers)
        rates = [measure(url, c, args.seconds, args.output_tokens, args.prompt_tokens) for c in args.concurrency]
    finally:
        mock.terminate()
        mock.join()
    best = max(rates, key=lambda r: r.requests_per_second)
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"load_average": load, "output_tokens": args.output_tokens,
                          "best": {**asdict(best), "requests_per_second": best.requests_per_second,
                                   "tokens_per_second": best.tokens_per_second},
                          "rates": [{**asdict(r), "requests_per_second": r.requests_per_second,
                                     "tokens_per_second": r.tokens_per_second} for r in rates]}))
    else:
        for r in rates:
            print(f"concurrency {r.concurrency:>4}: {r.requests_per_second:8.0f} requests/s "
                  f"{r.tokens_per_second:9.0f} tokens/s  ({r.failures} failures)")
        print(f"highest: {best.requests_per_second:.0f} requests/s, {best.tokens_per_second:.0f} tokens/s at "
              f"concurrency {best.concurrency}, {args.output_tokens} tokens per answer "
              f"(load average {load:.1f} on {os.cpu_count()} CPUs)")
    return 0 if all(r.failures == 0 for r in rates) else 1


def _workers_capacity(url: str, args, workers) -> int:
    """The fixed-concurrency client against the mock: per concurrency, requests/s, streamed
    chunks/s (one token a chunk) and the self-check, merged and per worker; the capacity
    is the highest requests/s of a level whose p99 send lag is within --lag-ms."""
    load = Load((url,), MOCK_MODEL, (tuple(range(args.prompt_tokens)),), (args.output_tokens,),
                (args.output_tokens,), ignore_eos=True, timeout_s=10)
    levels = []
    for c in args.concurrency:
        results = workers.run(load, worker_specs(c, workers.count, warmup_s=0.5, window_s=args.seconds,
                                                 timeout_s=load.timeout_s))
        window = results[0].window
        reqs = [r for w in results for r in w.requests]
        fig = point_figures(reqs, window, c, loop_lags_s=[x for w in results for x in w.loop_lag_s],
                            lag_limit_ms=args.lag_ms)
        done = [r for r in reqs if r.get("error") is None and not r.get("cut_at_window_end")
                and window[0] <= r["done"] < window[1]]
        ck = fig["client"]
        levels.append({"concurrency": c, "requests_per_second": len(done) / args.seconds,
                       "chunks_per_second": fig["system_tokens_per_second"], "failures": fig["failures"],
                       "send_lag_ms_p99": (ck["send_lag_ms"] or {}).get("p99"),
                       "loop_lag_ms_p99": (ck["loop_lag_ms"] or {}).get("p99"),
                       "achieved_concurrency": ck["achieved_concurrency"],
                       "workers": worker_rows(results, args.lag_ms)})
    within = [lv for lv in levels if lv["send_lag_ms_p99"] is not None and lv["send_lag_ms_p99"] <= args.lag_ms]
    best = max(within, key=lambda lv: lv["requests_per_second"]) if within else None
    load_avg = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"client": "workers", "client_workers": workers.describe(), "lag_ms": args.lag_ms,
                          "load_average": load_avg, "capacity": best, "levels": levels}))
    else:
        for lv in levels:
            print(f"concurrency {lv['concurrency']:>4}: {lv['requests_per_second']:8.0f} requests/s "
                  f"{lv['chunks_per_second']:9.0f} chunks/s  send lag p99 {lv['send_lag_ms_p99'] or 0:.2f} ms, "
                  f"loop lag p99 {lv['loop_lag_ms_p99'] or 0:.2f} ms ({lv['failures']} failures)")
        print("capacity: " + (f"{best['requests_per_second']:.0f} requests/s, {best['chunks_per_second']:.0f} "
                              f"chunks/s at concurrency {best['concurrency']}" if best else "none")
              + f" with p99 send lag <= {args.lag_ms:g} ms, {workers.count} {workers.kind} worker(s) "
              f"(load average {load_avg:.1f} on {os.cpu_count()} CPUs)")
    return 0 if best is not None and all(lv["failures"] == 0 for lv in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
