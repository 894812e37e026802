"""Write an admission policy (mmrec.admission) into an exported repository, or take it out:
the entry models' config.pbtxt files and the manifest's record, hashes included."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

from mmrec.admission import QueuePolicy, entry_models
from mmrec.layout import CONFIG_FILE, RepositoryLayout

from .manifest import write_manifest
from .repository import parse, render

INSTANCES_BEFORE = "instances_before"  # Manifest.admission: each admitted model's instance counts before


def _rewrite(root: Path, change: Callable, record: Callable[[list[str], dict], dict] | None) -> list[str]:
    """`change(config, previous record)` on every entry model of an exported repository (True: it
    changed), then the manifest's admission record `record(changed models, instances before)`
    (None removes it) and file hashes; returns the changed models."""
    root = Path(root)
    layout = RepositoryLayout(root)
    configs = {p.parent.name: parse(p.read_text()) for p in sorted(root.glob(f"*/{CONFIG_FILE}"))}
    manifest = layout.load_manifest()
    previous = manifest.admission or {}
    # the counts export chose, kept across re-admissions so clearing restores them
    before = dict(previous.get(INSTANCES_BEFORE, {}))
    for name in entry_models(configs):
        before.setdefault(name, [group.count for group in configs[name].instance_group])
    changed = [name for name in entry_models(configs) if change(configs[name], before.get(name))]
    for name in changed:
        layout.config_file(name).write_text(render(configs[name]))
    manifest.admission = None if record is None else record(changed, before)
    write_manifest(root, manifest)
    return changed


def apply_to_repository(root: Path, policy: QueuePolicy, record: dict | None = None) -> list[str]:
    """Rewrite every entry model's config.pbtxt in an exported repository with `policy`, and
    record it (with how it was derived) in the manifest; returns the models it went on."""
    def change(config, _counts) -> bool:
        policy.apply(config)
        return True
    return _rewrite(root, change, lambda models, before: {"policy": asdict(policy), "models": models,
                                                          INSTANCES_BEFORE: before, **(record or {})})


def reapply_recorded(root: Path, record: dict | None) -> None:
    """Put the policy a manifest records back on the models it went on, leaving the record as it
    is: `mmrec tune` renders the configs afresh and the admission must survive that."""
    if not record:
        return
    policy, layout = QueuePolicy(**record["policy"]), RepositoryLayout(root)
    for name in record["models"]:
        config = parse(layout.config_file(name).read_text())
        policy.apply(config)
        layout.config_file(name).write_text(render(config))


def clear_repository(root: Path) -> list[str]:
    """Remove the admission policy from an exported repository (Triton then queues without
    bound again) and give its models back the instance counts export chose; returns the models
    it was removed from."""
    def change(config, counts) -> bool:
        had = config.dynamic_batching.HasField("default_queue_policy")
        config.dynamic_batching.ClearField("default_queue_policy")
        if counts is not None and not counts and config.instance_group:
            config.ClearField("instance_group")  # export wrote none: the one admission added goes
            return True
        for group, count in zip(config.instance_group, counts or []):
            had |= group.count != count
            group.count = count
        return had
    return _rewrite(root, change, None)
