"""Pairs that need no LLM, the bar generated data has to clear.

jieba: every noun and verb jieba's tagger finds in a caption (flags n*, v*), two characters
or more (single characters such as 人 or 有 match almost every caption), once per caption.
With generic_share, words found in more than that share of the captions are dropped, as
capgen's curation drops generic queries (generic_share): left in, "图片" alone is 807 of
the 12,000 pairs the protocol draws from 1,536 captions, and "展示" 358.
"""
from __future__ import annotations

import polars as pl


def jieba_pairs(corpus: dict[str, str], min_chars: int = 2, generic_share: float | None = None) -> pl.DataFrame:
    import jieba.posseg as pseg

    rows = []
    for cid, text in corpus.items():
        seen = set()
        for w in pseg.lcut(text):
            word, flag = w.word.strip(), w.flag
            if len(word) >= min_chars and flag[:1] in ("n", "v") and word not in seen:
                seen.add(word)
                rows.append((word, cid, "noun" if flag[0] == "n" else "verb"))
    df = pl.DataFrame(rows, schema=["query", "caption_id", "type"], orient="row")
    if generic_share is not None:
        df = df.filter(pl.len().over("query") <= generic_share * len(corpus))
    return df
