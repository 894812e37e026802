"""The suite's "engine" section: the served item engine against itself in-process, and its memory.

`mmrec serve` is started the way a user starts it (its own process, the default model control:
the models clients call and what their ensembles compose) on the repository under test. Then:
- **memory**: after warm-up with batch-32 requests and a short idle, the resident memory of the
  launcher's whole process tree (launcher, tritonserver, every python stub), per process too;
- **speed**: one request of 32 real items (held-out captions, every 4th joined to the maximum
  length; real photos and drawings as encoded bytes) over gRPC, against the same bytes through the
  same engine in this process (`ReferencePipeline.encode_items` runs lib/item_engine.py), decode
  included in both, in alternating rounds; the Triton arm runs twice per round as the A/A arm.

Run it alone with `mmrec bench --only engine`.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from mmrec import schema
from mmrec.server import _http_ok, free_ports
from mmrec.stats import aa_check, paired_ratio, round_medians

from .settings import Settings
from .timing import interleaved_rounds
from .workload import Workload

BATCH = 32
TRITON, IN_PROCESS = "triton", "in_process"
AA_ARM = f"{TRITON} (A/A)"
IDLE_BEFORE_RSS_S = 2.0
STUB_INSTANCE = re.compile(r"^\w+_\d+_\d+$")  # a python stub's argument naming its model instance
Tick = Callable[[int], None]


def real_items(batch: int) -> tuple[list[str], list[bytes]]:
    """`batch` real items: held-out captions (every 4th joined up to the maximum length) and, in
    turn, real photos and the dataset's own drawings, as encoded bytes."""
    from mmrec.export.data import load_items
    from mmrec.photos import known_photos

    items = load_items()[:batch]
    texts = [" ".join(i.caption for i in items[j:j + 30]) if j % 4 == 0 else items[j].caption for j in range(batch)]
    photos = [p.read_bytes() for p in known_photos()]
    images = [photos[j % len(photos)] if j % 2 else items[j].image_bytes() for j in range(batch)]
    return texts, images


def process_memory_mb(pid: int) -> dict[str, dict[str, float]]:
    """Resident (RSS) and proportional (PSS: shared pages split between their users) memory of a
    process and its descendants, MB, keyed by a short name (the model instance a python stub
    serves, else the executable). The RSS sum counts a page shared by k processes k times: the
    conservative figure a target is judged on; the PSS sum is what the tree really occupies."""
    import psutil

    root = psutil.Process(pid)
    sizes: dict[str, dict[str, float]] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            cmdline = process.cmdline()
            info = process.memory_full_info()
        except psutil.Error:
            continue
        stub = [a for a in cmdline if STUB_INSTANCE.search(a)]
        name = stub[0] if stub else ("mmrec serve" if process.pid == pid else Path(cmdline[0]).name)
        while name in sizes:
            name += "'"
        sizes[name] = {"rss": round(info.rss / 2 ** 20, 1), "pss": round(getattr(info, "pss", info.rss) / 2 ** 20, 1)}
    return sizes


class ServeProcess:
    """`mmrec serve --repository R` on free loopback ports, as its own process."""

    def __init__(self, repository: Path, log_path: Path, ready_timeout_s: float = 240.0) -> None:
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mmrec.cli", "serve", "--repository", str(repository),
             "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics)],
            stdout=self.log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + ready_timeout_s
            while not self._ready():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"`mmrec serve` did not become ready (see {log_path})")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        return _http_ok(f"http://127.0.0.1:{self.http}/v2/health/ready")  # the launcher's probe: no proxy

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def stop(self) -> None:
        """SIGINT, as Ctrl-C would (the launcher stops tritonserver and its stubs); if it hangs,
        kill the launcher and every process it started (tritonserver runs in its own session)."""
        import psutil

        if self.process.poll() is None:
            try:
                descendants = psutil.Process(self.process.pid).children(recursive=True)
            except psutil.Error:
                descendants = []
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            for child in descendants:
                try:
                    child.kill()
                except psutil.Error:
                    pass
        self.log.close()


def run_engine(workload: Workload, settings: Settings, output: Path, step: Callable[[str, int], Tick]) -> dict:
    import tritonclient.grpc as grpcclient

    from mmrec.reference import in_process_engine

    rounds, per_round = settings.engine_rounds, settings.engine_per_round
    tick = step(f"engine: batch-{BATCH} request of real items, `mmrec serve` vs the same engine in-process, "
                f"{rounds} rounds x {per_round}; served memory", rounds + 2)
    texts, images = real_items(BATCH)
    server = ServeProcess(workload.repository, Path(output) / "engine-serve.log")
    engine = None
    client = None
    try:
        engine = in_process_engine(workload.repository)  # opened from item_encoder's config, as Triton does
        client = grpcclient.InferenceServerClient(server.grpc_url)

        def request() -> list:
            text = grpcclient.InferInput(schema.TEXT, [BATCH, 1], "BYTES")
            text.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
            picture = grpcclient.InferInput(schema.IMAGE, [BATCH, 1], "BYTES")
            picture.set_data_from_numpy(np.array([[i] for i in images], dtype=object))
            return [text, picture]

        served = client.infer(schema.ITEM_ENCODER, request()).as_numpy(schema.ITEM_EMBEDDING)
        for _ in range(settings.engine_warmup):
            client.infer(schema.ITEM_ENCODER, request())
        time.sleep(IDLE_BEFORE_RSS_S)
        memory = process_memory_mb(server.process.pid)
        tick(1)
        in_process = engine.encode(texts, images)[schema.ITEM_EMBEDDING]
        max_diff = float(np.abs(served - in_process).max())
        arms = {TRITON: lambda: client.infer(schema.ITEM_ENCODER, request()),
                IN_PROCESS: lambda: engine.encode(texts, images)}
        arms[AA_ARM] = arms[TRITON]
        for _ in range(settings.engine_warmup):
            arms[IN_PROCESS]()
        samples = interleaved_rounds(arms, rounds, per_round, tick)
    finally:
        if client is not None:
            client.close()
        if engine is not None:
            engine.close()
        server.stop()
    tick(1)
    per_round_p50 = {k: round_medians(v) for k, v in samples.items()}
    # speed of the served request relative to in-process: in-process latency / served latency
    speed = paired_ratio(per_round_p50[IN_PROCESS], per_round_p50[TRITON])
    aa = {**aa_check(paired_ratio(per_round_p50[TRITON], per_round_p50[AA_ARM])), "arm": f"{TRITON} twice per round"}
    return {"batch": BATCH, "rounds": rounds, "per_round": per_round,
            "p50_ms": {k: float(np.median([x for r in v for x in r])) for k, v in samples.items()},
            "p50_ms_per_round": per_round_p50, "aa": aa,
            "served_speed_vs_in_process": {"point": speed.point, "interval": speed.to_dict()},
            "max_abs_diff_item_embedding": max_diff,
            "rss_mb": {"total": round(sum(m["rss"] for m in memory.values()), 1),
                       "pss_total": round(sum(m["pss"] for m in memory.values()), 1),
                       "processes": {name: m["rss"] for name, m in memory.items()},
                       "processes_pss": {name: m["pss"] for name, m in memory.items()},
                       "idle_s_before": IDLE_BEFORE_RSS_S, "after": f"{1 + settings.engine_warmup} batch-{BATCH} requests"}}
