"""What every curation step shares: the record ranking, and dropping rows with their reason.

A step takes the surviving query records and returns (kept, dropped); `dropped` keeps every
input column plus `reason` and `detail`, so nothing vanishes without a trace in
shards/dropped.parquet.
"""
from __future__ import annotations

import polars as pl

from schemas.answer import QUERY_TYPES

TYPE_ORDER = {t: i for i, t in enumerate(QUERY_TYPES)}
DROP_COLUMNS = ("reason", "detail")


def with_rank(recs: pl.DataFrame) -> pl.DataFrame:
    """`rank`: 0 is the best record. Higher grade first, then more salient (lower number),
    then the type order of the answer schema, then input order, so every tie is broken."""
    order = pl.col("type").replace_strict(TYPE_ORDER, default=len(TYPE_ORDER), return_dtype=pl.Int32)
    return (
        recs.with_columns(_order=order)
        .sort(["grade", "salience", "_order", "row"], descending=[True, False, False, False])
        .with_columns(rank=pl.int_range(pl.len(), dtype=pl.UInt32))
        .drop("_order")
    )


def split_off(
    recs: pl.DataFrame, drop: pl.Expr, reason: str | pl.Expr, detail: pl.Expr | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows where `drop` is false, rows where it is true with reason and detail)."""
    marked = recs.with_columns(_drop=drop.fill_null(False))
    kept = marked.filter(~pl.col("_drop")).drop("_drop")
    dropped = marked.filter(pl.col("_drop")).drop("_drop").with_columns(
        reason=reason if isinstance(reason, pl.Expr) else pl.lit(reason),
        detail=(detail if detail is not None else pl.lit(None)).cast(pl.String),
    )
    return kept, dropped
