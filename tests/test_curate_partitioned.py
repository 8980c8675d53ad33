"""Curation in partitions and BM25 caption shards (gen/curate/partitioned.py): the same
output as in memory, parts that a failure leaves unfinished are redone and only they, a
damaged input is named, progress is logged."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from gen.curate import CurateConfig, InputError, curate
from gen.curate import partitioned

sys.path.insert(0, str(ROOT / "benchmarks"))
from curate_bench import synthesise  # noqa: E402

N_CAPTIONS, N_RECORDS = 300, 3000


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run with every curation step at work: duplicates, generic queries, mixed types,
    captions close to an evaluation set (the benchmark's synthesis, small)."""
    run = tmp_path_factory.mktemp("part") / "run"
    synthesise(run, N_CAPTIONS, N_RECORDS, 200)
    # Row groups of 500: a damaged one can be mid-file.
    queries, captions = pl.read_parquet(run / "queries.parquet"), pl.read_parquet(run / "captions.parquet")
    queries.write_parquet(run / "queries.parquet", row_group_size=500)
    # The judge's grades of some own pairs, and of some pairs with other captions.
    own = queries.select("caption_id", "query").gather_every(3)
    own.with_columns(judge_grade=(pl.int_range(pl.len()) % 3).cast(pl.Int8)).write_parquet(run / "judgements.parquet")
    other = pl.DataFrame({"caption_id": own["caption_id"].shift(1).fill_null(own["caption_id"][-1]),
                          "query": own["query"]})
    # And 0 for pairs with a few more captions each: without enough of them, whether any
    # lands among the mined negatives (negatives_judged_irrelevant) is up to chance.
    far = pl.concat([pl.DataFrame({"caption_id": own["caption_id"].shift(k).fill_null(own["caption_id"][-1]),
                                   "query": own["query"]}) for k in range(2, 8)])
    pl.concat([other.with_columns(judge_grade=(pl.int_range(pl.len()) % 3).cast(pl.Int8)),
               far.with_columns(judge_grade=pl.lit(0, pl.Int8))]).write_parquet(run / "candidate_judgements.parquet")
    return run


def _settings(run: Path, **more) -> dict:
    return dict(decontaminate_against=(run / "eval.jsonl",), dev_fraction=0.2, negatives=5, **more)


def _outputs(shards: Path) -> dict[str, pl.DataFrame]:
    out = {name: pl.concat([pl.read_parquet(f) for f in sorted(shards.glob(f"{name}-*.parquet"))]).sort("query_id")
           for name in ("train", "dev")}
    out["dropped"] = pl.read_parquet(shards / "dropped.parquet").sort("row")
    for name in ("flag/train", "flag/dev"):
        out[name] = pl.concat([pl.read_ndjson(f) for f in sorted(shards.glob(f"{name}-*.jsonl"))]).sort("query")
    out["st"] = pl.concat([pl.read_parquet(f) for f in sorted(shards.glob("st/*.parquet"))]).sort("anchor", "positive")
    out["qrels"] = pl.read_csv(shards / "beir/qrels/dev.tsv", separator="\t").sort("query-id", "corpus-id")
    out["corpus"] = pl.read_ndjson(shards / "beir/corpus.jsonl").sort("_id")
    return out


def _stats(manifest: dict) -> dict:
    return {k: v for k, v in manifest["stats"].items() if k != "peak_rss_gib_after_step"}


def _events(caplog, event: str) -> list[dict]:
    return [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == event]


@pytest.mark.parametrize("more", [{}, {"summary_share": 0.3, "roundtrip_k": 3, "rows_per_shard": 150},
                                  {"judge": "regrade", "judge_candidates": True}],
                         ids=["defaults", "mix_roundtrip_small_shards", "judged"])
