"""Fail on an import that points up the house's layers, or on an import cycle, in qrecover/.

Every module has a layer (LAYERS: module name or package prefix, the longest match wins); a module
may import from its own layer or any below it, never from one above. Imports inside functions
count too: a lazy import is still a dependency. Run `python tools/check_layers.py` (tests/test_layers.py
runs it in CI). Prints each violation and exits 1 when there is one.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qrecover"

# Bottom (0) to top; README "How the code is laid out" explains them.
LAYERS = {
    "qrecover._version": 0, "qrecover.errors": 0, "qrecover.utils": 0, "qrecover.format": 0,
    "qrecover.outputs": 0, "qrecover.resume": 0, "qrecover.forked": 0, "qrecover.data": 0, "qrecover.observer": 0, "qrecover.kernels.cache": 0,
    "qrecover.kernels": 1,
    "qrecover.nn": 2,
    "qrecover.quant": 3, "qrecover.saliency": 3, "qrecover.config": 3, "qrecover.models": 3,
    "qrecover.eval": 3,
    "qrecover.io": 4, "qrecover.hf_quantizer": 4, "qrecover.registration": 4,
    "qrecover.pipeline": 5, "qrecover.recovery": 5,
    "qrecover.api": 6, "qrecover.export": 6, "qrecover.recipes": 6,
    "qrecover.bench": 7,
    "qrecover.cli": 8, "qrecover.eval.lm_eval_cli": 8, "qrecover": 8,
}
NAMES = ["base", "kernels", "nn", "quant/config/models/eval", "io", "pipeline/recovery", "api", "bench", "entry points"]


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise KeyError(f"{module} has no layer: add it to LAYERS in tools/check_layers.py")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """qrecover modules that the file imports (a `from pkg import name` counts as pkg.name when
    that is a module, else as pkg)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "qrecover")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "qrecover":
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if _is_module(sub) else target)
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) - {module_name(p)} for p in sorted(PACKAGE.rglob("*.py"))}


def upward(deps: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} ({NAMES[layer_of(m)]}) imports {d} ({NAMES[layer_of(d)]})"
        for m, targets in sorted(deps.items()) for d in sorted(targets) if layer_of(d) > layer_of(m)
    ]


def cycles(deps: dict[str, set[str]]) -> list[str]:
    """One line per import cycle found by depth-first search (package __init__s left out: Python
    imports a package before its modules, which is not a cycle of ours)."""
    edges = {m: {d for d in ds if d in deps and not _is_package(d)} for m, ds in deps.items() if not _is_package(m)}
    found, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(edges.get(m, ())):
            if state.get(d) == "open":
                found.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return found


def _is_package(name: str) -> bool:
    return (PACKAGE.parent.joinpath(*name.split(".")) / "__init__.py").is_file()


def main() -> int:
    deps = graph()
    problems = [f"upward import: {line}" for line in upward(deps)] + [f"import cycle: {line}" for line in cycles(deps)]
    for line in problems:
        print(line)
    print(f"{len(deps)} modules, {sum(map(len, deps.values()))} imports: "
          + (f"{len(problems)} problems" if problems else "every import points down, no cycles"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
