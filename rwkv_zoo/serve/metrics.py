"""Server metrics in the Prometheus text exposition format (version 0.0.4).

Written by hand rather than with ``prometheus_client``: a dozen counters, gauges and two histograms
need ~80 lines, and the server then needs no third dependency. Counters are plain ints bumped by the
engine's thread (single writer); readers may see a value one step old, which a scrape tolerates.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time

__all__ = ["CONTENT_TYPE", "Histogram", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "rwkv_zoo_serve_"


class Histogram:
    """Cumulative buckets (``le``), ``_sum`` and ``_count``, as Prometheus expects them."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, c in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += c
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        out += [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]
        return out


LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """What ``/metrics`` shows. ``tokens_per_second`` is over the last ``window`` seconds."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self.prompt_tokens = 0  # every prompt token of every admitted request
        self.cached_prompt_tokens = 0  # ... of which the prefix cache supplied the state
        self.prefill_tokens = 0  # ... and those the model ran
        self.generation_tokens = 0
        self.completed = self.cancelled = self.rejected = 0
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()  # (endpoint, status)
        self.queue_length = self.batch_rows = self.prefilling = 0
        self.peak_batch_rows = 0
        self.ttft = Histogram(LATENCY_BOUNDS)
        self.step = Histogram(LATENCY_BOUNDS)  # one decode step = the time between two tokens of a row
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def observe_engine(self, queue_length: int, batch_rows: int, prefilling: int) -> None:
        self.queue_length, self.batch_rows, self.prefilling = queue_length, batch_rows, prefilling

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_step(self, seconds: float, rows: int) -> None:
        self.step.observe(seconds)
        self.peak_batch_rows = max(self.peak_batch_rows, rows)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, rows))
            while self._recent and self._recent[0][0] < now - self.window:
                self._recent.popleft()

    def observe_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [(t, n) for t, n in self._recent if t >= now - self.window]
        return sum(n for _, n in recent) / self.window

    def render(self, cache_stats: dict[str, int] | None = None) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[str] | int | float) -> None:
            full = PREFIX + name
            lines.append(f"# HELP {full} {help_}")
            lines.append(f"# TYPE {full} {kind}")
            if isinstance(samples, list):
                lines.extend(s if s.startswith(full) else f"{full}{s}" for s in samples)
            else:
                lines.append(f"{full} {samples}")

        metric("queue_length", "gauge", "Requests waiting for free rows.", self.queue_length)
        metric("batch_size", "gauge", "Rows decoding in the running batch.", self.batch_rows)
        metric("batch_size_peak", "gauge", "The most rows one decode step has run.", self.peak_batch_rows)
        metric("prefilling", "gauge", "Prompts being prefilled.", self.prefilling)
        metric("tokens_per_second", "gauge", f"Generated tokens per second over the last {self.window:g} s.",
               round(self.tokens_per_second(), 3))
        metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", self.prompt_tokens)
        metric("prompt_tokens_cached_total", "counter", "Prompt tokens whose state came from the prefix cache.",
               self.cached_prompt_tokens)
        metric("prefill_tokens_total", "counter", "Prompt tokens run through the model.", self.prefill_tokens)
        metric("generation_tokens_total", "counter", "Generated tokens.", self.generation_tokens)
        metric("requests_completed_total", "counter", "Requests whose every choice finished.", self.completed)
        metric("requests_cancelled_total", "counter", "Requests cancelled (client gone) before finishing.",
               self.cancelled)
        metric("requests_rejected_total", "counter", "Requests refused because the queue was full.", self.rejected)
        with self._lock:
            reqs = sorted(self.requests.items())
        metric("http_requests_total", "counter", "HTTP requests by endpoint and status.",
               [f'{{endpoint="{e}",status="{s}"}} {c}' for (e, s), c in reqs])
        metric("time_to_first_token_seconds", "histogram", "From arrival to the first sampled token.",
               self.ttft.lines(PREFIX + "time_to_first_token_seconds"))
        metric("decode_step_seconds", "histogram", "One decode step of the running batch (inter-token latency).",
               self.step.lines(PREFIX + "decode_step_seconds"))
        if cache_stats is not None:
            for key, kind, help_ in (("hits", "counter", "Prefix cache lookups that found a prefix."),
                                     ("misses", "counter", "Prefix cache lookups that found none."),
                                     ("evictions", "counter", "Prefix cache entries evicted."),
                                     ("entries", "gauge", "Prefix cache entries."),
                                     ("bytes", "gauge", "Bytes held by the prefix cache."),
                                     ("max_bytes", "gauge", "The prefix cache's bound in bytes.")):
                name = f"prefix_cache_{key}" + ("_total" if kind == "counter" else "")
                metric(name, kind, help_, cache_stats[key])
        return "\n".join(lines) + "\n"
