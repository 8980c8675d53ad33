"""Duplicates within one caption: exact (same normalised text) and near (character n-grams).

Near-duplicates use the Jaccard similarity of character 2- and 3-gram sets. Word 5-gram
MinHash, the usual choice for web text, sees nothing in a 4-character Chinese query; and
since only queries of the same caption are compared, exact Jaccard through a join on
(caption, gram) is cheaper than MinHash and has no false positives to tune away.
"""
from __future__ import annotations

import polars as pl

from gen.curate.normalize import char_ngrams
from gen.curate.steps import split_off


def exact(recs: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Keep the best-ranked record of each (caption, normalised query)."""
    best = pl.col("rank").min().over(["caption_id", "q_norm"])
    kept_query = pl.col("query").sort_by("rank").first().over(["caption_id", "q_norm"])
    return split_off(recs, pl.col("rank") != best, "duplicate_exact", kept_query)


def near_pairs(recs: pl.DataFrame, threshold: float) -> pl.DataFrame:
    """(better, worse) rank pairs of one caption whose 2-3-gram Jaccard >= threshold."""
    base = recs.select("rank", "q_norm", cap=pl.col("caption_id").cast(pl.Categorical).to_physical())
    # One u64 key per (caption, gram): a single-column join is much faster than two. A hash
    # collision (odds ~1e-5 a run) could add one shared gram to a pair; pairs across captions
    # it could invent are removed by the caption check at the end.
    grams = (
        pl.concat([char_ngrams(base, "rank", "q_norm", n) for n in (2, 3)])
        .join(base.select("rank", "cap"), on="rank")
        .select("rank", key=pl.struct("cap", pl.col("gram").hash()).hash())
        .unique()
    )
    sizes = grams.group_by("rank").agg(n=pl.len())
    # Only grams that two queries of one caption share can make a pair.
    shared = grams.filter(pl.len().over("key") > 1)
    return (
        shared.join(shared, on="key", suffix="_b")
        .filter(pl.col("rank") < pl.col("rank_b"))
        .group_by("rank", "rank_b")
        .agg(inter=pl.len())
        .join(sizes, on="rank")
        .join(sizes, left_on="rank_b", right_on="rank", suffix="_b")
        .filter(pl.col("inter") / (pl.col("n") + pl.col("n_b") - pl.col("inter")) >= threshold)
        .join(base.select("rank", "cap"), on="rank")
        .join(base.select(rank_b="rank", cap_b="cap"), on="rank_b")
        .filter(pl.col("cap") == pl.col("cap_b"))
        .select(better="rank", worse="rank_b")
        .sort("better", "worse")
    )


def near(recs: pl.DataFrame, threshold: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Drop the worse of each near-duplicate pair, best first: a record dropped for being
    near a better one does not knock out others in turn (A~B, B~C, A!~C keeps A and C)."""
    pairs = near_pairs(recs, threshold)
    gone: dict[int, int] = {}
    for better, worse in pairs.iter_rows():  # only near-duplicate pairs: few
        if better not in gone and worse not in gone:
            gone[worse] = better
    if not gone:
        return recs, split_off(recs.clear(), pl.lit(True), "duplicate_near")[1]
    loser = pl.DataFrame({"rank": list(gone), "_by": list(gone.values())},
                         schema={"rank": pl.UInt32, "_by": pl.UInt32})
    by_text = recs.select(_by="rank", _by_query="query")
    marked = recs.join(loser, on="rank", how="left").join(by_text, on="_by", how="left")
    kept, dropped = split_off(marked, pl.col("_by").is_not_null(), "duplicate_near", pl.col("_by_query"))
    return kept.drop("_by", "_by_query"), dropped.drop("_by", "_by_query")
