"""The seed's Disco word count, blocking as in Disco: SortNumberical.txt and SortAlphabetical.txt.

Run:  python examples/sync/wordcount.py     (writes the two files into the current directory)

The job runs on an embedded cluster (a master in this process and one slave
process per core), stopped when the script ends. Only the imports differ from
the seed (``from Disco.core import Job, result_iterator`` and, in ``reduce``,
``from Disco.utils import kvgroup``), with its outright bugs fixed: the two
functions were indented under nothing; Python 2's
``word.translate(string.maketrans("", ""), string.punctuation)`` is
``word.translate(str.maketrans("", "", string.punctuation))``; and the input was
the text itself, which Disco reads as a list of URLs: it is a ``raw://`` URL here
(Disco's way to give data inline). As in the seed's code, words are not
lower-cased (its comment says they are).
"""

# The seed's own style, kept: %-formatting, open() without a with block.
# ruff: noqa: UP031, SIM115

from asyncdist.sync import Job, result_iterator


# Split a line into words, ignoring punctuation: each line maps to (word, 1) pairs.
# (the seed indented map and reduce under nothing)
def map(line, params):
    import string

    for word in line.split():
        # the seed (Python 2): word.translate(string.maketrans("", ""), string.punctuation)
        strippedWord = word.translate(str.maketrans("", "", string.punctuation))
        yield strippedWord, 1


# kvgroup groups the sorted pairs by word; the sum of each group is the word's count.
def reduce(iter, params):
    from asyncdist.sync import kvgroup

    for word, counts in kvgroup(sorted(iter)):
        yield word, sum(counts)


if __name__ == "__main__":
    # the seed: input="There are known knows. ..." (the text itself); Disco's inline data is raw://
    job = Job().run(
        input="raw://There are known knows.\
                           These are things we know that we know.\
                           These are known unknown.\
                           That is to say,\
                           there are things that\
                           we know we do not know.\
                           But there are also unknown unknowns.\
                           There are things\
                           we do not know we do not know",
        map=map,
        reduce=reduce,
    )
    # Sort the results by count and by word, and print them to the two output files
    sort_in_numberical_order = open("SortNumberical.txt", "w")
    sort_in_alphabetcally_order = open("SortAlphabetical.txt", "w")

    wordCount = []
    for word, count in result_iterator(job.wait(show=True)):
        sort_in_alphabetcally_order.write("%s \t %d\n" % (str(word), int(count)))
        wordCount.append((word, count))
    sortedWordCount = sorted(wordCount, key=lambda count: count[1], reverse=True)
    for word, count in sortedWordCount:
        sort_in_numberical_order.write("%s \t %d\n" % (str(word), int(count)))
    sort_in_alphabetcally_order.close()
    sort_in_numberical_order.close()
