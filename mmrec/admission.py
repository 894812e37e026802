"""Admission at the server: a queue policy on every served entry model, so overload is shed at
once instead of queued without bound.

Without a policy Triton's dynamic batcher queues every request: past capacity the queue grows,
every answer comes late, and a recommender with a 100 ms budget gets nothing useful. Triton's
`dynamic_batching.default_queue_policy` is its own mechanism against that:

* `max_queue_size` rejects a request at once when that many already wait. We size it by
  Little's law over the wait budget `W = SLO - service time`: at capacity `C` requests/s the
  replica clears `C * W` requests in `W`. Under overload the dynamic batcher takes the whole
  queue as one batch, so an admitted request first waits for the batch in service (up to a full
  queue's worth) and then runs in a batch of that size: the queue is half of `C * W`.
* `default_timeout_microseconds` = `W` with `timeout_action: REJECT` drops a request that has
  waited its whole budget (the scheduler rejects it when it next looks at the queue). With the
  queue sized as above it is a backstop: a timeout rejection comes after the wait, a full-queue
  rejection at once.
* `allow_timeout_override` lets a client's own deadline (the request's `timeout`) replace `W`,
  so Triton drops work nobody waits for.
* Two instances of every admitted model (`ADMITTED_INSTANCES`). Any queue policy turns off the
  batcher's prefetching (core src/scheduler_utils.cc, PriorityQueue), so the batcher waits for
  an idle instance (`WaitForPayloadSlotAvailable`, 500 ms per wait). An instance signals that
  wait when its execution ends but only becomes idle after releasing the payload
  (backend_model_instance.cc: Execute -> Callback -> PayloadRelease -> DequeuePayload), so the
  signal is usually missed; an arriving request wakes the batcher again, but not when the
  queue is full: its enqueue fails before the wake-up. With one instance a full queue therefore
  stalls the model for up to 500 ms (traced on Triton 2.51, core main unchanged; at 2x capacity
  goodput fell to 0.25x capacity). With two, the other instance's signal finds the first idle:
  a stall lasts at most one batch.

Both rejections reach the client as UNAVAILABLE with Triton's own words (`SHED_MESSAGES`); the
client tells them from a dead server by those words (`mmrec.client.OverloadedError`).

An ensemble has no queue of its own: its first members' policies decide. The policy goes on the
models a request meets first (`entry_models`), not on inner members, whose queues only ever
hold what an entry admitted. Writing the policy into an exported repository is the export
stage's business (`mmrec.export.admission`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from mmrec import schema
from mmrec.layout import served_models

DEFAULT_SLO_MS = 100.0  # the p99 bound of capacity and admission (`--slo-ms`)
ADMITTED_INSTANCES = 2  # instances of an admitted model: one stalls on Triton's missed wake-up (above)
# An admitted request waits for the batch in service, then runs in one as large: each takes half.
BATCHES_PER_WAIT = 2
# Triton's messages for a shed request (status UNAVAILABLE): queue full, and waited too long.
SHED_MESSAGES = ("Exceeds maximum queue size", "Request timeout")
MANIFEST_KEY = "admission"


class AdmissionError(ValueError):
    """A policy that cannot work (an SLO below the service time, a capacity of zero)."""


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy for one model, with REJECT on timeout, and the instances per
    group it needs (at least; a group that has more keeps them)."""

    max_queue_size: int  # requests waiting; 0 would mean unbounded in Triton, so >= 1 here
    timeout_us: int  # how long a request may wait in the queue
    allow_timeout_override: bool = True
    instances: int = ADMITTED_INSTANCES

    def __post_init__(self) -> None:
        if self.max_queue_size < 1 or self.timeout_us < 1 or self.instances < 1:
            raise AdmissionError(f"max_queue_size, timeout_us and instances must be >= 1, got "
                                 f"{self.max_queue_size}, {self.timeout_us}, {self.instances}")

    def apply(self, config) -> None:
        """Write this policy into a `model_config_pb2.ModelConfig` that has dynamic batching."""
        from tritonclient.grpc import model_config_pb2 as mc

        if not config.HasField("dynamic_batching"):
            raise AdmissionError(f"model {config.name!r} has no dynamic batcher: a queue policy needs one")
        if not config.instance_group:
            config.instance_group.add(count=self.instances)
        for group in config.instance_group:
            group.count = max(group.count, self.instances)
        queue = config.dynamic_batching.default_queue_policy
        queue.timeout_action = mc.ModelQueuePolicy.REJECT
        queue.default_timeout_microseconds = self.timeout_us
        queue.allow_timeout_override = self.allow_timeout_override
        queue.max_queue_size = self.max_queue_size


def derive(capacity_rps: float, slo_ms: float, service_ms: float) -> QueuePolicy:
    """The policy that admits what one replica can answer within `slo_ms`.

    `capacity_rps`: requests/s the replica holds at the SLO (open loop); `service_ms`: the time a
    request still needs once it leaves the queue (the idle latency of one request)."""
    if capacity_rps <= 0:
        raise AdmissionError(f"capacity must be > 0 requests/s, got {capacity_rps}")
    wait_ms = slo_ms - service_ms
    if wait_ms <= 0:
        raise AdmissionError(f"an SLO of {slo_ms:g} ms leaves no time to queue: one request alone takes "
                             f"{service_ms:.1f} ms; raise --slo-ms or make the model faster")
    return QueuePolicy(max_queue_size=max(1, math.floor(capacity_rps * wait_ms / 1e3 / BATCHES_PER_WAIT)),
                       timeout_us=int(round(wait_ms * 1e3)))


# Members the client also calls on their own (score/rank on embeddings): entries too.
DIRECT_MEMBERS = (schema.SCORER,)


def entry_models(configs: Mapping[str, object], direct: tuple[str, ...] = DIRECT_MEMBERS) -> list[str]:
    """Batched models a request meets first, among those served: every dynamically batched model
    that is not only a later step of an ensemble (first steps read the ensemble's own inputs), and
    the members clients call directly."""
    served = served_models(configs) or set(configs)  # what `mmrec serve` loads
    inner: set[str] = set()
    first: set[str] = set()
    for config in configs.values():
        if config.platform != "ensemble":
            continue
        outside = {t.name for t in config.input}
        for step in config.ensemble_scheduling.step:
            (first if set(step.input_map.values()) <= outside else inner).add(step.model_name)
    return sorted(name for name, config in configs.items()
                  if name in served and config.platform != "ensemble" and config.HasField("dynamic_batching")
                  and (name in first or name not in inner or name in direct))


def is_shed_message(message: str) -> bool:
    return any(marker in message for marker in SHED_MESSAGES)


def policy_of(config) -> QueuePolicy | None:
    """The admission policy a parsed config carries (None: queues without bound)."""
    if not config.HasField("dynamic_batching") or not config.dynamic_batching.HasField("default_queue_policy"):
        return None
    queue = config.dynamic_batching.default_queue_policy
    instances = min((max(1, group.count) for group in config.instance_group), default=1)  # 0 means 1 to Triton
    return QueuePolicy(queue.max_queue_size, queue.default_timeout_microseconds, queue.allow_timeout_override,
                       instances)
