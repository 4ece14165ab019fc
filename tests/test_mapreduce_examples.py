"""The MapReduce examples (examples/mapreduce/) run as real processes on generated inputs and count right.

Each example runs with ``sys.executable`` on text generated here (seeded: mixed case, punctuation,
tokens of punctuation only, non-ASCII words) and its output is checked against
:class:`collections.Counter` or a dict built here with the examples' word rule. Most runs use
small input chunks (``ASYNCDIST_MR_CHUNK``), so that a job has several map tasks whose outputs
are combined and merged. Every process an example starts carries a marker in its environment;
after the example exited, none may be left (the embedded cluster's slaves and their workers
included). One test runs all three against an external ``asyncdist master`` and two
``asyncdist slave`` processes, as README.md shows.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from _util import SCALE, pids_with_env

ROOT = Path(__file__).resolve().parent.parent
MR_EXAMPLES = ROOT / "examples" / "mapreduce"
#: The bound of one example run (scaled).
BOUND = 120 * SCALE
MARKER = "MR_EXAMPLE_TEST_RUN"
NO_PUNCTUATION = str.maketrans("", "", string.punctuation)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="the leftover check reads /proc")


def words_of(text: str) -> list[str]:
    """The examples' rule: split on whitespace, strip ASCII punctuation, lower-case, drop empty words."""
    out = []
    for token in text.split():
        word = token.translate(NO_PUNCTUATION).lower()
        if word:
            out.append(word)
    return out


def make_text(seed: int, lines: int, vocabulary: int = 400) -> str:
    """Seeded text with a skewed word frequency and the tokens the word rule must handle."""
    rng = random.Random(seed)
    base = sorted(
        {"".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 9))) for _ in range(vocabulary)}
    )
    base += ["café", "naïve", "straße", "日本語"]
    weights = [1.0 / (i + 1) for i in range(len(base))]
    rng.shuffle(weights)
    decorations = [
        lambda w: w,
        lambda w: w,
        lambda w: w.upper(),
        lambda w: w.title(),
        lambda w: w + ",",
        lambda w: w + ".",
        lambda w: f'"{w}"',
        lambda w: f"({w})",
        lambda w: w[:1] + "'" + w[1:],
    ]
    out = []
    for _ in range(lines):
        tokens = [rng.choice(decorations)(w) for w in rng.choices(base, weights, k=rng.randint(0, 14))]
        if rng.random() < 0.1:
            tokens.insert(rng.randint(0, len(tokens)), rng.choice(["--", "...", "!", "—", "&"]))
        sep = "\t" if rng.random() < 0.05 else " "
        out.append(sep.join(tokens))
    return "\n".join(out) + "\n"


def leftovers(marker: str) -> list[int]:
    """The live processes whose environment carries ``MARKER=marker`` (the example's descendants)."""
    return pids_with_env(MARKER, marker)


