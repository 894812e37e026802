"""Render a repository once from its plan: configs, served graphs, kept variants, admission.

Export decides everything first (graphs staged, gated, tuned on the staged files), then calls
`render_repository` once. `mmrec tune` decides again on an exported repository and calls
`rerender`: the repository is rendered afresh from the manifest's new choice into a folder
beside it, the files no rendering owns (the fusion checkpoint, the gate set, published catalog
indexes) are carried over, and the folder is swapped in whole, so tune never edits a config or
moves a graph in place.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping

from mmrec import schema
from mmrec.layout import CONFIG_FILE, MANIFEST_FILE, RepositoryLayout
from mmrec.preprocess import ServedContract

from .admission import reapply_recorded
from .manifest import Manifest, MemberRecord, VariantRecord, file_record, write_manifest
from .repository import RepositoryPlan, Target, link_or_copy, write_repository
from .variants import VARIANTS

GraphFiles = dict[str, dict[str, Path]]  # member -> graph (fp32, int8, fp16, a TensorRT plan) -> its file now


def graph_of(name: str, variant: VariantRecord) -> str:
    """The graph a variant runs (a TensorRT plan's variant is its own graph)."""
    return variant.graph or name


def served_runtimes(models: Mapping[str, MemberRecord]) -> dict[str, tuple[str, str]]:
    """member -> (runtime, precision) of the variant it serves (TensorRT plans: none)."""
    return {name: (VARIANTS[m.served_variant].runtime, VARIANTS[m.served_variant].precision)
            for name, m in models.items() if m.served_variant in VARIANTS}


def plan_for(target: Target, contract: ServedContract, models: Mapping[str, MemberRecord], graphs: GraphFiles,
             tokenizer_file: Path, gpu: bool) -> RepositoryPlan:
    """The plan that serves each member's chosen variant: its graph and its runtime."""
    files = {}
    for name, member in models.items():
        graph = graph_of(member.served_variant, member.served)
        if graph not in graphs.get(name, {}):
            raise FileNotFoundError(f"{name} [{member.served_variant}]: its {graph} graph is not in the repository")
        files[name] = graphs[name][graph]
    runtimes = {} if target is Target.tensorrt else served_runtimes(models)
    return RepositoryPlan(target, contract, files, tokenizer_file, gpu=gpu, member_runtimes=runtimes)


def render_repository(plan: RepositoryPlan, models: Mapping[str, MemberRecord], graphs: GraphFiles,
                      root: Path) -> None:
    """Write the plan's configs and python models and place every graph: the served one as
    `<member>/1/model.onnx`, each other graph an admitted variant runs once as
    `<member>/variants/<graph>.onnx`; each variant's record points at its file."""
    written = write_repository(plan, root)
    layout = RepositoryLayout(root)
    for name, member in models.items():
        served = graph_of(member.served_variant, member.served)
        for variant_name, variant in member.variants.items():
            graph = graph_of(variant_name, variant)
            if name in written and graph == served and (variant.written or variant_name == member.served_variant):
                variant.set_file(file_record(written[name], root))
            elif variant.written and graph in graphs.get(name, {}):
                dest = layout.variant_file(name, graph)
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    link_or_copy(graphs[name][graph], dest)
                variant.set_file(file_record(dest, root))


def repository_graphs(root: Path, manifest: Manifest) -> GraphFiles:
    """Where an exported repository keeps each member's graphs now."""
    return {name: {graph_of(v_name, v): root / v.path for v_name, v in member.variants.items() if v.path}
            for name, member in manifest.models.items()}


def plan_from_manifest(root: Path, manifest: Manifest) -> RepositoryPlan:
    """The plan an exported repository renders with the served variants its manifest names now."""
    layout = RepositoryLayout(root)
    return plan_for(Target(manifest.target), layout.read_contract(), manifest.models, repository_graphs(root, manifest),
                    layout.tokenizer_file(schema.TOKENIZER), bool(manifest.gpu))


class RerenderError(OSError):
    """The re-rendered repository could not be swapped in; the repository is as it was."""


def rerender(root: Path, manifest: Manifest) -> None:
    """Render `root` again from `manifest` (its served variants as now chosen) into a folder
    beside it, then swap that folder in; see the module docstring. Only configs and graph
    placements are rendered anew: the python models, library modules and preprocess.json the
    repository runs are carried over as they are (tune changes the choice, not the code), and
    `manifest` itself is left untouched (its updated copy is what gets written)."""
    root = Path(root).resolve()
    manifest = Manifest.from_dict(manifest.to_dict())  # paths are cleared below: work on a copy
    staging = root.parent / f".{root.name}.rerender-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        graphs, plan = repository_graphs(root, manifest), plan_from_manifest(root, manifest)
        old_graph_paths = {v.path for m in manifest.models.values() for v in m.variants.values() if v.path}
        for member in manifest.models.values():
            for variant in member.variants.values():  # placed again where the new plan keeps them
                variant.path = variant.sha256 = variant.bytes = None
        render_repository(plan, manifest.models, graphs, staging)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = path.relative_to(root).as_posix()
            kept = staging / relative
            if (relative == MANIFEST_FILE or relative in old_graph_paths
                    or (path.name == CONFIG_FILE and kept.exists())):
                continue  # written by this render
            kept.parent.mkdir(parents=True, exist_ok=True)
            if path.name == CONFIG_FILE:  # configs are rewritten in place (`mmrec admit`): never shared
                shutil.copyfile(path, kept)
            else:  # the repository's own code, contract and later additions, never edited in place
                link_or_copy(path, kept)
        reapply_recorded(staging, manifest.admission)
        write_manifest(staging, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, root)


def _swap_in(staging: Path, root: Path) -> None:
    """Replace `root` by `staging` with two renames, putting `root` back if the second fails."""
    previous = root.parent / f".{root.name}.previous-{os.getpid()}"
    try:
        root.rename(previous)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise RerenderError(f"cannot swap the re-rendered repository in: renaming {root} failed ({err}). "
                            "mmrec tune renders beside the repository and swaps folders, so the repository must "
                            "be a plain folder (not a mount point) whose parent folder is writable; tune a copy "
                            "and publish that instead") from err
    try:
        staging.rename(root)
    except OSError as err:
        previous.rename(root)
        shutil.rmtree(staging, ignore_errors=True)
        raise RerenderError(f"cannot swap the re-rendered repository in ({err}); {root} is unchanged") from err
    shutil.rmtree(previous, ignore_errors=True)
