"""The daemon's metrics, for Prometheus and for ``telstate-replicator status``.

Prometheus scrapes them over HTTP (``--metrics-port``). The same numbers
go, about once a second, into the mirror's intake hash in Redis
(:func:`telstate.remote.intake_key`), where ``status`` on any host reads
them:

==========================================  =======================================
``telstate_replicator_requests_applied``    write requests committed to the log
``telstate_replicator_requests_rejected``   requests refused, by ``reason``
                                            (``immutable``, ``timestamp``,
                                            ``expired``, ``clock``, ``invalid``,
                                            ``store``, ``readonly``)
``telstate_replicator_batch_size``          requests per LMDB transaction
``telstate_replicator_request_seconds``     request sent to reply sent (server clock)
``telstate_replicator_mirror_lag_events``   events in the log not yet in the mirror
``telstate_replicator_mirror_lag_seconds``  age of the oldest of them
``telstate_replicator_rebuilds``            rebuilds of the mirror started
==========================================  =======================================
"""

from __future__ import annotations

import time
from typing import Any

import prometheus_client
import redis

#: Seconds between copies of the metrics into Redis.
PUBLISH_INTERVAL = 1.0
#: Reasons a request is rejected (the label values of the rejected counter).
REASONS = ("immutable", "timestamp", "expired", "clock", "invalid", "store", "readonly")


class Metrics:
    """The daemon's counters, in a registry of their own (so tests can make many)."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        prefix = "telstate_replicator_"
        self.applied = prometheus_client.Counter(
            prefix + "requests_applied",
            "Write requests committed to the log",
            registry=self.registry,
        )
        self.rejected = prometheus_client.Counter(
            prefix + "requests_rejected",
            "Write requests refused, by reason",
            ["reason"],
            registry=self.registry,
        )
        for reason in REASONS:
            self.rejected.labels(reason)
        self.batch_size = prometheus_client.Histogram(
            prefix + "batch_size",
            "Requests applied per LMDB transaction",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.latency = prometheus_client.Histogram(
            prefix + "request_seconds",
            "From a request's sending to its reply, by the Redis server's clock",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )
        self.lag_events = prometheus_client.Gauge(
            prefix + "mirror_lag_events", "Events not yet in the mirror", registry=self.registry
        )
        self.lag_seconds = prometheus_client.Gauge(
            prefix + "mirror_lag_seconds",
            "Age of the oldest event not yet in the mirror",
            registry=self.registry,
        )
        self.rebuilds = prometheus_client.Counter(
            prefix + "rebuilds", "Rebuilds of the mirror started", registry=self.registry
        )
        self._next_publish = 0.0

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Serve the metrics over HTTP on `port`, in a thread."""
        prometheus_client.start_http_server(port, addr=address, registry=self.registry)

    def summary(self) -> dict[str, Any]:
        """The metrics as a flat dict of numbers (what ``status`` shows)."""
        values: dict[str, Any] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith(("_created", "_bucket")):
                    continue
                name = sample.name.removeprefix("telstate_replicator_")
                if "reason" in sample.labels:
                    name += "_" + sample.labels["reason"]
                values[name] = sample.value
        return values

    def publish(self, client: redis.Redis, key: bytes) -> None:
        """Copy :meth:`summary` into the hash `key` (the intake key)."""
        client.hset(key, mapping={f"metric:{k}": repr(v) for k, v in self.summary().items()})
        self._next_publish = time.monotonic() + PUBLISH_INTERVAL

    def publish_due(self, client: redis.Redis, key: bytes) -> None:
        """:meth:`publish` if the last copy is :data:`PUBLISH_INTERVAL` old."""
        if time.monotonic() >= self._next_publish:
            self.publish(client, key)


def read_published(fields: dict[bytes, bytes]) -> dict[str, float]:
    """The metrics :meth:`Metrics.publish` put into an intake hash."""
    values = {}
    for name, value in fields.items():
        text = name.decode(errors="replace")
        if text.startswith("metric:"):
            try:
                values[text.removeprefix("metric:")] = float(value)
            except ValueError:
                continue
    return values
