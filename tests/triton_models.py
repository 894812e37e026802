"""Import a generated model folder's model.py the way Triton's python stub does.

The stub appends the model's version folder to sys.path and imports `<version>.model`, so the
library modules export copied beside model.py are what it imports (verified against the real
server by tests/test_serving.py). Unit tests that drive a TritonPythonModel with a fake pb_utils
load it the same way, from an exported repository.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from mmrec.layout import RepositoryLayout


def load_served_model(repository: Path, model: str) -> ModuleType:
    """<repository>/<model>/1/model.py as a module, its sibling modules imported from its folder."""
    path = RepositoryLayout(repository).python_model(model)
    folder = str(path.parent)
    siblings = {p.stem for p in path.parent.glob("*.py")} - {path.stem}
    saved = {name: sys.modules.pop(name) for name in siblings if name in sys.modules}
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(f"served_{model}_model", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
        for name in siblings:  # the next model folder imports its own copies
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    if hasattr(module, "priority"):
        # in-process, initialize() must not renice the test process: every server it starts
        # later would inherit the nice value (lib/priority.py never lowers one again)
        module.priority.yield_to_server = lambda nice=None: os.getpriority(os.PRIO_PROCESS, 0)
    return module
