"""The layering rule of DESIGN.md, kept by reading every import (module level and inside
functions) of the product code: ``sdk/`` imports neither ``agent/`` nor ``fleet/``; ``agent/``
and ``fleet/`` never import each other; product code never imports ``tools/``.

There are no exceptions: issue 14 moved the last ones (the model runtime both sides run to
``sdk/runtime/``; release building, the demo, its model builder and the project's LM to
``fleet/``). ``KNOWN`` stays empty; should an exception ever be listed, it may only shrink: a new
import fails, and so does a listed one that is gone."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

FORBIDDEN = {
    "sdk": ("agent", "fleet", "tools"),
    "agent": ("fleet", "tools"),
    "fleet": ("agent", "tools"),
}
#: (importing file, imported package or module): known exceptions; none
KNOWN: set[tuple[str, str]] = set()


def imports(path: Path) -> set[str]:
    """Every ``fleetlite.*`` module ``path`` imports, absolute or relative."""
    package = "fleetlite." + ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("fleetlite.")}


def test_product_code_keeps_the_layers() -> None:
    broken, seen = [], set()
    for layer, forbidden in FORBIDDEN.items():
        for path in sorted((REPO / layer).rglob("*.py")):
            where = str(path.relative_to(REPO))
            for module in sorted(imports(path)):
                target = module.split(".")[1]
                if target not in forbidden:
                    continue
                known = {(w, m) for w, m in KNOWN
                         if w == where and (module == m or module.startswith(m + "."))}
                if known:
                    seen |= known
                else:
                    broken.append(f"{where} imports {module}")
    assert not broken, "layering rule of DESIGN.md broken:\n" + "\n".join(broken)
    assert seen == KNOWN, f"a known exception is gone; take it off the list: {KNOWN - seen}"


def test_the_check_sees_imports_inside_functions() -> None:
    sample = REPO / "fleet" / "cli.py"
    assert "fleetlite.fleet.demo" in imports(sample)  # imported inside a function
