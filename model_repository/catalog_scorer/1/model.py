"""Triton python model `catalog_scorer`: a user vector in, the whole catalog's top-k item ids
and scores out.

Each version folder holds one catalog index written by `mmrec index build/add/remove`; Triton
serves the newest version (`version_policy: latest 1`); a new one is loaded with explicit model
control while the old one keeps answering, and every response comes from exactly one version.

Why a python model and not the ONNX graph alone: the portable target has no native ONNX
backend, K is optional per request, requests with different K share one batched scan, and
exactness is certified (see `catalog_scan.py`, copied beside this file by `mmrec index`; Triton's
python stub puts this folder on sys.path).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import priority  # lib/priority.py, copied beside this file by export
import runtime  # copies of model_repository/lib/{catalog_scan,runtime}.py, put beside this file by `mmrec index`
from catalog_scan import BadRequest, CatalogScan
from runner_settings import CatalogSettings
from tensor_names import CATALOG_SCORER

try:  # only present inside Triton
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised outside the server
    pb_utils = None


class TritonPythonModel:
    """Batches users across requests into one scan; each request gets its own K."""

    def initialize(self, args: dict) -> None:
        priority.yield_to_server()  # Triton's own threads first (lib/priority.py)
        config = json.loads(args["model_config"])
        settings = CatalogSettings.from_parameters(config.get("parameters", {}))
        self.version = args["model_version"]
        self.model_name = args.get("model_name", config.get("name", CATALOG_SCORER))
        folder = Path(args["model_repository"]) / self.version
        # the pod's thread budget (MMREC_ORT_INTRA_OP_THREADS where the chart sets it, else the usable
        # cores under the cgroup quota), never ORT's default of every core on the node
        threads = runtime.thread_budget(settings.intra_op_threads, 1)
        self.scan = CatalogScan(folder, runtime.make_session, threads, settings.prepacking)
        self.max_k, self.default_k = settings.max_k, settings.default_k
        self.user_name, self.k_name = (i["name"] for i in config["input"])
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]

    def parse(self, request) -> tuple[np.ndarray, int]:
        where = f"{self.model_name} (index version {self.version})"
        users = pb_utils.get_input_tensor_by_name(request, self.user_name).as_numpy()
        self.scan.check_users(users, where)
        k_tensor = pb_utils.get_input_tensor_by_name(request, self.k_name)
        if k_tensor is None:
            k = min(self.default_k, self.scan.items)
        else:
            ks = k_tensor.as_numpy().reshape(-1)
            if len(ks) != len(users) or (len(ks) and (ks != ks[0]).any()):
                raise BadRequest(f"{where}: every row of one request must ask for the same "
                                 f"{self.k_name}, got {ks.tolist()[:8]}")
            k = int(ks[0]) if len(ks) else self.default_k
        self.scan.check_k(k, self.max_k, where)
        return users.astype(np.float32, copy=False), k

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        parsed: dict[int, tuple[np.ndarray, int]] = {}
        for j, request in enumerate(requests):
            try:
                parsed[j] = self.parse(request)
            except BadRequest as err:
                responses[j] = _error(str(err), pb_utils.TritonError.INVALID_ARG)
        if not parsed:
            return responses
        order = list(parsed)
        users = np.concatenate([parsed[j][0] for j in order])
        k_max = max(parsed[j][1] for j in order)
        try:
            ranked = self.scan.search(users, k_max)
        except Exception as err:  # an ORT failure on validated input: fail this batch, keep serving
            for j in order:
                responses[j] = _error(f"{self.model_name}: {type(err).__name__}: {err}",
                                      pb_utils.TritonError.INTERNAL)
            return responses
        start = 0
        for j in order:
            n, k = len(parsed[j][0]), parsed[j][1]
            t = self.scan.tensors
            part = {t["ids"]: ranked.ids[start:start + n, :k], t["rows"]: ranked.rows[start:start + n, :k],
                    t["scores"]: ranked.scores[start:start + n, :k]}
            start += n
            responses[j] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, part[name] if dtype == np.object_ else part[name].astype(dtype, copy=False))
                for name, dtype in self.outputs])
        return responses

    def finalize(self) -> None:
        self.scan = None


def _error(message: str, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
