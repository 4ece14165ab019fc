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
    return _file_imports(PACKAGE / f"{module}.py")


def _file_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for asyncdist/x.py, 1 in a subpackage
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y (or ..x in a subpackage)
                if node.level > depth:
                    names.add("asyncdist." + (node.module or ""))
                else:
                    names.add("asyncdist." + path.parent.name + "." + (node.module or ""))
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


def _paradigm_files(paradigm: str) -> list[Path]:
    single = PACKAGE / f"{paradigm}.py"
    if single.exists():
        return [single]
    return sorted((PACKAGE / paradigm).glob("*.py"))


def test_paradigms_do_not_import_each_other() -> None:
    checked = 0
    for paradigm in PARADIGMS:
        for path in _paradigm_files(paradigm):
            checked += 1
            for name in _file_imports(path):
                other = name.removeprefix("asyncdist.").split(".")[0]
                if other in PARADIGMS and other != paradigm:
                    assert (paradigm, other) in ALLOWED_PARADIGM_IMPORTS, f"{path} imports {other}"
    assert checked  # at least the futures package exists


def test_core_modules_import_no_paradigm() -> None:
    for module in (
        "frames",
        "codec",
        "protocol",
        "security",
        "loop",
        "connection",
        "server",
        "errors",
        "spawn",
        "_deploy",
    ):
        for name in _imports(module):
            other = name.removeprefix("asyncdist.").split(".")[0]
            assert other not in PARADIGMS, f"asyncdist.{module} imports {name}"
