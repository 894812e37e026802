"""The chart's `helm test` pod, run as written against the real tritonserver.

`helm test <release>` starts templates/tests/test-inference.yaml: a stdlib-python script that
scores one item (a caption and a PNG) through the Service. Here its rendered command runs on this
machine against the served default export, with only the Service address swapped for the
loopback one, so a wrong tensor name, a request Triton refuses or a check that can never fail
shows here and not in a cluster.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from mmrec import schema
from test_deploy import CPU_VALUES, helm, render  # noqa: F401 - `helm` is a fixture

SETS = ("modelRepository.uri=s3://bucket/models",)


def _test_pods(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "Pod"
            and d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]


def _deployment(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] == "Deployment")


def _run(command: list[str], url: str, model: str | None = None) -> subprocess.CompletedProcess:
    """The pod's command with the Service URL (and optionally the model) replaced; python3 -I -S
    as in the pod: stdlib only, no site packages, so the image needs nothing installed."""
    program, args = command[:5], list(command[5:])
    assert program[:4] == ["python3", "-I", "-S", "-c"], program
    args[0] = url
    if model is not None:
        args[1] = model
    return subprocess.run([sys.executable, "-I", "-S", "-c", program[4], *args],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("values", [(), (CPU_VALUES,)], ids=["gpu", "cpu"])
def test_the_test_pod_is_never_selected_by_the_service_or_the_budget(helm, values):
    docs = render(helm, values, SETS)
    (pod,) = _test_pods(docs)
    labels = pod["metadata"]["labels"]
    selectors = [_deployment(docs)["spec"]["selector"]["matchLabels"]]
    selectors += [d["spec"]["selector"] for d in docs if d["kind"] == "Service"]
    selectors += [d["spec"]["selector"]["matchLabels"] for d in docs if d["kind"] == "PodDisruptionBudget"]
    for selector in selectors:
        assert not all(labels.get(k) == v for k, v in selector.items()), (selector, labels)
    container = pod["spec"]["containers"][0]
    assert container["image"] == _deployment(docs)["spec"]["template"]["spec"]["containers"][0]["image"]
    assert pod["spec"]["restartPolicy"] == "Never"
    # the model and the tensor names it sends and reads are the served contract's
    assert container["command"][6:10] == [schema.ITEM_ENCODER, schema.TEXT, schema.IMAGE, schema.ITEM_EMBEDDING]


def test_network_policy_admits_the_test_pod_when_clients_are_restricted(helm):
    docs = render(helm, (), SETS + ("networkPolicy.clients[0].podSelector.matchLabels.role=recommender",))
    (pod,) = _test_pods(docs)
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    peers = policy["spec"]["ingress"][0]["from"]
    admitted = [p for p in peers if "podSelector" in p
                and all(pod["metadata"]["labels"].get(k) == v for k, v in p["podSelector"]["matchLabels"].items())]
    assert admitted, peers
    assert not _test_pods(render(helm, (), SETS + ("helmTest.enabled=false",)))


@pytest.mark.server
def test_the_test_pod_scores_an_item_on_the_real_server_and_fails_on_a_missing_model(helm, triton_server):
    (pod,) = _test_pods(render(helm, (CPU_VALUES,), SETS))
    command = pod["spec"]["containers"][0]["command"]
    url = f"http://{triton_server.urls['http']}"

    passed = _run(command, url)
    assert passed.returncode == 0, passed.stderr[-2000:]
    assert passed.stdout.startswith(f"ok: {schema.ITEM_ENCODER} scored one item"), passed.stdout

    failed = _run(command, url, model="no_such_model")
    assert failed.returncode != 0
    # Triton's own message reaches the `helm test` log
    assert "/v2/models/no_such_model/ready: HTTP 400" in failed.stderr, failed.stderr[-2000:]
    assert "not ready" in failed.stderr, failed.stderr[-2000:]
