"""Prometheus metrics of one server, in a registry of its own (several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LATENCIES = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ddpo_reward_requests",
            "RPCs handled, by method and final status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.items = Counter(
            "ddpo_reward_items",
            "Items answered, by reward and status code (errors: code != OK)",
            ["reward", "code"],
            registry=self.registry,
        )
        self.item_latency = Histogram(
            "ddpo_reward_item_latency_seconds",
            "Time from an item's arrival to its answer (queue + scoring)",
            ["reward"],
            buckets=_LATENCIES,
            registry=self.registry,
        )
        self.batch_latency = Histogram(
            "ddpo_reward_batch_latency_seconds",
            "Time to score one batch",
            ["reward"],
            buckets=_LATENCIES,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "ddpo_reward_batch_size", "Items per scored batch", ["reward"], buckets=_BATCH_SIZES, registry=self.registry
        )
        self.queued_items = Gauge(
            "ddpo_reward_queued_items", "Items waiting for a batch", ["reward"], registry=self.registry
        )
