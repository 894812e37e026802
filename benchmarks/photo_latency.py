"""Real photos through `item_encoder`, one item per request (concurrency 1): a 640 x 427 JPEG
vs the same photo as a 12 MP phone JPEG stored sideways with an EXIF tag, through Triton (gRPC)
and through the in-process reference pipeline, in alternating rounds so background load hits
every arm alike. Medians with bootstrap 95 % intervals on the ratios.

`python -m mmrec.benchmarks.photo_latency --repository R --output benchmarks/results/photo_latency.json`
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

from mmrec import schema
from mmrec.photos import known_photos, phone_photo
from mmrec.reference import ReferencePipeline
from .machine import cpu_share, loadavg, machine_info
from .serving import running_server

CAPTION = "A Chinese palace with a red roof."
BOOTSTRAP = 2000


def _bootstrap_ratio(a: np.ndarray, b: np.ndarray, seed: int = 0) -> list[float]:
    """95 % interval of median(a) / median(b), resampling both arms."""
    rng = np.random.default_rng(seed)
    ratios = [np.median(rng.choice(a, a.size)) / np.median(rng.choice(b, b.size)) for _ in range(BOOTSTRAP)]
    return [round(float(np.percentile(ratios, 2.5)), 3), round(float(np.percentile(ratios, 97.5)), 3)]


def run(repository: Path, rounds: int, per_round: int) -> dict:
    import tritonclient.grpc as grpcclient

    palace = next(p for p in known_photos() if p.name == "palace")
    payloads = {"jpeg_640x427": palace.read_bytes(), "jpeg_12mp_exif6": phone_photo(palace, 6)}
    pipeline = ReferencePipeline(repository, intra_op_threads=0)
    samples: dict[str, list[float]] = {f"{where}/{name}": [] for where in ("triton", "in_process")
                                       for name in payloads}
    start_load = loadavg()
    with tempfile.TemporaryDirectory() as tmp, running_server(repository, Path(tmp) / "triton.log") as server:
        client = grpcclient.InferenceServerClient(server.urls["grpc"])

        def triton_call(image: bytes) -> None:
            text = grpcclient.InferInput(schema.TEXT, [1, 1], "BYTES")
            text.set_data_from_numpy(np.array([[CAPTION.encode()]], dtype=object))
            picture = grpcclient.InferInput(schema.IMAGE, [1, 1], "BYTES")
            picture.set_data_from_numpy(np.array([[image]], dtype=object))
            client.infer(schema.ITEM_ENCODER, [text, picture])

        arms = {f"triton/{n}": (lambda d=d: triton_call(d)) for n, d in payloads.items()}
        arms.update({f"in_process/{n}": (lambda d=d: pipeline.encode_items([CAPTION], [d]))
                     for n, d in payloads.items()})
        for call in arms.values():  # warm-up: sessions, arenas, python stubs
            for _ in range(5):
                call()
        for r in range(rounds):
            for name, call in arms.items():
                for _ in range(per_round):
                    t = time.perf_counter()
                    call()
                    samples[name].append(1000 * (time.perf_counter() - t))
            print(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{k} p50 {np.median(v):.1f} ms" for k, v in samples.items()), file=sys.stderr, flush=True)
    arrays = {k: np.array(v) for k, v in samples.items()}
    p50 = {k: round(float(np.median(v)), 2) for k, v in arrays.items()}
    ratios = {
        "triton_12mp_over_640": (arrays["triton/jpeg_12mp_exif6"], arrays["triton/jpeg_640x427"]),
        "triton_over_in_process_640": (arrays["triton/jpeg_640x427"], arrays["in_process/jpeg_640x427"]),
        "in_process_12mp_over_640": (arrays["in_process/jpeg_12mp_exif6"], arrays["in_process/jpeg_640x427"]),
    }
    return {
        "samples_per_arm": {k: int(v.size) for k, v in arrays.items()},
        "p50_ms": p50,
        "triton_minus_in_process_p50_ms_640": round(p50["triton/jpeg_640x427"] - p50["in_process/jpeg_640x427"], 2),
        "ratios": {k: {"p50_ratio": round(float(np.median(a) / np.median(b)), 3), "ci95": _bootstrap_ratio(a, b)}
                   for k, (a, b) in ratios.items()},
        "load_average_start": start_load, "load_average_end": loadavg(), "cpu_share_end": cpu_share(),
        "machine": machine_info(),
    }


def main(repository: Path = typer.Option(..., help="An exported repository (portable target)."),
         output: Path = typer.Option(Path("benchmarks/results/photo_latency.json")),
         rounds: int = typer.Option(10), per_round: int = typer.Option(12)) -> None:
    report = run(repository, rounds, per_round)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: report[k] for k in ("p50_ms", "ratios", "triton_minus_in_process_p50_ms_640",
                                             "load_average_start", "cpu_share_end")}, indent=2))


if __name__ == "__main__":
    typer.run(main)
