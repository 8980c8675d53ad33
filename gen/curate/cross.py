"""Cross-caption positives: other captions that plainly show a query become its positives.

A query generated for one caption is often just as true of others ("燃气表" fits every
caption with a gas meter). Left alone, those captions are false negatives in every batch
that holds them. This step looks at each query row's BM25 candidates in its own split
and adds, as grade-1 positives ("likely shown"), the captions whose normalised text
contains the whole normalised query; queries of one character are too ambiguous and get
none. Positives stay capped at max_positives. The negatives step already refuses such
captions as negatives, so the two never disagree.

With `judge_candidates`, captions the judge graded 1 or 2 for the query (gen/curate/judged.py)
join the same way, with the judge's grade, ahead of contained ones under the cap.

Added positives are not generated records: the manifest counts them apart
(`cross_positives`; `pairs_out` stays the generated pairs that dropped.parquet accounts for).
"""
from __future__ import annotations

import polars as pl

from gen.curate.config import CurateConfig
from gen.curate.negatives import _BATCH, SplitIndex, SplitIndexes, candidates

CROSS_GRADE = 1.0
MIN_QUERY_CHARS = 2


def _found(rows: pl.DataFrame, caps: pl.DataFrame, index: SplitIndex, config: CurateConfig) -> pl.DataFrame:
    """(qrow, caption_id) of one split, best BM25 rank first: contained, not yet a positive."""
    cand = candidates(index, rows, config.cross_depth)
    hits = (cand.join(caps.select("doc", caption_id="id", c_norm="c_norm"), on="doc")
            .join(rows.select("qrow", "q_norm"), on="qrow")
            .filter(pl.col("q_norm").str.len_chars() >= MIN_QUERY_CHARS)
            .filter(pl.col("c_norm").str.contains(pl.col("q_norm"), literal=True)))
    have = rows.select("qrow", caption_id="pos_ids").explode("caption_id")
    return (hits.join(have, on=["qrow", "caption_id"], how="anti")
            .sort(["qrow", "score", "doc"], descending=[False, True, False])
            .select("qrow", "caption_id"))


def _judged(rows: pl.DataFrame, caps: pl.DataFrame, judged: pl.DataFrame) -> pl.DataFrame:
    """(qrow, caption_id, grade) of one split: judged relevant, not yet a positive."""
    hits = (rows.select("qrow", "q_norm").join(judged, on="q_norm")
            .join(caps.select(caption_id="id"), on="caption_id"))
    have = rows.select("qrow", caption_id="pos_ids").explode("caption_id")
    return (hits.join(have, on=["qrow", "caption_id"], how="anti")
            .select("qrow", "caption_id", grade=pl.col("judge_grade").cast(pl.Float64)))


def extend(rows: pl.DataFrame, indexes: SplitIndexes, config: CurateConfig,
           judged: pl.DataFrame | None = None) -> tuple[pl.DataFrame, int]:
    """rows (query rows of all splits: qrow, split, q_norm, q_words, pos, pos_ids, pos_scores)
    with other captions of the same split appended to pos, pos_ids and pos_scores: those the
    judge graded 1 or 2 for the query (judged: caption_id, q_norm, judge_grade), with that
    grade, and those containing the query (cross_positives), with grade 1. Returns the rows
    and how many positives came from the judge."""
    found, by_judge = [], False
    for name in ("train", "dev"):
        split_caps = indexes.captions(name)
        part = rows.filter(pl.col("split") == name)
        if not (part.height and split_caps.height):
            continue
        if judged is not None and judged.height:
            found.append(_judged(part, split_caps, judged).with_columns(judge=pl.lit(True)))
            by_judge = True
        if config.cross_positives:
            # In slices, as negatives.mine does: the candidate frame grows with the rows.
            found += [_found(batch, split_caps, indexes.index(name), config)
                      .with_columns(grade=pl.lit(CROSS_GRADE), judge=pl.lit(False))
                      for batch in part.iter_slices(_BATCH)]
    if not found:
        return rows, 0
    room = rows.select("qrow", room=config.max_positives - pl.col("pos_ids").list.len())
    # Ids only until the cap is applied: caption texts are the bulk of these frames.
    ranked = pl.concat(found)   # contained ones are distinct and in BM25 order per row already
    if by_judge:  # under the cap, the judge's 2s first, then its 1s, then contained by BM25 rank
        ranked = (ranked.with_row_index("_i")
                  .sort(["qrow", "grade", "judge", "_i"], descending=[False, True, True, False])
                  .unique(["qrow", "caption_id"], keep="first", maintain_order=True).drop("_i"))
    added = (ranked.join(room, on="qrow", maintain_order="left")
             .filter(pl.int_range(pl.len()).over("qrow") < pl.col("room")))
    n_judged = int(added["judge"].sum())
    texts = indexes.all_caps.select(caption_id="id", text="text")
    added = (added.join(texts, on="caption_id", maintain_order="left")
             .group_by("qrow")
             .agg(x_ids=pl.col("caption_id"), x_text=pl.col("text"), x_grade=pl.col("grade")))
    out = rows.join(added, on="qrow", how="left", maintain_order="left")
    return out.with_columns(
        pos=pl.concat_list("pos", pl.col("x_text").fill_null([])),
        pos_ids=pl.concat_list("pos_ids", pl.col("x_ids").fill_null([])),
        pos_scores=pl.concat_list("pos_scores", pl.col("x_grade").fill_null([])),
    ).drop("x_ids", "x_text", "x_grade"), n_judged
