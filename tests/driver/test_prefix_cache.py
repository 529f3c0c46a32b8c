"""The prefix-cache hit rate from a server's /metrics, read from a stand-in server
that publishes vLLM's counters in the Prometheus text format (two engines'
labelled samples, which must be summed), and from one that has no /metrics."""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from wallperf.driver.prefix_cache import hit_rate, parse_counters, scrape

VLLM_METRICS = """# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {q0}
vllm:prefix_cache_queries_total{{engine="1",model_name="m"}} {q1}
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {h0}
vllm:prefix_cache_hits_total{{engine="1",model_name="m"}} {h1}
vllm:num_requests_running{{engine="0",model_name="m"}} 3.0
"""


@pytest.fixture
def server():
    state = {"body": None}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            if state["body"] is None:
                self.send_response(404)
                self.end_headers()
                return
            data = state["body"].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield state, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_hit_rate_over_a_point_sums_the_engines(server):
    state, url = server
    state["body"] = VLLM_METRICS.format(q0=1000.0, q1=500.0, h0=100.0, h1=0.0)
    before = scrape(url)
    state["body"] = VLLM_METRICS.format(q0=3000.0, q1=1500.0, h0=1300.0, h1=300.0)
    after = scrape(url)
    # Queried 2000 + 1000 tokens during the point, found 1200 + 300 of them.
    assert hit_rate([before], [after]) == {"exposed": True, "hit_rate": 0.5, "hit_tokens": 1500.0,
                                           "queried_tokens": 3000.0}


def test_a_server_without_metrics_exposes_none(server):
    _, url = server
    assert scrape(url) is None
    assert hit_rate([None], [None]) == {"exposed": False, "hit_rate": None}
    assert hit_rate([{}], [parse_counters("other_metric 1\n")])["exposed"] is False
