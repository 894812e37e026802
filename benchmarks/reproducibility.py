"""Two runs of `make bench` on one commit and machine, side by side: does every headline figure's
95 % interval from the first run overlap the one from the second?

An interval method is only as good as its run-to-run behaviour: if two runs of the same code on
a quiet machine give intervals that do not overlap, the intervals are too narrow (or the machine
was not quiet), whatever the simulation says. This module pulls the same figures out of two
bench.json files and says, per figure, both intervals and whether they overlap; a figure whose
intervals do not overlap is reported "not conclusive" with that reason.

    python -m mmrec.benchmarks.reproducibility benchmarks/results/bench.json benchmarks/results/repeat/bench.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import report


@dataclass(frozen=True)
class Figure:
    """One headline figure of a run: a point and its 95 % interval (None when the run has none)."""

    name: str
    point: float
    low: float | None
    high: float | None
    unit: str = "×"

    def text(self) -> str:
        span = f" [{self.low:.2f}, {self.high:.2f}]" if self.low is not None and self.high is not None else " [no interval]"
        return f"{self.point:.2f}{span}{self.unit}"


def _from_interval(name: str, interval: dict | None, unit: str = "×") -> Figure | None:
    if not interval or interval.get("point") is None:
        return None
    return Figure(name, interval["point"], interval.get("low"), interval.get("high"), unit)


def headline_figures(results: dict) -> Iterator[Figure]:
    """Every figure a reader acts on: the targets' intervals, each offline speed-up vs PyTorch and
    vs ORT FP32, Triton vs in-process at every concurrency, the photo ratios, the A/A arms, and
    the open-loop capacity (its interval over trials)."""
    for t in results.get("targets", []):
        fig = _from_interval(f"target: {t['id']}", t.get("interval"), " ms" if "p50.c1" in t["id"] else "×")
        if fig:
            yield fig
    for r in (results["sections"].get("offline") or {}).get("records", []):
        if r.get("status") != "ok":
            continue
        for field, what, skip in (("speedup_vs_pytorch_p50_interval", "vs PyTorch", ("pytorch",)),
                                  ("speedup_vs_ort_fp32_p50_interval", "vs ORT FP32", ("pytorch", "ort-fp32"))):
            if r["engine"] in skip:
                continue
            fig = _from_interval(f"offline {r['model']} {r['engine']} {r['label']} p50 {what}", r.get(field))
            if fig:
                yield fig
    serving = results["sections"].get("serving") or {}
    for protocol, rows in (serving.get("intervals") or {}).items():
        for row in rows:
            c = row["concurrency"]
            for key, unit in (("p50_diff_ms", " ms"), ("throughput_ratio", "×")):
                fig = _from_interval(f"serving {protocol} c={c} Triton vs in-process {key}", row.get(key), unit)
                if fig:
                    yield fig
            fig = _from_interval(f"serving {protocol} c={c} Triton vs batched throughput_ratio",
                                 (row.get("vs_batched") or {}).get("throughput_ratio"))
            if fig:
                yield fig
    for key, ratio in ((results["sections"].get("photos") or {}).get("ratios") or {}).items():
        fig = _from_interval(f"photos {key}", ratio.get("interval"))
        if fig:
            yield fig
    for name, section in results["sections"].items():
        fig = _from_interval(f"A/A {name}", ((section or {}).get("aa") or {}).get("interval"))
        if fig:
            yield fig
    for name, r in ((results["sections"].get("capacity") or {}).get("sets") or {}).items():
        iv = r.get("interval") or {}
        if r.get("median_qps"):
            several = iv.get("n", 0) > 1
            unit = r.get("unit", "items/s")
            yield Figure(f"capacity {name} ({unit} at p99 ≤ {results['sections']['capacity']['slo_ms']:g} ms)",
                         r["median_qps"], iv.get("low") if several else None, iv.get("high") if several else None,
                         f" {unit}")


def overlap(a: Figure, b: Figure) -> bool | None:
    """Do the two intervals share a point? None when either run has no interval for it."""
    if None in (a.low, a.high, b.low, b.high) or not all(map(math.isfinite, (a.low, a.high, b.low, b.high))):
        return None
    return a.low <= b.high and b.low <= a.high


def compare(first: dict, second: dict) -> dict:
    """Per figure: both runs' values and intervals, and the overlap verdict."""
    a = {f.name: f for f in headline_figures(first)}
    b = {f.name: f for f in headline_figures(second)}
    rows = []
    for name in [n for n in a if n in b]:
        verdict = overlap(a[name], b[name])
        rows.append({"figure": name, "first": a[name].text(), "second": b[name].text(), "overlap": verdict,
                     "status": {True: "intervals overlap", None: "not conclusive: no interval in one run",
                                False: "not conclusive: the runs' intervals do not overlap"}[verdict]})
    judged = [r for r in rows if r["overlap"] is not None]
    return {"figures": rows, "overlapping": sum(bool(r["overlap"]) for r in judged), "judged": len(judged),
            "runs": [_run(first), _run(second)], "only_in_one_run": sorted(set(a) ^ set(b))}


def _run(results: dict) -> dict:
    git = results.get("git") or {}
    return {"commit": git.get("commit"), "dirty": git.get("dirty"), "started_at": results.get("started_at"),
            "cpu": results["machine"]["cpu"]["model"], "contended": results.get("contended")}


def markdown(comparison: dict) -> str:
    runs = comparison["runs"]
    lines = [f"Two `make bench` runs: " + "; ".join(
        f"run {i + 1} commit `{(r['commit'] or '?')[:12]}` ({'uncommitted changes' if r['dirty'] else 'clean tree'}), "
        f"{r['cpu']}, started {r['started_at']}" + (", **contended**" if r["contended"] else "")
        for i, r in enumerate(runs)) + ".", "",
        f"**{comparison['overlapping']} of {comparison['judged']}** figures with an interval in both runs overlap.", ""]
    rows = [[r["figure"], r["first"], r["second"], "yes" if r["overlap"] else r["status"]]
            for r in comparison["figures"]]
    lines += report._table(["figure", "run 1 [95 %]", "run 2 [95 %]", "overlap"], rows)
    return "\n".join(lines).rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare two bench.json runs figure by figure.")
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--json", type=Path, default=None, help="also write the comparison here")
    args = parser.parse_args(argv)
    comparison = compare(json.loads(args.first.read_text()), json.loads(args.second.read_text()))
    print(markdown(comparison))
    if args.json:
        args.json.write_text(json.dumps(comparison, indent=1) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