def test_partitioned_curation_equals_the_in_memory_one(run, tmp_path, caplog, more):
    caplog.set_level(logging.INFO, logger="gen.curate")
    whole = curate(run, CurateConfig(**_settings(run, **more)), out_dir=tmp_path / "whole")
    assert not _events(caplog, "curate_partitions")      # small: the in-memory path
    parts = curate(run, CurateConfig(**_settings(run, partition_records=700, **more)), out_dir=tmp_path / "parts")
    assert _events(caplog, "curate_partitions")[0]["parts"] == 5
    a, b = _outputs(tmp_path / "whole"), _outputs(tmp_path / "parts")
    for name in a:
        assert a[name].height > 0, name
        assert a[name].equals(b[name]), name
    assert _stats(whole) == _stats(parts)
    reasons = whole["stats"]["dropped_by_reason"]
    assert {"decontaminated", "duplicate_exact", "duplicate_near", "generic_query"} <= set(reasons)
    if "roundtrip_k" in more:
        assert {"mix_downsampled", "roundtrip_miss"} <= set(reasons)
    if "judge" in more:
        assert reasons["judged_irrelevant"] and whole["stats"]["judged_positives"]
        assert whole["stats"]["negatives_judged_irrelevant"]
    # partition_records is how the job runs, not what comes out: the same fingerprint.
    assert whole["fingerprint"] == parts["fingerprint"]
    assert not (tmp_path / "parts" / partitioned.PARTS_DIR).exists()   # parts go once published


