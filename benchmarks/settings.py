"""What a benchmark run measures and for how long: one `Settings` per mode (full, quick).

Every time budget is a named field here, so the report can record exactly what produced its
numbers and `--quick` is a different object, not scattered if-statements.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from mmrec.admission import DEFAULT_SLO_MS  # the p99 bound of capacity (`mmrec bench --slo-ms`)

SECTIONS = ("offline", "roofline", "serving", "perf_analyzer", "photos", "engine", "capacity", "overload", "quality")
MODELS = ("text_encoder", "image_encoder", "fusion", "pipeline")
PROTOCOLS = ("grpc", "http")


@dataclass(frozen=True)
class Budget:
    """Time-bounded repetition: warm up, then repeat until `min_reps` samples over at least
    `measure_s` are reached, or `max_s` of measurement with at least `floor_reps` (a slow case),
    or `max_reps` (a very fast one). FULL: every case gets >= 100 samples, or >= 5 s and >= 10."""

    warmup_s: float
    measure_s: float
    min_reps: int
    max_reps: int = 10_000
    min_warmup_reps: int = 1
    max_s: float = math.inf
    # a slow case (a 1.5 s call) still gets this many samples past max_s: a median of 3 is noise
    floor_reps: int = 1


@dataclass(frozen=True)
class Settings:
    mode: str
    # offline backend comparison
    batches: tuple[int, ...]
    seq_lens: tuple[int, ...]
    offline: Budget
    # serving sweep (per concurrency level)
    concurrency: tuple[int, ...]
    level_warmup_s: float
    level_s: float
    protocols: tuple[str, ...] = PROTOCOLS
    # Rounds are the unit of every interval (mmrec.stats): many short interleaved rounds, so
    # drift between rounds is sampled, not mistaken for a difference between arms.
    offline_rounds: int = 10  # rounds of alternating engine order per offline case (budget split)
    serving_rounds: int = 10  # rounds of alternating series order per concurrency level (time split)
    round_warmup_s: float = 0.3  # serving: untimed load at the start of every round's window
    request_batch: int = 1  # items per request in the serving sweep (perf_analyzer's -b)
    raw_client_baseline: bool = True  # also sweep plain tritonclient.grpc.aio (client overhead)
    # perf_analyzer cross-check
    pa_concurrency: tuple[int, ...] = ()
    pa_window_ms: int = 2000
    pa_max_trials: int = 6
    pa_stability_pct: int = 15
    pa_data_items: int = 32
    # roofline: square sgemm sizes timed with numpy, torch and onnxruntime
    gemm_sizes: tuple[int, ...] = (1024, 2048)
    gemm_s: float = 1.0
    roofline_rounds: int = 3  # paired sgemm-peak / encoder rounds for the largest batch
    # photos: 640x427 vs 12 MP JPEG at concurrency 1, Triton and in-process (rounds x per round
    # samples per arm: >= 100 in full), cosine to full decode on every known photo or one
    photo_rounds: int = 10
    photo_per_round: int = 12
    photo_warmup: int = 5
    photo_cosine_all: bool = True
    # engine: a batch-32 request through `mmrec serve` vs the same engine in-process (rounds x per
    # round samples per arm), and the served process tree's memory after `engine_warmup` requests
    engine_rounds: int = 10
    engine_per_round: int = 3
    engine_warmup: int = 3
    # capacity: open-loop Poisson load (MLPerf LoadGen Server scenario) on the served item_encoder;
    # the highest rate whose p99 stays under `slo_ms`, searched `capacity_trials` times per payload set
    slo_ms: float = DEFAULT_SLO_MS
    capacity_sets: tuple[str, ...] = ("jpeg_640x427", "jpeg_12mp_exif6", "recommend_100k")
    capacity_trials: int = 3
    capacity_step_s: float = 5.0  # seconds of load per rate tried
    capacity_max_steps: int = 9
    # LoadGen, then perf_analyzer, at the median capacity of the first payload set (0: skip)
    capacity_cross_check_s: float = 12.0
    # overload (benchmarks/overload.py): factors x the first set's capacity offered to a server with
    # the admission policy derived from it, `overload_rounds` rounds of `overload_round_s` each,
    # then `overload_recovery_s` at half the capacity
    overload_factors: tuple[float, ...] = (1.5, 2.0)
    overload_rounds: int = 5
    overload_round_s: float = 6.0
    overload_recovery_s: float = 5.0
    # then `overload_soak_s` at the highest factor, the server's RSS sampled throughout (0: skip)
    overload_soak_s: float = 300.0
    # two replicas on their own cores behind the spill-over client (benchmarks/spill_over.py):
    # each one's capacity searched alone (steps of `..._search_step_s`), then their sum offered
    # in `overload_pair_rounds` rounds of `overload_pair_round_s` (0 rounds: skip)
    overload_pair_rounds: int = 5
    overload_pair_round_s: float = 6.0
    overload_pair_search_step_s: float = 3.0
    overload_pair_search_steps: int = 8
    # quality drift: simulated users per category and items per user
    users_per_category: int = 4
    items_per_user: int = 5
    neighbours: int = 10
    quality_items: int | None = None  # held-out items for the drift report (None: all)
    models: tuple[str, ...] = MODELS
    sections: tuple[str, ...] = SECTIONS
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **changes) -> "Settings":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


FULL = Settings(
    mode="full",
    batches=(1, 8, 32),
    seq_lens=(16, 64, 128),
    # >= 100 samples (and >= 1 s) or >= 5 s per case, over all rounds (issue 11's method)
    offline=Budget(warmup_s=0.3, measure_s=1.0, min_reps=100, max_s=5.0, min_warmup_reps=0, floor_reps=10),
    # 10 rounds x 6 series per level (1, 2, 4 and 8 are targets, 32 is saturation); `-c` adds levels
    concurrency=(1, 2, 4, 8, 32),
    level_warmup_s=1.0,
    level_s=6.0,
    pa_concurrency=(1, 4, 8, 32),
    pa_window_ms=2000,
    gemm_sizes=(1024, 2048),
    gemm_s=1.0,
)

QUICK = Settings(
    mode="quick",
    batches=(1, 4),
    seq_lens=(16,),
    offline=Budget(warmup_s=0.0, measure_s=0.1, min_reps=2, min_warmup_reps=0),
    offline_rounds=3,
    serving_rounds=3,
    round_warmup_s=0.1,
    concurrency=(1, 4),
    level_warmup_s=0.3,
    level_s=0.8,
    pa_concurrency=(1, 4),
    pa_window_ms=500,
    pa_max_trials=3,
    pa_stability_pct=50,
    pa_data_items=4,
    gemm_sizes=(512,),
    gemm_s=0.2,
    roofline_rounds=1,
    raw_client_baseline=False,
    photo_rounds=3,
    photo_per_round=3,
    photo_warmup=1,
    photo_cosine_all=False,
    engine_rounds=3,
    engine_per_round=1,
    engine_warmup=1,
    capacity_sets=("jpeg_640x427",),
    capacity_trials=1,
    capacity_step_s=1.5,
    capacity_max_steps=4,
    capacity_cross_check_s=0.0,
    overload_rounds=3,
    overload_round_s=1.5,
    overload_recovery_s=2.0,
    overload_soak_s=3.0,
    overload_pair_rounds=2,
    overload_pair_round_s=1.5,
    overload_pair_search_step_s=0.5,
    overload_pair_search_steps=3,
    users_per_category=2,
    items_per_user=3,
    quality_items=48,
)

MODES = {"full": FULL, "quick": QUICK}
