"""Which Triton models each HPA signal must select, per repository target, from the export's configs.

What executes differs by target: on `portable` item_encoder is one python model (the item
engine) that the other item entries route through, and its members stay unloaded; on
`onnxruntime`/`tensorrt` item_encoder is an ensemble of loaded members. An ensemble's counters
are the sum of its steps (its compute time is its members' compute, one execution per request),
so a time-based signal must select what executes, and a count of items must select each item
once. These sets come from the configs `mmrec export` writes (export/repository.py
`all_configs`) and the models a replica serves (mmrec/layout.py `served_models`), plus
catalog_scorer, which `mmrec index` writes (not the export) and every target may serve: its
load must reach the time-based signals too (a model a replica has not loaded has no series, so
selecting it costs nothing). tests/test_deploy.py checks the chart against these sets.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from mmrec import schema
from mmrec.layout import served_models

TARGETS = ("portable", "onnxruntime", "tensorrt")
ITEM_ENTRIES = (schema.ITEM_ENCODER, schema.ITEM_ENCODER_PIXELS, schema.INTEREST_SCORER)  # carry client items


@lru_cache(maxsize=None)
def _served(target: str) -> dict:
    """model -> ModelConfig of what a replica of `target` serves (explicit model control)."""
    from mmrec.export.choices import Target
    from mmrec.export.repository import RepositoryPlan, all_configs
    from mmrec.preprocess import ServedContract

    plan = RepositoryPlan(Target(target), ServedContract(categories=("a", "b")), {}, Path("tokenizer.json"),
                          gpu=target != "portable")
    configs = all_configs(plan)
    return {name: configs[name] for name in sorted(served_models(configs))}


def _steps(config) -> list[str]:
    return [step.model_name for step in config.ensemble_scheduling.step]


# Models outside the export that run batches on a replica of any target (written by `mmrec index`).
INDEX_MODELS = (schema.CATALOG_SCORER,)


def executing(target: str) -> tuple[str, ...]:
    """Models that run batches themselves (not ensembles), the index's included: the busy
    fraction and the queue:compute ratio read these."""
    exported = [n for n, c in _served(target).items() if c.platform != "ensemble"]
    return tuple(sorted({*exported, *INDEX_MODELS}))


def item_counters(target: str) -> tuple[str, ...]:
    """Where each item a client sends is counted exactly once: the item entries that do not
    route through another item entry (portable: item_encoder alone, which the two other
    entries call; elsewhere the three ensembles, each over its own members)."""
    served = _served(target)

    def routes_through_entry(name: str) -> bool:
        return served[name].platform == "ensemble" and any(m in ITEM_ENTRIES for m in _steps(served[name]))

    return tuple(n for n in ITEM_ENTRIES if n in served and not routes_through_entry(n))


def admission_points(target: str) -> tuple[str, ...]:
    """The models whose queues an admission policy sheds from: the first executing model on
    each item path (item_encoder itself where it executes)."""
    served = _served(target)
    out: list[str] = []
    for name in item_counters(target):
        first = name
        while served[first].platform == "ensemble":
            first = _steps(served[first])[0]
        if first not in out:
            out.append(first)
    return tuple(out)


def min_instances(target: str) -> int:
    """The fewest instances any executing model runs (the busy fraction of that model cannot pass it)."""
    return min(sum(g.count for g in c.instance_group) or 1 for n, c in _served(target).items()
               if c.platform != "ensemble")


def by_target(select) -> dict[str, tuple[str, ...]]:
    """{target: models} for a selector, with identical lists folded into `default` (the chart's
    podsMetrics[].models map form)."""
    per = {t: select(t) for t in TARGETS}
    common = per["onnxruntime"]
    out = {t: m for t, m in per.items() if m != common}
    out["default"] = common
    return out
