"""Output contract: formats trainers load, manifest, atomic writes, CLI, fingerprint."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

import gen.curate.shards
from conftest import CAPRETRIEVAL_CAPTIONS
from curate_helpers import dropped, rec, rows, run_curate, sample_captions, write_run
from gen.curate import CurateConfig, curate
from gen.curate.__main__ import main as cli_main
from gen.curate.shards import sha256_file

CAPS = sample_captions()


def _records() -> list[dict]:
    # Every caption: three keyword queries cut from it and one summary, plus a generic one.
    out = []
    for c in CAPS:
        t = c["text"]
        out += [rec(c["id"], t[4:8], type="simple_condition", grade=1, salience=1),
                rec(c["id"], t[8:11], type="event", grade=1, salience=1),
                rec(c["id"], t[12:16], type="hypernym", grade=2, salience=1),
                rec(c["id"], t[2:18], type="summary", salience=1),
                rec(c["id"], "图片", salience=9)]
    return out


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curated")
    return run_curate(tmp, CAPS, _records(), dev_fraction=0.3, negatives=3, rows_per_shard=20)


def test_nothing_vanishes(curated):
    m, shards = curated
    st = m["stats"]
    assert st["pairs_out"] + dropped(shards).height == st["queries_in"] == len(_records())
    assert sum(st["dropped_by_reason"].values()) == dropped(shards).height


def test_flagembedding_lines_have_list_pos_and_neg(curated):
    _, shards = curated
    lines = [json.loads(x) for f in sorted((shards / "flag").glob("*.jsonl")) for x in f.read_text("utf-8").splitlines()]
    assert lines
    for d in lines:
        assert list(d) == ["query", "pos", "neg", "type", "pos_scores", "neg_scores"]
        assert isinstance(d["query"], str)
        for key in ("pos", "neg", "pos_scores", "neg_scores"):
            assert isinstance(d[key], list), key       # a string would be split into characters
        assert all(isinstance(p, str) and len(p) > 1 for p in d["pos"] + d["neg"])
        assert len(d["pos"]) == len(d["pos_scores"]) and len(d["neg"]) == len(d["neg_scores"])
    n_parquet = sum(pl.read_parquet(f).height for f in shards.glob("*-0*.parquet"))
    assert len(lines) == n_parquet      # the same rows as the parquet query shards


def test_sentence_transformers_view_loads_with_datasets(curated, tmp_path):
    datasets = pytest.importorskip("datasets")
    _, shards = curated
    files = sorted(str(f) for f in (shards / "st").glob("train-*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3"]
    assert len(ds) > 0 and all(isinstance(ds[0][c], str) for c in ds.column_names)
    n_pairs = sum(len(r["pos"]) for r in rows(shards, "train") if len(r["neg"]) >= 3)
    assert len(ds) == n_pairs   # one row per (query, positive)


def test_beir_dev_set(curated):
    _, shards = curated
    beir = shards / "beir"
    corpus = [json.loads(x) for x in (beir / "corpus.jsonl").read_text("utf-8").splitlines()]
    queries = [json.loads(x) for x in (beir / "queries.jsonl").read_text("utf-8").splitlines()]
    qrels = (beir / "qrels" / "dev.tsv").read_text("utf-8").splitlines()
    assert qrels[0] == "query-id\tcorpus-id\tscore"
    corpus_ids, query_ids = {c["_id"] for c in corpus}, {q["_id"] for q in queries}
    # BEIR's loader reads a missing title as None, which its encoder then adds to the text.
    assert set(corpus[0]) == {"_id", "title", "text"} and corpus[0]["title"] == ""
    assert set(queries[0]) == {"_id", "text"}
    for line in qrels[1:]:
        qid, cid, score = line.split("\t")
        assert qid in query_ids and cid in corpus_ids and score in ("1", "2")
    dev_rows = rows(shards, "dev")
    assert {r["query_id"] for r in dev_rows} == query_ids


def test_json_lines_shards_escape_line_separators(tmp_path):
    """U+2028 and U+2029 are valid in JSON strings, yet str.splitlines() and JavaScript
    readers break lines there: one object a line, whatever a caption holds."""
    df = pl.DataFrame({"query": ["街头\u2028艺人", "x"], "pos": [["一\u2029二"], ["y"]]})
    path = tmp_path / "t.jsonl"
    gen.curate.shards.write_jsonl(df, path)
    text = path.read_text("utf-8")
    assert "\u2028" not in text and "\u2029" not in text
    assert [json.loads(line) for line in text.splitlines()] == df.to_dicts()
    assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]


def test_shards_are_bounded_and_the_manifest_describes_them(curated):
    m, shards = curated
    assert (shards / "manifest.json").exists()
    assert json.loads((shards / "manifest.json").read_text("utf-8"))["fingerprint"] == m["fingerprint"]
    train = [f for f in m["files"] if f["file"].startswith("train-")]
    assert len(train) > 1 and all(f["rows"] <= 20 for f in train)
    for f in m["files"]:
        assert sha256_file(shards / f["file"]) == f["sha256"]
    st = m["stats"]
    for key in ("queries_in_by_type", "dropped_by_reason", "duplicates_removed", "negatives_per_query",
                "decontamination", "splits"):
        assert key in st
    assert st["negatives_per_query"]["min"] >= 1


def test_a_crash_while_writing_leaves_no_half_shard_and_no_manifest(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", CAPS, _records())
    shards = run / "shards"
    curate(run, CurateConfig(negatives=3))
    before = {p: p.read_bytes() for p in shards.glob("train-*.parquet")}

    def crash(self, path, **kw):
        Path(path).write_bytes(b"PAR1 half a shard")
        raise OSError("disk full")
    monkeypatch.setattr(pl.DataFrame, "write_parquet", crash)
    with pytest.raises(OSError):
        curate(run, CurateConfig(negatives=3))
    assert not (shards / "manifest.json").exists()          # unfinished, and says so
    assert {p: p.read_bytes() for p in shards.glob("train-*.parquet")} == before   # old shards intact
    assert not [p for p in shards.rglob("*") if p.name.endswith(".tmp")]


def test_atomic_writer_replaces_only_on_success(tmp_path):
    target = tmp_path / "x.parquet"
    gen.curate.shards.write_parquet(pl.DataFrame({"a": [1]}), target)
    with pytest.raises(ZeroDivisionError):
        gen.curate.shards._atomic(target, lambda tmp: (tmp.write_bytes(b"partial"), 1 / 0))
    assert pl.read_parquet(target)["a"].to_list() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["x.parquet"]


def test_stale_shards_of_an_earlier_curation_are_removed(tmp_path):
    run = write_run(tmp_path / "run", CAPS, _records())
    curate(run, CurateConfig(negatives=3, rows_per_shard=10))
    many = sorted(p.name for p in (run / "shards").glob("train-*.parquet"))
    curate(run, CurateConfig(negatives=3, rows_per_shard=10_000))
    assert len(many) > 1 and sorted(p.name for p in (run / "shards").glob("train-*.parquet")) == ["train-00000.parquet"]


def test_cli_recurates_with_other_settings(tmp_path, capsys):
    run = write_run(tmp_path / "run", CAPS, _records())
    out = tmp_path / "out"
    assert cli_main(["--queries", str(run), "--out", str(out), "--negatives", "2",
                     "--dev-fraction", "0", "--summary-share", "none", "--stoplist", "图片"]) == 0
    m = json.loads((out / "manifest.json").read_text("utf-8"))
    assert m["settings"]["negatives"] == 2 and m["settings"]["stoplist"] == ["图片"]
    assert json.loads(capsys.readouterr().out)["fingerprint"] == m["fingerprint"]
    assert cli_main(["--queries", str(run), "--negatives", "-1"]) == 2   # invalid: a clear error


def test_fingerprint_covers_data_settings_only(tmp_path):
    base = CurateConfig()
    assert CurateConfig(workers=1, rows_per_shard=5, bm25_backend="numpy").fingerprint() == base.fingerprint()
    assert CurateConfig(negatives=3).fingerprint() != base.fingerprint()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"text": "一"}\n', encoding="utf-8")
    b.write_text('{"text": "二"}\n', encoding="utf-8")
    fa = CurateConfig(decontaminate_against=(a,)).fingerprint()
    assert fa != CurateConfig(decontaminate_against=(b,)).fingerprint()
    b.write_text('{"text": "一"}\n', encoding="utf-8")   # same content, other name: same data
    assert fa == CurateConfig(decontaminate_against=(b,)).fingerprint()


def test_all_real_captions_curate_quickly(tmp_path):
    caps = [json.loads(x) for x in CAPRETRIEVAL_CAPTIONS.read_text("utf-8").splitlines()]
    recs = []
    for c in caps:
        t = c["text"]
        recs += [rec(c["id"], t[4:8], type="simple_condition", grade=1), rec(c["id"], t[2:18], type="summary")]
    m, shards = run_curate(tmp_path, caps, recs, dev_fraction=0.05)
    assert m["stats"]["pairs_out"] > 0.5 * len(recs)
    assert m["timings_s"]["total"] < 30


def test_empty_input_and_no_negatives_still_give_loadable_shards(tmp_path):
    m, shards = run_curate(tmp_path / "empty", CAPS, [])
    assert m["stats"]["pairs_out"] == 0 and pl.read_parquet(shards / "train-00000.parquet").height == 0
    m, shards = run_curate(tmp_path / "none", CAPS, [rec("cr.0", "燃气表")], negatives=0)
    [row] = rows(shards)
    assert row["neg"] == [] and m["stats"]["pairs_out"] == 1
    assert pl.read_parquet(shards / "st" / "train-00000.parquet").columns == ["anchor", "positive"]


def test_settings_are_checked():
    with pytest.raises(ValueError):
        CurateConfig(min_chars=10, max_chars=5)
    with pytest.raises(ValueError):
        CurateConfig(unknown_setting=1)
