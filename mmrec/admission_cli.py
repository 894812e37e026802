"""`mmrec admit`: measure what one replica holds at the SLO and write the queue policy that sheds
the rest (mmrec.admission). Like `mmrec tune`, run it on the serving machine: capacity is a
property of the machine, not of the export."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from mmrec.admission import DEFAULT_SLO_MS, AdmissionError, derive
from mmrec.export.admission import apply_to_repository, clear_repository

console = Console()
PAYLOAD_SET = "jpeg_640x427"  # the workload's photos; `--payloads` picks the phone-size set instead


def measure_capacity(repository: Path, slo_ms: float, payloads: str, trials: int, step_s: float,
                     max_steps: int) -> dict:
    """Open-loop capacity (LoadGen Server scenario) of the served item_encoder, without admission."""
    from mmrec.benchmarks.open_loop import find_capacity, payload_sets
    from mmrec.benchmarks.serving import running_server
    from mmrec.machine import cpu_info

    from mmrec.benchmarks.overload import shadow_repository

    sets = payload_sets(repository)
    if payloads not in sets:
        raise typer.BadParameter(f"unknown payload set {payloads!r}; one of {', '.join(sets)}")
    with tempfile.TemporaryDirectory(prefix="mmrec_admit_") as workdir:
        # a symlinked shadow without the current policy: the repository keeps its own until the
        # new one is derived (a failed measurement changes nothing)
        shadow = shadow_repository(repository, Path(workdir) / "repository")
        removed = clear_repository(shadow)
        if removed:
            console.print(f"measuring without the current admission policy (of {', '.join(removed)})")
        with running_server(shadow, Path(workdir) / "tritonserver.log") as server:
            result = find_capacity(server.urls["grpc"], sets[payloads], slo_ms, trials, step_s=step_s,
                                   max_steps=max_steps, progress=lambda line: console.print("  " + line))
    cpu = cpu_info()
    return {"capacity_rps": min(result["capacity_qps"]), "service_ms": result["search"]["idle_latency_ms"],
            "trials": result["capacity_qps"], "payloads": payloads, "step_s": step_s,
            "cpu": cpu.get("model"), "usable_cores": cpu.get("usable_cores")}


def admit_command(
    repository: Path = typer.Argument(..., help="Repository written by `mmrec export`."),
    slo_ms: float = typer.Option(DEFAULT_SLO_MS, "--slo-ms", help="p99 latency bound one replica must keep."),
    capacity: Optional[float] = typer.Option(None, help="Requests/s one replica holds at the SLO (measured when omitted)."),
    service_ms: Optional[float] = typer.Option(None, help="Latency of one request on an idle replica (measured when omitted)."),
    payloads: str = typer.Option(PAYLOAD_SET, help="Payload set the capacity is measured on (jpeg_640x427, jpeg_12mp_exif6)."),
    trials: int = typer.Option(1, min=1, max=9, help="Capacity searches; the lowest counts."),
    step_s: float = typer.Option(4.0, min=0.5, help="Seconds of open-loop load per rate tried."),
    max_steps: int = typer.Option(8, min=2, help="Rates tried per search at most."),
    clear: bool = typer.Option(False, "--clear", help="Remove the policy and restore the instance counts export chose."),
) -> None:
    """Write a queue policy on every entry model: requests over `capacity x (SLO - service) / 2` in
    the queue are rejected at once, requests waiting longer than `SLO - service` when they time
    out (the client raises OverloadedError after its retry budget), instead of queued past the
    SLO; every admitted model gets two instances (mmrec/admission.py says why)."""
    if clear:
        removed = clear_repository(repository)
        console.print(f"admission removed from {', '.join(removed)}" if removed else "no admission policy to remove")
        return
    record: dict = {"slo_ms": slo_ms}
    if capacity is None or service_ms is None:
        console.print(f"measuring open-loop capacity at p99 <= {slo_ms:g} ms ({payloads}, {trials} trial(s))")
        measured = measure_capacity(repository, slo_ms, payloads, trials, step_s, max_steps)
        record["measured"] = measured
        capacity = measured["capacity_rps"] if capacity is None else capacity
        service_ms = measured["service_ms"] if service_ms is None else service_ms
    record |= {"capacity_rps": capacity, "service_ms": service_ms,
               "derived_by": "measured" if "measured" in record else "given"}
    try:
        policy = derive(capacity, slo_ms, service_ms)
    except AdmissionError as err:
        console.print(f"[red]admit failed:[/red] {err}")
        raise typer.Exit(2)
    models = apply_to_repository(repository, policy, record)
    console.print(f"admission on {', '.join(models)}: at most {policy.max_queue_size} waiting, "
                  f"{policy.timeout_us / 1e3:.1f} ms queue budget, {policy.instances} instances (capacity {capacity:.1f}/s, "
                  f"service {service_ms:.1f} ms, SLO {slo_ms:g} ms); restart or reload the server to apply")
