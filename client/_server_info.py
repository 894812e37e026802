"""What the client learns from the server: the served contract, read from one model's config.

Read over the wire (never from the repository folder), so a client on another machine sees
exactly what the server runs. Export writes the whole contract (widths, batch limit, sequence
buckets, limits, categories, image recipe) into every python model's config; the client reads it
from the item model it calls (`item_encoder`, or `item_encoder_pixels` with local preprocessing)
where that is a python model (the portable target's item engine), else from the first step of
that ensemble (`item_preprocess` / `item_preprocess_pixels`, or the item engine). Only the models
the client calls need to be loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from mmrec import schema
from mmrec.preprocess import ContractError, ServedContract

from ._errors import MMRecError
from ._items import Limits


@dataclass(frozen=True)
class ModelNames:
    """Served model names; override one to talk to a renamed or versioned deployment."""

    item_encoder: str = schema.ITEM_ENCODER
    item_encoder_pixels: str = schema.ITEM_ENCODER_PIXELS
    interest_scorer: str = schema.INTEREST_SCORER
    scorer: str = schema.SCORER
    tokenizer: str = schema.TOKENIZER  # not needed by the client any more (kept for callers)
    image_preprocess: str = schema.IMAGE_PREPROCESS  # idem
    fusion: str = schema.FUSION  # idem
    catalog_scorer: str = schema.CATALOG_SCORER  # optional: checked on the first recommend(), not at connect
    item_preprocess: str = schema.ITEM_PREPROCESS
    item_preprocess_pixels: str = schema.ITEM_PREPROCESS_PIXELS

    def item_model(self, local_preprocessing: bool) -> str:
        """The item model the client calls: encoded images, or pixels it preprocessed itself."""
        return self.item_encoder_pixels if local_preprocessing else self.item_encoder

    def needed(self, local_preprocessing: bool) -> tuple[str, ...]:
        """Models that must be ready: the ones called."""
        return ((self.item_encoder_pixels, self.scorer) if local_preprocessing
                else (self.item_encoder, self.interest_scorer, self.scorer))

    def contract_model(self, configs: dict[str, dict], local_preprocessing: bool) -> str:
        """The model whose config holds the served contract: the called item model itself, or
        the first step of that ensemble (`configs` holds the called models' configs)."""
        called = self.item_model(local_preprocessing)
        config = configs.get(called) or {}
        steps = (config.get("ensemble_scheduling") or {}).get("step") or []
        return steps[0]["model_name"] if config.get("platform") == "ensemble" and steps else called

    def all(self) -> tuple[str, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class ServerInfo:
    """The served interface, as far as the client needs it."""

    url: str
    protocol: str
    max_batch_size: int
    categories: tuple[str, ...]
    item_dim: int
    preprocess: ServedContract
    # the shortest queue budget of an admission policy on the models read (None: no policy);
    # a request's own `timeout` replaces it at the server, so the client never sends a longer one
    queue_budget_us: int | None = None

    @property
    def limits(self) -> Limits:
        return Limits(self.preprocess.max_text_bytes, self.preprocess.max_image_bytes)


def _output_dims(config: dict, model: str, name: str) -> tuple[int, ...]:
    for output in config.get("output", []):
        if output["name"] == name:
            return tuple(int(d) for d in output["dims"])
    raise MMRecError(f"model {model!r} has no output {name!r}; is this an mmrec repository?")


def _contract(configs: dict[str, dict], names: ModelNames) -> tuple[str, ServedContract]:
    """The contract from the config of ModelNames.contract_model (of whichever item model was read)."""
    sources = [names.contract_model(configs, local) for local in (False, True)
               if names.item_model(local) in configs]
    model = next((m for m in sources if m in configs and (configs[m].get("parameters") or {})), None)
    if model is None:
        raise MMRecError(f"none of the models read ({', '.join(configs)}) carries the served contract; "
                         f"the client reads it from {names.item_encoder!r} or the first step of that ensemble")
    try:
        return model, ServedContract.from_parameters(configs[model].get("parameters", {}))
    except ContractError as err:
        raise MMRecError(f"model {model!r}: {err}") from None


def _check_outputs(contract: ServedContract, configs: dict[str, dict], names: ModelNames) -> None:
    """The called ensemble's outputs must have the contract's widths (a mixed-up deployment)."""
    ensemble = next((m for m in (names.item_encoder, names.item_encoder_pixels) if m in configs), None)
    if ensemble is None:
        return
    probs = _output_dims(configs[ensemble], ensemble, schema.INTEREST_PROBS)[0]
    item = _output_dims(configs[ensemble], ensemble, schema.ITEM_EMBEDDING)[0]
    if (probs, item) != (len(contract.categories), contract.item_dim):
        raise MMRecError(f"model {ensemble!r} outputs {probs} interests and {item}-d embeddings but the "
                         f"served contract names {len(contract.categories)} categories of {contract.item_dim}-d "
                         "items; re-export the repository")


def server_info(url: str, protocol: str, configs: dict[str, dict], names: ModelNames,
                max_batch_size: int | None = None) -> ServerInfo:
    """Build ServerInfo from model configs in JSON form (model name -> config dict)."""
    _, contract = _contract(configs, names)
    if not contract.categories:
        raise MMRecError("the served contract names no categories; re-export the repository")
    _check_outputs(contract, configs, names)
    server_batch = min([int(c.get("max_batch_size", 0)) or 1 for c in configs.values()]
                       + [contract.max_batch_size])
    batch = min(server_batch, max_batch_size) if max_batch_size else server_batch
    if batch < 1:
        raise MMRecError(f"max_batch_size must be at least 1, got {max_batch_size}")
    preprocess = replace(contract, max_batch_size=server_batch)
    return ServerInfo(url=url, protocol=protocol, max_batch_size=batch, categories=contract.categories,
                      item_dim=contract.item_dim, preprocess=preprocess, queue_budget_us=queue_budget_us(configs))


def queue_budget_us(configs: dict[str, dict]) -> int | None:
    """The shortest queue timeout among the configs' admission policies that let a request's own
    timeout override it (mmrec.admission), in microseconds; None when none has one."""
    budgets = []
    for config in configs.values():
        policy = (config.get("dynamic_batching") or {}).get("default_queue_policy") or {}
        timeout = int(policy.get("default_timeout_microseconds", 0) or 0)
        if timeout > 0 and policy.get("allow_timeout_override"):
            budgets.append(timeout)
    return min(budgets) if budgets else None
