"""Quality filters. Each is a setting, each drop is counted under its reason; a record failing
several is counted once, under the first in FILTER_ORDER (cheapest and most certain first)."""
from __future__ import annotations

import polars as pl
from rapidfuzz.distance import LCSseq

from gen.curate.config import CurateConfig
from gen.curate.normalize import char_ngrams, cjk_share
from gen.curate.steps import split_off
from schemas.text import normalize

FILTER_ORDER = (
    "empty", "stoplist", "too_short", "too_long", "too_few_words", "too_many_words",
    "low_cjk_share", "copies_caption", "ungrounded_grade2",
)
# Words too common to show that a query names something in its caption.
FUNCTION_WORDS = frozenset("的 了 在 和 与 及 或 是 有 着 个 一 一个 一些 这 那 上 中 里 下 把 被 对 也 都 很".split())


def apply(recs: pl.DataFrame, config: CurateConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """`recs` needs q_norm, q_words (jieba words of q_norm) and c_norm (its caption's)."""
    q_len = pl.col("q_norm").str.len_chars()
    n_words = pl.col("q_words").list.len()
    stop = sorted({normalize(s) for s in config.stoplist})
    failing = {
        "empty": q_len == 0,
        "stoplist": pl.col("q_norm").is_in(stop),
        "too_short": q_len < config.min_chars,
        "too_long": q_len > config.max_chars,
        "too_few_words": n_words < config.min_words,
        "too_many_words": n_words > config.max_words,
        "low_cjk_share": cjk_share(pl.col("q_norm")) < config.min_cjk_share,
        "copies_caption": pl.col("_copies"),
        "ungrounded_grade2": pl.col("_ungrounded"),
    }
    marked = _with_copies(recs, config.copy_ratio)
    marked = _with_ungrounded(marked, config.grounding_types)
    reason = pl.coalesce([pl.when(failing[r]).then(pl.lit(r)) for r in FILTER_ORDER])
    kept, dropped = split_off(marked, reason.is_not_null(), reason)
    helpers = ("_copies", "_ungrounded")
    return kept.drop(helpers), dropped.drop(helpers)


def _with_copies(recs: pl.DataFrame, ratio: float) -> pl.DataFrame:
    # LCS is at most the query's length, so only queries nearly as long as their caption can
    # copy it: the exact LCS (rapidfuzz, bit-parallel C++) runs on those few alone.
    long_enough = pl.col("q_norm").str.len_chars() >= ratio * pl.col("c_norm").str.len_chars()
    cand = recs.filter(long_enough & (pl.col("c_norm").str.len_chars() > 0)).select("rank", "q_norm", "c_norm")
    copies = [
        r for r, q, c in cand.iter_rows()
        if q == c or LCSseq.similarity(q, c) >= ratio * len(c)
    ]
    return recs.with_columns(_copies=pl.col("rank").is_in(pl.Series(copies, dtype=pl.UInt32).implode()))


def _with_ungrounded(recs: pl.DataFrame, types: tuple[str, ...]) -> pl.DataFrame:
    # "Names something in the caption": a character bigram of the query, or one of its
    # words other than function words, occurs in the caption. One-character queries are
    # their own bigram (char_ngrams), so "猫" is grounded in "一只猫".
    claims = recs.filter(pl.col("type").is_in(list(types)) & (pl.col("grade") == 2)
                         & (pl.col("q_norm").str.len_chars() > 0))
    bigrams = char_ngrams(claims, "rank", "q_norm", 2).rename({"gram": "unit"})
    words = (claims.select("rank", unit="q_words").explode("unit")
             .filter(pl.col("unit").is_not_null() & ~pl.col("unit").is_in(sorted(FUNCTION_WORDS))))
    units = pl.concat([bigrams, words]).unique().join(claims.select("rank", "c_norm"), on="rank")
    grounded = (units.filter(pl.col("c_norm").str.contains(pl.col("unit"), literal=True))
                .select("rank").unique())
    ungrounded = claims.select("rank").join(grounded, on="rank", how="anti")["rank"]
    return recs.with_columns(_ungrounded=pl.col("rank").is_in(ungrounded.implode()))
