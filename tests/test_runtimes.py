"""CPU runtimes and precisions (issue 15): OpenVINO beside ONNX Runtime, gated variants, and the
per-machine choice of `mmrec tune`, served by the real Triton."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mmrec import metrics, schema
from mmrec.export.manifest import sha256_file
from mmrec.export.repository import Target, parse
from mmrec.export.tuning import REFERENCE, choose_pair, decision, serve_variants, tune_repository
from mmrec.export.variants import VARIANTS
from mmrec.layout import RepositoryLayout
from mmrec.model_repository.lib import runtime
from mmrec.photos import known_photos
from mmrec.reference import ReferencePipeline, served_runtime
from mmrec.stats import Interval, aa_check, pooled_ratio

from hard_dependencies import IN_CI, skip_unless

ENCODERS = (schema.TEXT_ENCODER, schema.IMAGE_ENCODER)
# openvino is a hard dependency: CI fails where it is unusable (tests/hard_dependencies.py)
needs_openvino = pytest.mark.skipif(runtime.unavailable_reason("openvino") is not None and not IN_CI,
                                    reason=str(runtime.unavailable_reason("openvino")))


def manifest_of(repository: Path) -> dict:
    return RepositoryLayout(repository).read_manifest()


def _feeds(reference: ReferencePipeline) -> dict[str, dict[str, np.ndarray]]:
    texts = ["a red apple on a white plate", "rocket ship " * 60, "ein Hund läuft im Park 🐕"]
    ids, mask = reference.tokenizer(texts)
    pixels = reference.preprocess_images([p.read_bytes() for p in known_photos()[:3]])
    return {schema.TEXT_ENCODER: {schema.INPUT_IDS: ids, schema.ATTENTION_MASK: mask},
            schema.IMAGE_ENCODER: {schema.PIXEL_VALUES: pixels}}


@needs_openvino
@pytest.mark.parametrize("member", ENCODERS)
def test_openvino_fp32_matches_onnxruntime_on_real_inputs(member, exported_repository, reference):
    path = exported_repository / member / "1" / "model.onnx"
    feed = _feeds(reference)[member]
    ort_out = runtime.open_session(path, "onnxruntime").run(None, feed)[0]
    ov_session = runtime.open_session(path, "openvino", threads=1)
    ov_out = ov_session.run(None, feed)[0]
    assert ov_out.shape == ort_out.shape and ov_session.input_dtypes == runtime.OrtSession(path).input_dtypes
    assert metrics.row_cosine(ort_out, ov_out).min() >= 0.9999
    again = ov_session.run(None, {k: v[:1] for k, v in feed.items()})[0]  # a new batch size
    np.testing.assert_allclose(again, ov_out[:1], atol=1e-4)


def test_bf16_is_refused_where_the_cpu_would_silently_run_fp32(exported_repository):
    reason = runtime.unavailable_reason("openvino", "bf16")
    capabilities = runtime.openvino_capabilities()
    if not capabilities:
        assert reason == "the openvino package is not installed"
    elif "BF16" in capabilities:
        assert reason is None
        return
    else:
        assert "no native BF16" in reason and "FP32" in reason
    with pytest.raises(RuntimeError, match="bf16"):
        runtime.open_session(exported_repository / schema.TEXT_ENCODER / "1" / "model.onnx", "openvino",
                             precision="bf16")
    assert "bf16 is an OpenVINO hint" in runtime.unavailable_reason("onnxruntime", "bf16")
    assert "unknown runtime" in runtime.unavailable_reason("tvm")


@needs_openvino
def test_export_gates_every_runtime_variant_and_records_why_one_is_missing(exported_repository):
    manifest = manifest_of(exported_repository)
    for member in ENCODERS:
        variants = manifest["models"][member]["variants"]
        assert {"openvino-fp32", "openvino-bf16", "openvino-int8"} <= set(variants), member
        for name, entry in variants.items():
            spec = VARIANTS[name]
            assert (entry["graph"], entry["runtime"], entry["precision"]) == (spec.graph, spec.runtime,
                                                                                spec.precision)
            if entry.get("skipped"):
                assert entry["written"] is False and "gate" not in entry, name
            elif name != "fp32":
                assert entry["gate"]["evaluated_on"] == f"{spec.runtime} {spec.precision}"
                assert entry["written"] == entry["gate"]["passed"], (member, name)
            if entry["written"]:  # an admitted variant points at the graph file it runs
                path = exported_repository / entry["path"]
                assert sha256_file(path) == entry["sha256"]
                assert path.name == ("model.onnx" if spec.graph == "fp32" else f"{spec.graph}.onnx")
        assert variants["openvino-fp32"]["written"], "OpenVINO FP32 must match ORT FP32"
        assert variants["openvino-fp32"]["gate"]["mean_cosine"] >= 0.9999
        if "BF16" not in runtime.openvino_capabilities():
            assert "no native BF16" in variants["openvino-bf16"]["skipped"]
    combinations = manifest["combinations"]
    assert combinations and all(set(c["variants"]) == set(ENCODERS) for c in combinations)
    # every pair of admitted CPU variants was gated on the fused item embedding
    admitted = {m: {v for v, e in manifest["models"][m]["variants"].items()
                    if e["written"] and VARIANTS[v].cpu} for m in ENCODERS}
    assert len(combinations) == np.prod([len(a) for a in admitted.values()]) - 1


def test_pooled_speedup_separates_a_real_speedup_from_an_aa_pair():
    """Per-round medians of two cases (batch 1 and 32) with drift shared by every arm in a round:
    the paired, pooled speed-up finds a real 1.67x and the reference against itself shows none."""
    rng = np.random.default_rng(0)
    drift = rng.normal(0, 0.1, (2, 12))  # the machine's state of each round, hitting every arm alike
    base = np.array([[10.0], [300.0]]) * np.exp(drift)

    def arm(speed: float) -> np.ndarray:
        return base / speed * np.exp(rng.normal(0, 0.02, base.shape))

    reference, aa, faster = arm(1.0), arm(1.0), arm(1 / 0.6)
    speedup = pooled_ratio(list(zip(reference, faster)))
    assert 1.6 < speedup.low <= speedup.point <= speedup.high < 1.75 and speedup.rounds == 12
    assert speedup.verdict(1.0, "above") == "met"
    same = pooled_ratio(list(zip(reference, aa)))
    assert same.low < 1 < same.high and same.verdict(1.0, "above") == "not conclusive"
    assert aa_check(same)["stable"] is True
    # the same numbers unpaired (one arm's rounds shuffled): the drift no longer cancels and the
    # interval widens; pairing by round is what makes it narrow
    shuffled = pooled_ratio([(r, rng.permutation(f)) for r, f in zip(reference, faster)])
    assert shuffled.high - shuffled.low > 2 * (speedup.high - speedup.low)


def _speedup(point: float, low: float, high: float) -> dict:
    return Interval(point, low, high, 10).to_dict()


def test_choice_respects_the_combination_gate():
    def member(**scores):
        return {"aa": {"stable": True},
                "variants": {v: {"speedup_vs_fp32": _speedup(s, s - 0.02, s + 0.02)}
                             for v, s in {"fp32": 1.0, **scores}.items()}}

    measured = {schema.TEXT_ENCODER: member(**{"openvino-fp32": 1.1}),
                schema.IMAGE_ENCODER: member(int8=1.6, **{"openvino-int8": 2.0, "openvino-fp32": 0.99})}

    def combo(text, image, passed):
        return {"variants": {schema.TEXT_ENCODER: text, schema.IMAGE_ENCODER: image}, "passed": passed}

    everything = [combo(t, i, True) for t in ("fp32", "openvino-fp32")
                  for i in ("fp32", "int8", "openvino-int8") if (t, i) != ("fp32", "fp32")]
    choice, _ = choose_pair(measured, everything)
    assert choice == {schema.TEXT_ENCODER: "openvino-fp32", schema.IMAGE_ENCODER: "openvino-int8"}
    # the fastest pair failed its fused-embedding gate: the next fastest passing pair is served
    blocked = [c if c["variants"] != choice else {**c, "passed": False} for c in everything]
    choice, record = choose_pair(measured, blocked)
    assert choice == {schema.TEXT_ENCODER: "fp32", schema.IMAGE_ENCODER: "openvino-int8"} and record["passed"]
    assert "openvino-fp32 faster, but in no pair whose gate passed" in decision(
        measured[schema.TEXT_ENCODER], choice[schema.TEXT_ENCODER])
    # a slower-than-FP32 variant (openvino-fp32 image, interval below 1) is never chosen
    assert choose_pair({schema.IMAGE_ENCODER: measured[schema.IMAGE_ENCODER]}, [], {})[0] == {
        schema.IMAGE_ENCODER: REFERENCE}
    # a point estimate above 1 is not enough: the whole interval must lie above 1
    unsure = {schema.TEXT_ENCODER: {"aa": {"stable": True}, "variants": {
        "fp32": {"speedup_vs_fp32": _speedup(1, 1, 1)}, "int8": {"speedup_vs_fp32": _speedup(1.3, 0.98, 1.6)}}}}
    assert choose_pair(unsure, [combo("int8", "fp32", True)])[0] == {schema.TEXT_ENCODER: REFERENCE}
    assert "no variant's speed-up interval" in decision(unsure[schema.TEXT_ENCODER], REFERENCE)
    # an unstable A/A arm: the machine, not the code, would decide, so the reference stays
    noisy = {schema.IMAGE_ENCODER: {**measured[schema.IMAGE_ENCODER], "aa": {"stable": False, "why": "drift"}}}
    assert choose_pair(noisy, everything)[0] == {schema.IMAGE_ENCODER: REFERENCE}
    assert decision(noisy[schema.IMAGE_ENCODER], REFERENCE).startswith("A/A unstable")
    # the openvino target serves OpenVINO variants only: its fallback is OpenVINO FP32
    ov_only = {m: {**measured[m], "variants": {v: r for v, r in measured[m]["variants"].items() if v != "int8"}}
               for m in measured}
    pairs = everything + [combo("openvino-fp32", "openvino-fp32", True)]
    slow = {m: {**ov_only[m], "variants": {v: {"speedup_vs_fp32": _speedup(0.95, 0.9, 1.0)}
                                           for v in ov_only[m]["variants"]}} for m in ov_only}
    assert choose_pair(slow, pairs, {}, "openvino-fp32")[0] == {
        schema.TEXT_ENCODER: "openvino-fp32", schema.IMAGE_ENCODER: "openvino-fp32"}
    # a user's --serve-variant is kept and the rest is chosen around it
    choice, _ = choose_pair({schema.IMAGE_ENCODER: measured[schema.IMAGE_ENCODER]}, everything,
                            {schema.TEXT_ENCODER: "openvino-fp32"})
    assert choice == {schema.IMAGE_ENCODER: "openvino-int8"}


@pytest.fixture(scope="module")
def tuned_repository(exported_repository, tmp_path_factory) -> Path:
    """A copy of the session export, tuned on this machine (3 rounds: a smoke run of the method)."""
    root = tmp_path_factory.mktemp("tuned") / "repository"
    shutil.copytree(exported_repository, root)
    tune_repository(root, rounds=3)
    return root


def test_tune_records_the_machine_the_numbers_and_a_consistent_choice(tuned_repository):
    manifest = manifest_of(tuned_repository)
    tuning = manifest["tuning"]
    assert tuning["machine"]["cpu"] and tuning["machine"]["usable_cores"] >= 1
    assert isinstance(tuning["machine"]["flags"], list)
    for member in ENCODERS:
        record = tuning["members"][member]
        aa = record["aa"]  # ORT FP32 against itself, interleaved like every variant
        assert aa["stable"] in (True, False, None) and aa["interval"]["rounds"] == 3 == record["rounds"]
        assert all(len(t) == 3 for t in record["aa_ms_per_round"].values())
        measured = record["variants"]
        assert REFERENCE in measured and measured[REFERENCE]["speedup_vs_fp32"]["point"] == 1.0
        for name, numbers in measured.items():
            assert len(numbers["median_ms"]) == 2 and all(v > 0 for v in numbers["median_ms"].values())
            assert all(len(t) == 3 for t in numbers["ms_per_round"].values())
            speedup = Interval.from_dict(numbers["speedup_vs_fp32"])
            assert speedup.low <= speedup.point <= speedup.high and speedup.rounds == 3, name
        chosen = tuning["chosen"][member]
        assert manifest["models"][member]["served_variant"] == chosen
        assert tuning["decisions"][member]
        if chosen != REFERENCE:  # chosen only when clearly faster than ORT FP32, on a stable machine
            assert Interval.from_dict(measured[chosen]["speedup_vs_fp32"]).low > 1.0
            assert measured[chosen]["faster_than_fp32"] == "met" and aa["stable"] is not False
        spec = VARIANTS[chosen]
        assert served_runtime(tuned_repository, member) == (spec.runtime, spec.precision)
        merged = parse((tuned_repository / schema.ITEM_ENCODER / "config.pbtxt").read_text()).parameters
        assert (merged[f"{member}.runtime"].string_value, merged[f"{member}.precision"].string_value) \
            == (spec.runtime, spec.precision), "the merged item_encoder must run what the member serves"
        served = manifest["models"][member]["variants"][chosen]
        assert served["path"] == f"{member}/1/model.onnx"
        assert sha256_file(tuned_repository / served["path"]) == served["sha256"]
        for entry in manifest["models"][member]["variants"].values():  # every admitted graph still on disk
            if entry.get("path"):
                assert sha256_file(tuned_repository / entry["path"]) == entry["sha256"]


def test_tune_gates_every_candidate_again_on_this_machine(tuned_repository):
    """The gate set export saved reproduces export's own gates here (same inputs, same machine),
    and every pair tune could serve was gated on this machine."""
    manifest = manifest_of(tuned_repository)
    gated = manifest["tuning"]["gates"]
    for member in ENCODERS:
        here = gated["members"][member]
        measured = manifest["tuning"]["members"][member]["variants"]
        assert set(measured) - {REFERENCE} <= set(here), "every timed candidate passed its gate here"
        for variant, gate in here.items():
            assert gate["evaluated_on"].endswith("on this machine")
            at_export = manifest["models"][member]["variants"][variant]["gate"]
            assert gate["mean_cosine"] == pytest.approx(at_export["mean_cosine"], abs=1e-4), (member, variant)
            assert gate["neighbour_agreement"] == pytest.approx(at_export["neighbour_agreement"], abs=0.02)
    served = {m: manifest["models"][m]["served_variant"] for m in ENCODERS}
    if any(v != REFERENCE for v in served.values()):
        pair = next(c for c in gated["combinations"] if c["variants"] == served)
        assert pair["passed"]


def test_tune_renders_the_repository_again_and_keeps_what_it_does_not_own(exported_repository, tmp_path):
    """`mmrec tune` never edits in place: it renders the repository again from the new choice
    beside it and swaps it in. Files no rendering owns (a published catalog, the fusion
    checkpoint, the gate set) come along; graphs are placed once, where the new plan keeps them."""
    from mmrec.export.manifest import Manifest
    from mmrec.export.render import plan_from_manifest
    from mmrec.export.repository import all_configs, render

    root = tmp_path / "repository"
    shutil.copytree(exported_repository, root)
    catalog = root / "catalog_scorer" / "3" / "index.bin"  # what `mmrec index` publishes later
    catalog.parent.mkdir(parents=True)
    catalog.write_bytes(b"catalog of version 3")
    (catalog.parent.parent / "config.pbtxt").write_text('name: "catalog_scorer"\n')
    served_code = RepositoryLayout(root).python_model(schema.ITEM_ENCODER)
    served_code.write_text(served_code.read_text() + "# the code this repository was exported with\n")
    before = manifest_of(root)
    serve_variants(root, {schema.TEXT_ENCODER: "int8"})
    after = manifest_of(root)
    assert catalog.read_bytes() == b"catalog of version 3"
    assert (catalog.parent.parent / "config.pbtxt").read_text() == 'name: "catalog_scorer"\n'
    assert served_code.read_text().endswith("# the code this repository was exported with\n"), \
        "tune changes the served choice, not the code the repository runs"
    assert RepositoryLayout(root).fusion_checkpoint.is_file() and RepositoryLayout(root).gate_set_file.is_file()
    text = after["models"][schema.TEXT_ENCODER]["variants"]
    assert text["int8"]["path"] == f"{schema.TEXT_ENCODER}/1/model.onnx"
    assert text["int8"]["sha256"] == before["models"][schema.TEXT_ENCODER]["variants"]["int8"]["sha256"]
    assert text["fp32"]["path"] == f"{schema.TEXT_ENCODER}/variants/fp32.onnx"  # parked, not lost
    assert text["fp32"]["sha256"] == before["models"][schema.TEXT_ENCODER]["variants"]["fp32"]["sha256"]
    assert not (root / schema.TEXT_ENCODER / "variants" / "int8.onnx").exists()  # served: not kept twice
    listed = {e["path"] for m in after["models"].values() for e in m["variants"].values() if e.get("path")}
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*.onnx")}
    assert on_disk == listed, "every graph on disk is one the manifest names"
    # every config is exactly what the plan renders: nothing was patched after rendering
    plan = plan_from_manifest(root, Manifest.from_dict(after))
    for name, config in all_configs(plan).items():
        assert (root / name / "config.pbtxt").read_text() == render(config), name
    assert not list(tmp_path.glob(".repository.*")), "no staging folder left behind"


def _sabotage(graph: Path) -> None:
    """Negate the graph's output: what a CPU whose INT8 kernels overflow might as well return."""
    import onnx

    model = onnx.load(str(graph))
    output = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{output}_raw" if name == output else name for name in node.output]
    model.graph.node.append(onnx.helper.make_node("Neg", [f"{output}_raw"], [output]))
    onnx.save(model, str(graph))


