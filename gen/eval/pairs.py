"""Training pairs (query, caption id) from wherever they come, and the fixed sample.

Sources: a capgen run directory (its queries.parquet, one pair per generated query), a
curated shard directory (train-*.parquet and dev-*.parquet: one pair per positive), or a
JSON lines / parquet file with `query` and `caption_id` (what the baselines write).
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from gen.curate.shards import query_shards

PAIR_COLUMNS = ("query", "caption_id", "type")


def load_pairs(source: Path) -> pl.DataFrame:
    """query, caption_id, type ('unknown' where the source has none)."""
    source = Path(source)
    if source.is_dir():
        shards = query_shards(source)
        if shards:
            df = pl.concat([pl.read_parquet(p, columns=["query", "pos_ids", "type"]) for p in shards])
            df = df.explode("pos_ids").rename({"pos_ids": "caption_id"})
        elif (source / "queries.parquet").is_file():
            df = pl.read_parquet(source / "queries.parquet", columns=list(PAIR_COLUMNS))
        else:
            raise FileNotFoundError(f"{source}: neither curated shards (train-*.parquet) nor queries.parquet")
    elif source.suffix == ".parquet":
        df = pl.read_parquet(source)
    else:
        df = pl.read_ndjson(source)
    missing = {"query", "caption_id"} - set(df.columns)
    if missing:
        raise ValueError(f"{source}: pairs need columns query and caption_id; missing {sorted(missing)}")
    if "type" not in df.columns:
        df = df.with_columns(type=pl.lit("unknown"))
    return df.select(PAIR_COLUMNS).drop_nulls(["query", "caption_id"])


def sample(pairs: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    """Exactly n pairs, so that runs compare at equal training budget: distinct (query,
    caption) pairs first, drawn without replacement; a pool smaller than n is topped up
    by drawing again from it (said in the result as `pool`)."""
    pool = pairs.unique(subset=["query", "caption_id"], keep="first", maintain_order=True)
    if pool.height == 0:
        raise ValueError("no pairs to train on")
    if pool.height >= n:
        return pool.sample(n=n, seed=seed, shuffle=True)
    extra = pool.sample(n=n - pool.height, seed=seed, with_replacement=True)
    return pl.concat([pool, extra]).sample(fraction=1.0, seed=seed, shuffle=True)
