"""The package's layers: a module imports only from the layers above it (README, "How the code is laid out"), never
a private name of another module, and no module is a re-export shim."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lora_llava"
LAYERS = ["errors", "files", "llava", "config", "data", "datagen", "run", "model", "infer", "eval", "demo", "train",
          "export", "serve", "planner", "cli"]


def _imports(path: Path):
    """(target layer, imported names) of every relative import of a module."""
    rel = path.relative_to(PACKAGE)
    here = rel.with_suffix("").parts
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(here[:-node.level]) if len(here) >= node.level else []
            target = [*base, *(node.module.split(".") if node.module else [])]
            yield (target[0] if target else "__init__"), [a.name for a in node.names], node.lineno


def test_imports_flow_one_way():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        layer = path.relative_to(PACKAGE).with_suffix("").parts[0]
        if layer not in LAYERS:
            continue
        for target, _, line in _imports(path):
            if target in LAYERS and LAYERS.index(target) > LAYERS.index(layer):
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert not upward, upward
    # Every module of the package belongs to a layer.
    tops = {p.relative_to(PACKAGE).with_suffix("").parts[0] for p in PACKAGE.rglob("*.py")}
    assert tops - set(LAYERS) == {"__init__", "__main__"}


def test_no_private_names_cross_modules():
    crossing = [f"{path.relative_to(PACKAGE)}:{line} imports {name}" for path in PACKAGE.rglob("*.py")
                for _, names, line in _imports(path) for name in names
                if name.startswith("_") and name != "__version__"]
    assert not crossing, crossing
