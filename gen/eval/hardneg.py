"""One hard negative caption per training pair, mined the same way for every pool.

The fixed protocol trains on in-batch negatives only: 31 random captions a batch, which a
query like "白色的小狗在草地上奔跑" tells apart from its caption by any word. The benchmark
asks for the fine-grained cut (the black dog on the grass, the white dog indoors), so this
variant adds, for each pair, the caption BM25 ranks highest for the query among the pool's
captions that are not its positives. capgen's shards carry negatives of their own, but the
baselines have none: so every pool, capgen's included, is mined here by curation's own
miner (gen/curate/negatives.py) with the same settings, and only the pairs differ.

What the miner refuses as a negative of a query: a caption paired with it anywhere in the
pool, one containing it, or one containing all its jieba words. Queries BM25 finds nothing
for (one-word ones, mostly) get a guarded random caption, as in curation.
"""
from __future__ import annotations

from collections import Counter

import polars as pl

from gen.curate.config import CurateConfig
from gen.curate.negatives import SplitIndexes, mine
from gen.curate.normalize import normalized, tokenize
from gen.curate.positives import query_id

SPLIT = "train"


def _words(texts: pl.Series, search: bool) -> pl.Series:
    return pl.Series(tokenize(texts.to_list(), search=search), dtype=pl.List(pl.String))


def negatives(pool: pl.DataFrame, corpus: dict[str, str], queries: list[str]) -> dict[str, str]:
    """query -> negative caption id, for each of `queries`, mined among the captions of `pool`
    (query, caption_id rows: every pair it has, so none of a query's positives is its negative)."""
    config = CurateConfig(negatives=1)
    pool = pool.select("query", "caption_id").unique()
    caps = pl.DataFrame({"id": pool["caption_id"].unique().sort()})
    caps = caps.with_columns(text=pl.col("id").replace_strict(corpus), split=pl.lit(SPLIT))
    caps = caps.with_columns(c_norm=normalized(caps["text"]))
    caps = caps.with_columns(c_words=_words(caps["c_norm"], search=True))

    wanted = pl.DataFrame({"query": list(dict.fromkeys(queries))}, schema={"query": pl.String})
    wanted = wanted.with_columns(q_norm=normalized(wanted["query"]))
    rows = (wanted.select("q_norm").unique(maintain_order=True)
            # curation's own ids, which seed the random fill as they do in the shards
            .with_columns(query_id=pl.col("q_norm").map_elements(query_id, return_dtype=pl.String),
                          split=pl.lit(SPLIT))
            .with_row_index("qrow"))
    rows = rows.with_columns(q_words=_words(rows["q_norm"], search=False))
    known = pool.with_columns(q_norm=normalized(pool["query"])).select("caption_id", "q_norm")

    found = mine(rows, SplitIndexes(caps, rows, config), SPLIT, known, config, Counter())
    first = found.select("qrow", neg_id=pl.col("neg_ids").list.first())
    by_norm = rows.join(first, on="qrow").select("q_norm", "neg_id")
    out = wanted.join(by_norm, on="q_norm").drop_nulls("neg_id")
    return dict(zip(out["query"].to_list(), out["neg_id"].to_list()))


def attach(sample: pl.DataFrame, pool: pl.DataFrame, corpus: dict[str, str]) -> pl.DataFrame:
    """sample (the protocol's drawn pairs) with neg_id: each pair's hard negative. A pair whose
    query has none (a pool of one caption) has no caption to contrast with and raises."""
    neg = negatives(pool, corpus, sample["query"].to_list())
    out = sample.with_columns(neg_id=pl.col("query").replace_strict(neg, default=None, return_dtype=pl.String))
    missing = out.filter(pl.col("neg_id").is_null())
    if missing.height:
        raise ValueError(f"{missing.height} sampled pairs have no caption to mine a negative from, "
                         f"e.g. {missing['query'][0]!r}")
    return out
