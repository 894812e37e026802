#!/usr/bin/env python3
"""Measure what the chart's HPA reads, on one replica: items/s and the queue:compute ratio.

Starts the pip-installed tritonserver (2.51, the 24.10 image's version) with the chart's
tritonserver flags on a local repository (the chart renders them; only repository and ports
are swapped), times start -> ready, then runs closed-loop gRPC load on `item_encoder` (real
Tux Paint items, one item per request as in the benchmark's serving sweep) at each concurrency
and reports, from Triton's own /metrics, what the adapter rules compute:

  * triton_items_per_second     rate(nv_inference_count) over the public ensembles
  * triton_queue_compute_ratio  rate(queue_duration_us) / rate(compute_infer_duration_us)
                                over the member models the HPA selects
  * client p50 / p99 latency, to read X_B (throughput sustained at a p99 budget B)

    python deploy/tools/scaling_signals.py --repository artifacts/repository \
        --concurrency 1 2 4 8 16 --seconds 20

Numbers depend on the machine and on what else runs on it: record both with them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "mmrec"
HANDLED = ("--model-repository", "--model-control-mode", "--exit-timeout-secs", "--http-port", "--grpc-port",
           "--metrics-port", "--log-verbose")


def chart(values: list[str], sets: list[str]) -> tuple[list[str], dict]:
    """tritonserver args (the kubelet's $(VAR)s filled in) and the HPA of the rendered chart."""
    helm = shutil.which("helm", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if helm is None:
        sys.exit("helm not found: python deploy/tools/install_helm.py")
    cmd = [helm, "template", "mmrec", str(CHART), "--set", "modelRepository.uri=s3://local/repository",
           "--set", "model.target=portable"]
    for v in values:
        cmd += ["-f", v]
    for s in sets:
        cmd += ["--set", s]
    docs = [d for d in yaml.safe_load_all(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    triton = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "triton")
    env = {"MMREC_ADMIN_KEY": secrets.token_hex(16), "MMREC_CPU_THREADS": str(os.cpu_count())}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in triton["args"]]
    hpa = next((d for d in docs if d["kind"] == "HorizontalPodAutoscaler"), {})
    return args, hpa


def hpa_models(hpa: dict, metric: str, default: list[str]) -> list[str]:
    for m in hpa.get("spec", {}).get("metrics", []):
        if m["type"] == "Pods" and m["pods"]["metric"]["name"] == metric:
            return m["pods"]["metric"]["selector"]["matchExpressions"][0]["values"]
    return default


def scrape(url: str) -> dict[tuple[str, str], float]:
    text = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=10).read().decode()
    out = {}
    for family, model, value in re.findall(r'^(nv_inference_\w+)\{[^}]*model="([^"]+)"[^}]*\} (\S+)$', text, re.M):
        if "quantile" not in family:
            out[(family, model)] = out.get((family, model), 0.0) + float(value)
    return out


def delta(before: dict, after: dict, family: str, models: list[str]) -> float:
    return sum(after.get((family, m), 0.0) - before.get((family, m), 0.0) for m in models)


def run_load(url: str, items: list[tuple[bytes, bytes]], concurrency: int, seconds: float):
    """Closed loop: `concurrency` callers, one item per request; (latencies s, errors, elapsed s)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from mmrec import schema

    latencies: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + seconds

    def caller(offset: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        n = offset
        while time.monotonic() < stop:
            text, image = items[n % len(items)]
            n += concurrency
            tensors = []
            for name, value in ((schema.TEXT, text), (schema.IMAGE, image)):
                t = grpcclient.InferInput(name, [1, 1], "BYTES")
                t.set_data_from_numpy(np.array([[value]], dtype=object))
                tensors.append(t)
            t0 = time.monotonic()
            try:
                client.infer(schema.ITEM_ENCODER, tensors)
                latencies.append(time.monotonic() - t0)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(str(exc)[:100])

    started = time.monotonic()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True, help="a portable-target export")
    parser.add_argument("--values", nargs="*", default=[str(CHART / "values-cpu.yaml")])
    parser.add_argument("--set", dest="sets", nargs="*", default=[])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    opts = parser.parse_args()

    import numpy as np

    from mmrec import schema
    from mmrec.export.data import load_items, split
    from mmrec.server import ServerConfig, TritonServer, free_ports

    args, hpa = chart(opts.values, opts.sets)
    ratio_models = hpa_models(hpa, "triton_queue_compute_ratio", [schema.TEXT_ENCODER, schema.IMAGE_ENCODER])
    item_models = hpa_models(hpa, "triton_items_per_second", [schema.ITEM_ENCODER])
    http, grpc, metrics = free_ports(3)
    mode = next((a.split("=", 1)[1] for a in args if a.startswith("--model-control-mode=")), "none")
    config = ServerConfig(repository=opts.repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          model_control=mode,  # the chart's, not the launcher's default
                          extra_args=[a for a in args if a.split("=", 1)[0] not in HANDLED])
    parts = split(load_items())
    held_out = parts.held_out if hasattr(parts, "held_out") else parts[1]
    items = [(i.caption.encode(), i.image_bytes()) for i in held_out[:64]]
    rows = []
    started = time.monotonic()
    with TritonServer(config, ready_timeout_s=600) as server:
        ready_s = time.monotonic() - started
        print(f"start -> ready: {ready_s:.1f} s ({opts.repository})", flush=True)
        metrics_url = f"http://{server.urls['metrics']}/metrics"
        for concurrency in opts.concurrency:
            run_load(server.urls["grpc"], items, concurrency, 3.0)  # warm-up: a steady state first
            before = scrape(metrics_url)
            latencies, errors, elapsed = run_load(server.urls["grpc"], items, concurrency, opts.seconds)
            time.sleep(2.5)  # counters settle after the last response
            after = scrape(metrics_url)
            queue = delta(before, after, "nv_inference_queue_duration_us", ratio_models)
            compute = delta(before, after, "nv_inference_compute_infer_duration_us", ratio_models)
            lat = np.array(latencies) * 1000
            row = {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
                   "items_per_s": round(delta(before, after, "nv_inference_count", item_models) / elapsed, 1),
                   "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
                   "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
                   "queue_compute_ratio": round(queue / max(compute, 1.0), 3),
                   # per member: which stage queues (the adapter rule sums them)
                   "per_model": {m: round(delta(before, after, "nv_inference_queue_duration_us", [m])
                                          / max(delta(before, after, "nv_inference_compute_infer_duration_us", [m]), 1.0), 3)
                                 for m in ratio_models}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| concurrency | items/s | p50 ms | p99 ms | queue:compute | errors |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['items_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['queue_compute_ratio']} | {r['errors']} |")
    load = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
          f"start -> ready {ready_s:.1f} s; ratio over {ratio_models}")
    if opts.json:
        opts.json.write_text(json.dumps({"ready_s": ready_s, "rows": rows, "loadavg": load}, indent=1))


if __name__ == "__main__":
    main()
