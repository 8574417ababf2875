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
    """Read at scrape time from Scheduler.status(): one source of truth for both front doors."""

    def __init__(self):
        self.scheduler = None

    def describe(self):
        return []  # families depend on state (no hit rate without a neuron cache): no fixed description

    def collect(self):
        ready = GaugeMetricFamily("flashllm_ready", "1 when the daemon serves requests, 0 while loading or draining")
        scheduler = self.scheduler
        if scheduler is None:
            ready.add_metric([], 0)
            yield ready
            return
        status = scheduler.status("", model="", mode="")
        ready.add_metric([], 1 if status.ok and status.state == "ready" else 0)
        yield ready
        yield _gauge("flashllm_requests_running", "requests in the engine's batch", status.requests_running)
        yield _gauge("flashllm_requests_waiting", "requests queued for a batch slot", status.requests_queued)
        yield _gauge("flashllm_max_batch", "batch slots (KV-cache slots)", status.max_batch)
        yield _counter("flashllm_requests_finished", "requests finished by the engine, all front doors",
                       status.requests_completed)
        yield _counter("flashllm_requests_failed", "requests refused or failed, all front doors",
                       status.requests_failed)
        yield _counter("flashllm_generation_tokens", "tokens generated, all front doors", status.tokens_generated)
        yield _gauge("flashllm_tokens_per_second", f"tokens generated per second over the last "
                                                   f"{status.window_s:.0f} s", status.tokens_per_s)
        yield _gauge("flashllm_decode_batch_mean", "sequences per decode step (recent window)", status.mean_batch)
        yield _gauge("flashllm_decode_step_seconds", "mean decode step (recent window)", status.step_ms / 1e3)
        yield _gauge("flashllm_ffn_io_seconds_per_step", "FFN flash reads per decode step (recent window)",
                     status.io_ms_per_step / 1e3)
        yield _gauge("flashllm_ffn_compute_seconds_per_step", "FFN compute per decode step (recent window)",
                     status.compute_ms_per_step / 1e3)
        yield _gauge("flashllm_flash_read_bytes_per_token", "bytes read from flash per decoded token "
                                                            "(read_bytes of the FFN reader, recent window)",
                     status.flash_bytes_per_token)
        if status.cache_hit_rate is not None:
            yield _gauge("flashllm_neuron_cache_hit_rate", "neuron cache hits / neurons needed (recent window)",
                         status.cache_hit_rate)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
