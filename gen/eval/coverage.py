"""Coverage: does a caption's generated set contain what a person searched for?

For each strong labelled pair (human query h, caption c with grade 2), the pair is covered
when one of c's generated queries q *matches* h. A match is strict on purpose, so that a
long query which merely contains h does not count:

  1. equal after normalisation (NFKC, case, punctuation and spaces dropped); or
  2. one contains the other and the shorter has at least 75% of the longer's characters
     ("体育馆" ~ "体育馆里", but not "公园" ~ "公园门口", nor h inside a summary); or
  3. the same multiset of jieba words once function words are dropped ("女孩和狗" ~ "狗和女孩").

Reported overall and per human query type, with which generated type matched first.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable

from gen.eval.labels import LabelledQuery
from schemas.text import normalize

CONTAIN_RATIO = 0.75
_FUNCTION_WORDS = frozenset("的 地 得 和 与 及 跟 同 在 里 中 上 了 着 个 一个 是 有".split())


def _words(text: str) -> tuple[str, ...]:
    import jieba  # loaded on first use: its dictionary takes a second
    return tuple(sorted(w for w in (normalize(t) for t in jieba.lcut(text)) if w and w not in _FUNCTION_WORDS))


class Matcher:
    """Matches one human query against many generated ones; caches the jieba split."""

    def __init__(self, human: str):
        self.norm = normalize(human)
        self.words = _words(human)

    def matches(self, generated: str) -> bool:
        g = normalize(generated)
        if not g or not self.norm:
            return False
        if g == self.norm:
            return True
        short, long_ = sorted((g, self.norm), key=len)
        if short in long_ and len(short) >= CONTAIN_RATIO * len(long_):
            return True
        return bool(self.words) and _words(generated) == self.words


def coverage(labels: list[LabelledQuery], generated: Iterable[tuple[str, str, str]]) -> dict:
    """generated: (caption_id, query, type) rows. Only captions that have generated rows
    count (a run over part of the corpus is measured on that part; `captions` says how many)."""
    by_caption: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for cid, query, qtype in generated:
        by_caption[cid].append((query, qtype))
    total, hit = Counter(), Counter()
    matched_by = Counter()
    for lq in labels:
        m = Matcher(lq.query)
        for cid, grade in lq.positives.items():
            if grade < 2 or cid not in by_caption:
                continue
            total[lq.type] += 1
            for query, qtype in by_caption[cid]:
                if m.matches(query):
                    hit[lq.type] += 1
                    matched_by[qtype] += 1
                    break
    n = sum(total.values())
    return {
        "strong_pairs": n,
        "covered": sum(hit.values()),
        "coverage": round(sum(hit.values()) / n, 4) if n else None,
        "captions": len(by_caption),
        "by_type": {t: {"pairs": total[t], "coverage": round(hit[t] / total[t], 4)} for t in sorted(total)},
        "matched_by_generated_type": dict(matched_by.most_common()),
    }
