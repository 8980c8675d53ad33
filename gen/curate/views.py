"""The shapes trainers load, all cut from one frame of query rows (one row per query and
split: query, pos/neg texts and ids, grades, BM25 scores)."""
from __future__ import annotations

import polars as pl

# Parquet query shards: the FlagEmbedding row plus ids, BM25 scores and the judge's
# confirmations (neg_judged: graded 0 by the judge) for tracing.
QUERY_COLUMNS = ("query_id", "query", "type", "subtype", "pos", "pos_ids", "pos_scores",
                 "neg", "neg_ids", "neg_scores", "neg_bm25", "neg_judged")
FLAG_COLUMNS = ("query", "pos", "neg", "type", "pos_scores", "neg_scores")


def _with_neg_scores(rows: pl.DataFrame) -> pl.DataFrame:
    # Scores share one scale, the grade: positives 2 (strongly shown) or 1 (likely), mined
    # negatives 0, which is what the false-negative guard stands for. BM25 scores are not
    # relevance and stay in neg_bm25.
    return rows.with_columns(
        neg_scores=pl.col("neg_bm25").list.eval(pl.lit(0.0, dtype=pl.Float64)),
    )


def query_rows(rows: pl.DataFrame) -> pl.DataFrame:
    return _with_neg_scores(rows).select(QUERY_COLUMNS)


def flag(rows: pl.DataFrame) -> pl.DataFrame:
    """FlagEmbedding JSON lines: pos and neg are lists (a string there is split into
    characters by the trainer)."""
    return _with_neg_scores(rows).select(FLAG_COLUMNS)


def sentence_transformers(rows: pl.DataFrame, k: int) -> pl.DataFrame:
    """anchor, positive, negative_1..negative_k; one row per (query, positive). The column
    order is the role, so nothing else goes in. Rows need all k negatives (a null negative
    breaks the loss): query rows with fewer are left out of this view only."""
    full = rows.filter(pl.col("neg").list.len() >= k).select("query", "pos", "neg").explode("pos")
    return full.select(
        anchor="query", positive="pos",
        **{f"negative_{i + 1}": pl.col("neg").list.get(i) for i in range(k)},
    )


def beir(rows: pl.DataFrame, captions: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """MTEB/BEIR retrieval set: corpus (_id, title, text) = every caption of the split,
    queries (_id, text), qrels (query-id, corpus-id, score = grade 2/1). The title is empty
    but present: BEIR's loader reads a missing one as None, and its encoder adds it to the text."""
    corpus = captions.select(_id="id", title=pl.lit(""), text="text").sort("_id")
    queries = rows.select(_id="query_id", text="query").sort("_id")
    qrels = (
        rows.select("query_id", "pos_ids", "pos_scores").explode("pos_ids", "pos_scores")
        .select(**{"query-id": pl.col("query_id"), "corpus-id": pl.col("pos_ids"),
                   "score": pl.col("pos_scores").cast(pl.Int64)})
        .sort("query-id", "corpus-id")
    )
    return corpus, queries, qrels
