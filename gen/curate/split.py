"""Train/dev split by caption, from a hash of the caption's normalised text (c_norm) alone,
so that regenerating or re-curating a run (or adding captions to it) never moves a caption
between splits.

The text, not the id: a caption dataset often holds the same caption under several ids, or
with only punctuation, width or case apart ("红色汽车停在路边。", "红色汽车停在路边"). Such
captions get the same queries, so split by id one could land in train and the other in dev,
and a dev pair would be a train pair. Equal normalised text always means the same split.

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


def caption_fraction(c_norm: str) -> float:
    """A caption's place in [0, 1): sha256 of its normalised text, first 8 bytes, big-endian."""
    return int.from_bytes(hashlib.sha256(c_norm.encode("utf-8")).digest()[:8], "big") / 2**64


def assign(captions: pl.DataFrame, dev_fraction: float) -> pl.DataFrame:
    """captions (with c_norm) with a `split` column ("train" or "dev")."""
    uniq = captions["c_norm"].unique()
    frac = pl.Series([caption_fraction(t) for t in uniq.to_list()], dtype=pl.Float64)
    place = captions["c_norm"].replace_strict(uniq, frac, return_dtype=pl.Float64)
    return captions.with_columns(
        split=pl.when(place < dev_fraction).then(pl.lit("dev")).otherwise(pl.lit("train")))
