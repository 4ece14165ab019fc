"""Two chained MapReduce jobs: a word count, then the top 10 words of its results.

The first job counts the words of a text file (as wordcount.py does) into ``--partitions``
partitions; its :class:`~asyncdist.mapreduce.Results` are the *input* of the second job, whose
map tasks read them on the slaves that hold them (no byte of them comes back here in between).
The second job keys every ``(word, count)`` by ``(-count, word)``, so that sorting by key puts
the most frequent words first (ties by word); a combiner keeps the first 10 pairs of each map
task's sorted output, and its single reduce task yields the first 10 of all. Run::

    python examples/mapreduce/chain_top10.py [FILE-OR-GLOB ...] [--partitions N] [--top 10]

It prints ``top 10 words by count:`` and then one ``rank. word count`` line each. With no
``--master`` the jobs run on an embedded cluster (see README.md beside this file).
"""

from __future__ import annotations

import argparse
import itertools
import os
import string
from typing import Any

import asyncdist
from asyncdist.mapreduce import Job, kvgroup, result_iterator

HERE = os.path.dirname(os.path.abspath(__file__))
NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


# -- job 1: the word count -------------------------------------------------------------------------


def count_map(line: str, params: Any) -> Any:
    for word in line.split():
        stripped = word.translate(NO_PUNCTUATION).lower()
        if stripped:
            yield stripped, 1


def count_reduce(pairs: Any, params: Any) -> Any:
    for word, counts in kvgroup(pairs):
        yield word, sum(counts)


# -- job 2: the top N of job 1's (word, count) results ---------------------------------------------


def rank_map(record: tuple[str, int], params: Any) -> Any:
    word, count = record
    yield (-count, word), None  # sorted by key: most frequent first, ties by word


def first_n(pairs: Any, params: Any) -> Any:
    """Combiner and reduce: the first ``params["top"]`` pairs of a sorted stream (the rest is
    never read). Each map task's output shrinks to them, and the global top N is among them."""
    return itertools.islice(pairs, params["top"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="word count, then the top words, as two chained jobs")
    parser.add_argument(
        "input",
        nargs="*",
        default=[os.path.join(HERE, "sample.txt")],
        help="text files or globs (default: sample.txt beside this script)",
    )
    parser.add_argument("--top", type=int, default=10, help="how many words (default 10)")
    parser.add_argument("--partitions", type=int, default=2, help="partitions of the word count (default 2)")
    parser.add_argument("--master", help="HOST:PORT of an `asyncdist master` (default: embedded cluster)")
    parser.add_argument("--secret-file", help="the cluster's secret (else ASYNCDIST_SECRET)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    options = {"secret_file": args.secret_file} if args.secret_file else {}
    counts = await Job(name="wordcount", master=args.master, **options).run(
        input=args.input,
        map=count_map,
        reduce=count_reduce,
        combiner=count_reduce,
        partitions=args.partitions,
    )
    counted = await counts.wait(show=not args.quiet)

    # The second job's input is the first job's results: one map task per partition of them.
    top = await Job(name=f"top{args.top}", master=args.master, **options).run(
        input=counted,
        map=rank_map,
        combiner=first_n,
        reduce=first_n,
        partitions=1,
        params={"top": args.top},
    )
    ranked = await top.wait(show=not args.quiet)

    print(f"top {args.top} words by count:")
    rank = 0
    async for (negative_count, word), _ in result_iterator(ranked):
        rank += 1
        print(f"{rank:3d}. {word} {-negative_count}")
    for job in (top, counts):
        await job.purge()
        await job.close()


if __name__ == "__main__":
    asyncdist.run(main(parse_args()))
