"""The served contract and the repository layout: one writer, one reader, one bucket rule."""
from __future__ import annotations

from dataclasses import replace

import pytest

from mmrec import schema
from mmrec.layout import RepositoryLayout
from mmrec.model_repository.lib.served_contract import (ContractError, ServedContract, normalize_buckets,
                                                        parse_buckets)

CONTRACT = ServedContract(categories=("animals", "food"), max_batch_size=8, seq_buckets=(32, 16),
                          max_text_bytes=99, image_fit="pad", item_dim=128)


def test_parameters_round_trip_through_the_one_writer_and_reader():
    parameters = CONTRACT.to_parameters()
    assert ServedContract.from_parameters(parameters) == CONTRACT
    triton = {k: {"string_value": v} for k, v in parameters.items()}  # json.loads(args["model_config"])
    assert ServedContract.from_parameters(triton) == CONTRACT
    assert ServedContract.from_json(CONTRACT.to_json()) == CONTRACT


def test_one_rule_normalizes_sequence_buckets():
    assert CONTRACT.seq_buckets == (16, 32, 128)  # sorted, max_seq_len always last
    assert normalize_buckets((256, 64, 64, 0), 128) == (64, 128)  # too long, duplicate, zero dropped
    assert replace(CONTRACT, max_seq_len=32).seq_buckets == (16, 32)
    assert parse_buckets("16, 32,64") == (16, 32, 64)
    for bad in ("16,x", "", "0,16"):
        with pytest.raises(ContractError):
            parse_buckets(bad)


def test_missing_parameters_name_the_fix():
    parameters = CONTRACT.to_parameters()
    del parameters["categories"]
    with pytest.raises(ContractError, match="re-export"):
        ServedContract.from_parameters(parameters)


def test_widths_and_member_specs_come_from_the_contract():
    members = schema.member_specs_for(CONTRACT)
    assert members[schema.FUSION].output(schema.ITEM_EMBEDDING_MEMBER).dims == (128,)
    assert members[schema.FUSION].output(schema.INTEREST_PROBS_MEMBER).dims == (2,)
    assert members[schema.TEXT_ENCODER].output(schema.TEXT_EMBEDDING).dims == (ServedContract().text_dim,)


def test_fusion_config_takes_the_item_width_as_its_hidden_width():
    from mmrec.export.models.fusion import FusionConfig

    config = FusionConfig.from_contract(CONTRACT)
    assert (config.text_dim, config.image_dim, config.hidden_dim, config.num_categories) == (384, 1280, 128, 2)


def test_layout_owns_every_path(tmp_path):
    layout = RepositoryLayout(tmp_path)
    assert layout.model_file(schema.TEXT_ENCODER) == tmp_path / "text_encoder" / "1" / "model.onnx"
    assert layout.model_file(schema.TEXT_ENCODER, "plan").name == "model.plan"
    assert layout.tokenizer_file() == tmp_path / "tokenizer" / "1" / "tokenizer.json"
    assert layout.fusion_checkpoint == tmp_path / "fusion" / "variants" / "fusion_head.safetensors"
    assert layout.variant_file(schema.IMAGE_ENCODER, "int8") == tmp_path / "image_encoder" / "variants" / "int8.onnx"
    assert layout.gate_set_file == tmp_path / "gate_set.npz"
    assert layout.read_manifest(required=False) == {}
    layout.write_contract(CONTRACT)
    assert layout.read_contract() == CONTRACT


def test_export_cli_takes_sequence_buckets(tmp_path):
    from typer.testing import CliRunner

    from mmrec.cli import app

    result = CliRunner().invoke(app, ["export", "-o", str(tmp_path / "o"), "--seq-buckets", "16,x"])
    assert result.exit_code == 2 and "--seq-buckets" in result.output
    assert "--seq-buckets" in CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200"}).output


