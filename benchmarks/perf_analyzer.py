"""Cross-check with NVIDIA perf_analyzer: same server, model, batch and concurrency as our client.

Where it comes from (see FIELD_NOTES): the tritonclient 2.50.0 wheel ships `bin/perf_analyzer`,
which runs on Debian 12 given Debian's `libb64-0d` and `libcudart.so.12` from the pip wheel
`nvidia-cuda-runtime-cu12` on LD_LIBRARY_PATH (no GPU needed). Later wheels need glibc 2.38;
the wheel's [grpc] extra pins protobuf<5, so the binary is unpacked into a cache folder rather
than installed into the venv:

    python -m mmrec.benchmarks.perf_analyzer --setup     # pip download + unzip into the cache
    apt-get install -y libb64-0d                        # root, once

Lookup order: --perf-analyzer PATH, $MMREC_PERF_ANALYZER, the cache
(~/.cache/mmrec/perf_analyzer, or $MMREC_CACHE_DIR/perf_analyzer), `perf_analyzer` on PATH.
When none runs, the section is skipped with a reason that names the missing piece.

Input data: a JSON file of real items. BYTES tensors given as {"b64": ...} are copied verbatim
into the request, so each IMAGE is base64 of Triton's serialized string element
(uint32 little-endian length + the PNG bytes); TEXT is given as a JSON string array.
"""
from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from mmrec import schema
from mmrec.machine import default_cache_dir

from .timing import P99_MIN_SAMPLES

TRITONCLIENT_WHEEL = "tritonclient==2.50.0"
CUDART_WHEEL = "nvidia-cuda-runtime-cu12==12.9.79"
BINARY_IN_WHEEL = "tritonclient-2.50.0.data/data/bin/perf_analyzer"
CUDART_IN_WHEEL = "nvidia/cuda_runtime/lib/libcudart.so.12"
ENV_BINARY = "MMREC_PERF_ANALYZER"
APT_LIBB64 = "apt-get install -y libb64-0d"
SETUP_HINT = "python -m mmrec.benchmarks.perf_analyzer --setup"
US_PER_MS = 1000.0


def cache_dir() -> Path:
    return default_cache_dir() / "perf_analyzer"


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    lib_dirs: tuple[Path, ...] = ()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [str(p) for p in self.lib_dirs] + [p for p in [env.get("LD_LIBRARY_PATH")] if p]
        if libs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        return env


@dataclass
class Located:
    tool: PerfAnalyzer | None
    reason: str = ""
    tried: list[str] = field(default_factory=list)


def _missing_libraries(tool: PerfAnalyzer) -> list[str]:
    """Shared libraries the dynamic loader cannot find for the binary (via ldd)."""
    try:
        done = subprocess.run(["ldd", str(tool.binary)], capture_output=True, text=True, timeout=20,
                              env=tool.env())
    except (OSError, subprocess.SubprocessError) as err:
        return [f"(ldd failed: {err})"]
    return [line.split("=>")[0].strip() for line in done.stdout.splitlines() if "not found" in line]


def _fix_for(library: str) -> str:
    if library.startswith("libb64"):
        return f"`{APT_LIBB64}`"
    if library.startswith("libcudart"):
        return f"`{SETUP_HINT}` (unpacks {CUDART_WHEEL}'s libcudart.so.12 into {cache_dir() / 'lib'})"
    return "install the library that provides it"


def _with_libs(binary: Path) -> PerfAnalyzer:
    """A binary plus the lib/ folders that may hold its libcudart: beside it, and the cache's."""
    binary = Path(binary)
    dirs = dict.fromkeys(p for p in (binary.parent.parent / "lib", cache_dir() / "lib") if p.is_dir())
    return PerfAnalyzer(binary, tuple(dirs))


def _candidates(explicit: Path | None) -> list[PerfAnalyzer]:
    paths = [explicit, os.environ.get(ENV_BINARY), cache_dir() / "bin" / "perf_analyzer",
             shutil.which("perf_analyzer")]
    return [_with_libs(Path(p)) for p in paths if p]


