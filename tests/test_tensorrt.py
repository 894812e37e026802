"""TensorRT: profile logic everywhere; engine builds only where a GPU and tensorrt exist."""
from __future__ import annotations

import pytest

from mmrec import schema
from mmrec.export.errors import ExportError
from mmrec.export.pipeline import ExportOptions, Exporter
from mmrec.export.repository import Target
from mmrec.export.tensorrt import batch_profiles, tensorrt_unavailable_reason

GPU_MISSING = tensorrt_unavailable_reason()


def test_profiles_cover_max_batch_and_every_sequence_bucket():
    specs = schema.member_specs(12)
    dims = {t.name: t.dims for t in specs[schema.TEXT_ENCODER].inputs}
    profiles = batch_profiles(dims, max_batch=32, seq_buckets=(16, 32, 64, 128))
    assert len(profiles) == 4
    for profile, seq in zip(profiles, (16, 32, 64, 128)):
        lo, opt, hi = profile.shapes[schema.INPUT_IDS]
        assert lo == (1, seq) and hi == (32, seq) and lo[0] <= opt[0] <= hi[0]
    image = batch_profiles({t.name: t.dims for t in specs[schema.IMAGE_ENCODER].inputs}, 32)
    assert len(image) == 1 and image[0].shapes[schema.PIXEL_VALUES][2] == (32, 3, 224, 224)


@pytest.mark.skipif(GPU_MISSING is None, reason="a GPU with TensorRT is present")
def test_tensorrt_target_without_gpu_fails_early_naming_what_is_missing(tmp_path):
    with pytest.raises(ExportError, match="target tensorrt needs a GPU build machine"):
        Exporter(ExportOptions(output=tmp_path / "trt", target=Target.tensorrt)).run()
    assert not (tmp_path / "trt").exists()


@pytest.mark.gpu
@pytest.mark.skipif(GPU_MISSING is not None, reason=f"TensorRT engine build skipped: {GPU_MISSING}")
def test_tensorrt_export_builds_plans_with_profiles(tmp_path):  # pragma: no cover - GPU only
    import tensorrt as trt

    output = tmp_path / "trt"
    Exporter(ExportOptions(output=output, target=Target.tensorrt, precisions=("fp32",))).run()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((output / schema.TEXT_ENCODER / "1" / "model.plan").read_bytes())
    assert engine.num_optimization_profiles == 4
    lo, _, hi = engine.get_tensor_profile_shape(schema.INPUT_IDS, 0)
    assert lo[0] == 1 and hi[0] == 32