def test_served_models_read_their_names_from_the_one_definition(exported_repository):
    """Served code spells no model or tensor name: the thin models import lib/tensor_names.py,
    whose copy in every python model folder is the source file; the names it gives the portable
    item_encoder are the ones its config and the fusion member's config carry."""
    from mmrec.export.repository import ITEM_PIPELINE_MEMBERS, parse
    from mmrec.layout import SOURCES
    from triton_models import load_served_model

    layout = RepositoryLayout(exported_repository)
    source = SOURCES.lib_file("tensor_names").read_bytes()
    for model_py in sorted(exported_repository.glob("*/1/model.py")):
        assert (model_py.parent / "tensor_names.py").read_bytes() == source, model_py
    module = load_served_model(exported_repository, schema.ITEM_ENCODER)
    engine = module.ItemEngine.__init__.__globals__  # the copy of lib/item_engine.py beside model.py
    assert engine["__file__"] == str(layout.version_dir(schema.ITEM_ENCODER) / "item_engine.py")
    assert engine["ITEM_PIPELINE_MEMBERS"] == ITEM_PIPELINE_MEMBERS
    fusion = parse(layout.config_file(schema.FUSION).read_text())
    assert engine["FUSION_OUTPUTS"] == tuple(o.name for o in fusion.output)
    assert (engine["TEXT_EMBEDDING"], engine["IMAGE_EMBEDDING"]) == tuple(i.name for i in fusion.input)
    config = parse(layout.config_file(schema.ITEM_ENCODER).read_text())
    assert module.ITEM_OUTPUTS == engine["ITEM_OUTPUTS"] == tuple(o.name for o in config.output)
    assert [i.name for i in config.input] == [schema.TEXT, schema.IMAGE, schema.PIXELS]


# ---- runner and catalog settings: one owner (lib/runner_settings.py) --------------------------

def test_runner_settings_round_trip_plain_prefixed_and_triton_forms():
    from mmrec.model_repository.lib.runner_settings import RunnerSettings

    settings = RunnerSettings(runtime="openvino", precision="bf16", intra_op_threads=2, cpu_share=2,
                              model_file="../text_encoder/1/model.onnx", seq_buckets=(16, 32),
                              length_input=schema.ATTENTION_MASK)
    for member in (None, schema.TEXT_ENCODER):
        parameters = settings.to_parameters(member)
        assert set(parameters) <= set(RunnerSettings.keys(member))
        assert RunnerSettings.from_parameters(parameters, member) == settings
        triton = {k: {"string_value": v} for k, v in parameters.items()}
        assert RunnerSettings.from_parameters(triton, member) == settings
    # a merged model's keys of one member are not another member's, nor the model's own
    prefixed = settings.to_parameters(schema.TEXT_ENCODER)
    assert RunnerSettings.from_parameters(prefixed, schema.IMAGE_ENCODER) == RunnerSettings()
    assert RunnerSettings.from_parameters(prefixed) == RunnerSettings()
    assert "seq_buckets" not in RunnerSettings().to_parameters()  # empty optional fields are left out


def test_runner_settings_refuse_what_no_runner_can_run():
    from mmrec.model_repository.lib.runner_settings import RunnerSettings, SettingsError

    for bad in ({"runtime": "tensorflow"}, {"precision": "fp8"}, {"cpu_share": "0"}, {"intra_op_threads": "x"}):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            RunnerSettings.from_parameters(bad)


def test_openvino_backend_keys_are_translated_by_the_same_owner():
    from mmrec.model_repository.lib.runner_settings import OPENVINO_BF16_KEY, RunnerSettings

    bf16 = RunnerSettings(runtime="openvino", precision="bf16", intra_op_threads=3)
    keys = bf16.to_openvino_backend()
    assert keys[OPENVINO_BF16_KEY] == "YES"
    assert RunnerSettings.from_openvino_backend(keys) == bf16
    assert OPENVINO_BF16_KEY not in RunnerSettings(runtime="openvino").to_openvino_backend()