def assert_no_leftovers(marker: str) -> None:
    # The embedded cluster waits for its slaves; their pool workers die with them (a signal
    # sent by the kernel when their parent exits), which can take a moment.
    deadline = time.monotonic() + 10 * SCALE
    while (left := leftovers(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], "the example left processes behind"


def run_example(
    name: str, *args: str, cwd: Path, env: dict[str, str] | None = None, marker: str | None = None
) -> str:
    """Run ``python examples/mapreduce/NAME ARGS`` to its end (bounded); return its stdout."""
    marker = marker or uuid.uuid4().hex
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCDIST_")}
    full_env.update(env or {})
    full_env[MARKER] = marker
    proc = subprocess.Popen(
        [sys.executable, str(MR_EXAMPLES / name), *args],
        cwd=cwd,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=BOUND)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert_no_leftovers(marker)
    return out


SMALL_CHUNKS = {"ASYNCDIST_MR_CHUNK": str(32 << 10)}


def read_counts(path: Path) -> list[tuple[str, int]]:
    """A SortNumberical.txt / SortAlphabetical.txt file: the seed's ``word \\t count`` lines."""
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        word, sep, count = line.partition(" \t ")
        assert sep, line
        pairs.append((word, int(count)))
    return pairs


def test_every_mapreduce_example_is_tested_and_described() -> None:
    examples = {p.name for p in MR_EXAMPLES.glob("*.py")}
    assert examples == {"wordcount.py", "chain_top10.py", "inverted_index.py"}
    readme = (MR_EXAMPLES / "README.md").read_text()
    for name in examples:
        assert f"python examples/mapreduce/{name}" in readme, name


def check_wordcount(out_dir: Path, expected: Counter[str], stdout: str) -> None:
    alphabetical = read_counts(out_dir / "SortAlphabetical.txt")
    numerical = read_counts(out_dir / "SortNumberical.txt")
    assert alphabetical == sorted(expected.items())
    # Most frequent first; ties keep the alphabetical order.
    assert numerical == sorted(expected.items(), key=lambda wc: (-wc[1], wc[0]))
    assert [c for _, c in numerical[:10]] == [c for _, c in expected.most_common(10)]
    total = sum(expected.values())
    assert f"{total} words, {len(expected)} distinct" in stdout, stdout


def test_wordcount_sample(tmp_path: Path) -> None:
    """The default input, the seed's text, written into the current directory."""
    out = run_example("wordcount.py", "--quiet", cwd=tmp_path)
    expected = Counter(words_of((MR_EXAMPLES / "sample.txt").read_text(encoding="utf-8")))
    assert (expected["know"], expected["are"]) == (6, 6)  # the seed's text
    check_wordcount(tmp_path, expected, out)
    assert "wrote ./SortNumberical.txt and ./SortAlphabetical.txt" in out, out


def test_wordcount_generated(tmp_path: Path) -> None:
    """Several map tasks (small chunks), three partitions, progress bars on, --out."""
    text = make_text(seed=1, lines=4000)
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    expected = Counter(words_of(text))
    assert "café" in expected
    assert "" not in expected
    out = run_example(
        "wordcount.py", "input.txt", "--out", "results", "--partitions", "3", cwd=tmp_path, env=SMALL_CHUNKS
    )
    check_wordcount(tmp_path / "results", expected, out)


def test_wordcount_glob_of_files(tmp_path: Path) -> None:
    texts = [make_text(seed=10 + i, lines=300) for i in range(3)]
    for i, text in enumerate(texts):
        (tmp_path / f"part{i}.txt").write_text(text, encoding="utf-8")
    expected = Counter(words_of("".join(texts)))
    out = run_example("wordcount.py", "part*.txt", "--quiet", cwd=tmp_path, env=SMALL_CHUNKS)
    check_wordcount(tmp_path, expected, out)


def parse_top(stdout: str, n: int) -> list[tuple[str, int]]:
    lines = stdout.splitlines()
    start = lines.index(f"top {n} words by count:")
    ranked = []
    for rank, line in enumerate(lines[start + 1 :], 1):
        found = re.fullmatch(r"\s*(\d+)\. (\S+) (\d+)", line)
        if found is None:
            break
        assert int(found.group(1)) == rank, line
        ranked.append((found.group(2), int(found.group(3))))
    return ranked


def check_top(ranked: list[tuple[str, int]], expected: Counter[str], n: int) -> None:
    """Against Counter.most_common(n), which orders ties by first appearance: the counts must be
    the same; each word's count right; every word above the n-th count present; ties by word."""
    common = expected.most_common(n)
    assert [c for _, c in ranked] == [c for _, c in common]
    assert len({w for w, _ in ranked}) == len(ranked)
    for word, count in ranked:
        assert expected[word] == count, word
    last = common[-1][1]
    assert {w for w, c in expected.items() if c > last} <= {w for w, _ in ranked}
    assert ranked == sorted(expected.items(), key=lambda wc: (-wc[1], wc[0]))[:n]


def tied_text(seed: int) -> tuple[str, Counter[str]]:
    """Text whose counts tie across the 10th place: 7 words of 50, then 6 of 40, then the rest."""
    rng = random.Random(seed)
    counts = {f"w{i:02d}": 50 for i in range(7)}
    counts.update({f"t{i:02d}": 40 for i in range(6)})
    counts.update({f"r{i:02d}": rng.randint(1, 39) for i in range(200)})
    tokens = [word for word, c in counts.items() for _ in range(c)]
    rng.shuffle(tokens)
    text = "\n".join(" ".join(tokens[i : i + 9]) for i in range(0, len(tokens), 9)) + "\n"
    return text, Counter(counts)


def test_chain_top10_ties(tmp_path: Path) -> None:
    text, expected = tied_text(seed=3)
    assert Counter(words_of(text)) == expected
    (tmp_path / "tied.txt").write_text(text, encoding="utf-8")
    out = run_example(
        "chain_top10.py", "tied.txt", "--quiet", cwd=tmp_path, env={"ASYNCDIST_MR_CHUNK": "4096"}
    )
    ranked = parse_top(out, 10)
    assert len(ranked) == 10
    check_top(ranked, expected, 10)
    # The three places of the 40-tie go to the first three of those words by spelling.
    assert ranked[7:] == [("t00", 40), ("t01", 40), ("t02", 40)]


def test_chain_top10_generated(tmp_path: Path) -> None:
    text = make_text(seed=2, lines=3000)
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    expected = Counter(words_of(text))
    out = run_example(
        "chain_top10.py", "input.txt", "--partitions", "3", "--top", "25", cwd=tmp_path, env=SMALL_CHUNKS
    )
    check_top(parse_top(out, 25), expected, 25)


def test_chain_top10_sample(tmp_path: Path) -> None:
    out = run_example("chain_top10.py", "--quiet", cwd=tmp_path)
    expected = Counter(words_of((MR_EXAMPLES / "sample.txt").read_text(encoding="utf-8")))
    check_top(parse_top(out, 10), expected, 10)


def make_folder(folder: Path, seed: int) -> dict[str, list[str]]:
    """Text files (one empty, one not matching *.txt); return the index they should give."""
    folder.mkdir()
    index: dict[str, set[str]] = {}
    for i in range(6):
        name = f"doc{i}.txt"
        text = make_text(seed=seed + i, lines=150 * (i + 1), vocabulary=120)
        (folder / name).write_text(text, encoding="utf-8")
        for word in words_of(text):
            index.setdefault(word, set()).add(name)
    (folder / "empty.txt").write_text("", encoding="utf-8")
    (folder / "notes.md").write_text("zzzz-not-indexed qqqq\n", encoding="utf-8")
    return {word: sorted(names) for word, names in sorted(index.items())}


def test_inverted_index_generated(tmp_path: Path) -> None:
    expected = make_folder(tmp_path / "docs", seed=20)
    out = run_example(
        "inverted_index.py", "docs", "--json", "index.json", "--show", "3", cwd=tmp_path, env=SMALL_CHUNKS
    )
    index = json.loads((tmp_path / "index.json").read_text(encoding="utf-8"))
    assert index == expected
    assert list(index) == sorted(index)
    assert "zzzznotindexed" not in index
    files = {name for names in expected.values() for name in names}
    assert f"indexed {len(expected)} words in {len(files)} files" in out, out
    lines = out.splitlines()
    first = lines.index(f"indexed {len(expected)} words in {len(files)} files")
    shown = [f"{w}: {', '.join(n)}" for w, n in list(expected.items())[:3]]
    assert lines[first + 1 : first + 4] == shown


def test_inverted_index_default_folder(tmp_path: Path) -> None:
    out = run_example("inverted_index.py", "--quiet", "--json", "index.json", cwd=tmp_path)
    expected: dict[str, set[str]] = {}
    for path in sorted((MR_EXAMPLES / "texts").glob("*.txt")):
        for word in words_of(path.read_text(encoding="utf-8")):
            expected.setdefault(word, set()).add(path.name)
    index = json.loads((tmp_path / "index.json").read_text(encoding="utf-8"))
    assert index == {w: sorted(n) for w, n in expected.items()}
    assert "indexed" in out


def test_inverted_index_of_a_folder_without_files(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("not a text file\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(MR_EXAMPLES / "inverted_index.py"), "docs"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=BOUND,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "error: no file matches" in result.stderr
    assert "Traceback" not in result.stderr


def test_examples_on_an_external_cluster(tmp_path: Path) -> None:
    """README's second way: `asyncdist master` and two `asyncdist slave` processes, --master."""
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCDIST_")}
    env[MARKER] = marker
    secret = tmp_path / "secret"
    secret.write_text("mr-example-test-secret-0123456789abcdef\n")
    procs: list[subprocess.Popen[str]] = []

    def start(*argv: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "asyncdist", *argv],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(proc)
        return proc

    def banner(proc: subprocess.Popen[str]) -> str:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded by the test's timeout
        assert line, f"{proc.args} exited: code {proc.wait()}"
        return line

    try:
        master = start("master", "--port", "0", "--secret-file", str(secret))
        address = re.search(r"listening on (127\.0\.0\.1:\d+)", banner(master))
        assert address is not None
        for i in range(2):
            slave = start(
                "slave", "--master", address.group(1), "--data-dir", str(tmp_path / f"slave{i}"),
                "--secret-file", str(secret),
            )  # fmt: skip
            assert "serving" in banner(slave)
        cluster = ["--master", address.group(1), "--secret-file", str(secret), "--quiet"]

        text = make_text(seed=5, lines=2000)
        (tmp_path / "input.txt").write_text(text, encoding="utf-8")
        expected = Counter(words_of(text))
        out = run_example(
            "wordcount.py", "input.txt", "--partitions", "2", *cluster, cwd=tmp_path, env=SMALL_CHUNKS
        )
        check_wordcount(tmp_path, expected, out)
        out = run_example("chain_top10.py", "input.txt", *cluster, cwd=tmp_path, env=SMALL_CHUNKS)
        check_top(parse_top(out, 10), expected, 10)
        index = make_folder(tmp_path / "docs", seed=30)
        run_example("inverted_index.py", "docs", "--json", "index.json", *cluster, cwd=tmp_path)
        assert json.loads((tmp_path / "index.json").read_text(encoding="utf-8")) == index
        # Each job purged its data on the slaves.
        for i in range(2):
            assert list((tmp_path / f"slave{i}").iterdir()) == []
        master.terminate()
        assert master.wait(timeout=30 * SCALE) == 0
        for proc in procs[1:]:  # a slave stops when its master is gone
            assert proc.wait(timeout=30 * SCALE) == 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    assert_no_leftovers(marker)
