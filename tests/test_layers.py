"""The layers of the tree, read from the source: imports only go down.

    base      mpm_fx/errors.py, mpm_fx/schedule.py      (import nothing of ours but each other)
    op        mpm_fx/ops/, mpm_fx/methods/               plain tensor code
    passes    passes/       -> mpm_fx.passes             capture, analysis, the pipeline
    backends  backends/     -> mpm_fx.backends           compilers and exporters
    front     mpm_fx/*.py                                optimize, costs, fidelity, tune
    bench     bench/        -> mpm_fx.bench              the benchmark

passes/, backends/ and bench/ sit at the top of the repository and install as ``mpm_fx.*``
(pyproject's ``package-dir``); the module of every file is found through that table, so the
graph is the one an installed mpm_fx has. Every import counts, those inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("base", "op", "passes", "backends", "front", "bench")


def package_dirs() -> dict:
    """{"mpm_fx.passes": "passes", ...} from pyproject.toml."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["setuptools"]["package-dir"]


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "mpm_fx":
        raise ValueError(module)
    if len(parts) == 1:
        return "front"
    head = parts[1]
    if head in ("errors", "schedule"):
        return "base"
    if head in ("ops", "methods"):
        return "op"
    if head in ("passes", "backends", "bench"):
        return head
    return "front"


def modules(dirs: dict) -> dict:
    """{module name: (path, source)} of every Python file of the installed packages."""
    found = {}
    for package, folder in dirs.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder).with_suffix("").parts
            found[".".join((package, *relative)).removesuffix(".__init__")] = (
                path, path.read_text())
    return found


def imports(module: str, source: str, is_package: bool, known: set) -> set:
    """The mpm_fx modules a source imports (resolving ``from mpm_fx import ops`` to the module
    ``mpm_fx.ops`` where it is one, and relative imports)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "mpm_fx"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[:len(module.split(".")) - node.level + is_package]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] != "mpm_fx":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return out


def upward_imports(found: dict) -> list:
    """(importer, imported, their layers) for every import that goes up."""
    known, bad = set(found), []
    for module, (path, source) in found.items():
        mine = LAYERS.index(layer(module))
        for target in imports(module, source, path.name == "__init__.py", known):
            if LAYERS.index(layer(target)) > mine:
                bad.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
    return sorted(bad)


def test_no_layer_imports_a_higher_one():
    found = modules(package_dirs())
    assert {"mpm_fx.ops.tokens", "mpm_fx.methods.mpm", "mpm_fx.passes.capture",
            "mpm_fx.backends.aot", "mpm_fx.optimized", "mpm_fx.bench.cli"} <= set(found)
    assert upward_imports(found) == []


def test_every_module_has_a_layer():
    for module in modules(package_dirs()):
        assert layer(module) in LAYERS


def test_an_upward_import_is_found():
    """The check itself: an op module importing the passes, a pass importing the front end
    through a relative import and a function-level import are each reported."""
    found = {
        "mpm_fx.ops.tokens": (Path("tokens.py"), "from mpm_fx.passes import rewrite\n"),
        "mpm_fx.passes": (Path("__init__.py"), "def f():\n    from .. import optimized\n"),
        "mpm_fx.passes.graph": (Path("graph.py"), "from mpm_fx import ops\n"),
        "mpm_fx.optimized": (Path("optimized.py"), ""),
        "mpm_fx.ops": (Path("__init__.py"), ""),
    }
    assert upward_imports(found) == [
        "mpm_fx.ops.tokens (op) imports mpm_fx.passes (passes)",
        "mpm_fx.passes (passes) imports mpm_fx.optimized (front)",
    ]


def test_no_function_is_longer_than_90_lines():
    """A function a reader must hold whole fits on a screen and a half."""
    long = []
    for module, (path, source) in modules(package_dirs()).items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 90:
                    long.append(f"{module}.{node.name}: {length} lines")
    assert long == []
