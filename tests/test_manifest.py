"""The typed release manifest (mmrec.release_manifest): exact round trips of real manifests, old
and new, unknown keys kept, absent keys not invented, and missing keys named."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from mmrec import schema
from mmrec.export.manifest import write_manifest
from mmrec.layout import RepositoryLayout
from mmrec.release_manifest import (MANIFEST_FILE, Manifest, ManifestError, MemberRecord, TuningRecord,
                                    VariantRecord)
from toy_manifest import toy_manifest

ROOT = Path(__file__).resolve().parents[1]
# the committed record of a default export after `mmrec tune` (README's export block renders it)
EXPORT_RECORD = ROOT / "benchmarks" / "results" / "export" / "export_report.json"
# keys later exports added: a manifest written before them has none of these
NEWER_TOP_KEYS = ("build", "tuning", "served_combination", "combinations", "admission", "files")


def raw(repository: Path) -> dict:
    return json.loads((repository / MANIFEST_FILE).read_text())


def tuned_manifest() -> dict:
    manifest = json.loads(EXPORT_RECORD.read_text())["manifest"]
    assert "tuning" in manifest and "served_combination" in manifest, "the committed export record was tuned"
    return manifest


def old_manifest(current: dict) -> dict:
    """`current` as an export before `build`, tuning, combinations, the image fit and the
    train/validation split wrote it."""
    old = {k: copy.deepcopy(v) for k, v in current.items() if k not in NEWER_TOP_KEYS}
    del old["preprocess"]["image_fit"]
    for key in ("train", "validation"):
        del old["inputs"]["dataset"][key]
    for member in old["models"].values():
        for variant in member["variants"].values():
            for key in ("graph", "runtime", "precision"):
                variant.pop(key, None)
    return old


def test_the_real_export_round_trips_byte_for_byte(exported_repository):
    text = (exported_repository / MANIFEST_FILE).read_text()
    manifest = RepositoryLayout(exported_repository).load_manifest()
    assert manifest.to_dict() == json.loads(text)
    assert manifest.to_json() == text  # what write_manifest writes: the same bytes
    assert manifest.served_variants() == {m: "fp32" for m in schema.ONNX_MODELS}  # the fixture is tune=False
    text_encoder = manifest.models[schema.TEXT_ENCODER]
    assert text_encoder.served is text_encoder.variants["fp32"]
    assert text_encoder.served.path == f"{schema.TEXT_ENCODER}/1/model.onnx"
    assert manifest.inputs.dataset.sha256 == raw(exported_repository)["inputs"]["dataset"]["sha256"]
    assert manifest.contract == RepositoryLayout(exported_repository).read_contract()


def test_a_tuned_manifest_round_trips():
    data = tuned_manifest()
    manifest = Manifest.from_dict(data)
    assert manifest.to_dict() == data
    assert manifest.tuning.chosen == data["tuning"]["chosen"]
    for member, variant in manifest.tuning.chosen.items():
        assert manifest.models[member].served_variant == variant
    assert manifest.served_combination.variants == data["served_combination"]["variants"]


def test_an_old_manifest_round_trips_without_invented_keys(exported_repository):
    data = old_manifest(raw(exported_repository))
    manifest = Manifest.from_dict(data)
    assert manifest.to_dict() == data
    assert manifest.build is None and manifest.tuning is None and manifest.files is None
    assert manifest.inputs.dataset.train is None
    assert manifest.contract.image_fit == "pad"  # the legacy fit, read but not written back
    assert "image_fit" not in manifest.to_dict()["preprocess"]


def test_unknown_keys_are_kept_at_every_level(exported_repository):
    data = raw(exported_repository)
    data["signed_by"] = {"key": "abc"}
    data["models"][schema.TEXT_ENCODER]["notes"] = "newer member key"
    data["models"][schema.TEXT_ENCODER]["variants"]["int8"]["calibration"] = {"texts": 64}
    data["inputs"]["dataset"]["licence"] = "GPL-2.0"
    data["build"]["branch"] = "main"
    manifest = Manifest.from_dict(data)
    assert manifest.extra == {"signed_by": {"key": "abc"}}
    assert manifest.models[schema.TEXT_ENCODER].variants["int8"].extra == {"calibration": {"texts": 64}}
    assert manifest.to_dict() == data


def test_a_rewrite_by_this_code_keeps_what_it_does_not_know(tmp_path):
    """write_manifest (admission, tune) on a newer manifest: its unknown keys and explicit nulls
    survive; only `files` is recomputed."""
    (tmp_path / "a.txt").write_text("x")
    data = {**toy_manifest().to_dict(), "signed_by": "release-bot", "admission": None}
    data["models"]["fusion"]["variants"]["fp32"]["calibration"] = [1, 2]
    write_manifest(tmp_path, Manifest.from_dict(data))
    written = raw(tmp_path)
    assert written["signed_by"] == "release-bot" and written["admission"] is None
    assert written["models"]["fusion"]["variants"]["fp32"]["calibration"] == [1, 2]
    assert [f["path"] for f in written["files"]] == ["a.txt"]


def test_tuning_records_are_typed_where_code_reads_them():
    tuning = TuningRecord.from_dict(tuned_manifest()["tuning"])
    member = next(iter(tuning.members.values()))
    assert member.variants["fp32"].speedup_vs_fp32["point"] == 1.0  # the reference against itself
    assert tuning.machine.usable_cores >= 1 and tuning.rule


@pytest.mark.parametrize("path", ["target", "models", "inputs.dataset.sha256", "models.fusion.served_variant",
                                  "models.fusion.variants", "tuning.machine.cpu", "build.commit"])
def test_a_missing_required_key_is_named(path):
    data = toy_manifest(tuning=TuningRecord.from_dict(tuned_manifest()["tuning"])).to_dict()
    data["build"] = {"commit": None, "dirty": None}  # required keys whose value may be null
    Manifest.from_dict(data)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    del node[last]
    with pytest.raises(ManifestError, match=f"`{path}` is missing"):
        Manifest.from_dict(data)


def test_a_value_of_the_wrong_kind_is_named():
    data = toy_manifest().to_dict()
    data["max_batch_size"] = "32"
    with pytest.raises(ManifestError, match="`max_batch_size` must be int, got str"):
        Manifest.from_dict(data)
    data = toy_manifest().to_dict()
    data["models"]["fusion"]["variants"] = ["fp32"]
    with pytest.raises(ManifestError, match="`models.fusion.variants` must be object, got list"):
        Manifest.from_dict(data)
    data = toy_manifest().to_dict()
    data["target"] = None  # required and not nullable (unlike build.commit)
    with pytest.raises(ManifestError, match="`target` is null"):
        Manifest.from_dict(data)


def test_a_served_variant_that_is_not_recorded_is_refused():
    data = toy_manifest().to_dict()
    data["models"]["fusion"]["served_variant"] = "int8"
    with pytest.raises(ManifestError, match="models.fusion.served_variant.*'int8'.*\\['fp32'\\]"):
        Manifest.from_dict(data)


def test_load_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `mmrec export` first"):
        Manifest.load(tmp_path)
    assert Manifest.load(tmp_path, required=False) is None
    assert RepositoryLayout(tmp_path).load_manifest(required=False) is None
    data = toy_manifest().to_dict()
    del data["inputs"]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=f"{tmp_path / MANIFEST_FILE}: `inputs` is missing.*re-export"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match="is not JSON"):
        Manifest.load(tmp_path)


def test_a_manifest_built_in_code_writes_and_reads_back(tmp_path):
    """What export and tune do with the records: add variants, choose the served one, write."""
    manifest = toy_manifest(models={})
    member = manifest.models.setdefault(schema.TEXT_ENCODER, MemberRecord(served_variant="fp32"))
    member.add("fp32", VariantRecord(written=True, graph="fp32", runtime="onnxruntime", precision="fp32",
                                     parity={"max_abs_error": 1e-7}))
    member.add("int8", VariantRecord(written=False, graph="int8", gate={"passed": False, "reasons": ["cos 0.9"]}))
    member.add("openvino-int8", VariantRecord(written=False, skipped="openvino is not installed"))
    with pytest.raises(ManifestError, match="cannot serve 'fp16'"):
        member.serve("fp16")
    assert member.served.parity == {"max_abs_error": 1e-7}
    assert [v for v, e in member.variants.items() if e.left_out] == ["int8", "openvino-int8"]
    assert member.variants["int8"].gate_reasons == ["cos 0.9"] and member.variants["fp32"].gate_reasons == []
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    write_manifest(tmp_path, manifest)
    back = Manifest.load(tmp_path)
    assert back == manifest  # write_manifest filled build and files on the record it wrote
    assert back.build is not None and [f.path for f in back.files] == ["model.onnx"]
    assert "path" not in raw(tmp_path)["models"][schema.TEXT_ENCODER]["variants"]["int8"]  # absent stays absent


def test_a_dict_handed_to_write_manifest_is_checked_and_completed(tmp_path):
    """Writers still building dicts (export, tune) get the same checks and see build and files."""
    with pytest.raises(ManifestError, match="`format`, `target`, `max_batch_size`, .* are missing"):
        write_manifest(tmp_path, {"models": {}})
    data = toy_manifest().to_dict()
    write_manifest(tmp_path, data)
    assert data == raw(tmp_path) and "build" in data and data["files"] == []



def test_a_manifest_of_a_newer_format_or_a_flag_for_a_number_is_refused():
    """A newer layout is not read (so admit or tune never rewrite what they do not understand),
    and True is no batch size."""
    from mmrec.release_manifest import FORMAT

    data = toy_manifest().to_dict()
    with pytest.raises(ManifestError, match="newer than this mmrec reads"):
        Manifest.from_dict({**data, "format": FORMAT + 1})
    with pytest.raises(ManifestError, match="`max_batch_size` must be int"):
        Manifest.from_dict({**data, "max_batch_size": True})
