"""The layering of the code is a test: a lower layer never imports a higher one.

    errors, zoo  <  families  <  ir  <  passes  <  compiler  <  runtime, space
                                                                 <  tools, bench, integrations

Layers of the same rank are siblings: neither imports the other (nothing imports tools or bench;
the CLI reaches ``morphc bench`` by module name). The package ``__init__`` and ``__main__`` sit
above everything (they only re-export and dispatch).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"errors": 0, "zoo": 0, "families": 1, "ir": 2, "passes": 3, "compiler": 4,
          "runtime": 5, "space": 5, "bench": 6, "integrations": 6, "tools": 6}


def layer_of_module(name: str) -> str | None:
    """``morphc.ir.sites`` -> ``ir``; ``morphc.passes.find_sites`` -> ``passes``."""
    parts = name.split(".")
    if parts[0] != "morphc" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def source_files():
    for path in sorted((ROOT / "morphc").rglob("*.py")):
        rel = path.relative_to(ROOT / "morphc")
        if rel.name in ("__init__.py", "__main__.py") and len(rel.parts) == 1:
            continue
        yield path, rel.parts[0].removesuffix(".py")
    for path in sorted((ROOT / "passes").rglob("*.py")):
        yield path, "passes"


def imports(path: Path):
    """Every module ``path`` imports, at any depth (late imports inside functions count too)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "morphc":
                yield from (f"morphc.{alias.name}" for alias in node.names)
            else:
                yield node.module


CASES = [(path, layer) for path, layer in source_files()]


@pytest.mark.parametrize("path, layer", CASES, ids=[str(p.relative_to(ROOT)) for p, _ in CASES])
def test_imports_only_go_down(path, layer):
    assert layer in LAYERS, f"{path} is in no known layer; add its folder to LAYERS"
    bad = []
    for module in imports(path):
        target = layer_of_module(module)
        if target is None or target == layer:
            continue
        if LAYERS[target] >= LAYERS[layer]:
            bad.append(f"{module} ({target})")
    assert not bad, f"{path.relative_to(ROOT)} ({layer}) imports upward/sideways: {bad}"


def test_checker_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from morphc.runtime.bypass import Bypass\n")
    assert [m for m in imports(bad) if LAYERS[layer_of_module(m)] >= LAYERS["compiler"]]
    assert layer_of_module("morphc.passes.infra") == "passes"
    assert layer_of_module("torch.fx") is None