def test_tune_refuses_a_variant_that_fails_its_gate_on_this_machine(exported_repository, tmp_path):
    """A candidate export admitted but that fails here is neither timed nor served; pinned, it stops tune."""
    from mmrec.export.tuning import TuneError

    root = tmp_path / "repository"
    shutil.copytree(exported_repository, root)
    manifest = manifest_of(root)
    int8 = manifest["models"][schema.TEXT_ENCODER]["variants"]["int8"]
    assert int8["written"], "the session export admitted text INT8 (its gate passed at export)"
    _sabotage(root / int8["path"])
    tuning = tune_repository(root, runtimes=("onnxruntime",), rounds=3)
    verdict = tuning["gates"]["members"][schema.TEXT_ENCODER]["int8"]
    assert not verdict["passed"] and any("cosine" in r for r in verdict["reasons"])
    assert "int8" not in tuning["members"][schema.TEXT_ENCODER]["variants"]
    assert manifest_of(root)["models"][schema.TEXT_ENCODER]["served_variant"] != "int8"
    assert all(c["variants"][schema.TEXT_ENCODER] != "int8" for c in tuning["gates"]["combinations"])
    with pytest.raises(TuneError, match="fails its quality gate on this machine"):
        tune_repository(root, runtimes=("onnxruntime",), rounds=3, fixed={schema.TEXT_ENCODER: "int8"})


