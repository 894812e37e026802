"""The suite's "photos" section: real photos through `item_encoder`, one item per request
(concurrency 1) — a 640 x 427 JPEG vs the same photo as a 12 MP phone JPEG stored sideways
with an EXIF orientation tag (mmrec.photos), through Triton (gRPC, the suite's server) and
through the in-process reference pipeline, in alternating rounds so background load hits every
arm alike. Ratios and differences are paired by round, with intervals over rounds
(mmrec.stats); the 640 x 427 Triton arm runs twice per round as the section's A/A arm.

Quality: the served item embedding of each phone photo vs the same item encoded in-process from
a full-resolution decode (`mmrec.photos.full_resolution_pixels`, the reference the upstream
tests use), and the image embedding of the served decoder's pixels vs those of the full decode.

Run it alone with `mmrec bench --only photos`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from mmrec import metrics, schema
from mmrec.photos import full_resolution_pixels, known_photos, phone_photo
from mmrec.stats import aa_check, paired_difference, paired_ratio, round_medians

from .settings import Settings
from .timing import interleaved_rounds
from .workload import Workload

CAPTION = "A Chinese palace with a red roof."
LATENCY_PHOTO = "palace"  # 640 x 427 JPEG (scikit-learn's china.jpg)
PHONE_ORIENTATION = 6  # stored sideways: rotate 90° clockwise to view
ARMS = ("jpeg_640x427", "jpeg_12mp_exif6")
DCT_DECODE = "decode/jpeg_12mp_dct_scaled"  # libjpeg's DCT-scaled decode of the same 12 MP file, nothing else
AA_REFERENCE = f"triton/{ARMS[0]}"
AA_ARM = f"{AA_REFERENCE} (A/A)"
Tick = Callable[[int], None]
EXTRA_OVER_DECODE = 1.25  # issue 21: a 12 MP photo may add at most 1.25x its 1/4-scale decode


def _triton_caller(url: str):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)

    def call(caption: str, image: bytes) -> np.ndarray:
        text = grpcclient.InferInput(schema.TEXT, [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[caption.encode()]], dtype=object))
        picture = grpcclient.InferInput(schema.IMAGE, [1, 1], "BYTES")
        picture.set_data_from_numpy(np.array([[image]], dtype=object))
        result = client.infer(schema.ITEM_ENCODER, [text, picture],
                              outputs=[grpcclient.InferRequestedOutput(schema.ITEM_EMBEDDING)])
        return result.as_numpy(schema.ITEM_EMBEDDING)

    return client, call


def dct_scaled_decode(data: bytes, decoder) -> tuple[int, int]:
    """The floor for a phone photo's cost: libjpeg-turbo decoding the file at the DCT scale the
    served decoder asks for (`ImageDecoder.needed_scale`: 1/4 for a 12 MP photo and the crop
    fit), nothing else (no rotation, resize or normalization). Returns the decoded size."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(data))
    decoder.draft(image)  # the served decoder's own choice of scale
    image.load()
    return image.size


def photo_quality(pipeline, contract, triton_call, photos) -> dict:
    """Cosine of the served item embedding of each 12 MP phone photo to the in-process item
    embedding from a full-resolution decode, and of the image embedding of the served decoder's
    pixels to that of the full decode."""
    served_item, image = {}, {}
    for photo in photos:
        data = phone_photo(photo, PHONE_ORIENTATION)
        full = full_resolution_pixels(data, contract)
        reference = pipeline.encode_items_pixels([CAPTION], full)[schema.ITEM_EMBEDDING]
        served_item[photo.name] = float(metrics.row_cosine(triton_call(CAPTION, data), reference)[0])
        image[photo.name] = float(metrics.row_cosine(pipeline.embed_pixels(pipeline.preprocess_images([data])),
                                                     pipeline.embed_pixels(full))[0])
    values = [*served_item.values(), *image.values()]
    return {"item_embedding_served": served_item, "image_embedding_in_process_decoder": image,
            "min": min(values), "photos": len(photos),
            "what": "min over served item embedding and decoder image embedding vs full-resolution decode"}


