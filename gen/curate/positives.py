"""From records (one caption, one query) to queries with positives, and the SM/KW mix.

The same normalised query generated for several captions is one query whose positives are
all those captions. A query that claims a large share of the corpus is generic: in a batch
its other positives are false negatives, so it is dropped; the others keep at most
`max_positives` positives, best graded (then most salient) first.
"""
from __future__ import annotations

import hashlib
import math

import polars as pl

from gen.curate.config import CurateConfig
from gen.curate.steps import split_off


def unit_hash(*cols: str) -> pl.Expr:
    """A deterministic number in [0, 1) per row from its text columns (polars' own hash is
    not promised stable across versions; this must be, so re-curation samples the same)."""
    joined = pl.concat_str([pl.col(c) for c in cols], separator="\x1f")
    return joined.map_batches(
        lambda s: pl.Series([_unit(t) for t in s.to_list()], dtype=pl.Float64),
        return_dtype=pl.Float64,
    )


def _unit(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def query_id(q_norm: str) -> str:
    """A query's id in the shards, from its normalised text: stable across runs, and what
    seeds its random negatives (gen/curate/negatives.py)."""
    return "q" + hashlib.sha256(q_norm.encode("utf-8")).hexdigest()[:16]


def mix_counts(recs: pl.DataFrame) -> tuple[int, int]:
    """(summaries, other records): what mix() balances."""
    n_sm = recs.filter(pl.col("type") == "summary").height
    return n_sm, recs.height - n_sm


def mix(recs: pl.DataFrame, summary_share: float | None,
        counts: tuple[int, int] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Down-sample summaries or keyword-like records so summaries make `summary_share` of the
    records; None keeps the generated mix. Which records go is a hash of (caption, query).
    counts: mix_counts of the whole run, when recs is only a part of it."""
    n_sm, n_kw = counts if counts is not None else mix_counts(recs)
    if summary_share is None or recs.height == 0:
        return split_off(recs, pl.lit(False), "mix_downsampled")
    is_sm = pl.col("type") == "summary"
    if n_sm == 0 or n_kw == 0:
        return split_off(recs, pl.lit(False), "mix_downsampled")
    share = n_sm / (n_sm + n_kw)
    if share > summary_share:   # too many summaries: keep p of them
        p, over = summary_share * n_kw / ((1 - summary_share) * n_sm), is_sm
    else:                       # too many keywords
        p, over = (n_sm * (1 - summary_share) / summary_share / n_kw) if summary_share else 0.0, ~is_sm
    drop = over & (unit_hash("caption_id", "q_norm") >= p)
    return split_off(recs, drop, "mix_downsampled", pl.lit(f"summary_share={summary_share}"))


def group(recs: pl.DataFrame, n_captions: int, config: CurateConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Adds query_id, q_text, q_type, q_subtype (all from the best record of the query) and
    drops generic queries and positives past the cap."""
    key = "q_norm"
    limit = max(config.generic_min_positives, math.ceil(config.generic_share * n_captions))
    n_pos = pl.len().over(key)
    recs, generic = split_off(recs, n_pos > limit, "generic_query",
                              pl.format("{} positives > {}", n_pos, pl.lit(limit)))
    pos_rank = pl.col("rank").rank("ordinal").over(key)
    recs, capped = split_off(recs, pos_rank > config.max_positives, "positives_capped")
    ids = recs.select(key).unique()
    ids = ids.with_columns(query_id=pl.Series([query_id(t) for t in ids[key].to_list()], dtype=pl.String))
    best = lambda c: pl.col(c).sort_by("rank").first().over(key)  # noqa: E731
    recs = recs.join(ids, on=key).with_columns(
        q_text=best("q_clean"), q_type=best("type"), q_subtype=best("subtype"))
    return recs, pl.concat([generic, capped], how="diagonal_relaxed")