@needs_openvino
def test_openvino_variants_serve_through_triton(exported_repository, reference, tmp_path):
    """Serve the text encoder on OpenVINO FP32 and the image encoder on OpenVINO running the INT8
    graph (or FP32 where INT8 failed its gate) in the real Triton; results match the
    in-process pipeline on the same runtimes and stay within the gates of ORT FP32."""
    from mmrec.client import MMRecClient
    from mmrec.server import ServerConfig, TritonServer, free_ports

    root = tmp_path / "repository"
    shutil.copytree(exported_repository, root)
    manifest = manifest_of(root)
    image = "openvino-int8" if manifest["models"][schema.IMAGE_ENCODER]["variants"]["openvino-int8"]["written"] \
        else "openvino-fp32"
    serve_variants(root, {schema.TEXT_ENCODER: "openvino-fp32", schema.IMAGE_ENCODER: image})
    assert parse((root / schema.IMAGE_ENCODER / "config.pbtxt").read_text()).parameters["runtime"].string_value \
        == "openvino"
    merged = parse((root / schema.ITEM_ENCODER / "config.pbtxt").read_text()).parameters
    assert merged["image_encoder.runtime"].string_value == merged["text_encoder.runtime"].string_value == "openvino"

    texts = ["a red apple on a white plate", "rocket ship " * 60, "a yellow daisy"]
    images = [p.read_bytes() for p in known_photos()[:3]]
    local = ReferencePipeline(root).encode_items(texts, images)
    fp32 = reference.encode_items(texts, images)
    http, grpc, metrics_port = free_ports(3)
    config = ServerConfig(repository=root, http_port=http, grpc_port=grpc, metrics_port=metrics_port)
    with TritonServer(config, log_path=tmp_path / "tritonserver.log", ready_timeout_s=180) as server:
        with MMRecClient(server.urls["grpc"]) as client:
            served = client.encode_items(list(zip(texts, images)))
    np.testing.assert_allclose(served.item_embedding, local[schema.ITEM_EMBEDDING], atol=1e-4)
    assert metrics.row_cosine(served.item_embedding, fp32[schema.ITEM_EMBEDDING]).min() >= 0.98


