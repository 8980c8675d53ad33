"""Steps that look across captions: cross-caption positives (cross.py) and the round-trip
filter (roundtrip.py)."""
from curate_helpers import rec, rows, run_curate

CAPS = [
    {"id": "c1", "text": "墙上安装着一个燃气表。"},
    {"id": "c2", "text": "厨房里的燃气表和管道。"},
    {"id": "c3", "text": "一只猫趴在窗台上。"},
    {"id": "c4", "text": "猫粮和狗粮摆在货架上。"},
    {"id": "c5", "text": "燃气灶上煮着一锅汤。"},
]


def test_contained_captions_become_grade_1_positives(tmp_path):
    recs = [rec("c1", "燃气表"), rec("c3", "猫"), rec("c3", "窗台"), rec("c5", "燃气灶")]
    manifest, shards = run_curate(tmp_path, CAPS, recs, min_chars=1, negatives=1)
    by_query = {r["query"]: r for r in rows(shards)}
    meter = by_query["燃气表"]
    assert meter["pos_ids"] == ["c1", "c2"] and meter["pos_scores"] == [2.0, 1.0]
    assert "c2" not in meter["neg_ids"]                  # never both positive and negative
    assert by_query["猫"]["pos_ids"] == ["c3"]           # one character: too ambiguous
    assert by_query["燃气灶"]["pos_ids"] == ["c5"]       # shares words, not the phrase
    # Generated pairs still account for every record; the added ones are counted apart.
    assert manifest["stats"]["pairs_out"] == 4 and manifest["stats"]["cross_positives"] == 1


def test_cross_positives_respect_the_cap_and_can_be_turned_off(tmp_path):
    caps = [{"id": f"c{i}", "text": f"第{i}张图里有燃气表"} for i in range(6)]
    _, shards = run_curate(tmp_path / "a", caps, [rec("c0", "燃气表")], max_positives=3, negatives=0,
                           generic_min_positives=10)
    assert rows(shards)[0]["pos_ids"] == ["c0", "c1", "c2"]
    manifest, shards = run_curate(tmp_path / "b", caps, [rec("c0", "燃气表")], negatives=0,
                                  cross_positives=False)
    assert rows(shards)[0]["pos_ids"] == ["c0"] and manifest["stats"]["cross_positives"] == 0


def test_roundtrip_drops_queries_that_cannot_find_their_caption(tmp_path):
    from curate_helpers import reason_of
    recs = [rec("c3", "猫在窗台", type="simple_condition"),    # not literal, BM25 finds c3 first
            rec("c3", "飞机起飞", type="event", grade=1),      # invented: finds nothing (grade 1: not a grounding drop)
            rec("c3", "宠物", type="hypernym"),                # exempt: hypernyms rarely appear
            rec("c2", "燃气表", type="entity")]                # literal: kept whatever its rank
    manifest, shards = run_curate(tmp_path / "on", CAPS, recs, roundtrip_k=1, negatives=0)
    assert reason_of(shards, "c3", "飞机起飞") == "roundtrip_miss"
    kept = {r["query"] for r in rows(shards)}
    assert kept == {"猫在窗台", "宠物", "燃气表"}
    assert manifest["stats"]["dropped_by_reason"]["roundtrip_miss"] == 1
    _, shards = run_curate(tmp_path / "off", CAPS, recs, negatives=0)   # off by default
    assert len(rows(shards)) == 4