def run_photos(workload: Workload, settings: Settings, threads: int, step: Callable[[str, int], Tick],
               server: Callable[[], object]) -> dict:
    """The whole section; `server()` is the suite's (lazily started) tritonserver."""
    from mmrec.reference import ReferencePipeline, in_process_encoder

    rounds, per_round = settings.photo_rounds, settings.photo_per_round
    tick = step(f"photos: 640x427 vs 12 MP JPEG, Triton and in-process, {rounds} rounds x {per_round}",
                rounds + 2)
    srv = server()
    palace = next(p for p in known_photos() if p.name == LATENCY_PHOTO)
    payloads = {ARMS[0]: palace.read_bytes(), ARMS[1]: phone_photo(palace, PHONE_ORIENTATION)}
    pipeline = ReferencePipeline(workload.repository, intra_op_threads=threads)  # the quality reference
    in_process = in_process_encoder(workload.repository, intra_op_threads=threads)  # the timed arm
    client, triton_call = _triton_caller(srv.urls["grpc"])
    try:
        arms = {f"triton/{n}": (lambda d=d: triton_call(CAPTION, d)) for n, d in payloads.items()}
        arms[AA_ARM] = arms[AA_REFERENCE]
        arms.update({f"in_process/{n}": (lambda d=d: in_process.encode_items([CAPTION], [d]))
                     for n, d in payloads.items()})
        arms[DCT_DECODE] = lambda: dct_scaled_decode(payloads[ARMS[1]], workload.decoder)
        for call in arms.values():  # warm-up: sessions, arenas, python stubs
            for _ in range(settings.photo_warmup):
                call()
        tick(1)
        samples = interleaved_rounds(arms, rounds, per_round, tick)
        photos = known_photos() if settings.photo_cosine_all else [palace]
        quality = photo_quality(pipeline, workload.preprocess, triton_call, photos)
        tick(1)
    finally:
        client.close()
        in_process.close()
    p50 = {k: float(np.median([x for r in v for x in r])) for k, v in samples.items() if k != AA_ARM}
    round_p50 = {k: round_medians(v) for k, v in samples.items()}
    pairs = {"triton_12mp_over_640": ("triton/jpeg_12mp_exif6", "triton/jpeg_640x427"),
             "in_process_12mp_over_640": ("in_process/jpeg_12mp_exif6", "in_process/jpeg_640x427"),
             "triton_over_in_process_640": ("triton/jpeg_640x427", "in_process/jpeg_640x427"),
             "triton_over_in_process_12mp": ("triton/jpeg_12mp_exif6", "in_process/jpeg_12mp_exif6")}
    ratios = {}
    for key, (a, b) in pairs.items():
        interval = paired_ratio(round_p50[a], round_p50[b])
        ratios[key] = {"p50_ratio": interval.point, "interval": interval.to_dict()}
    diff = paired_difference(round_p50["triton/jpeg_640x427"], round_p50["in_process/jpeg_640x427"])
    # what a 12 MP photo adds over a 640x427 one, against the DCT-scaled decode of the same file
    extra = [a - b for a, b in zip(round_p50["triton/jpeg_12mp_exif6"], round_p50["triton/jpeg_640x427"])]
    floor = round_p50[DCT_DECODE]
    decoded = dct_scaled_decode(payloads[ARMS[1]], workload.decoder)
    over_floor = paired_difference(extra, [EXTRA_OVER_DECODE * f for f in floor])
    extra_over_decode = {"point": float(np.mean(extra) / np.mean(floor)), "extra_ms_per_round": extra,
                         "dct_decode_ms_per_round": floor, "dct_decoded_size": list(decoded),
                         "allowed": EXTRA_OVER_DECODE,
                         f"extra_minus_{EXTRA_OVER_DECODE:g}x_decode_ms": over_floor.to_dict(3)}
    aa = {**aa_check(paired_ratio(round_p50[AA_REFERENCE], round_p50[AA_ARM])), "arm": f"{AA_REFERENCE} twice per round"}
    return {"caption": CAPTION, "photo": LATENCY_PHOTO, "payload_bytes": {k: len(v) for k, v in payloads.items()},
            "rounds": rounds, "per_round": settings.photo_per_round,
            "samples_per_arm": {k: sum(map(len, v)) for k, v in samples.items()},
            "p50_ms": p50, "p50_ms_per_round": round_p50, "aa": aa, "ratios": ratios, "triton_minus_in_process_p50_ms_640": diff.to_dict(3),
            "extra_12mp_over_dct_decode": extra_over_decode,
            "cosine": quality, "reference_threads": threads, "in_process": in_process.kind}
