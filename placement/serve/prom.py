"""Prometheus metrics of one service, read from its state at scrape time (so they survive restarts with it), in a
registry of its own (never the process-global one)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from placement.serve.service import ReplanService


class ServiceCollector(Collector):
    """Tokens, live imbalance and colocation, decisions, moves and bytes moved of a ``ReplanService``."""

    def __init__(self, service: ReplanService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        st = self.service.status()
        live = st["live"]
        counters = (
            ("moeplace_observed_tokens", "Tokens of routing ingested (shards and observations).", "observed_tokens"),
            ("moeplace_shards_ingested", "Shards of the watched dataset counted.", "shards_ingested"),
            ("moeplace_shards_quarantined", "Shards refused (damaged or another model).", "shards_quarantined"),
            ("moeplace_decisions", "Re-planning decisions taken.", "decisions"),
            ("moeplace_plan_changes", "Plan versions made after the initial one.", "changes"),
            ("moeplace_moves", "Expert copies in the move lists of all versions.", "moves_total"),
            ("moeplace_bytes_moved", "Bytes of expert weights in the move lists of all versions.", "bytes_moved_total"),
        )
        for name, doc, key in counters:
            yield CounterMetricFamily(name, doc, value=st[key])
        gauges = (
            ("moeplace_plan_version", "Current plan version.", st["plan_version"]),
            ("moeplace_window_tokens", "Decayed token mass of the routing window.", st["window_tokens"]),
            ("moeplace_live_imbalance_max", "imbalance_max of the current plan on the window.", live["imbalance_max"]),
            ("moeplace_live_imbalance_mean", "imbalance_mean of the plan on the window.", live["imbalance_mean"]),
            ("moeplace_live_colocation", "colocation of the current plan on the window.", live["colocation"]),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)


def service_registry(service: ReplanService) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ServiceCollector(service))
    return registry
