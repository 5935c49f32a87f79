"""A metrics recorder for tests: `metrics.set_backend(MemoryBackend())` records every call."""

from __future__ import annotations

import collections
from typing import Any

from deployments.metrics import MetricSpec


class MemoryBackend:
    """A recorder for tests: `backend.values[name]` lists (value, tags) in call order."""

    def __init__(self):
        self.values: dict[str, list[tuple[float, dict]]] = collections.defaultdict(list)

    def __call__(self, spec: MetricSpec) -> Any:
        values = self.values[spec.name]

        class _Metric:
            def inc(self, value=1.0, tags=None):
                values.append((value, dict(tags or {})))

            observe = set = inc

        return _Metric()

    def total(self, name: str, **tags) -> float:
        return sum(v for v, t in self.values.get(name, []) if all(t.get(k) == w for k, w in tags.items()))

    def count(self, name: str, **tags) -> int:
        return sum(1 for _, t in self.values.get(name, []) if all(t.get(k) == w for k, w in tags.items()))

    def last(self, name: str, **tags) -> float | None:
        hits = [v for v, t in self.values.get(name, []) if all(t.get(k) == w for k, w in tags.items())]
        return hits[-1] if hits else None
