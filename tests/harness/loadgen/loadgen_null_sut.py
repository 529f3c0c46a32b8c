"""Run the real LoadGen against a tiny deterministic SUT and leave its logs in a folder.

Tests of the log parser and of the TEST06 checks need logs that LoadGen itself
wrote, not hand-made imitations. Each run happens in its own process (this file
is a script): LoadGen keeps process-wide state (the logger, the audit config,
`FromConfig`'s once-only rule), so one run per process is the safe contract.

The SUT answers sample `i` with the tokens `answer_tokens(i, eos)`; a `--fault`
breaks the answers of the samples with `i % 4 == 1` in one TEST06-relevant way
(or skips their FirstTokenComplete, which LoadGen logs as an error), so a test
knows exactly which qsl indices must fail which check.
"""
import argparse
import array
import queue
import threading
import time
from pathlib import Path

import mlperf_loadgen as lg

FAULTS = ("none", "two_eos", "eos_in_middle", "token_count", "first_token", "no_first_token")


def answer_tokens(index: int, eos: int) -> list[int]:
    """A first token unique to the sample, 2-4 body tokens, then one EOS; `eos` must be below 10."""
    body = [10 + (index + k) % 5 for k in range(2 + index % 3)]
    return [100 + index] + body + [eos]


def is_faulty(index: int) -> bool:
    return index % 4 == 1


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outdir", type=Path, required=True)
    p.add_argument("--scenario", choices=("Offline", "Server", "SingleStream", "MultiStream"), required=True)
    p.add_argument("--mode", choices=("PerformanceOnly", "AccuracyOnly"), default="PerformanceOnly")
    p.add_argument("--token-latencies", action="store_true", help="use_token_latencies (TTFT/TPOT)")
    p.add_argument("--ttft-ns", type=int, default=2_000_000_000)
    p.add_argument("--tpot-ns", type=int, default=200_000_000)
    p.add_argument("--qps", type=float, default=2000.0, help="Server target / Offline expected QPS")
    p.add_argument("--min-duration-ms", type=int, default=300)
    p.add_argument("--min-query-count", type=int, default=100)
    p.add_argument("--delay-ms", type=float, default=0.2, help="SUT time per sample")
    p.add_argument("--total-samples", type=int, default=30)
    p.add_argument("--eos", type=int, default=2)
    p.add_argument("--fault", choices=FAULTS, default="none")
    return p.parse_args()


class NullSUT:
    """One worker thread answers queued samples, so LoadGen's issue thread never waits on the SUT."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.streaming = args.token_latencies and args.scenario != "Offline"
        self.samples: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._serve, daemon=True)
        self.worker.start()

    def issue_query(self, query_samples) -> None:
        for qs in query_samples:
            self.samples.put((qs.id, qs.index))

    def stop(self) -> None:
        self.samples.put(None)
        self.worker.join()

    def _serve(self) -> None:
        while (item := self.samples.get()) is not None:
            self._answer(*item)

    def _answer(self, sample_id: int, index: int) -> None:
        args = self.args
        tokens = answer_tokens(index, args.eos)
        fault = args.fault if is_faulty(index) else "none"
        if fault == "two_eos":
            tokens = tokens + [args.eos]
        elif fault == "eos_in_middle":
            tokens = tokens[:2] + [args.eos] + tokens[2:]
        n_tokens = len(tokens) + 1 if fault == "token_count" else len(tokens)
        # Half the delay before the first token and half after, so TTFT and TPOT are both non-zero.
        time.sleep(args.delay_ms / 2000.0)
        if self.streaming and fault != "no_first_token":
            first = tokens[0] + 1000 if fault == "first_token" else tokens[0]
            first_buf = array.array("i", [first])
            address, _ = first_buf.buffer_info()
            lg.FirstTokenComplete([lg.QuerySampleResponse(sample_id, address, first_buf.itemsize)])
        time.sleep(args.delay_ms / 2000.0)
        buf = array.array("i", tokens)
        address, length = buf.buffer_info()
        lg.QuerySamplesComplete([lg.QuerySampleResponse(sample_id, address, length * buf.itemsize, n_tokens)])


def _settings(args: argparse.Namespace) -> lg.TestSettings:
    s = lg.TestSettings()
    s.scenario = getattr(lg.TestScenario, args.scenario)
    s.mode = getattr(lg.TestMode, args.mode)
    s.min_duration_ms = args.min_duration_ms
    s.min_query_count = args.min_query_count
    s.server_target_qps = args.qps
    s.offline_expected_qps = args.qps
    s.single_stream_expected_latency_ns = int(args.delay_ms * 1e6)
    s.multi_stream_expected_latency_ns = int(8 * args.delay_ms * 1e6)
    s.use_token_latencies = args.token_latencies
    s.ttft_latency = args.ttft_ns
    s.tpot_latency = args.tpot_ns
    return s


def main() -> None:
    args = _parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    log_settings = lg.LogSettings()
    log_settings.log_output.outdir = str(args.outdir)
    sut_impl = NullSUT(args)
    sut = lg.ConstructSUT(sut_impl.issue_query, lambda: None)
    qsl = lg.ConstructQSL(args.total_samples, args.total_samples, lambda _: None, lambda _: None)
    # An absent audit.config inside the run folder: LoadGen otherwise reads one from the cwd.
    lg.StartTestWithLogSettings(sut, qsl, _settings(args), log_settings, str(args.outdir / "audit.config"))
    sut_impl.stop()
    lg.DestroyQSL(qsl)
    lg.DestroySUT(sut)


if __name__ == "__main__":
    main()
