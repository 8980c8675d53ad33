"""Pairs that need no LLM, the bar generated data has to clear.

jieba: every noun and verb jieba's tagger finds in a caption (flags n*, v*), two characters
or more (single characters such as 人 or 有 match almost every caption), once per caption.
"""
from __future__ import annotations

import polars as pl


def jieba_pairs(corpus: dict[str, str], min_chars: int = 2) -> pl.DataFrame:
    import jieba.posseg as pseg

    rows = []
    for cid, text in corpus.items():
        seen = set()
        for w in pseg.lcut(text):
            word, flag = w.word.strip(), w.flag
            if len(word) >= min_chars and flag[:1] in ("n", "v") and word not in seen:
                seen.add(word)
                rows.append((word, cid, "noun" if flag[0] == "n" else "verb"))
    return pl.DataFrame(rows, schema=["query", "caption_id", "type"], orient="row")
