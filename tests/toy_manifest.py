"""The smallest valid release manifest, for tests of writers (write_manifest, record_export)
that need a manifest but not an export."""
from __future__ import annotations

from mmrec.release_manifest import DatasetRecord, InputSource, Inputs, Manifest, MemberRecord, VariantRecord


def toy_manifest(**changes) -> Manifest:
    """One FP32 member, every required key, nothing measured; `changes` replace fields."""
    fields = dict(
        target="portable", max_batch_size=8, preprocess={}, training={}, versions={},
        models={"fusion": MemberRecord(served_variant="fp32",
                                       variants={"fp32": VariantRecord(written=True, graph="fp32")})},
        inputs=Inputs(text_model=InputSource(sha256="0" * 64), image_encoder=InputSource(sha256="1" * 64),
                      dataset=DatasetRecord(sha256="2" * 64, items=3, held_out=1)))
    return Manifest(**{**fields, **changes})
