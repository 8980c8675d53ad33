"""Which pairs may share a batch, when every other caption of a batch is a query's negative.

- No text twice in a batch (sentence-transformers' NO_DUPLICATES, the fixed protocol): a
  repeated caption would be its own query's negative.
- With clean=True (a protocol variant, reported apart), also no caption that contains
  another pair's query, compared after schemas.text.normalize. "天空" paired with one sky
  photo must not be pushed away from another sky photo in its batch. In random batches of
  32 (measured on the 1,536-caption pools, docs/quality.md) a third of the jieba
  baseline's queries and a tenth of capgen's meet such a caption.

Greedy: shuffled, each batch takes the first waiting pairs that fit it, the rest wait. A
query that most captions contain ("人") fits no batch; rather than a tail of tiny batches,
a batch that cannot be filled under clean is topped up under the first rule alone, so
clean adds no batches. Repeated texts can still leave the tail short (jieba's 图片 is 807
of its 12,000 pairs); the trainer stops at the protocol's ceil(n / batch) steps either way.
"""
from __future__ import annotations

import random

from schemas.text import normalize


def plan(queries: list[str], captions: list[tuple[str, ...]], batch_size: int, rng: random.Random,
         clean: bool) -> tuple[list[list[int]], list[int]]:
    """Batches of pair indices, and the pairs placed under the first rule alone.
    captions[i]: pair i's caption texts (its positive, then any hard negative)."""
    texts = [(q, *c) for q, c in zip(queries, captions)]
    q_norm = [normalize(q) for q in queries] if clean else []
    c_norm = [tuple(normalize(t) for t in c) for c in captions] if clean else []
    waiting = list(range(len(queries)))
    rng.shuffle(waiting)
    out, relaxed = [], []
    while waiting:
        batch, seen, later = [], set(), []
        for i in waiting:
            fits = len(batch) < batch_size and seen.isdisjoint(texts[i])
            if fits and not (clean and _clash(i, batch, q_norm, c_norm)):
                batch.append(i)
                seen.update(texts[i])
            else:
                later.append(i)
        if clean and len(batch) < batch_size and later:
            rest = []
            for i in later:
                if len(batch) < batch_size and seen.isdisjoint(texts[i]):
                    batch.append(i)
                    seen.update(texts[i])
                    relaxed.append(i)
                else:
                    rest.append(i)
            later = rest
        out.append(batch)
        waiting = later
    return out, relaxed


def _clash(i: int, batch: list[int], q_norm: list[str], c_norm: list[tuple[str, ...]]) -> bool:
    # An empty normal form (a query of punctuation only) is in every string: it clashes with nothing.
    mine = q_norm[i]
    return any(mine and mine in t for j in batch for t in c_norm[j]) or \
        any(q_norm[j] and q_norm[j] in t for j in batch for t in c_norm[i])
