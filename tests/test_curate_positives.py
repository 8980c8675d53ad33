"""One query, several positives; generic queries; the positives cap; the SM/KW mix."""
from __future__ import annotations

import polars as pl

from curate_helpers import dropped, rec, rows, run_curate, sample_captions

CAPS = sample_captions()
IDS = [c["id"] for c in CAPS]


def test_same_normalised_query_in_several_captions_is_one_query(tmp_path):
    recs = [rec("cr.33", "笔记本电脑", grade=1), rec("cr.15", "笔记本电脑！", grade=2),
            rec("cr.9", "ＰＤＦ转换", type="hypernym", grade=1), rec("cr.12", "pdf转换", type="hypernym")]
    _, shards = run_curate(tmp_path, CAPS, recs, min_cjk_share=0.0)
    out = {r["query"]: r for r in rows(shards)}
    laptop = out["笔记本电脑！"]                      # the best record's own text
    assert laptop["pos_ids"] == ["cr.15", "cr.33"] and laptop["pos_scores"] == [2.0, 1.0]
    assert len(out) == 2


def test_generic_queries_are_dropped(tmp_path):
    # 8 of 40 captions: more than max(generic_min_positives=5, 1% of 40).
    recs = [rec(i, "人物", type="hypernym", salience=2) for i in IDS[:8]] + [rec("cr.0", "燃气表")]
    m, shards = run_curate(tmp_path, CAPS, recs)
    assert m["stats"]["dropped_by_reason"]["generic_query"] == 8
    assert {r["query"] for r in rows(shards)} == {"燃气表"}
    assert dropped(shards).filter(pl.col("reason") == "generic_query")["detail"][0] == "8 positives > 5"


def test_positives_are_capped_best_first(tmp_path):
    recs = [rec(i, "人物", type="hypernym", grade=1 if n % 2 else 2, salience=n) for n, i in enumerate(IDS[:5])]
    m, shards = run_curate(tmp_path, CAPS, recs, max_positives=2)
    [row] = rows(shards)
    assert row["pos_ids"] == [IDS[0], IDS[2]] and row["pos_scores"] == [2.0, 2.0]
    assert m["stats"]["dropped_by_reason"]["positives_capped"] == 3


def test_summary_share_sets_the_mix(tmp_path):
    recs = []
    for c in CAPS:
        recs.append(rec(c["id"], c["text"][2:12], type="summary"))
        recs += [rec(c["id"], c["text"][a:a + 3], type="simple_condition", grade=1, salience=a)
                 for a in (3, 9, 15)]
    def share(shards):
        r = pl.DataFrame(rows(shards))
        pairs = r.select("type", n=pl.col("pos").list.len())
        return pairs.filter(pl.col("type") == "summary")["n"].sum() / pairs["n"].sum()
    m_kept, kept = run_curate(tmp_path / "kept", CAPS, recs, random_fill=True)
    m_mix, mixed = run_curate(tmp_path / "mix", CAPS, recs, summary_share=0.1)
    assert "mix_downsampled" not in m_kept["stats"]["dropped_by_reason"]
    assert m_mix["stats"]["dropped_by_reason"]["mix_downsampled"] > 0
    assert share(mixed) < share(kept)
    assert abs(share(mixed) - 0.1) < 0.08
