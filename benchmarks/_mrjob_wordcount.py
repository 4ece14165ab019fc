"""The word count of bench_mapreduce.py as an mrjob job (mrjob runs this file in its task subprocesses).

``python benchmarks/_mrjob_wordcount.py -r local --num-cores 2 INPUT`` prints one
``"word"\\tcount`` line per word (mrjob's JSON key, JSON value). The same job as the other
implementations: the mapper yields ``(word, 1)`` per word, the combiner and the reducer sum.
"""

from mrjob.job import MRJob
from mrjob.protocol import RawValueProtocol


class MRWordCount(MRJob):  # type: ignore[misc]
    INPUT_PROTOCOL = RawValueProtocol

    def mapper(self, _, line):  # type: ignore[no-untyped-def]
        for word in line.split():
            yield word, 1

    def combiner(self, word, counts):  # type: ignore[no-untyped-def]
        yield word, sum(counts)

    def reducer(self, word, counts):  # type: ignore[no-untyped-def]
        yield word, sum(counts)


if __name__ == "__main__":
    MRWordCount.run()