def locate(explicit: Path | None = None) -> Located:
    """The first candidate that exists, is executable and has all its libraries."""
    tried, reasons = [], []
    for tool in _candidates(explicit):
        tried.append(str(tool.binary))
        if not tool.binary.is_file():
            reasons.append(f"{tool.binary}: not found")
            continue
        if not os.access(tool.binary, os.X_OK):
            reasons.append(f"{tool.binary}: not executable (chmod +x)")
            continue
        missing = _missing_libraries(tool)
        if missing:
            reasons.append(f"{tool.binary}: missing " + ", ".join(f"{m} -> {_fix_for(m)}" for m in missing))
            continue
        return Located(tool, "", tried)
    reason = "perf_analyzer not available: " + "; ".join(reasons) + f". Set it up with `{SETUP_HINT}` and `{APT_LIBB64}`."
    return Located(None, reason, tried)


def prepare(directory: Path | None = None, python: str = sys.executable) -> PerfAnalyzer:
    """Download the two wheels (no dependencies) and unpack only the binary and libcudart."""
    directory = Path(directory or cache_dir())
    wheels = directory / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for requirement in (TRITONCLIENT_WHEEL, CUDART_WHEEL):
        subprocess.run([python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--dest", str(wheels), requirement], check=True)
    (directory / "bin").mkdir(exist_ok=True)
    (directory / "lib").mkdir(exist_ok=True)
    for pattern, member, target in (("tritonclient-2.50.0-*.whl", BINARY_IN_WHEEL, directory / "bin" / "perf_analyzer"),
                                    ("nvidia_cuda_runtime_cu12-*.whl", CUDART_IN_WHEEL, directory / "lib" / "libcudart.so.12")):
        wheel = sorted(wheels.glob(pattern))[-1]
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        target.chmod(0o755)
    return PerfAnalyzer(directory / "bin" / "perf_analyzer", (directory / "lib",))


# --------------------------------------------------------------------------- input data


def serialized_bytes_element(data: bytes) -> bytes:
    """One element of a Triton BYTES tensor in its wire form: uint32 LE length + bytes."""
    return struct.pack("<I", len(data)) + data


def write_input_data(texts: list[str], images: list[bytes], path: Path) -> Path:
    """perf_analyzer --input-data JSON: one batch-1 step per real item."""
    steps = [{schema.TEXT: [text],
              schema.IMAGE: {"b64": base64.b64encode(serialized_bytes_element(image)).decode("ascii")}}
             for text, image in zip(texts, images)]
    path.write_text(json.dumps({"data": steps}))
    return path


# --------------------------------------------------------------------------- running and parsing


_STDOUT_PATTERNS = {
    "throughput_infer_s": r"Throughput:\s*([\d.]+)\s*infer/sec",
    "p50_us": r"p50 latency:\s*(\d+)\s*usec",
    "p90_us": r"p90 latency:\s*(\d+)\s*usec",
    "p95_us": r"p95 latency:\s*(\d+)\s*usec",
    "p99_us": r"p99 latency:\s*(\d+)\s*usec",
    "avg_us": r"Avg latency:\s*(\d+)\s*usec",
}
_CSV_COLUMNS = {"Inferences/Second": "throughput_infer_s", "p50 latency": "p50_us", "p90 latency": "p90_us",
                "p95 latency": "p95_us", "p99 latency": "p99_us", "Avg latency": "avg_us",
                "Server Queue": "server_queue_us", "Server Compute Input": "server_compute_input_us",
                "Server Compute Infer": "server_compute_infer_us",
                "Server Compute Output": "server_compute_output_us", "Client Send": "client_send_us",
                "Client Recv": "client_recv_us", "Network+Server Send/Recv": "network_server_us"}


def parse_csv(path: Path) -> dict[str, float]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    row = rows[-1]
    return {key: float(row[col]) for col, key in _CSV_COLUMNS.items() if row.get(col) not in (None, "")}


def parse_stdout(text: str) -> dict[str, float]:
    out = {}
    for key, pattern in _STDOUT_PATTERNS.items():
        matches = re.findall(pattern, text)
        if matches:
            out[key] = float(matches[-1])
    return out


def _as_result(raw: dict[str, float], batch: int, concurrency: int, window_ms: int | None = None) -> dict:
    ms = {p: raw[f"{p}_us"] / US_PER_MS for p in ("p50", "p90", "p95", "p99", "avg") if f"{p}_us" in raw}
    throughput = raw.get("throughput_infer_s")
    if window_ms is not None and throughput is not None and "p99" in ms:
        # perf_analyzer reports the last measurement window: p99 only where >= P99_MIN_SAMPLES back it
        ms["samples"] = int(throughput / batch * window_ms / 1000)
        if ms["samples"] < P99_MIN_SAMPLES:
            ms["p99"] = None
    server = {k[:-3] + "_ms": v / US_PER_MS for k, v in raw.items() if k.startswith(("server_", "client_", "network_"))}
    return {"concurrency": concurrency, "latency_ms": ms, "breakdown_ms": server,
            "throughput_requests_s": throughput / batch if throughput is not None else None,
            "throughput_items_s": throughput}


ACCEPT_ANY_STABILITY_PCT = 1000  # last resort on a noisy machine: take the measurement as it is
MIN_WINDOW_MS = 500


def run_level(tool: PerfAnalyzer, url: str, model: str, concurrency: int, data: Path, batch: int,
              window_ms: int, max_trials: int, stability_pct: int, workdir: Path,
              protocol: str = "grpc") -> dict:
    """One perf_analyzer measurement at a fixed concurrency. perf_analyzer refuses to report
    until consecutive windows agree within the stability threshold; on a machine too noisy
    for that it is retried with a looser threshold, then with none (`stable` says which)."""
    report = workdir / f"perf_analyzer_c{concurrency}.csv"
    attempts = []
    output = ""
    for stability in (stability_pct, max(3 * stability_pct, 50), ACCEPT_ANY_STABILITY_PCT):
        cmd = [str(tool.binary), "-m", model, "-u", url, "-i", protocol, "--concurrency-range",
               f"{concurrency}:{concurrency}", "--input-data", str(data), "-b", str(batch),
               "--measurement-mode", "time_windows", "-p", str(window_ms), "--max-trials", str(max_trials),
               "-s", str(stability), "-f", str(report)]
        timeout = 60 + (max_trials + 2) * window_ms / 1000 * 2
        report.unlink(missing_ok=True)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=tool.env(), timeout=timeout)
            output, rc = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as err:
            output, rc = f"timed out after {timeout:.0f} s: {err.stdout or ''}", -1
        raw = parse_csv(report) if report.is_file() else {}
        raw = raw or parse_stdout(output)
        attempts.append({"stability_pct": stability, "rc": rc})
        if rc == 0 and "throughput_infer_s" in raw:
            result = _as_result(raw, batch, concurrency, window_ms)
            result.update(command=" ".join(cmd), stability_pct=stability, attempts=attempts,
                          stable=stability <= 100)
            return result
    return {"concurrency": concurrency, "error": output.strip()[-800:], "command": " ".join(cmd),
            "attempts": attempts}


def compare(own: list[dict], pa: list[dict]) -> list[dict]:
    """Our client vs perf_analyzer at each concurrency both measured (ratios own / PA)."""
    by_c = {r["concurrency"]: r for r in own}
    rows = []
    for p in pa:
        o = by_c.get(p["concurrency"])
        if o is None or "error" in p or not p.get("throughput_items_s"):
            continue
        row = {"concurrency": p["concurrency"],
               "throughput_ratio": o["throughput_items_s"] / p["throughput_items_s"],
               "pa_stability_pct": p.get("stability_pct"), "pa_stable": p.get("stable")}
        for q in ("p50", "p95", "p99"):
            if p["latency_ms"].get(q) is not None and o["latency_ms"].get(q) is not None:
                row[f"{q}_ratio"] = o["latency_ms"][q] / p["latency_ms"][q]
                row[f"{q}_diff_ms"] = o["latency_ms"][q] - p["latency_ms"][q]
        rows.append(row)
    return rows


class Session:
    """perf_analyzer runs for one benchmark: real-item input data written once, one
    measurement per concurrency level (called level by level from the serving sweep, so each
    runs right after our own client at that level), then the comparison."""

    def __init__(self, tool: PerfAnalyzer, workload, settings, workdir: Path,
                 model: str = schema.ITEM_ENCODER) -> None:
        self.tool, self.settings, self.workdir, self.model = tool, settings, Path(workdir), model
        inputs = workload.pipeline_input(min(settings.pa_data_items, len(workload.items)))
        self.input_items = len(inputs)
        self.data = write_input_data(inputs.texts, inputs.images, self.workdir / "input_data.json")
        self.runs: list[dict] = []

    def wants(self, concurrency: int) -> bool:
        return concurrency in self.settings.pa_concurrency

    @property
    def window_ms(self) -> int:
        """Called once per serving round: each run gets its share of the level's window."""
        return max(MIN_WINDOW_MS, self.settings.pa_window_ms // max(1, self.settings.serving_rounds))

    def level(self, server, concurrency: int) -> None:
        if not self.wants(concurrency):
            return
        s = self.settings
        self.runs.append(run_level(self.tool, server.urls["grpc"], self.model, concurrency, self.data,
                                   s.request_batch, self.window_ms, s.pa_max_trials, s.pa_stability_pct,
                                   self.workdir))

    @property
    def levels(self) -> list[dict]:
        """One result per concurrency: the runs of that level averaged (each run is kept)."""
        out = []
        for c in dict.fromkeys(r["concurrency"] for r in self.runs):
            runs = [r for r in self.runs if r["concurrency"] == c]
            ok = [r for r in runs if "error" not in r]
            if not ok:
                out.append(runs[-1])
                continue
            mean = lambda values: sum(values) / len(values)  # noqa: E731
            level = {"concurrency": c, "runs": ok, "stable": all(r.get("stable") for r in ok),
                     "stability_pct": max(r["stability_pct"] for r in ok),
                     "throughput_items_s": mean([r["throughput_items_s"] for r in ok]),
                     "throughput_requests_s": mean([r["throughput_requests_s"] for r in ok]),
                     # a percentile any run left unreported (p99 from < 1,000 requests) stays unreported;
                     # sample counts add up
                     "latency_ms": {k: (sum if k == "samples" else mean)([r["latency_ms"][k] for r in ok])
                                    if all(r["latency_ms"][k] is not None for r in ok) else None
                                    for k in ok[0]["latency_ms"] if all(k in r["latency_ms"] for r in ok)},
                     "breakdown_ms": {k: mean([r["breakdown_ms"][k] for r in ok]) for k in ok[0]["breakdown_ms"]
                                      if all(k in r["breakdown_ms"] for r in ok)}}
            out.append(level)
        return out

    def result(self, own_levels: list[dict]) -> dict:
        levels = self.levels
        return {"tool": str(self.tool.binary), "lib_dirs": [str(p) for p in self.tool.lib_dirs],
                "model": self.model, "batch": self.settings.request_batch, "protocol": "grpc",
                "input_items": self.input_items, "window_ms": self.window_ms,
                "measurement": "time_windows; a level's runs (one per serving round) averaged",
                "levels": levels, "comparison": compare(own_levels, levels)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Locate or set up perf_analyzer for `mmrec bench`.")
    parser.add_argument("--setup", action="store_true", help="download and unpack perf_analyzer into the cache")
    parser.add_argument("--dir", type=Path, default=None, help=f"cache folder (default {cache_dir()})")
    args = parser.parse_args(argv)
    explicit = None
    if args.setup:
        explicit = prepare(args.dir).binary
        print(f"perf_analyzer unpacked to {explicit}")
    located = locate(explicit)
    if located.tool is None:
        print(located.reason, file=sys.stderr)
        return 1
    print(f"perf_analyzer ready: {located.tool.binary} (LD_LIBRARY_PATH += "
          f"{':'.join(map(str, located.tool.lib_dirs)) or '-'})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
