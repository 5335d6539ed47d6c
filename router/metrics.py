"""Counters and gauges in the Prometheus text exposition format, without a client library:
the service needs a handful of counters, not a framework."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Metrics:
    """Counters keyed by name and labels; gauges computed when scraped."""

    def __init__(self) -> None:
        self._counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        self._gauges: dict[str, Callable[[], list[tuple[dict[str, str], float]]]] = {}

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._counters[name]
        series[key] = series.get(key, 0) + value

    def value(self, name: str, **labels: str) -> float:
        return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0)

    def gauge(self, name: str, collect: Callable[[], list[tuple[dict[str, str], float]]]) -> None:
        self._gauges[name] = collect

    def render(
        self,
        gauges: dict[str, list[tuple[dict[str, str], float]]] | None = None,
        counters: dict[str, list[tuple[dict[str, str], float]]] | None = None,
    ) -> str:
        """The exposition text: the counters, with ``counters`` (counts kept elsewhere that only
        grow), then the gauges, with ``gauges`` (read when scraped)."""
        families: dict[str, dict[str, list[tuple[dict[str, str], float]]]] = {
            "counter": {name: [(dict(key), value) for key, value in sorted(series.items())]
                        for name, series in self._counters.items()} | (counters or {}),
            "gauge": {name: collect() for name, collect in self._gauges.items()} | (gauges or {}),
        }
        lines = []
        for kind, samples_by_name in families.items():
            for name in sorted(samples_by_name):
                lines.append(f"# TYPE {name} {kind}")
                lines.extend(f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples_by_name[name])
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """A sample's value, exact: ``{:g}`` wrote 1234567 as ``1.23457e+06``, and a counter past a
    million then stood still in ``rate()`` until its sixth digit moved."""
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
