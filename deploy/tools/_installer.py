"""What the binary installers in this folder share: their error type and their command line.

Each installer (install_helm.py, install_promtool.py) is run as a script, so this sibling is
importable from its folder; each brings only how its binary is fetched and checked.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


class InstallError(RuntimeError):
    pass


def run_cli(argv: list[str] | None, description: str, binary: str, install: Callable[[Path], Path],
            describe: Callable[[Path], str]) -> int:
    """`--dest` (default: the running interpreter's bin folder, i.e. the venv), install, report."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(sys.executable).parent / binary,
                        help="where to write the binary (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = install(args.dest)
    except InstallError as exc:
        print(f"install_{binary}: {exc}", file=sys.stderr)
        return 1
    print(f"{binary} {describe(path)} at {path}")
    return 0
