"""The import direction of the layers (docs/architecture.md), checked from the source with ast.

contract (model_repository/lib, then mmrec's schema/layout/preprocess)  <  the reference
pipeline  <  export / client / serve / benchmarks  <  CLI and demo. Lazy imports inside
functions count too: a lower layer that imports a higher one, however late, can no longer be
used (or tested, or shipped) without it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"mmrec": ROOT / "mmrec", "mmrec.export": ROOT / "export", "mmrec.client": ROOT / "client",
                "mmrec.benchmarks": ROOT / "benchmarks", "mmrec.model_repository": ROOT / "model_repository"}

LIB = "mmrec.model_repository.lib"
CONTRACT = ("mmrec.schema", "mmrec.layout", "mmrec.preprocess", "mmrec.metrics", "mmrec.export_defaults", "mmrec.machine",
            "mmrec.stats", "mmrec.admission", "mmrec.release_manifest",
            "mmrec.model_repository")
PIPELINE = ("mmrec.reference",)
SERVE = ("mmrec.server", "mmrec.index_graph", "mmrec.index_publish", "mmrec.index_store",
         "mmrec.photos", "mmrec.tls_probe")
TOP = ("mmrec.cli", "mmrec.admission_cli", "mmrec.demo", "mmrec.serve_cli", "mmrec.index_cli", "mmrec.export.cli", "mmrec.client.cli",
       "mmrec.benchmarks.cli")
# what each layer may import from mmrec (besides itself); anything else is a violation
ALLOWED = {
    "lib": (LIB,),  # its own siblings only (copied beside it: export/repository.py LIB_IMPORTS)
    "contract": (LIB,) + CONTRACT,
    "pipeline": (LIB,) + CONTRACT + PIPELINE,
    "client": (LIB,) + CONTRACT + ("mmrec.client",),
    "export": (LIB,) + CONTRACT + PIPELINE + ("mmrec.export",),
    # serving a catalog index writes its config with export's repository writer
    "serve": (LIB,) + CONTRACT + PIPELINE + SERVE + ("mmrec.export.repository",),
    # building a catalog index encodes items through the server (client) or in-process
    "index_build": (LIB,) + CONTRACT + PIPELINE + SERVE + ("mmrec.client",),
    "benchmarks": (LIB,) + CONTRACT + PIPELINE + SERVE + ("mmrec.export", "mmrec.client", "mmrec.benchmarks"),
}


def module_name(path: Path) -> str:
    for package, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: -len(str(kv[1]))):
        if folder in path.parents:
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            return ".".join((package,) + parts)
    raise ValueError(path)


def layer(module: str) -> str | None:
    def under(names):
        return any(module == n or module.startswith(n + ".") for n in names)
    if under(TOP):
        return None  # the top may import anything
    if under((LIB,)):
        return "lib"
    if module.startswith("mmrec.model_repository."):  # thin Triton models: only their siblings
        return "lib"
    if module == "mmrec":
        return "contract"
    for name, prefixes in (("index_build", ("mmrec.index_build",)), ("client", ("mmrec.client",)), ("export", ("mmrec.export",)),
                           ("benchmarks", ("mmrec.benchmarks",)), ("pipeline", PIPELINE), ("serve", SERVE),
                           ("contract", CONTRACT)):
        if under(prefixes):
            return name
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py")


def imports(path: Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = node.module or ""
            if node.level:
                target = f"{base}.{target}" if target else base
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from mmrec import reference`
    return {m for m in found if m == "mmrec" or m.startswith("mmrec.")}


SOURCES = sorted(p for folder in PACKAGE_DIRS.values() for p in folder.rglob("*.py")
                 if ".venv" not in p.parts)


def _known(name: str) -> bool:
    """A real mmrec module or package (an imported attribute like mmrec.schema.TEXT is not)."""
    for package, folder in PACKAGE_DIRS.items():
        if name == package or name.startswith(package + "."):
            rest = name[len(package):].lstrip(".").split(".") if name != package else []
            path = folder.joinpath(*rest) if rest else folder
            if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
                return True
    return False


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_layer_imports_a_higher_one(path):
    module = module_name(path)
    own = layer(module)
    if own is None:
        return
    allowed = ALLOWED[own]
    wrong = sorted(m for m in imports(path, module) if _known(m) and m != "mmrec"
                   and not any(m == a or m.startswith(a + ".") for a in allowed))
    assert not wrong, f"{module} ({own} layer) imports {wrong}: see docs/architecture.md"


def test_the_served_library_imports_nothing_of_mmrec_and_shadows_nothing():
    """lib/ runs inside Triton's python stub, copied beside model.py: no mmrec imports but its own
    siblings (copied with it), and no module name that an installed top-level package could
    shadow (the stub appends the model folder to sys.path after site-packages)."""
    import importlib.util

    for path in sorted((ROOT / "model_repository" / "lib").glob("*.py")):
        if path.name == "__init__.py":
            continue
        assert all(m.startswith(LIB + ".") for m in imports(path, module_name(path))), path
        assert importlib.util.find_spec(path.stem) is None, f"an installed {path.stem!r} would shadow {path}"