def test_length_groups_cut_padding_only_where_it_pays():
    mask = np.zeros((32, 128), np.int64)
    mask[:8] = 1  # 8 texts of 128 tokens
    mask[8:, :12] = 1  # 24 captions of 12 tokens
    groups = runtime.length_groups(mask, (16, 32, 64, 128))
    assert [(len(rows), width) for rows, width in groups] == [(24, 16), (8, 128)]
    assert sorted(np.concatenate([rows for rows, _ in groups])) == list(range(32))
    similar = np.ones((32, 40), np.int64)
    similar[:, 36:] = 0  # every row 36 tokens: one group, nothing to gain
    assert [(len(rows), width) for rows, width in runtime.length_groups(similar, (16, 32, 64))] == [(32, 40)]


def test_text_encoder_by_length_equals_the_padded_batch(exported_repository, reference):
    """Rows run at their own bucket give what the padded batch gives (mean pooling under the mask)."""
    texts = ["a cat", "rocket ship " * 60, "a red apple on a white plate", "ein Hund 🐕"] * 4
    ids, mask = reference.tokenizer(texts)
    assert ids.shape[1] == 128
    session = reference.sessions[schema.TEXT_ENCODER]
    padded = session.run(None, {schema.INPUT_IDS: ids, schema.ATTENTION_MASK: mask})[0]
    grouped = runtime.run_by_length(session, None, {schema.INPUT_IDS: ids, schema.ATTENTION_MASK: mask},
                                    schema.ATTENTION_MASK, reference.preprocess.seq_buckets)[0]
    assert len(runtime.length_groups(mask, reference.preprocess.seq_buckets)) == 2
    np.testing.assert_allclose(grouped, padded, atol=2e-5)
    np.testing.assert_allclose(reference.embed_texts(texts), padded, atol=2e-5)


