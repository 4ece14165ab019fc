"""The layering rules of DESIGN.md, checked on the source: layer 0 does no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "asyncdist"
LAYER0 = ("frames", "codec", "protocol")
IO_MODULES = {"asyncio", "socket", "ssl", "selectors", "uvloop", "asyncssh"}
PARADIGMS = ("futures", "objects", "naming", "csp", "mapreduce", "rpc")
ALLOWED_PARADIGM_IMPORTS = {("objects", "naming"), ("naming", "objects")}


def _imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                names.add("asyncdist." + (node.module or ""))
            elif node.module:
                names.add(node.module)
    return names


def test_layer0_imports_no_io() -> None:
    for module in LAYER0:
        bad = {name for name in _imports(module) if name.split(".")[0] in IO_MODULES}
        assert not bad, f"asyncdist.{module} imports {bad}"


def test_only_codec_imports_msgpack() -> None:
    for path in PACKAGE.glob("*.py"):
        if path.stem != "codec":
            assert "msgpack" not in {n.split(".")[0] for n in _imports(path.stem)}, path.name


def test_only_loop_imports_uvloop() -> None:
    for path in PACKAGE.glob("*.py"):
        if path.stem != "loop":
            assert "uvloop" not in {n.split(".")[0] for n in _imports(path.stem)}, path.name


def test_paradigms_do_not_import_each_other() -> None:
    present = [p for p in PARADIGMS if (PACKAGE / f"{p}.py").exists() or (PACKAGE / p).is_dir()]
    for module in present:
        if not (PACKAGE / f"{module}.py").exists():
            continue
        for name in _imports(module):
            other = name.removeprefix("asyncdist.").split(".")[0]
            if other in PARADIGMS and other != module:
                assert (module, other) in ALLOWED_PARADIGM_IMPORTS, f"{module} imports {other}"
