"""The daemon's Prometheus metrics (`GET /metrics`), in one registry of its own.

Two kinds of figures:
- what the HTTP front door sees per request (counted as it happens): requests
  by endpoint and status, completions by outcome, prompt and completion tokens,
  time to first token and inter-token latency histograms;
- the engine's and scheduler's state, read when Prometheus scrapes (both front
  doors share them): running and waiting requests, tokens generated, and the
  scheduler's recent window: tokens/s, flash bytes read per token, neuron cache
  hit rate, FFN I/O and compute time per decode step.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A tiny model on a GPU makes a token in a few ms; a big one streaming from flash on a laptop, seconds.
TOKEN_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FIRST_TOKEN_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class DaemonMetrics:
    """Counters the HTTP front door moves, plus a collector over the scheduler attached once the engine is up."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.http_requests = Counter("flashllm_http_requests", "HTTP requests answered, by endpoint and status",
                                     ["endpoint", "status"], registry=self.registry)
        self.completions = Counter(
            "flashllm_completions", "chat and completion choices by outcome: stop, length, cancelled (the client "
            "went away) or the error code that refused them", ["outcome"], registry=self.registry)
        self.prompt_tokens = Counter("flashllm_prompt_tokens", "prompt tokens of finished HTTP completions",
                                     registry=self.registry)
        self.completion_tokens = Counter("flashllm_completion_tokens", "tokens generated for HTTP completions",
                                         registry=self.registry)
        self.time_to_first_token = Histogram("flashllm_time_to_first_token_seconds",
                                             "from a request's arrival to its first token",
                                             buckets=FIRST_TOKEN_BUCKETS_S, registry=self.registry)
        self.inter_token_latency = Histogram("flashllm_inter_token_latency_seconds",
                                             "between a streamed request's consecutive tokens",
                                             buckets=TOKEN_LATENCY_BUCKETS_S, registry=self.registry)
        self._scheduler_state = _SchedulerCollector()
        self.registry.register(self._scheduler_state)

    def attach(self, scheduler) -> None:
        """Report this scheduler's state from now on (before: only the daemon's loading state)."""
        self._scheduler_state.scheduler = scheduler

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SchedulerCollector:
    """Read at scrape time from Scheduler.status(): one source for both front doors, under the same names
    as `flashllm status --prometheus` (clients/client_cli.STATUS_METRICS)."""

    def __init__(self):
        self.scheduler = None

    def describe(self):
        return []  # families depend on state (no hit rate without a neuron cache): no fixed description

    def collect(self):
        from flashllm.runtime.clients.client_cli import STATUS_METRICS

        scheduler = self.scheduler
        if scheduler is None:  # still loading
            yield GaugeMetricFamily("flashllm_healthy", "1 when the daemon is ready and its engine makes progress.",
                                    value=0)
            return
        status = scheduler.status("", model="", mode="")
        for name, kind, documentation, value_of in STATUS_METRICS:
            value = value_of(status)
            if name == "up" or value is None:
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"flashllm_{name}", documentation, value=value)
