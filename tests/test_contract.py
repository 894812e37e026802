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
    assert layout.read_manifest(required=False) == {}
    layout.write_contract(CONTRACT)
    assert layout.read_contract() == CONTRACT


def test_export_cli_takes_sequence_buckets(tmp_path):
    from typer.testing import CliRunner

    from mmrec.cli import app

    result = CliRunner().invoke(app, ["export", "-o", str(tmp_path / "o"), "--seq-buckets", "16,x"])
    assert result.exit_code == 2 and "--seq-buckets" in result.output
    assert "--seq-buckets" in CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200"}).output


def test_merged_item_encoder_uses_the_schema_names(exported_repository):
    """The portable item_encoder (one python model, item_pipeline/model.py) hard-codes the member
    tensor names like the other thin models: they must be the schema's."""
    from mmrec.export.repository import ITEM_PIPELINE_MEMBERS, parse
    from triton_models import load_served_model

    module = load_served_model(exported_repository, schema.ITEM_ENCODER)
    assert module.MEMBERS == ITEM_PIPELINE_MEMBERS
    assert (module.INPUT_IDS, module.ATTENTION_MASK, module.PIXEL_VALUES, module.TEXT_EMBEDDING,
            module.IMAGE_EMBEDDING) == (schema.INPUT_IDS, schema.ATTENTION_MASK, schema.PIXEL_VALUES,
                                        schema.TEXT_EMBEDDING, schema.IMAGE_EMBEDDING)
    assert module.FUSION_OUTPUTS == (schema.ITEM_EMBEDDING_MEMBER, schema.INTEREST_PROBS_MEMBER,
                                     schema.ALIGNMENT_MEMBER)
    config = parse(RepositoryLayout(exported_repository).config_file(schema.ITEM_ENCODER).read_text())
    assert module.PUBLIC_OUTPUTS == tuple(o.name for o in config.output)
    assert [i.name for i in config.input] == [schema.TEXT, schema.IMAGE]
