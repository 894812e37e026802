"""Scrapes of a real /metrics endpoint, turned into the `input_series` of a promtool unit test.

Prometheus adds target labels (job, namespace, service, pod, ...) to every scraped series, an
`up` series per target (1 when the scrape worked, 0 when it failed) and stale markers for the
series of a failed scrape. `Recording` does the same for scrapes taken here, so the alert,
dashboard and adapter PromQL is evaluated by promtool on the series a cluster's Prometheus
would hold. Scrape k lands at k x `interval` in promtool's time, the scrape interval the chart
configures, whatever the real spacing was: counters keep their real increments, so ratios are
real and a rate is the real increment over `interval`-spaced samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs: a hashable label set


class ExpositionError(ValueError):
    """A /metrics line that is not Prometheus text format."""


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Labels
    value: float


def _parse_labels(text: str, line: str) -> tuple[Labels, str]:
    """`a="x",b="y"} rest` -> (labels, rest); handles the format's \\\\, \\" and \\n escapes."""
    labels: list[tuple[str, str]] = []
    i = 0
    while True:
        while i < len(text) and text[i] in " ,":
            i += 1
        if i < len(text) and text[i] == "}":
            return tuple(sorted(labels)), text[i + 1:]
        eq = text.find("=", i)
        if eq < 0 or eq + 1 >= len(text) or text[eq + 1] != '"':
            raise ExpositionError(f"bad label set in {line!r}")
        name, i, value = text[i:eq].strip(), eq + 2, []
        while i < len(text) and text[i] != '"':
            if text[i] == "\\" and i + 1 < len(text):
                value.append({"n": "\n"}.get(text[i + 1], text[i + 1]))
                i += 2
            else:
                value.append(text[i])
                i += 1
        if i >= len(text):
            raise ExpositionError(f"unterminated label value in {line!r}")
        labels.append((name, "".join(value)))
        i += 1


def parse_exposition(text: str) -> list[Sample]:
    """Every sample of a Prometheus text-format page (comments skipped, timestamps ignored)."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        brace, space = line.find("{"), line.find(" ")
        if brace >= 0 and (space < 0 or brace < space):
            name = line[:brace]
            labels, rest = _parse_labels(line[brace + 1:], line)
        else:
            name, rest, labels = line[:space], line[space:], ()
        fields = rest.split()
        if not name or not fields:
            raise ExpositionError(f"no value in {line!r}")
        samples.append(Sample(name, labels, float(fields[0])))
    return samples


def series_selector(name: str, labels: dict[str, str] | Labels) -> str:
    """`name{a="x",...}` with label values escaped as PromQL strings."""
    items = sorted(dict(labels).items())
    inner = ",".join('{}="{}"'.format(k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
                     for k, v in items)
    return f"{name}{{{inner}}}"


def _format(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Inf" if value > 0 else "-Inf"
    return repr(value)


@dataclass
class Recording:
    """Scrapes of one target plus other series sampled at the same ticks (e.g. kube-state-metrics).

    `target` holds the labels Prometheus adds to everything scraped from the target.
    """

    interval_s: int
    target: dict[str, str]
    _ticks: list[dict[tuple[str, Labels], float] | None] = field(default_factory=list)
    _others: list[dict[tuple[str, Labels], float]] = field(default_factory=list)

    def add_scrape(self, page: str | None) -> int:
        """One scrape: the page's text, or None when the scrape failed. Returns its index."""
        if page is None:
            self._ticks.append(None)
        else:
            extra = tuple(self.target.items())
            self._ticks.append({(s.name, tuple(sorted(dict(s.labels + extra).items()))): s.value
                                for s in parse_exposition(page)})
        self._others.append({})
        return len(self._ticks) - 1

    def add_sample(self, name: str, labels: dict[str, str], value: float) -> None:
        """A series sampled at the current tick from another source than the target."""
        self._others[-1][(name, tuple(sorted(labels.items())))] = value

    def __len__(self) -> int:
        return len(self._ticks)

    def time_s(self, index: int) -> int:
        """promtool time of scrape `index`."""
        return index * self.interval_s

    def value(self, name: str, index: int, **labels: str) -> float | None:
        """The sample of the one series `name` whose labels include `labels`, at scrape `index`."""
        tick = self._ticks[index] or {}
        found = [v for (n, ls), v in tick.items() if n == name and labels.items() <= dict(ls).items()]
        if len(found) > 1:
            raise KeyError(f"{len(found)} series of {name} match {labels}")
        return found[0] if found else None

    def label_values(self, name: str, label: str) -> set[str]:
        """Values of `label` across every scraped series of `name`."""
        return {dict(ls)[label] for tick in self._ticks if tick for (n, ls) in tick
                if n == name and label in dict(ls)}

    def input_series(self) -> list[dict[str, str]]:
        """promtool's input_series: `_` where a series has no sample, `stale` after a failed scrape."""
        keys = sorted({k for tick in self._ticks if tick for k in tick} | {k for o in self._others for k in o})
        out = [{"series": series_selector("up", self.target),
                "values": " ".join("0" if tick is None else "1" for tick in self._ticks)}]
        for key in keys:
            values, present = [], False
            for tick, other in zip(self._ticks, self._others):
                if key in other:
                    values.append(_format(other[key]))
                    present = True
                elif tick is not None and key in tick:
                    values.append(_format(tick[key]))
                    present = True
                else:
                    # a series that vanished with a failed scrape is marked stale, as Prometheus does
                    values.append("stale" if present and tick is None else "_")
                    present = False
            out.append({"series": series_selector(*key), "values": " ".join(values)})
        return out
