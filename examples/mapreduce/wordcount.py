"""The seed's Disco word count on asyncdist.mapreduce: SortNumberical.txt and SortAlphabetical.txt.

Counts the words of a text file (default: sample.txt beside this script, the seed's text) and
writes every ``word \\t count`` line twice, sorted by count (most frequent first, ties by word)
into SortNumberical.txt and sorted by word into SortAlphabetical.txt, as the seed does. Words
are split on whitespace, stripped of punctuation and lower-cased (what the seed's comment says;
its code forgot the lower-casing); a token of punctuation only is no word. Run::

    python examples/mapreduce/wordcount.py [FILE-OR-GLOB ...] [--out DIR] [--partitions N]

With no ``--master`` the job runs on an embedded cluster (a master in this process, one slave
process per core); ``--master HOST:PORT`` sends it to an ``asyncdist master`` instead (secret from
``--secret-file`` or ``ASYNCDIST_SECRET``). See README.md beside this file.
"""

from __future__ import annotations

import argparse
import os
import string
from typing import Any

import asyncdist
from asyncdist.mapreduce import Job, kvgroup, result_iterator

HERE = os.path.dirname(os.path.abspath(__file__))
#: str.translate table deleting ASCII punctuation (the seed's ``string.maketrans("", "")``,
#: ``string.punctuation`` of Python 2).
NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


# Split a line into words, ignoring punctuation, all lower-case: each line maps to (word, 1) pairs.
def fmap(line: str, params: Any) -> Any:
    for word in line.split():
        stripped = word.translate(NO_PUNCTUATION).lower()
        if stripped:
            yield stripped, 1


# The reduce gets its partition's pairs already sorted by word (the seed sorted them itself):
# kvgroup groups the counts of each word, and their sum is the word's count. The same function
# serves as the combiner, which sums the pairs of each map task before they leave it.
def freduce(pairs: Any, params: Any) -> Any:
    for word, counts in kvgroup(pairs):
        yield word, sum(counts)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Disco's word count on asyncdist.mapreduce")
    parser.add_argument(
        "input",
        nargs="*",
        default=[os.path.join(HERE, "sample.txt")],
        help="text files or globs (default: sample.txt beside this script)",
    )
    parser.add_argument("--out", default=".", help="where to write the two files (default: here)")
    parser.add_argument("--partitions", type=int, default=1, help="reduce tasks (default 1)")
    parser.add_argument("--master", help="HOST:PORT of an `asyncdist master` (default: embedded cluster)")
    parser.add_argument("--secret-file", help="the cluster's secret (else ASYNCDIST_SECRET)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    options = {"secret_file": args.secret_file} if args.secret_file else {}
    job = await Job(name="wordcount", master=args.master, **options).run(
        input=args.input, map=fmap, reduce=freduce, combiner=freduce, partitions=args.partitions
    )
    results = await job.wait(show=not args.quiet)
    word_count = [(word, count) async for word, count in result_iterator(results)]
    await job.purge()  # the results are read: free them on the slaves
    await job.close()

    # Sort the results by word and by count (most frequent first; ties keep the words' order),
    # and print them to the two output files.
    word_count.sort()
    sorted_word_count = sorted(word_count, key=lambda wc: wc[1], reverse=True)
    numerical = write_counts(sorted_word_count, args.out, "SortNumberical.txt")
    alphabetical = write_counts(word_count, args.out, "SortAlphabetical.txt")

    total = sum(count for _, count in word_count)
    top = ", ".join(f"{word} {count}" for word, count in sorted_word_count[:5])
    print(f"{total} words, {len(word_count)} distinct; most frequent: {top}")
    print(f"wrote {numerical} and {alphabetical}")


def write_counts(word_count: list[tuple[str, int]], folder: str, name: str) -> str:
    """One ``word \\t count`` line per word (the seed's format), into ``folder/name``."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        for word, count in word_count:
            f.write(f"{word} \t {int(count)}\n")
    return path


if __name__ == "__main__":
    asyncdist.run(main(parse_args()))
