"""Deterministic split by caption text; queries whose positives straddle both splits."""
from __future__ import annotations

import random
import sys

import polars as pl

from conftest import ROOT
from curate_helpers import rec, rows, run_curate, sample_captions
from gen.curate import CurateConfig, curate
from gen.curate.normalize import normalized
from gen.curate.split import assign, caption_fraction
from schemas.text import normalize

sys.path.insert(0, str(ROOT / "benchmarks"))
from curate_bench import synthesise  # noqa: E402

CAPS = sample_captions()
TEXT = {c["id"]: c["text"] for c in CAPS}


def _caps(captions: list[dict]) -> pl.DataFrame:
    """Captions as curation has them at the split: with c_norm."""
    df = pl.DataFrame(captions).select("id", "text")
    return df.with_columns(c_norm=normalized(df["text"]))


def test_split_depends_on_the_caption_text_alone():
    first = dict(assign(_caps(CAPS), 0.3).select("id", "split").iter_rows())
    shuffled = CAPS[:]
    random.Random(1).shuffle(shuffled)
    more = _caps(shuffled + [{"id": f"new.{i}", "text": f"新的图片{i}"} for i in range(50)])
    again = dict(assign(more, 0.3).select("id", "split").iter_rows())
    assert all(again[i] == s for i, s in first.items())   # order and new captions change nothing
    # Pinned: sha256 of the normalised text, first 8 bytes big-endian / 2**64. A change here
    # moves captions between splits in every existing run.
    assert round(caption_fraction(normalize(TEXT["cr.0"])), 4) == 0.0939
    assert round(caption_fraction(normalize(TEXT["cr.1"])), 4) == 0.6114
    assert first["cr.0"] == "dev" and first["cr.1"] == "train"


def test_captions_whose_normalised_text_is_equal_share_a_split():
    # Same text under other ids, and variants equal once normalised (punctuation, full-width
    # letters, case, spaces): split by id, some of them would be dev and others train, and
    # their shared queries a train pair inside dev.
    variants = lambda t: [t, t + "。", t.rstrip("。") + "!", " " + t.replace("，", ", ")]
    base = [c["text"] for c in CAPS] + ["红色汽车停在路边", "A red CAR, parked.", "ＡＢＣ　def"]
    caps = [{"id": f"{k}.{j}", "text": v} for k, t in enumerate(base) for j, v in enumerate(variants(t))]
    caps += [{"id": "x.upper", "text": "a red car parked"}, {"id": "x.wide", "text": "abc def"}]
    df = _caps(caps)
    assert df.group_by("c_norm").len()["len"].min() >= 4        # the variants do normalise alike
    for dev_fraction in (0.05, 0.2, 0.3, 0.5, 0.7, 0.95):
        splits = assign(df, dev_fraction).group_by("c_norm").agg(n=pl.col("split").n_unique())
        assert splits["n"].max() == 1, dev_fraction
    both = assign(df, 0.5)["split"].unique().sort().to_list()
    assert both == ["dev", "train"]   # the texts themselves do spread over both splits


def test_dev_fraction_is_roughly_honoured():
    ids = pl.DataFrame({"id": [f"c.{i}" for i in range(20_000)], "c_norm": [f"图片{i}" for i in range(20_000)]})
    share = (assign(ids, 0.05)["split"] == "dev").mean()
    assert 0.04 < share < 0.06


def test_a_query_straddling_splits_becomes_one_row_per_split(tmp_path):
    # With dev_fraction 0.3: cr.0, cr.3, cr.7 are dev; cr.1, cr.6 train.
    recs = [rec("cr.1", "图片中的信息", type="hypernym"), rec("cr.6", "图片中的信息", type="hypernym", grade=1),
            rec("cr.0", "图片中的信息", type="hypernym"), rec("cr.3", "图片中的信息", type="hypernym", grade=1)]
    m, shards = run_curate(tmp_path, CAPS, recs, dev_fraction=0.3, negatives=4)
    split_of = dict(assign(_caps(CAPS), 0.3).select("id", "split").iter_rows())
    [train] = rows(shards, "train")
    [dev] = rows(shards, "dev")
    assert train["query_id"] == dev["query_id"]
    assert train["pos_ids"] == ["cr.1", "cr.6"] and dev["pos_ids"] == ["cr.0", "cr.3"]
    # Negatives come from the row's own split only: no dev caption is seen in training.
    assert all(split_of[i] == "train" for i in train["neg_ids"])
    assert all(split_of[i] == "dev" for i in dev["neg_ids"])
    assert m["stats"]["splits"]["dev"]["pairs"] == 2 and m["stats"]["splits"]["train"]["pairs"] == 2


def test_twin_captions_share_a_split_in_memory_and_partitioned(tmp_path):
    # A run with twins: captions under a second id, with the same text or one equal once
    # normalised, and the same queries (the answer key is a function of the text alone).
    run = tmp_path / "run"
    synthesise(run, 120, 1000, 20)
    caps, queries = pl.read_parquet(run / "captions.parquet"), pl.read_parquet(run / "queries.parquet")
    twins = caps.head(60).with_columns(
        id="twin." + pl.col("id"),
        text=pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.col("text")).otherwise(pl.col("text") + "。"))
    twin_of = dict(zip(caps["id"].head(60).to_list(), twins["id"].to_list()))
    pl.concat([caps, twins]).write_parquet(run / "captions.parquet")
    copied = queries.filter(pl.col("caption_id").is_in(list(twin_of))).with_columns(
        caption_id=pl.col("caption_id").replace_strict(twin_of), answer_key=pl.col("answer_key") + ".twin")
    pl.concat([queries, copied]).write_parquet(run / "queries.parquet")

    settings = dict(dev_fraction=0.5, negatives=3)
    outs = []
    for name, more in (("whole", {}), ("parts", {"partition_records": 500})):
        curate(run, CurateConfig(**settings, **more), out_dir=tmp_path / name)
        outs.append({s: pl.concat([pl.read_parquet(f) for f in sorted((tmp_path / name).glob(f"{s}-*.parquet"))])
                     .sort("query_id") for s in ("train", "dev")})
    for out in outs:
        split_of = {i: s for s, df in out.items() for ids in df["pos_ids"].to_list() for i in ids}
        pairs = [(a, b) for a, b in twin_of.items() if a in split_of and b in split_of]
        assert len(pairs) >= 20
        assert all(split_of[a] == split_of[b] for a, b in pairs)
        # No positive text, normalised, is both trained on and held out.
        norm = lambda df: {normalize(t) for ts in df["pos"].to_list() for t in ts}  # noqa: E731
        assert out["train"].height and out["dev"].height and not norm(out["train"]) & norm(out["dev"])
    for s in ("train", "dev"):
        assert outs[0][s].equals(outs[1][s]), s
