"""Triton python model: the whole item path in one step (the `portable` target's `item_encoder`).

TEXT + IMAGE (encoded bytes) -> ITEM_EMBEDDING, INTEREST_PROBS, ALIGNMENT

Why one step: on the portable target every ensemble step is a python model, and every hop between
two of them costs a round trip through shared memory to another stub process. The four-step
ensemble (item_preprocess -> text_encoder || image_encoder -> fusion) paid four such hops per
request; this model pays one, and keeps the ensemble's parallelism itself: the text encoder runs
on a worker thread (its share of the cores) while this thread decodes the images and runs the
image encoder (ONNX Runtime, OpenVINO and Pillow's decoder release the GIL). The image encoder
is ~2/3 of the compute, so it gets all the cores: once the text branch is done, none sits idle
(measured in issue 11 against text and image on one core each, and against chunks of both on
two workers). Public name and tensors are the ensemble's; the GPU and native targets keep the
ensemble (see export/repository.py, `MERGED_ENSEMBLES`).

It runs the members' own graphs (`<repository>/<member>/1/model.onnx`, named by the config's
`<member>.model_file` parameters, relative to this model's folder) with the runtime and precision
`mmrec tune` chose for each member (the `<member>.` runner settings, lib/runner_settings.py), so it
always serves exactly what the members serve. Like an ensemble, it needs its members' folders beside it.

Validation is item_preprocess's: every request is checked on its own and a bad one gets
INVALID_ARG naming what was wrong, without failing the others in the dynamic batch. If the
runtime fails on the joined batch, each request is run again alone, so only the one(s) it rejects
fail (INTERNAL). The text rows of a request whose image turns out bad are encoded and dropped.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import priority  # lib/priority.py, copied beside this file by export
import runtime  # copies of model_repository/lib/*.py that export puts beside this file
from image_preprocessing import ImageDecoder
from runner_settings import RunnerSettings
from served_contract import TOKENIZER_FILE, ServedContract
from tensor_names import (ATTENTION_MASK, FUSION, FUSION_OUTPUTS, IMAGE, IMAGE_EMBEDDING, IMAGE_ENCODER,
                          INPUT_IDS, ITEM_OUTPUTS as PUBLIC_OUTPUTS, ITEM_PIPELINE_MEMBERS as MEMBERS,
                          PIXEL_VALUES, TEXT, TEXT_EMBEDDING, TEXT_ENCODER)
from text_preprocessing import TextTokenizer

try:  # only present inside Triton
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised outside the server
    pb_utils = None


class TritonPythonModel:
    """Preprocess, both encoders (side by side) and fusion for every request of a dynamic batch."""

    def initialize(self, args: dict) -> None:
        priority.yield_to_server()  # Triton's own threads first (lib/priority.py)
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        contract = ServedContract.from_parameters(parameters)
        model_dir = Path(args["model_repository"])
        self.tokenizer = TextTokenizer.for_contract(contract, model_dir / args["model_version"] / TOKENIZER_FILE)
        self.decoder = ImageDecoder.for_contract(contract)
        self.seq_buckets = contract.seq_buckets
        self.sessions = {}
        for member in MEMBERS:  # each member's graph, runtime and share of the cores: `<member>.` settings
            settings = RunnerSettings.from_parameters(parameters, member)
            self.sessions[member] = runtime.open_configured((model_dir / settings.model_file).resolve(), settings)
        # one worker: the text encoder, while the calling thread decodes and runs the image encoder
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="text-encoder")
        self.output_dtypes = [pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(config, name)["data_type"]) for name in PUBLIC_OUTPUTS]

    def _texts(self, request) -> list[str]:
        return self.tokenizer.decode_texts(pb_utils.get_input_tensor_by_name(request, TEXT).as_numpy())

    def _images(self, request) -> list[bytes]:
        return list(pb_utils.get_input_tensor_by_name(request, IMAGE).as_numpy().reshape(-1))

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Text embeddings, rows at their own length bucket (as the text_encoder member runs)."""
        ids, mask = self.tokenizer(texts)
        session = self.sessions[TEXT_ENCODER]
        feed = {INPUT_IDS: ids.astype(session.input_dtypes[INPUT_IDS], copy=False),
                ATTENTION_MASK: mask.astype(session.input_dtypes[ATTENTION_MASK], copy=False)}
        return runtime.run_by_length(session, [TEXT_EMBEDDING], feed, ATTENTION_MASK, self.seq_buckets)[0]

    def _request_items(self, request) -> tuple[list[str], list[bytes]]:
        texts, images = self._texts(request), self._images(request)
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} TEXT rows but {len(images)} IMAGE rows")
        return texts, images

    def execute(self, requests: list) -> list:
        """Texts are checked first and start encoding on the worker; images are decoded (and
        checked) meanwhile. A request whose image is bad gets its error and its text rows are
        dropped from the text embeddings before fusion."""
        responses: list = [None] * len(requests)
        candidates: list[tuple[int, list[str], list[bytes]]] = []
        for j, request in enumerate(requests):
            try:
                candidates.append((j, *self._request_items(request)))
            except ValueError as err:  # InvalidText, row mismatch
                responses[j] = self._error(str(err))
        if not candidates:
            return responses
        text_future = self.worker.submit(self.encode_text, [t for _, texts, _ in candidates for t in texts])
        good: list[int] = []
        decoded: list[np.ndarray] = []
        for j, texts, images in candidates:
            try:
                decoded.append(np.stack([self.decoder.decode(d, i) for i, d in enumerate(images)]))
                good.append(j)
            except ValueError as err:  # InvalidImage
                responses[j] = self._error(str(err))
        try:
            image_embedding = None
            if good:
                session = self.sessions[IMAGE_ENCODER]
                pixels = self.decoder.normalize(np.concatenate(decoded))
                pixels = pixels.astype(session.input_dtypes[PIXEL_VALUES], copy=False)
                image_embedding = session.run([IMAGE_EMBEDDING], {PIXEL_VALUES: pixels})[0]
            text_embedding = text_future.result()
            if not good:
                return responses
            kept = set(good)
            rows = np.concatenate([np.full(len(texts), j in kept) for j, texts, _ in candidates])
            outputs = self.sessions[FUSION].run(list(FUSION_OUTPUTS), {TEXT_EMBEDDING: text_embedding[rows],
                                                                        IMAGE_EMBEDDING: image_embedding})
        except Exception as err:  # noqa: BLE001 - a runtime failure must not take the batch down
            text_future.cancel()
            if len(requests) == 1:
                return [responses[0] if responses[0] is not None
                        else self._error(f"item_encoder: {type(err).__name__}: {err}", internal=True)]
            # isolate the request(s) the runtime rejects: each one again alone
            return [r if r is not None else self.execute([request])[0] for r, request in zip(responses, requests)]
        sizes = [len(texts) for j, texts, _ in candidates if j in kept]
        per_request = zip(*[np.split(o, np.cumsum(sizes)[:-1]) for o in outputs])
        for j in good:
            responses[j] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, array.astype(dtype, copy=False))
                for name, dtype, array in zip(PUBLIC_OUTPUTS, self.output_dtypes, next(per_request))])
        return responses

    @staticmethod
    def _error(message: str, internal: bool = False):
        """INVALID_ARG for what the client sent wrong; INTERNAL for a runtime failure."""
        code = pb_utils.TritonError.INTERNAL if internal else pb_utils.TritonError.INVALID_ARG
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def finalize(self) -> None:
        self.worker.shutdown(wait=True)
        self.sessions = {}
