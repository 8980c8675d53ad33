"""Exact and near duplicates within one caption; never across captions."""
from __future__ import annotations

from curate_helpers import rec, reason_of, rows, run_curate, sample_captions

CAPS = sample_captions()


def test_exact_duplicates_in_a_caption_collapse_keeping_the_better(tmp_path):
    recs = [rec("cr.0", "燃气表", grade=1, salience=1), rec("cr.0", "燃气表。", grade=2, salience=3),
            rec("cr.0", "“燃气表”", grade=2, salience=2)]
    m, shards = run_curate(tmp_path, CAPS, recs)
    assert m["stats"]["duplicates_removed"]["exact"] == 2
    [row] = [r for r in rows(shards) if r["query_id"]]
    assert row["query"] == "“燃气表”" and row["pos_scores"] == [2.0]   # grade 2, salience 2 wins
    assert reason_of(shards, "cr.0", "燃气表") == "duplicate_exact"


def test_the_same_query_in_two_captions_is_not_a_duplicate(tmp_path):
    recs = [rec("cr.33", "笔记本电脑"), rec("cr.15", "电脑", grade=1), rec("cr.15", "笔记本电脑", grade=1)]
    m, shards = run_curate(tmp_path, CAPS, recs)
    assert m["stats"]["duplicates_removed"] == {"exact": 0, "near": 0}
    row = next(r for r in rows(shards) if r["query"] == "笔记本电脑")
    assert row["pos_ids"] == ["cr.33", "cr.15"]   # grade 2 first


def test_near_duplicates_keep_higher_grade_then_better_salience(tmp_path):
    recs = [
        # Jaccard of 2-3-gram sets 0.64 and 0.81: at or above the default 0.6.
        rec("cr.0", "墙上的燃气表旁边有管道", type="simple_condition", grade=1, salience=1),
        rec("cr.0", "墙上燃气表旁边有管道", type="simple_condition", grade=2, salience=2),
        rec("cr.26", "一个小女孩在娃娃机前玩耍", type="complex_condition", grade=2, salience=2),
        rec("cr.26", "小女孩在娃娃机前玩耍", type="complex_condition", grade=2, salience=1),
        # 0.43: two different cars, not duplicates.
        rec("cr.7", "红色汽车", type="hypernym"), rec("cr.7", "蓝色汽车", type="hypernym", grade=1),
    ]
    m, shards = run_curate(tmp_path, CAPS, recs, min_cjk_share=0.0)
    assert m["stats"]["duplicates_removed"]["near"] == 2
    assert reason_of(shards, "cr.0", "墙上的燃气表旁边有管道") == "duplicate_near"   # lower grade goes
    assert reason_of(shards, "cr.26", "一个小女孩在娃娃机前玩耍") == "duplicate_near"  # worse salience goes
    assert reason_of(shards, "cr.7", "蓝色汽车") is None


def test_distinct_short_queries_are_not_near_duplicates(tmp_path):
    # Single characters: each is its own gram, so they do not all match one empty signature.
    recs = [rec("cr.4", "猫"), rec("cr.4", "楼"), rec("cr.4", "地震")]
    m, _ = run_curate(tmp_path, CAPS, recs, min_chars=1)
    assert m["stats"]["duplicates_removed"]["near"] == 0


def test_near_duplicate_chain_drops_only_against_kept_records():
    import polars as pl

    from gen.curate import dedup
    # A~B and B~C but A!~C: B goes (worse than A); C stays, for B is gone.
    texts = ["abcdefgh", "abcdefxy", "cdefxyzw"]   # Jaccard 0.53, 0.53; A-C 0.24
    recs = pl.DataFrame({"rank": [0, 1, 2], "caption_id": ["c"] * 3, "query": texts,
                         "q_norm": texts}).cast({"rank": pl.UInt32})
    assert dedup.near_pairs(recs, 0.5).rows() == [(0, 1), (1, 2)]
    kept, gone = dedup.near(recs, 0.5)
    assert kept["rank"].to_list() == [0, 2] and gone["detail"].to_list() == ["abcdefgh"]
    # The same texts in different captions are never compared.
    apart = recs.with_columns(caption_id=pl.Series(["c1", "c2", "c3"]))
    assert dedup.near_pairs(apart, 0.5).height == 0
