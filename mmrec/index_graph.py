"""The catalog scan as one ONNX graph: MatMul over the whole index, TopK, exact re-rank, ids.

Why this shape:
- The scan is a GEMV (one user) or GEMM (a dynamic batch of users) against the embedding matrix
  stored transposed, Et [D, N], as external data next to model.onnx. That is the layout ONNX
  Runtime's MLAS streams once for M=1 without repacking, and the file is memory-mapped, so
  several instances (and a version being swapped in) share the page cache.
- The re-rank reads its candidates' rows from a second, row-major copy E [N, D] (also external,
  memory-mapped): gathering C rows from Et costs C x D scattered reads, measured as slow as the
  whole scan; from E it is C contiguous 1 KB reads. Disk is 2x the index; RAM is Et plus only
  the pages of E that candidates touched.
- fp32 sums in another order (numpy/BLAS vs MLAS) can swap items whose scores differ by one
  rounding. So the fp32 scan only nominates `candidates` rows (K + a margin); those are
  re-scored in float64 (every fp32 product is exact in float64) and ranked by
  (score desc, row asc): the result is the exact ranking of the stored fp32 vectors.
- The graph also returns the exact K-th logit and the fp32 logit of the last candidate. When
  their gap exceeds the fp32 error bound, no row outside the candidates can belong in the top K
  (`certified` in the served model.py); otherwise that user is re-run with more candidates.
  Exactness is checked, not assumed.
- σ is monotonic: the graph ranks logits and applies the sigmoid to the K winners only.
- Item ids are a string initializer gathered by row, so ids travel inside the model file and a
  native onnxruntime backend could serve the same graph.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import schema
from .layout import MODEL_FILES

OPSET = 17
MODEL_FILE = MODEL_FILES["onnx"]
EMBEDDINGS_T_FILE = "embeddings_t.f32"  # external data of the scan matrix: raw float32 [D, N]
EMBEDDINGS_FILE = "embeddings.f32"  # external data of the re-rank rows: raw float32 [N, D]
# fp32 candidates kept beyond K for the exact re-rank; the certificate decides whether that was
# enough, so this only trades the re-rank's cost against how often a row is re-run.
RERANK_MARGIN = 32
@dataclass(frozen=True)
class ScanGraph:
    """What publish writes: the model file and its external data file."""

    model: Path
    embeddings: Path
    embeddings_t: Path
    items: int
    dim: int


def write_scan_graph(embeddings: np.ndarray, ids: list[str], folder: Path) -> ScanGraph:
    """Write model.onnx + embeddings.f32 (Et, external data) for an [N, D] float32 index.

    The matrix goes to disk straight from numpy (no protobuf copy of a 1 GB initializer).
    """
    import onnx
    from onnx import TensorProto, helper

    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or not len(embeddings):
        raise ValueError(f"an index needs [N >= 1, D] embeddings, got shape {embeddings.shape}")
    if len(ids) != len(embeddings):
        raise ValueError(f"{len(ids)} ids for {len(embeddings)} embeddings")
    n, d = embeddings.shape
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data_t_path, data_path = folder / EMBEDDINGS_T_FILE, folder / EMBEDDINGS_FILE
    _write_transposed(embeddings, data_t_path)
    _write_rows(embeddings, data_path)
    et = _external("item_embeddings_t", [d, n], EMBEDDINGS_T_FILE)
    e = _external("item_embeddings", [n, d], EMBEDDINGS_FILE)
    id_tensor = helper.make_tensor("item_ids", TensorProto.STRING, [n], [i.encode("utf-8") for i in ids])

    def const(name: str, values: list[int]) -> TensorProto:
        return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)

    user = schema.USER_EMBEDDING
    nodes = [
        # fp32 scan over the whole catalog, then the K + margin best rows
        helper.make_node("MatMul", [user, "item_embeddings_t"], ["logits32"]),
        helper.make_node("TopK", ["logits32", schema.CANDIDATES], ["cand_logits32", "cand_rows"], axis=-1),
        # candidates in row order, so equal exact scores come out lowest row first
        helper.make_node("Neg", ["cand_rows"], ["neg_rows"]),
        helper.make_node("TopK", ["neg_rows", schema.CANDIDATES], ["neg_sorted", "_unused"], axis=-1),
        helper.make_node("Neg", ["neg_sorted"], ["rows_sorted"]),
        # exact re-rank in float64 over the candidates' vectors
        helper.make_node("Gather", ["item_embeddings", "rows_sorted"], ["cand"], axis=0),  # [B, C, D]
        helper.make_node("Cast", ["cand"], ["cand64"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", [user], ["user64"], to=TensorProto.DOUBLE),
        helper.make_node("Unsqueeze", ["user64", "axis_last"], ["user64_col"]),  # [B, D, 1]
        helper.make_node("MatMul", ["cand64", "user64_col"], ["cand_logits_col"]),  # [B, C, 1]
        helper.make_node("Squeeze", ["cand_logits_col", "axis_last"], ["cand_logits"]),  # [B, C]
        helper.make_node("TopK", ["cand_logits", schema.TOP_K], ["top_logits", "top_pos"], axis=-1),
        helper.make_node("GatherElements", ["rows_sorted", "top_pos"], [schema.ITEM_ROWS], axis=1),
        helper.make_node("Sigmoid", ["top_logits"], ["top_scores64"]),
        helper.make_node("Cast", ["top_scores64"], [schema.SCORE], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["item_ids", schema.ITEM_ROWS], [schema.ITEM_IDS], axis=0),
        # certificate: exact K-th logit and the fp32 logit of the last candidate
        helper.make_node("Sub", [schema.TOP_K, "one"], ["k_minus_1"]),
        helper.make_node("Slice", ["top_logits", "k_minus_1", schema.TOP_K, "axis1"], [schema.KTH_LOGIT]),
        helper.make_node("Sub", [schema.CANDIDATES, "one"], ["c_minus_1"]),
        helper.make_node("Slice", ["cand_logits32", "c_minus_1", schema.CANDIDATES, "axis1"],
                         [schema.CANDIDATE_FLOOR]),
    ]
    graph = helper.make_graph(
        nodes, "catalog_scan",
        inputs=[helper.make_tensor_value_info(user, TensorProto.FLOAT, [schema.BATCH_AXIS, d]),
                helper.make_tensor_value_info(schema.TOP_K, TensorProto.INT64, [1]),
                helper.make_tensor_value_info(schema.CANDIDATES, TensorProto.INT64, [1])],
        outputs=[helper.make_tensor_value_info(schema.ITEM_IDS, TensorProto.STRING, [schema.BATCH_AXIS, "k"]),
                 helper.make_tensor_value_info(schema.ITEM_ROWS, TensorProto.INT64, [schema.BATCH_AXIS, "k"]),
                 helper.make_tensor_value_info(schema.SCORE, TensorProto.FLOAT, [schema.BATCH_AXIS, "k"]),
                 helper.make_tensor_value_info(schema.KTH_LOGIT, TensorProto.DOUBLE, [schema.BATCH_AXIS, 1]),
                 helper.make_tensor_value_info(schema.CANDIDATE_FLOOR, TensorProto.FLOAT,
                                               [schema.BATCH_AXIS, 1])],
        initializer=[et, e, id_tensor, const("one", [1]), const("axis1", [1]), const("axis_last", [-1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="mmrec-index")
    model_path = folder / MODEL_FILE
    # onnx.save would pull the external tensor into memory only if asked to; write as is
    with open(model_path, "wb") as f:
        f.write(model.SerializeToString())
        f.flush()
        os.fsync(f.fileno())
    onnx.checker.check_model(str(model_path))
    return ScanGraph(model_path, data_path, data_t_path, n, d)


def _external(name: str, dims: list[int], location: str):
    """A float32 initializer whose bytes live in `location` (raw, offset 0), for mmap by ORT."""
    from onnx import TensorProto

    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    length = 4
    for size in dims:
        length *= size
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_rows(embeddings: np.ndarray, path: Path) -> None:
    with open(path, "wb") as f:
        np.ascontiguousarray(embeddings, dtype=np.float32).tofile(f)
        f.flush()
        os.fsync(f.fileno())


def _write_transposed(embeddings: np.ndarray, path: Path, block_rows: int = 65536) -> None:
    """Et [D, N] to disk without a full transposed copy in memory (blocks of D x block columns)."""
    n, d = embeddings.shape
    with open(path, "wb") as f:
        f.truncate(n * d * 4)
    mapped = np.memmap(path, dtype=np.float32, mode="r+", shape=(d, n))
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        mapped[:, start:stop] = embeddings[start:stop].T
    mapped.flush()
    del mapped
    _fsync(path)