def test_a_bf16_cpu_gets_bf16_plumbing_and_no_false_fp32_on_the_openvino_target(monkeypatch, tmp_path):
    """What this AVX2 machine cannot run, checked as plumbing: on a CPU whose OpenVINO reports
    BF16, bf16 is offered, the openvino target must serve it explicitly (its backend cannot force
    FP32), and both the backend config and the reference pipeline say bf16."""
    from mmrec.export.errors import ExportError
    from mmrec.export.pipeline import ExportOptions
    from mmrec.export.repository import RepositoryPlan, all_configs, render
    from mmrec.preprocess import ServedContract

    runtime.openvino_capabilities.cache_clear()
    monkeypatch.setattr(runtime, "openvino_capabilities", lambda: ("FP32", "INT8", "BF16"))
    skip_unless(runtime.unavailable_reason("openvino"))
    assert runtime.unavailable_reason("openvino", "bf16") is None
    with pytest.raises(ExportError, match="native BF16"):
        ExportOptions(output=tmp_path / "r", target=Target.openvino).validate()
    both = {schema.TEXT_ENCODER: "openvino-bf16", schema.IMAGE_ENCODER: "openvino-bf16"}
    ExportOptions(output=tmp_path / "r", target=Target.openvino, serve_variants=both).validate()
    with pytest.raises(ExportError, match="runs openvino only"):
        ExportOptions(output=tmp_path / "r", target=Target.openvino,
                      serve_variants={schema.IMAGE_ENCODER: "int8"}).validate()
    plan = RepositoryPlan(Target.openvino, ServedContract(categories=("a", "b")), {}, tmp_path / "t.json",
                          member_runtimes={m: ("openvino", "bf16") for m in ENCODERS})
    configs = all_configs(plan)
    for member in ENCODERS:
        assert configs[member].parameters["HINT_BF16"].string_value == "YES"
        (tmp_path / member).mkdir()
        (tmp_path / member / "config.pbtxt").write_text(render(configs[member]))
        assert served_runtime(tmp_path, member) == ("openvino", "bf16")
    assert "HINT_BF16" not in configs[schema.FUSION].parameters
