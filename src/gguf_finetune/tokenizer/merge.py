"""The greedy pair-merge loop shared by the SPM and BPE tokenizers.

llama.cpp keeps adjacent symbol pairs in a priority queue and repeatedly merges the best one
(SPM: highest score; BPE: lowest merge rank), ties going to the leftmost pair; a queued pair whose
symbols have changed since is skipped.  That is exactly "merge the best adjacent pair, leftmost
first, until none is mergeable", which is what both functions here compute:

* :func:`merge_reference` - the obvious O(n^2) rescan with a priority callback, the specification;
* :func:`merge` - the heap + linked list version (O(n log n)), for long inputs;
* :func:`merge_pairs` / :func:`merge_concat` - what the tokenizers call: a patched list of pair
  priorities for short inputs (most words), :func:`merge` for long ones.
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush
from typing import Callable, Optional

# priority(left_text, right_text) -> a sortable key (smaller merges first) or None (not mergeable)
Priority = Callable[[str, str], Optional[float]]


def merge_reference(symbols: list[str], priority: Priority) -> list[str]:
    syms = list(symbols)
    while True:
        best = None
        best_i = -1
        for i in range(len(syms) - 1):
            p = priority(syms[i], syms[i + 1])
            if p is not None and (best is None or p < best):
                best, best_i = p, i
        if best is None:
            return syms
        syms[best_i:best_i + 2] = [syms[best_i] + syms[best_i + 1]]


def merge(symbols: list[str], priority: Priority) -> list[str]:
    n = len(symbols)
    if n < 2:
        return list(symbols)
    syms: list = list(symbols)  # syms[i] is None once merged into its left neighbour
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        p = priority(syms[i], syms[i + 1])
        if p is not None:
            heap.append((p, i, syms[i] + syms[i + 1]))
    heapify(heap)
    while heap:
        _p, i, text = heappop(heap)
        left = syms[i]
        j = nxt[i]
        # stale: the left symbol was absorbed, or either side grew since this pair was queued
        if left is None or j < 0 or left + syms[j] != text:
            continue
        syms[i] = text
        syms[j] = None
        k = nxt[j]
        nxt[i] = k
        if k >= 0:
            prv[k] = i
        h = prv[i]
        if h >= 0:
            p = priority(syms[h], text)
            if p is not None:
                heappush(heap, (p, h, syms[h] + text))
        if k >= 0:
            p = priority(text, syms[k])
            if p is not None:
                heappush(heap, (p, i, text + syms[k]))
    return [s for s in syms if s is not None]


# Most words are a handful of symbols: there a list of pair priorities, searched with the C-level
# min()/index() (leftmost minimum = leftmost best pair) and patched around each merge, is several
# times faster than the heap.  Same result: both merge the best pair, leftmost on ties.
SMALL = 64
_NONE = float("inf")  # "not mergeable": larger than any priority


def merge_pairs(symbols: list[str], table: dict) -> list[str]:
    """:func:`merge` with ``priority(a, b) = table.get((a, b))`` (BPE merge ranks)."""
    n = len(symbols)
    get = table.get
    if n > SMALL:
        return merge(symbols, lambda a, b: get((a, b)))
    syms = list(symbols)
    if n < 2:
        return syms
    pr = [get((syms[i], syms[i + 1]), _NONE) for i in range(n - 1)]
    while pr:
        best = min(pr)
        if best == _NONE:
            break
        i = pr.index(best)
        syms[i] += syms[i + 1]
        del syms[i + 1]
        del pr[i]
        if i < len(pr):
            pr[i] = get((syms[i], syms[i + 1]), _NONE)
        if i > 0:
            pr[i - 1] = get((syms[i - 1], syms[i]), _NONE)
    return syms


def merge_concat(symbols: list[str], table: dict) -> list[str]:
    """:func:`merge` with ``priority(a, b) = table.get(a + b)`` (SPM: minus the token score)."""
    n = len(symbols)
    get = table.get
    if n > SMALL:
        return merge(symbols, lambda a, b: get(a + b))
    syms = list(symbols)
    if n < 2:
        return syms
    pr = [get(syms[i] + syms[i + 1], _NONE) for i in range(n - 1)]
    while pr:
        best = min(pr)
        if best == _NONE:
            break
        i = pr.index(best)
        syms[i] += syms[i + 1]
        del syms[i + 1]
        del pr[i]
        if i < len(pr):
            pr[i] = get(syms[i] + syms[i + 1], _NONE)
        if i > 0:
            pr[i - 1] = get(syms[i - 1] + syms[i], _NONE)
    return syms
