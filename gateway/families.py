"""
Prometheus metric families, as every layer's live collector yields them for
``/metrics`` (the store's queue, the uploader's lag, a broker source's
flow): the model's, so that storage, outbound and the transports can say
what they measure without importing ``ops``, which reads them.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


def gauge(name: str, documentation: str, value: float | None = None, labels: list[str] | None = None) -> Any:
    return GaugeMetricFamily(name, documentation, value=value, labels=labels)


def counter(name: str, documentation: str, labels: list[str], value: float | None = None) -> Any:
    return CounterMetricFamily(name, documentation, value=value, labels=labels or None)