def test_bm25_shards_search_each_query_row_in_one_shard_of_its_split(run, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gen.curate")
    m = curate(run, CurateConfig(**_settings(run, bm25_shard_captions=60)), out_dir=tmp_path / "s")
    n = _events(caplog, "curate_shards")[0]["bm25_shards"]["train"]
    assert n >= 3          # ~240 train captions, at most 60 a shard
    caps = pl.read_parquet(run / "captions.parquet", columns=["id"])
    shard = pl.DataFrame({"h": partitioned.caption_hash(caps["id"])}).select(s=partitioned._bm25_shard(pl.col("h"), n))
    shard_of = dict(zip(caps["id"].to_list(), shard["s"].to_list()))
    train = pl.concat([pl.read_parquet(f) for f in (tmp_path / "s").glob("train-*.parquet")])
    used = [{shard_of[i] for i in ids + pos} for ids, pos in zip(train["neg_ids"].to_list(), train["pos_ids"].to_list())
            if ids]
    assert used and all(len(s) >= 1 for s in used)
    # Negatives (and cross positives, beyond the generated ones) come from one shard a row.
    assert all(len({shard_of[i] for i in ids}) == 1 for ids in train["neg_ids"].to_list() if ids)
    assert len({next(iter({shard_of[i] for i in ids})) for ids in train["neg_ids"].to_list() if ids}) == n
    st = m["stats"]
    assert st["pairs_out"] + pl.read_parquet(tmp_path / "s" / "dropped.parquet").height == st["queries_in"]


class Boom(RuntimeError):
    pass


def test_a_failed_partition_leaves_no_finished_part_and_the_rerun_redoes_only_it(run, tmp_path, monkeypatch):
    config = CurateConfig(**_settings(run, partition_records=700))
    out = tmp_path / "out"
    real = partitioned._records
    calls: list[int] = []

    def failing(folder: Path, item: dict) -> dict:
        calls.append(item["part"])
        if item["part"] == 2:
            (folder / "recs-00000.parquet").write_bytes(b"half")   # a task killed mid-write
            raise Boom("disk full")
        return real(folder, item)

    monkeypatch.setattr(partitioned, "_records", failing)
    with pytest.raises(Boom):
        curate(run, config, out_dir=out)
    assert calls == [0, 1, 2]
    work = next((out / partitioned.PARTS_DIR).iterdir())
    done = sorted(p.name for p in (work / "records").iterdir())
    assert done == ["p00000", "p00001"]          # no folder, hidden or not, for the failed part
    assert not (out / "manifest.json").exists()

    calls.clear()
    monkeypatch.setattr(partitioned, "_records",
                        lambda folder, item: (calls.append(item["part"]), real(folder, item))[1])
    captions_done = []
    real_caps = partitioned._captions
    monkeypatch.setattr(partitioned, "_captions", lambda f, i: (captions_done.append(i["part"]), real_caps(f, i))[1])
    resumed = curate(run, config, out_dir=out)
    assert calls == [2, 3, 4] and captions_done == []
    fresh = curate(run, config, out_dir=tmp_path / "fresh")
    assert _stats(resumed) == _stats(fresh)
    a, b = _outputs(out), _outputs(tmp_path / "fresh")
    assert all(a[k].equals(b[k]) for k in a)


def test_a_changed_input_never_reuses_the_parts_of_the_old_one(run, tmp_path, monkeypatch):
    changed = tmp_path / "run"
    changed.mkdir()
    for name in ("captions.parquet", "eval.jsonl"):
        (changed / name).write_bytes((run / name).read_bytes())
    queries = pl.read_parquet(run / "queries.parquet")
    queries.write_parquet(changed / "queries.parquet")
    config = CurateConfig(**_settings(changed, partition_records=700))
    out = tmp_path / "out"
    monkeypatch.setattr(partitioned, "_negatives", lambda folder, item: (_ for _ in ()).throw(Boom("killed")))
    with pytest.raises(Boom):
        curate(changed, config, out_dir=out)
    old = {p.name for p in (out / partitioned.PARTS_DIR).iterdir()}
    monkeypatch.undo()
    # Every record's query now differs: parts of the old input would bring back the old ones.
    queries.with_columns(pl.col("query") + "新").write_parquet(changed / "queries.parquet")
    m = curate(changed, config, out_dir=out)
    train = _outputs(out)["train"]
    assert train.height and all(q.endswith("新") for q in train["query"].to_list())
    assert m["stats"]["queries_in"] == queries.height
    assert not (out / partitioned.PARTS_DIR).exists() and old


def _damage_row_group(path: Path, group: int) -> None:
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(group).column(1)          # query: a compressed page of text
    data = bytearray(path.read_bytes())
    start = col.data_page_offset + 16
    data[start:start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


def test_a_damaged_row_group_mid_file_is_named_with_exit_2(run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "captions.parquet").write_bytes((run / "captions.parquet").read_bytes())
    pl.read_parquet(run / "queries.parquet").write_parquet(bad / "queries.parquet", row_group_size=500,
                                                           compression="zstd")
    _damage_row_group(bad / "queries.parquet", 3)
    with pytest.raises(InputError, match=r"queries\.parquet: row group 4 of \d+ \(after row \d+\) is damaged"):
        curate(bad, CurateConfig(partition_records=700), out_dir=tmp_path / "o1")
    with pytest.raises(InputError, match=r"queries\.parquet.*damaged"):      # the in-memory path too
        curate(bad, CurateConfig(), out_dir=tmp_path / "o2")
    proc = subprocess.run([sys.executable, "-m", "gen.curate", "--queries", str(bad), "--out", str(tmp_path / "o3"),
                           "--partition-records", "700"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "queries.parquet: row group 4 of" in proc.stderr and "Traceback" not in proc.stderr


def test_progress_names_the_step_and_partition_with_counts(run, tmp_path, caplog):
    from gen.logs import JsonFormatter
    caplog.set_level(logging.INFO, logger="gen.curate")
    curate(run, CurateConfig(**_settings(run, partition_records=1000)), out_dir=tmp_path / "o")
    n_records = pq.ParquetFile(run / "queries.parquet").metadata.num_rows
    n = -(-n_records // 1000)
    progress = _events(caplog, "curate_progress")
    steps = [e["step"] for e in progress]
    assert steps == ["partition"] + ["captions"] * n + ["records"] * n + ["group"] * n + ["negatives"] * 2
    records = [e for e in progress if e["step"] == "records"]
    assert [e["part"] for e in records] == list(range(1, n + 1)) and {e["parts"] for e in records} == {n}
    assert sum(e["records"] for e in records) == n_records and all(e["kept"] > 0 for e in records)
    line = next(r for r in caplog.records if getattr(r, "fields", {}).get("step") == "records"
                and r.fields["event"] == "curate_progress")
    assert f"records 1/{n} done" in line.getMessage() and "kept=" in line.getMessage()
    as_json = json.loads(JsonFormatter().format(line))
    assert as_json["event"] == "curate_progress" and as_json["records"] == records[0]["records"]
    inside = _events(caplog, "curate_task_progress")     # within the longest tasks, bucket by bucket
    assert inside and {e["split"] for e in inside} == {"train", "dev"} and all(e["query_rows"] > 0 for e in inside)


@pytest.mark.slow
def test_the_ray_executor_writes_the_shards_the_local_one_does(ray_local, run, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gen.curate")
    settings = _settings(run, partition_records=1000, bm25_shard_captions=100, summary_share=0.3)
    local = curate(run, CurateConfig(**settings), out_dir=tmp_path / "local")
    caplog.clear()
    on_ray = curate(run, CurateConfig(executor="ray", **settings), out_dir=tmp_path / "ray")
    assert _events(caplog, "curate_partitions")[-1]["executor"] == "ray"
    # The input pass runs here; the other tasks ran in Ray's worker processes.
    here = f"{socket.gethostname()}:{os.getpid()}"
    workers = {e["step"]: e["worker"] for e in _events(caplog, "curate_progress")}
    assert workers.pop("partition") == here
    assert here not in workers.values() and set(workers) == {"captions", "records", "group", "negatives"}
    a, b = _outputs(tmp_path / "local"), _outputs(tmp_path / "ray")
    assert all(a[k].equals(b[k]) for k in a)
    assert _stats(local) == _stats(on_ray)


def test_an_in_memory_curation_names_each_step_as_it_starts(run, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gen.curate")
    curate(run, CurateConfig(**_settings(run)), out_dir=tmp_path / "o")
    steps = [e["step"] for e in _events(caplog, "curate_step")]
    assert steps[0] == "load" and steps[-1] == "write"
    assert {"dedup_near", "positives", "negatives"} <= set(steps)


@pytest.mark.parametrize("setting", [{"judge": "drop"}, {"judge_candidates": True}])
def test_a_missing_judge_file_is_named_before_any_partition_runs(run, tmp_path, setting):
    bare = tmp_path / "run"
    bare.mkdir()
    for name in ("queries.parquet", "captions.parquet"):
        (bare / name).write_bytes((run / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="run python -m gen.judge first"):
        curate(bare, CurateConfig(partition_records=700, **setting), out_dir=tmp_path / "o")
    assert not (tmp_path / "o" / partitioned.PARTS_DIR).exists()


@pytest.mark.slow
def test_gen_run_with_the_ray_executor_curates_on_ray(ray_local, tmp_path, sample_captions, capsys):
    from conftest import write_jsonl
    from fake_openai import FakeOpenAI
    from gen.run import EXIT_OK, main
    path = write_jsonl(tmp_path / "caps.jsonl", sample_captions[:30])
    job = tmp_path / "job.toml"
    job.write_text("[curation]\npartition_records = 40\ndev_fraction = 0.2\n", encoding="utf-8")
    with FakeOpenAI() as fake:
        assert main(["--config", str(job), "--captions", str(path), "--model", "fake-model", "--no-progress",
                     "--base-url", fake.base_url, "--out", str(tmp_path / "out"), "--executor", "ray",
                     "--ray-actors", "1", "--log-format", "json"]) == EXIT_OK
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    progress = [e for e in events if e.get("event") == "curate_progress"]
    here = f"{socket.gethostname()}:{os.getpid()}"
    assert {e["step"] for e in progress} == {"partition", "captions", "records", "group", "negatives"}
    assert all(e["worker"] != here for e in progress if e["step"] != "partition")
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["curation"]["stats"]["pairs_out"] > 0
    assert not list((tmp_path / "out" / "shards").glob(".curate-parts"))


def test_partitions_and_shards_left_empty_change_nothing(tmp_path):
    from curate_helpers import rec, sample_captions, write_run
    caps = sample_captions()[:12]
    records = [rec(c["id"], c["text"][i:i + 3], grade=1 + i % 2) for c in caps for i in (2, 6, 10)]
    run = write_run(tmp_path / "run", caps, records)
    settings = dict(dev_fraction=0.3, negatives=2)
    whole = curate(run, CurateConfig(**settings), out_dir=tmp_path / "whole")
    # 36 records in 9 partitions of 12 captions, and BM25 shards of 2 captions: some of each empty.
    parts = curate(run, CurateConfig(partition_records=4, **settings), out_dir=tmp_path / "parts")
    a, b = _outputs(tmp_path / "whole"), _outputs(tmp_path / "parts")
    assert a["train"].height and all(a[k].equals(b[k]) for k in a)
    assert _stats(whole) == _stats(parts)
    sharded = curate(run, CurateConfig(partition_records=4, bm25_shard_captions=2, **settings),
                     out_dir=tmp_path / "sharded")
    assert sharded["stats"]["pairs_out"] + pl.read_parquet(tmp_path / "sharded" / "dropped.parquet").height == 36


def test_a_file_a_task_cannot_see_is_named_with_the_node(run, tmp_path):
    # What a cluster node without the driver's --decontaminate-against file meets.
    from gen.curate.partitioned import _captions
    evals = tmp_path / "eval.jsonl"
    evals.write_text('{"text": "x"}\n', encoding="utf-8")
    item = {"config": CurateConfig(decontaminate_against=(evals,)).model_dump(mode="json"), "part": 0,
            "input": str(tmp_path)}
    evals.unlink()
    with pytest.raises(InputError, match=rf"on {socket.gethostname()}: .*eval.jsonl: no such file.*every node"):
        _captions(tmp_path, item)


def test_a_new_shard_version_resumes_the_parts_of_the_failed_one(run, tmp_path, monkeypatch):
    from gen.publish import curate_versioned
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("queries.parquet", "captions.parquet", "eval.jsonl"):
        (copy / name).write_bytes((run / name).read_bytes())
    config = CurateConfig(**_settings(copy, partition_records=700))
    real = partitioned._group
    monkeypatch.setattr(partitioned, "_group", lambda f, i: (_ for _ in ()).throw(Boom("killed")))
    with pytest.raises(Boom):
        curate_versioned(copy, config)
    assert not (copy / "shards" / "latest").exists()
    assert [p.name for p in (copy / "shards").iterdir()] == [partitioned.PARTS_DIR]   # no partial version
    redone: list[str] = []
    for step in ("_captions", "_records"):
        real_step = getattr(partitioned, step)
        monkeypatch.setattr(partitioned, step, lambda f, i, real_step=real_step, step=step:
                            (redone.append(step), real_step(f, i))[1])
    monkeypatch.setattr(partitioned, "_group", real)
    m = curate_versioned(copy, config)
    assert redone == [] and m["stats"]["pairs_out"] > 0
    assert (copy / "shards" / "latest" / "manifest.json").is_file()
    assert not (copy / "shards" / partitioned.PARTS_DIR).exists()


def test_an_in_memory_curation_after_a_failed_partitioned_one_leaves_no_parts(run, tmp_path, monkeypatch):
    """Settings that take the run back into memory (a larger partition_records) never
    reuse the parts; a success must not leave them on disk for good."""
    out = tmp_path / "out"
    monkeypatch.setattr(partitioned, "_group", lambda f, i: (_ for _ in ()).throw(Boom("killed")))
    with pytest.raises(Boom):
        curate(run, CurateConfig(**_settings(run, partition_records=700)), out_dir=out)
    assert (out / partitioned.PARTS_DIR).is_dir()
    monkeypatch.undo()
    m = curate(run, CurateConfig(**_settings(run)), out_dir=out)
    assert m["stats"]["pairs_out"] > 0
    assert not (out / partitioned.PARTS_DIR).exists()


@pytest.mark.parametrize("partition_records", [700, 1_000_000], ids=["partitioned", "in_memory"])
@pytest.mark.parametrize("file,column", [("queries.parquet", "caption_id"), ("queries.parquet", "query"),
                                         ("captions.parquet", "id"), ("captions.parquet", "text")])
def test_a_missing_id_or_text_is_named_with_its_file_row_and_column(run, tmp_path, file, column, partition_records):
    bad = tmp_path / "run"
    bad.mkdir()
    for name in ("queries.parquet", "captions.parquet", "eval.jsonl"):
        (bad / name).write_bytes((run / name).read_bytes())
    df = pl.read_parquet(bad / file)
    df.with_columns(pl.when(pl.int_range(pl.len()) == 41).then(None).otherwise(pl.col(column)).alias(column)
                    ).write_parquet(bad / file)
    config = CurateConfig(**_settings(bad, partition_records=partition_records))
    with pytest.raises(InputError, match=rf"{file}: row 42: {column} is missing"):
        curate(bad, config, out_dir=tmp_path / "out")


def test_parts_of_a_failed_curation_are_not_reused_by_changed_curation_code(run, tmp_path, monkeypatch):
    """A failed curation, capgen upgraded, the rerun: parts the old code wrote would mix
    its rows into the new code's output."""
    code = tmp_path / "step.py"
    code.write_text("OLD = 1\n")
    monkeypatch.setattr(partitioned, "code_files", lambda real=partitioned.code_files: [*real(), code])
    config = CurateConfig(**_settings(run, partition_records=700))
    out = tmp_path / "out"
    real_group = partitioned._group
    monkeypatch.setattr(partitioned, "_group", lambda f, i: (_ for _ in ()).throw(Boom("killed")))
    with pytest.raises(Boom):
        curate(run, config, out_dir=out)
    monkeypatch.setattr(partitioned, "_group", real_group)
    code.write_text("NEW = 1\n")
    captions_done: list[int] = []
    real_caps = partitioned._captions
    monkeypatch.setattr(partitioned, "_captions", lambda f, i: (captions_done.append(i["part"]), real_caps(f, i))[1])
    curate(run, config, out_dir=out)
    assert captions_done == [0, 1, 2, 3, 4]

