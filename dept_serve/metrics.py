"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dept_serve.batching import BatchRecord
from dept_serve.errors import ServeError

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
UNKNOWN_ADAPTER = "<unknown>"  # the label of requests for adapters that are not loaded, to bound cardinality


class ServerMetrics:
    """Requests, rows, batch sizes and latencies, per adapter where it applies."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("dept_serve_requests", "Requests answered, by endpoint, adapter and HTTP status.",
                                ["endpoint", "adapter", "status"], registry=self.registry)
        self.latency = Histogram("dept_serve_request_latency_seconds",
                                 "Time from arrival to answer of successful requests.", ["endpoint", "adapter"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("dept_serve_queue_wait_seconds", "Time a row waits before its batch starts.",
                                    ["adapter"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rows = Counter("dept_serve_rows", "Inputs run through the model, by adapter.", ["adapter"],
                            registry=self.registry)
        self.batch_size = Histogram("dept_serve_batch_size", "Rows per batch.", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.batch_adapters = Histogram("dept_serve_batch_adapters", "Distinct adapters per batch.",
                                        buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_compute = Histogram("dept_serve_batch_compute_seconds", "Compute time of one batch.",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.adapters_loaded = Gauge("dept_serve_adapters_loaded", "Adapters loaded now.", registry=self.registry)
        self.queue_depth = Gauge("dept_serve_queue_depth", "Rows waiting for a batch.", registry=self.registry)

    @contextlib.contextmanager
    def counting(self, endpoint: str, adapter: str) -> Iterator[None]:
        """Count one request of `endpoint` with the HTTP status it ends with (a refusal's, else 200 or 500)."""
        status = 500
        try:
            yield
            status = 200
        except ServeError as err:
            status = err.status_code
            raise
        finally:
            self.requests.labels(endpoint, adapter, str(status)).inc()

    def observe_batch(self, record: BatchRecord) -> None:
        adapters = [row.payload.adapter for row in record.rows]
        self.batch_size.observe(len(record.rows))
        self.batch_adapters.observe(len(set(adapters)))
        self.batch_compute.observe(record.compute_s)
        for row, adapter in zip(record.rows, adapters):
            self.rows.labels(adapter).inc()
            self.queue_wait.labels(adapter).observe(row.started - row.enqueued)

    def render(self) -> bytes:
        return generate_latest(self.registry)
