"""The package's layers: imports run one way, and nothing reaches into another module's privates.

Layers, lowest first (docs/development.md): core, nets, then accel and data side by side, infer,
train, stages, tools; `pipeline.__main__` (the command table) and `pipeline.weights` (the
public import path of `load_weights`) sit on top. A module imports its own package and the
layers below it; a stage or a tool is imported by the command table alone; a name starting
with `_` is used only inside the module that defines it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
RANK = {"core": 0, "nets": 1, "accel": 2, "data": 2, "infer": 3, "train": 4, "stages": 5, "tools": 6,
        "__main__": 7, "weights": 7}
ENTRY_POINTS = {"pipeline.__main__"}      # may import stages and tools (lazily, by name)


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) of every import of `module`, lazy ones too."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub, None, node.lineno) if sub in MODULES else (base, a.name, node.lineno))
    return [(m, n, line) for m, n, line in found if m == "pipeline" or m.startswith("pipeline.")]


def test_the_layers_are_what_the_docs_say():
    assert {_layer(m) for m in MODULES if m != "pipeline"} == set(RANK)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "pipeline"))
def test_imports_run_down_the_layers(module):
    layer, wrong = _layer(module), []
    for target, name, line in _imports(module):
        other = _layer(target)
        if other == layer and layer not in ("stages", "tools"):
            continue                                   # inside its own package
        if module in ENTRY_POINTS or RANK[other] < RANK[layer] and other not in ("stages", "tools"):
            continue
        wrong.append(f"line {line}: {target}{'.' + name if name else ''} ({other} from {layer})")
    assert not wrong, f"{module} imports upwards or sideways: " + "; ".join(wrong)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_crosses_a_module(module):
    wrong = [f"line {line}: {target}.{name}" for target, name, line in _imports(module)
             if name and name.startswith("_") and not name.startswith("__")]
    assert not wrong, f"{module} imports private names: " + "; ".join(wrong)
