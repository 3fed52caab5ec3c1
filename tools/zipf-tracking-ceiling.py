#!/usr/bin/env python3
"""The ceiling of `uhmm bench tier`'s tracking-recall row: how much of the
true hottest tenth of the pages (counted over one window of the Zipf trace)
a tracker can name, when it knows every page's true access probability
(the oracle) or saw every access of another window as long.

The model is the bench's workload: a table of PAGES pages of 32 slots at
load 0.7, keys scrambled over the pages, YCSB's Zipf (theta 0.99). Pages
tied at the tenth's lowest count count as in it, as in the bench.

Usage: tools/zipf-tracking-ceiling.py ACCESSES [PAGES]   (e.g. 1100000 262144)
"""
import bisect
import itertools
import random
import sys

random.seed(1)
accesses = int(sys.argv[1])
pages = int(sys.argv[2]) if len(sys.argv) > 2 else 262144
keys = int(pages * 32 * 0.7)
weights = [(i + 1) ** -0.99 for i in range(keys)]
cum = list(itertools.accumulate(weights))
total = cum[-1]
page_of = [random.randrange(pages) for _ in range(keys)]
prob = [0.0] * pages
for k in range(keys):
    prob[page_of[k]] += weights[k] / total
n = pages // 10


def window():
    counts = [0] * pages
    for _ in range(accesses):
        k = min(bisect.bisect_left(cum, random.random() * total), keys - 1)
        counts[page_of[k]] += 1
    return counts


def top(values):
    return sorted(range(pages), key=lambda p: -values[p])[:n]


def recall(truth, named):
    threshold = sorted(truth, reverse=True)[n - 1]
    room = n - sum(1 for c in truth if c > threshold)
    above = sum(1 for p in named if truth[p] > threshold)
    at = sum(1 for p in named if truth[p] == threshold)
    return (above + min(at, room)) / n


def weighted(truth, named):
    hot = set(top(truth))
    return sum(truth[p] for p in hot & set(named)) / sum(truth[p] for p in hot)


a, b = window(), window()
print(f"{accesses} accesses over {pages} pages; the tenth's edge: {sorted(a, reverse=True)[n - 1]} accesses")
print(f"oracle (true probabilities): recall {recall(a, top(prob)):.2f}, weighted {weighted(a, top(prob)):.2f}")
print(f"every access of another window: recall {recall(a, top(b)):.2f}, weighted {weighted(a, top(b)):.2f}")
