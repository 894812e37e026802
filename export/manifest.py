"""Release manifest: what was exported, from which inputs, with which numbers.

No timestamps and sorted keys: the same inputs give a byte-identical manifest, so a release
pipeline can diff two exports. The one exception is the separate `build` key: the commit and
dirty flag of the source tree that built the repository (`mmrec.machine.git_commit`), so that
numbers rendered from a manifest can be traced to code. Two builds from the same commit still
write identical manifests; to compare builds from different commits, leave `build` out.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path

from mmrec.layout import MANIFEST_FILE, RepositoryLayout
from mmrec.machine import git_commit

HASH_CHUNK = 1 << 20
BUILD_KEY = "build"  # {commit, dirty} of the tree that built it: not a function of the inputs
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


def file_entry(path: Path, root: Path) -> dict:
    return {"path": path.relative_to(root).as_posix(), "sha256": sha256_file(path),
            "bytes": path.stat().st_size}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_identity() -> dict:
    """The source tree that is building a repository: {"commit": sha | None, "dirty": bool | None}."""
    return git_commit()


def write_manifest(root: Path, manifest: dict) -> Path:
    """Add an entry for every file under root not already listed, record the building tree under
    `build` unless the manifest already names one (a later `mmrec tune` keeps the export's), then
    write manifest.json."""
    manifest.setdefault(BUILD_KEY, build_identity())
    listed = {v["path"] for m in manifest["models"].values() for v in m["variants"].values()
              if v.get("path")}
    manifest["files"] = [file_entry(p, root) for p in sorted(Path(root).rglob("*"))
                         if p.is_file() and p.name != MANIFEST_FILE
                         and p.relative_to(root).as_posix() not in listed]
    path = RepositoryLayout(root).manifest_file
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path

