"""An inverted index with asyncdist.mapreduce: for every word, the sorted names of the files that hold it.

The input is the text files of a folder (``--pattern``, default ``*.txt``; default folder:
texts/ beside this script). A ``map_reader`` turns each input chunk into ``(file name, line)``
records (it gets the chunk's path, Disco's ``url``), the map yields ``(word, file name)`` once
per word of the line, a combiner drops the duplicates of each map task, and the reduce gathers
each word's sorted, distinct file names. Words are split on whitespace, stripped of punctuation
and lower-cased, as in wordcount.py. Run::

    python examples/mapreduce/inverted_index.py [FOLDER] [--pattern '*.txt'] [--json index.json]

It prints how many words and files it indexed and the first ``--show`` entries (default 8);
``--json FILE`` writes the whole index as one JSON object ``{word: [file, ...]}`` (keys sorted).
With no ``--master`` the job runs on an embedded cluster (see README.md beside this file); the
slaves read the files, so with an external cluster the folder must be visible to every slave.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import string
from typing import Any

import asyncdist
from asyncdist.mapreduce import Job, kvgroup, result_iterator

HERE = os.path.dirname(os.path.abspath(__file__))
NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def named_lines(fd: Any, size: int, url: str, params: Any) -> Any:
    """map_reader: the lines of one input chunk, each with the name of its file."""
    name = os.path.basename(url)
    for line in fd:
        yield name, line


def fmap(record: tuple[str, str], params: Any) -> Any:
    name, line = record
    for word in line.split():
        stripped = word.translate(NO_PUNCTUATION).lower()
        if stripped:
            yield stripped, name


def distinct(pairs: Any, params: Any) -> Any:
    """Combiner: each (word, file name) pair once."""
    for word, names in kvgroup(pairs):
        for name in sorted(set(names)):
            yield word, name


def freduce(pairs: Any, params: Any) -> Any:
    for word, names in kvgroup(pairs):
        yield word, sorted(set(names))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="an inverted index of a folder of text files")
    parser.add_argument(
        "folder", nargs="?", default=os.path.join(HERE, "texts"), help="default: texts/ beside this script"
    )
    parser.add_argument("--pattern", default="*.txt", help="which files of the folder (default *.txt)")
    parser.add_argument("--json", metavar="FILE", help="write the whole index to FILE as JSON")
    parser.add_argument("--show", type=int, default=8, help="entries to print (default 8)")
    parser.add_argument("--partitions", type=int, default=2, help="reduce tasks (default 2)")
    parser.add_argument("--master", help="HOST:PORT of an `asyncdist master` (default: embedded cluster)")
    parser.add_argument("--secret-file", help="the cluster's secret (else ASYNCDIST_SECRET)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    args.input = os.path.join(os.path.abspath(args.folder), args.pattern)  # the slaves read the files
    if not glob.glob(args.input):
        parser.error(f"no file matches {args.input}")
    return args


async def main(args: argparse.Namespace) -> None:
    options = {"secret_file": args.secret_file} if args.secret_file else {}
    job = await Job(name="inverted-index", master=args.master, **options).run(
        input=args.input,
        map_reader=named_lines,
        map=fmap,
        combiner=distinct,
        reduce=freduce,
        partitions=args.partitions,
    )
    results = await job.wait(show=not args.quiet)
    # Each partition is sorted by word; the partitions hold different words.
    index = dict(sorted([(word, names) async for word, names in result_iterator(results)]))
    await job.purge()
    await job.close()

    files = sorted({name for names in index.values() for name in names})
    print(f"indexed {len(index)} words in {len(files)} files")
    for word, names in list(index.items())[: args.show]:
        print(f"{word}: {', '.join(names)}")
    if args.json:
        write_json(index, args.json)
        print(f"wrote {args.json}")


def write_json(index: dict[str, list[str]], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    asyncdist.run(main(parse_args()))
