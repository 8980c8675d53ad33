"""Train/dev split by caption, from a hash of the caption id alone, so that regenerating or
re-curating a run (or adding captions to it) never moves a caption between splits.

A query belongs to the split of its positives' captions. A query whose positives fall in
both splits becomes one row per split, each with only that split's positives (and, in
negatives.py, negatives mined from that split's captions only): no dev caption is ever
seen in training, not even as a negative. The query text itself may then occur in both
splits, as a common search ("燃气表") would in real use; what dev measures is finding its
unseen dev captions.
"""
from __future__ import annotations

import hashlib

import polars as pl


def caption_fraction(caption_id: str) -> float:
    """A caption's place in [0, 1): sha256 of its id, first 8 bytes, big-endian."""
    return int.from_bytes(hashlib.sha256(caption_id.encode("utf-8")).digest()[:8], "big") / 2**64


def assign(captions: pl.DataFrame, dev_fraction: float) -> pl.DataFrame:
    """captions with a `split` column ("train" or "dev")."""
    frac = [caption_fraction(i) for i in captions["id"].to_list()]
    return captions.with_columns(
        split=pl.when(pl.Series(frac, dtype=pl.Float64) < dev_fraction).then(pl.lit("dev")).otherwise(pl.lit("train")))
