"""Prometheus metrics of the real-time layer, beside django-prometheus's at ``/metrics``.

Read from the registry when scraped, so the hot paths pay nothing for them. Each process
reports what it serves, as Prometheus expects of every target it scrapes.
"""

from collections import Counter
from collections.abc import Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from realtime.connections import Transport, get_connection_manager


class ConnectionsCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        entries, subscriptions = get_connection_manager().registry.served_here()
        by_transport = Counter(entry.transport for entry in entries)
        connections = GaugeMetricFamily(
            "realtime_connections",
            "Live WebSocket and SSE connections this process serves.",
            labels=["transport"],
        )
        for transport in Transport:
            connections.add_metric([transport.value], by_transport[transport.value])
        yield connections
        yield GaugeMetricFamily(
            "realtime_subscriptions",
            "Task subscriptions of the connections this process serves.",
            value=subscriptions,
        )


_registered = False


def register() -> None:
    """Add the real-time gauges to the process's Prometheus registry, once (Django may
    call an app's ``ready()`` more than once)."""
    global _registered
    if not _registered:
        REGISTRY.register(ConnectionsCollector())
        _registered = True
