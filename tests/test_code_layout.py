"""The layout of ``scripts/``: folders by role, imports that only point down, no hidden imports.

Read from the source (``ast``), nothing is imported. The roles, lowest first (a module may import its own
folder and any folder of a lower rank, never one above):

    0  utils                                  errors, quiet, atomic I/O, torchrun helpers
    1  wsi, formats, optim                    reading slides; one home per file format; optimisers
    2  transforms, data, networks, metrics    MONAI transforms; datalists/bags/splits; networks; metrics
    3  engines                                packed-bag iterations, handlers, the fold ensemble
    4  workflows                              preprocess, extract, training, evaluate, predict, inference, publish
    5  experiments                            compare, ablation, transfer (over the training workflow)
    6  demo, benchmarks                       drivers: nothing imports them
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
RANK = {
    "utils": 0,
    "wsi": 1, "formats": 1, "optim": 1,
    "transforms": 2, "data": 2, "networks": 2, "metrics": 2,
    "engines": 3,
    "workflows": 4,
    "experiments": 5,
    "demo": 6, "benchmarks": 6,
}  # fmt: skip
EXPERIMENTS = {"scripts.experiments.compare", "scripts.experiments.ablation", "scripts.experiments.transfer"}
# The only imports allowed inside a function, and why: each is an optional dependency that may be absent or
# unusable on a machine while the rest of the bundle still works.
OPTIONAL_IMPORTS = {
    "cucim": "optional GPU reader; a broken install or file can crash the process, so it is loaded only after "
             "the crash-safe probe (scripts/wsi/probe.py) accepted the file",
    "cupy": "CUDA-only (GPU decode); not installed on CPU machines",
    "openslide": "needs the OpenSlide C library, which may be missing; the other backends still work",
}  # fmt: skip
# a child-process script that silences file descriptors 1 and 2 before importing cuCIM (and numpy)
NOT_CHECKED_FOR_LOCAL_IMPORTS = {"scripts/wsi/_cucim_probe.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SCRIPTS.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function or class) for every import statement of ``path``."""
    found = []

    def visit(node, nested: bool):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                found.append((child.module, child.lineno, nested))
                # "from scripts.wsi import mpp": the imported name may itself be a module
                found.extend((f"{child.module}.{alias.name}", child.lineno, nested) for alias in child.names)
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def _project_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    edges = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(path):
            if target in modules and target != name:
                edges[name].add(target)
    return edges


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANK) else None


def test_scripts_top_level_holds_only_role_folders():
    loose = sorted(p.name for p in SCRIPTS.glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules directly under scripts/ (put each in the folder of its role): {loose}"
    folders = sorted(p.name for p in SCRIPTS.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted(RANK), f"scripts/ folders {folders} differ from the documented roles {sorted(RANK)}"


def test_imports_point_down_the_roles():
    modules = _modules()
    upward = []
    for name, targets in _project_edges(modules).items():
        source = _folder(name)
        if source is None:  # scripts/__init__.py
            continue
        for target in targets:
            folder = _folder(target)
            if folder is not None and RANK[folder] > RANK[source]:
                upward.append(f"{name} ({source}, rank {RANK[source]}) imports {target} ({folder}, rank {RANK[folder]})")
    assert not upward, "imports that point up the layout:\n" + "\n".join(sorted(upward))


def test_no_experiment_imports_another():
    edges = _project_edges(_modules())
    crossing = [f"{a} imports {b}" for a in sorted(EXPERIMENTS) for b in sorted(edges[a] & EXPERIMENTS)]
    assert not crossing, "\n".join(crossing)


def test_no_import_cycles():
    edges = _project_edges(_modules())
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_function_level_imports_only_for_optional_dependencies():
    hidden = []
    for path in sorted(SCRIPTS.rglob("*.py")) + sorted((ROOT / "apps").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in NOT_CHECKED_FOR_LOCAL_IMPORTS:
            continue
        for target, line, nested in _imports(path):
            if nested and target.split(".")[0] not in OPTIONAL_IMPORTS:
                hidden.append(f"{rel}:{line}: {target}")
    hidden = sorted(set(hidden))
    assert not hidden, ("imports inside functions (move them to the top of the module; only "
                        f"{sorted(OPTIONAL_IMPORTS)} may be imported lazily):\n" + "\n".join(hidden))


def test_the_checks_see_a_violation(tmp_path):
    """The checks above read real code: a module that imports upward, inside a function, is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from scripts.workflows.training import train_fold\n    import cucim\n")
    found = _imports(bad)
    assert ("scripts.workflows.training", 2, True) in found and ("cucim", 3, True) in found
    assert _folder("scripts.workflows.training") == "workflows" and _folder("scripts.utils.errors") == "utils"