def test_a_member_runtime_in_the_plan_reaches_its_own_merged_and_openvino_configs():
    """What a tuned plan renders for a member served on another runtime, in each kind of config
    (export and `mmrec tune` both render from the plan; nothing edits a config afterwards)."""
    from pathlib import Path

    from mmrec.export.choices import Target
    from mmrec.export.repository import RepositoryPlan, all_configs, runner_settings

    def configs(target: Target, **runtimes: tuple[str, str]):
        return all_configs(RepositoryPlan(target=target, contract=CONTRACT, member_files={}, tokenizer_file=Path("t"),
                                          member_runtimes=runtimes))

    portable = configs(Target.portable, **{schema.TEXT_ENCODER: ("openvino", "bf16")})
    own, merged = portable[schema.TEXT_ENCODER], portable[schema.ITEM_ENCODER]
    assert (runner_settings(own).runtime, runner_settings(own).precision) == ("openvino", "bf16")
    assert runner_settings(own).seq_buckets == CONTRACT.seq_buckets
    text_in_merged = runner_settings(merged, schema.TEXT_ENCODER)
    assert (text_in_merged.runtime, text_in_merged.precision) == ("openvino", "bf16")
    assert text_in_merged.model_file
    assert runner_settings(merged, schema.IMAGE_ENCODER).runtime == "onnxruntime"  # not chosen: ORT FP32
    assert not any(k.startswith(schema.SCORER + ".") for k in merged.parameters)  # not a merged member

    native = configs(Target.onnxruntime, **{schema.IMAGE_ENCODER: ("onnxruntime", "int8")})[schema.IMAGE_ENCODER]
    assert dict(native.parameters) == dict(configs(Target.onnxruntime)[schema.IMAGE_ENCODER].parameters)  # the graph is the choice

    for precision in ("bf16", "fp32"):
        openvino = configs(Target.openvino, **{schema.IMAGE_ENCODER: ("openvino", precision)})[schema.IMAGE_ENCODER]
        assert runner_settings(openvino).precision == precision


def test_catalog_settings_are_written_and_read_by_one_owner():
    from mmrec.client._catalog import catalog_info
    from mmrec.index_publish import ServeOptions
    from mmrec.model_repository.lib.runner_settings import CatalogSettings, SettingsError

    settings = CatalogSettings(max_k=50, default_k=5, intra_op_threads=1, prepacking="off")
    assert ServeOptions is CatalogSettings
    assert CatalogSettings.from_parameters(settings.to_parameters()) == settings
    config = {"parameters": {k: {"string_value": v} for k, v in settings.to_parameters().items()},
              "input": [{"name": schema.USER_EMBEDDING, "dims": [256]}], "max_batch_size": 8}
    info = catalog_info(config, schema.CATALOG_SCORER)
    assert (info.max_k, info.default_k, info.dim) == (50, 5, 256)
    for bad in ({"max_k": "5", "default_k": "6"}, {"default_k": "1"}, {"max_k": "5", "default_k": "1", "prepacking": "x"}):
        with pytest.raises(SettingsError):
            CatalogSettings.from_parameters(bad)


def test_library_modules_copied_with_the_siblings_they_import():
    """A lib module that imports a sibling (`from .x`, flat `from x` in Triton's stub) must have
    that sibling copied beside it: export's LIB_IMPORTS is checked against the code."""
    import ast

    from mmrec.export.repository import LIB_IMPORTS
    from mmrec.layout import SOURCES

    lib = SOURCES.lib_file("runtime").parent
    modules = {p.stem for p in lib.glob("*.py") if p.stem != "__init__"}
    found = {}
    for module in modules:
        tree = ast.parse((lib / f"{module}.py").read_text())
        siblings = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module in modules}
        siblings |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names if alias.name in modules}
        if siblings:
            found[module] = tuple(sorted(siblings))
    assert found == {k: tuple(sorted(v)) for k, v in LIB_IMPORTS.items()}
