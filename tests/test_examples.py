"""Every script in examples/ runs as-is and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

EXPECTED = {
    "echo.py": ["5", "HELLO, Meeta!", "[5, 4, 3, 2, 1]", "remote TypeError:"],
    "pi.py": ["number of workers 3000 - number of attempts 3000", "value of pi = 3.1"],
    "map_reduce.py": ["with result: 2646700", "map python executed in"],
    "recurse.py": ["4096 leaves from depth 12"],
    "callbacks.py": ["as_completed: 25", "wait: [0, 1, 4] done, 0 pending", "cancelled: True"],
}
# How each example is run: the launcher with 2 workers (the README's main command) or plain.
LAUNCH = {"pi.py", "map_reduce.py", "recurse.py"}
ARGS = {"map_reduce.py": ["200"]}


def test_every_example_has_expectations() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    prefix = ["-m", "asyncdist", "-n", "2"] if name in LAUNCH else []
    result = subprocess.run(
        [sys.executable, *prefix, str(EXAMPLES / name), *ARGS.get(name, [])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for line in EXPECTED[name]:
        assert line in result.stdout, (line, result.stdout)
