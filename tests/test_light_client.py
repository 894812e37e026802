"""The light client install (issue 22): `pip install mmrec` without extras gives a recommender
service the client and the `mmrec score` command, and none of the export, serving or
benchmarking weight (torch, ONNX, OpenVINO, the tritonserver wheel).

A fresh virtual environment gets the project with its base dependencies only (from the package
registry, as a service would install it), then ranks real items against the real server; the
ranking must equal the one the full install's client gets.
"""
from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "onnx", "onnxruntime", "openvino", "nncf", "transformers", "nvidia-pytriton", "matplotlib",
         "mlcommons-loadgen")


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory) -> Path:
    """A venv with `pip install <this project>`: base dependencies, no extras."""
    home = tmp_path_factory.mktemp("light-client") / "venv"
    venv.EnvBuilder(with_pip=True).create(home)
    python = home / "bin" / "python"
    out = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return home


def _write_items(folder: Path, items, name: str) -> Path:
    lines = []
    for i, (caption, image, _) in enumerate(items):
        path = folder / f"{name}_{i}.png"
        path.write_bytes(image)
        lines.append(json.dumps({"text": caption, "image": path.name, "id": f"{name}-{i}"}))
    target = folder / f"{name}.jsonl"
    target.write_text("\n".join(lines) + "\n")
    return target


@pytest.mark.server
@pytest.mark.timeout(900)
def test_the_base_install_ranks_items_without_the_heavy_packages(light_venv, triton_server, sample_items, tmp_path):
    from importlib.metadata import distributions  # noqa: F401 - the child lists its own

    python = light_venv / "bin" / "python"
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                            capture_output=True, text=True, timeout=120, check=True)
    installed = {d["name"].lower() for d in json.loads(listed.stdout)}
    assert "mmrec" in installed and "tritonclient" in installed
    assert not installed & set(HEAVY), sorted(installed & set(HEAVY))

    history = _write_items(tmp_path, sample_items[:4], "history")
    candidates = _write_items(tmp_path, sample_items[4:12], "candidates")
    command = ["score", "--history", str(history), "--items", str(candidates), "--url", triton_server.urls["grpc"],
               "--format", "jsonl"]
    # cwd outside the checkout: its mmrec/ folder must not shadow the installed package
    light = subprocess.run([str(light_venv / "bin" / "mmrec"), *command], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert light.returncode == 0, light.stdout[-2000:] + light.stderr[-4000:]
    full = subprocess.run([sys.executable, "-m", "mmrec.cli", *command], capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-4000:]

    def ranking(stdout: str) -> list[tuple[str, float]]:
        rows = [json.loads(line) for line in stdout.splitlines() if line.strip()]
        return [(row["id"], row["score"]) for row in rows]

    got, expected = ranking(light.stdout), ranking(full.stdout)
    assert [i for i, _ in got] == [i for i, _ in expected] and len(got) == 8
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(got, expected))
    # the command starts without the export stack: no torch import on the way to `score`
    probe = subprocess.run([str(python), "-c", "import mmrec.cli, sys; "
                            "print(sorted(m for m in ('torch', 'onnx', 'openvino') if m in sys.modules))"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stdout + probe.stderr
