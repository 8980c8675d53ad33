"""Round-trip filter: a query that cannot find its own caption is generic or invented.

For each record, BM25 (the same index as negatives, over every caption of the run) ranks
the corpus for the query; the record stays when its caption is among the top
`roundtrip_k`, or when the caption contains the whole query (a literal mention is
grounded however many other captions share it: "桌子" in a corpus of 50 tables). Types
in `roundtrip_exempt` are kept regardless: a hypernym is by design a word its caption
does not use, so BM25 cannot vouch for it. Off unless roundtrip_k is set; measured in
docs/quality.md.
"""
from __future__ import annotations

import polars as pl

from gen.curate.config import CurateConfig
from gen.curate.negatives import SplitIndex, candidates
from gen.curate.steps import split_off


def apply(recs: pl.DataFrame, caps: pl.DataFrame, config: CurateConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """recs: caption_id, rank, q_norm, q_words, c_norm, type. caps: id, c_words."""
    k = config.roundtrip_k
    if k is None or recs.height == 0:
        return split_off(recs, pl.lit(False), "roundtrip_miss")
    docs = caps.sort("id").with_row_index("doc")
    checked = recs.filter(~pl.col("type").is_in(list(config.roundtrip_exempt))
                          & ~pl.col("c_norm").str.contains(pl.col("q_norm"), literal=True))
    if checked.height == 0:
        return split_off(recs, pl.lit(False), "roundtrip_miss")
    queries = checked.select("q_norm", "q_words").unique("q_norm", maintain_order=True).with_row_index("qrow")
    index = SplitIndex(docs["c_words"].to_list(), config, queries.height)
    top = (candidates(index, queries, k).join(queries.select("qrow", "q_norm"), on="qrow")
           .join(docs.select("doc", caption_id="id"), on="doc").select("q_norm", "caption_id", "pos"))
    found = checked.join(top, on=["q_norm", "caption_id"], how="left")
    missed = found.filter(pl.col("pos").is_null())["rank"]
    return split_off(recs, pl.col("rank").is_in(missed.implode()), "roundtrip_miss",
                     pl.lit(f"own caption not in BM25 top {k}"))
