"""The package as pip installs it (``pip install .``) holds every subpackage, not only the top."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_in_the_distribution() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert not isinstance(config["packages"], list), "a fixed list leaves new subpackages out of the wheel"
    include = config["packages"]["find"]["include"]
    packages = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "asyncdist").rglob("__init__.py")
    }
    assert {"asyncdist", "asyncdist.futures", "asyncdist.rpc"} <= packages
    missing = sorted(p for p in packages if not any(fnmatch.fnmatchcase(p, pattern) for pattern in include))
    assert missing == []
    assert config["package-data"]["asyncdist"] == ["py.typed"]
