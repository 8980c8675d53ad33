"""Comparison forms of text: the shared normaliser, jieba words, character n-grams.

Everything here works on unique strings and maps back with a join: real data repeats
("燃气表" for hundreds of captions), and the Python-level work (NFKC, jieba) is the slow part.
"""
from __future__ import annotations

import multiprocessing as mp
from typing import Sequence

import jieba
import polars as pl

from schemas.text import clean, normalize

jieba.setLogLevel(60)

# Below this many texts a process pool costs more than it saves.
_POOL_MIN_TEXTS = 20_000


def normalized(col: pl.Series) -> pl.Series:
    """schemas.text.normalize over a column, computed once per distinct value."""
    uniq = col.unique()
    mapped = pl.Series([normalize(t) for t in uniq.to_list()], dtype=pl.String)
    return col.replace_strict(uniq, mapped, return_dtype=pl.String).alias(col.name)


def cleaned(col: pl.Series) -> pl.DataFrame:
    """schemas.text.clean over a column, once per distinct value: `clean` (the text without
    invisible format characters) and `refused` (why the text must not reach a shard, or null)."""
    uniq = col.unique()
    out = [clean(t) if t is not None else (t, None) for t in uniq.to_list()]
    return pl.DataFrame({
        "clean": col.replace_strict(uniq, pl.Series([c for c, _ in out], dtype=pl.String), return_dtype=pl.String),
        "refused": col.replace_strict(uniq, pl.Series([r for _, r in out], dtype=pl.String), return_dtype=pl.String),
    })


def _cut(texts: Sequence[str]) -> list[list[str]]:
    # HMM off: new-word guessing is the slow half of jieba, and one tokeniser for queries and
    # captions matters more than finding names it does not know.
    return [[w for w in jieba.lcut(t, HMM=False) if w.strip()] for t in texts]


def _cut_search(texts: Sequence[str]) -> list[list[str]]:
    return [search_terms([w for w in jieba.lcut(t, HMM=False) if w.strip()]) for t in texts]


def search_terms(words: list[str]) -> list[str]:
    """jieba's search-engine mode from already cut words: each word plus the dictionary
    2- and 3-grams inside it (jieba.cut_for_search's own expansion). BM25 over these lets
    "燃气表" reach a caption about "燃气灶", a hard negative that whole words cannot find."""
    freq = jieba.dt.FREQ
    out: list[str] = []
    for w in words:
        if len(w) > 2:
            out += [w[i:i + 2] for i in range(len(w) - 1) if freq.get(w[i:i + 2])]
        if len(w) > 3:
            out += [w[i:i + 3] for i in range(len(w) - 2) if freq.get(w[i:i + 3])]
        out.append(w)
    return out


def tokenize(texts: Sequence[str], workers: int = 1, search: bool = False) -> list[list[str]]:
    """jieba words of each (already normalised) text, in order; distinct texts cut once.
    search=True gives search_terms() instead."""
    uniq = list(dict.fromkeys(texts))
    fn = _cut_search if search else _cut
    jieba.initialize()  # before any fork, so workers share the loaded dictionary
    if workers > 1 and len(uniq) >= _POOL_MIN_TEXTS:
        # fork: workers run jieba only, never polars (whose threads do not survive a fork).
        size = -(-len(uniq) // (workers * 8))
        chunks = [uniq[i:i + size] for i in range(0, len(uniq), size)]
        with mp.get_context("fork").Pool(workers) as pool:
            cut = [words for part in pool.map(fn, chunks) for words in part]
    else:
        cut = fn(uniq)
    table = dict(zip(uniq, cut))
    return [table[t] for t in texts]


def char_ngrams(df: pl.DataFrame, key: str, text: str, n: int) -> pl.DataFrame:
    """(key, gram) rows: the character n-grams of `text`. A string shorter than n is its own
    single gram, so short strings still get a signature instead of all sharing an empty one."""
    length = pl.col(text).str.len_chars().cast(pl.Int64)
    return (
        df.select(key, text, off=pl.int_ranges(0, pl.max_horizontal(length - n + 1, 1)))
        .explode("off")
        .select(key, gram=pl.col(text).str.slice(pl.col("off"), n))
    )


def cjk_share(expr: pl.Expr) -> pl.Expr:
    """Share of Han characters (0 for an empty string)."""
    n = expr.str.len_chars()
    return pl.when(n > 0).then(expr.str.count_matches(r"\p{Han}") / n).otherwise(0.0)
