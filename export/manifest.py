"""Release manifest: what was exported, from which inputs, with which numbers.

No timestamps and sorted keys: the same inputs give a byte-identical manifest, so a release
pipeline can diff two exports. The one exception is the separate `build` key: the commit and
dirty flag of the source tree that built the repository (`mmrec.machine.git_commit`), so that
numbers rendered from a manifest can be traced to code. Two builds from the same commit still
write identical manifests; to compare builds from different commits, leave `build` out.

The records themselves (`Manifest`, `MemberRecord`, `VariantRecord`, ...) live in
`mmrec.release_manifest`, where every reader can import them without the export stack; they are
re-exported here for the writers.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path

from mmrec.layout import MANIFEST_FILE, RepositoryLayout
from mmrec.machine import git_commit
from mmrec.release_manifest import (FORMAT, BuildIdentity, DatasetRecord, FileEntry, InputSource, Inputs, Manifest,
                                    ManifestError, MeasuredMember, MeasuredVariant, MemberRecord, ServedCombination,
                                    TuningMachine, TuningRecord, VariantRecord)

__all__ = ["BUILD_KEY", "FORMAT", "MANIFEST_FILE", "BuildIdentity", "DatasetRecord", "FileEntry", "InputSource", "Inputs",
           "Manifest", "ManifestError", "MeasuredMember", "MeasuredVariant", "MemberRecord", "ServedCombination",
           "TuningMachine", "TuningRecord", "VariantRecord", "build_identity", "file_record",
           "package_versions", "sha256_file", "sha256_tree", "write_manifest"]

HASH_CHUNK = 1 << 20
BUILD_KEY = "build"  # Manifest.build's key: the tree that built it, not a function of the inputs
TRACKED_PACKAGES = ("mmrec", "torch", "onnx", "onnxruntime", "onnxslim", "transformers",
                    "tokenizers", "numpy", "pillow", "nvidia-pytriton", "tritonclient", "tensorrt", "openvino")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(folder: Path) -> str:
    """Hash of every file's relative path and content under folder (sorted, so stable)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(sha256_file(path).encode())
    return h.hexdigest()


def file_record(path: Path, root: Path) -> FileEntry:
    """A file of the repository at `root`: relative path, hash and size."""
    return FileEntry(path=path.relative_to(root).as_posix(), sha256=sha256_file(path), bytes=path.stat().st_size)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_identity() -> BuildIdentity:
    """The source tree that is building a repository (commit and dirty flag, None outside a checkout)."""
    return BuildIdentity.from_dict(git_commit(), BUILD_KEY)


def write_manifest(root: Path, manifest: Manifest | dict) -> Path:
    """Add an entry for every file under root not already listed, record the building tree under
    `build` unless the manifest already names one (a later `mmrec tune` keeps the export's), then
    write manifest.json. A hand-built dict is read through the same records, so a bad key fails
    here, and gets `build` and `files` added like the record."""
    record = Manifest.of(manifest)
    if record.build is None:
        record.build = build_identity()
    listed = {v.path for m in record.models.values() for v in m.variants.values() if v.path}
    record.files = [file_record(p, root) for p in sorted(Path(root).rglob("*"))
                    if p.is_file() and p.name != MANIFEST_FILE and p.relative_to(root).as_posix() not in listed]
    if isinstance(manifest, dict):  # the caller goes on with its dict (export returns it)
        manifest[BUILD_KEY] = record.build.to_dict()
        manifest["files"] = [f.to_dict() for f in record.files]
    path = RepositoryLayout(root).manifest_file
    path.write_text(record.to_json())
    return path

