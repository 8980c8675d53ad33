"""Curation of runs larger than one machine's memory: the records in partitions, BM25 in
caption shards, each part a task an executor runs (here, or on a Ray cluster).

1. input: one streamed pass splits queries.parquet and captions.parquet into `parts`
   partitions by a stable hash of the caption id (a caption and its records land together).
2. captions, per partition: cleaning, decontamination, jieba terms, the split.
   Then, from all partitions' captions (one column): filters.common_units, the caption count
   the generic-query limit needs, and how many BM25 shards each split gets
   (bm25_shard_captions at most each).
3. records, per partition: the steps that look at one caption's records (pipeline.record_steps).
   Survivors, and every (caption, query) pair for the false-negative guard, go out in
   `parts` buckets by a hash of the normalised query, so a query's records meet in one bucket.
4. roundtrip (roundtrip_k set), per caption shard of the whole run: each record is checked
   against the shard holding its caption.
5. group, per bucket: the SM/KW mix (with the whole run's counts), multi-positive grouping,
   the query rows; each row goes to one BM25 shard of its split by a hash of its query id.
6. negatives, per (split, shard): one BM25 index over the shard's captions serves
   cross-caption positives and negatives of the rows sent to it, bucket by bucket.
7. write: the shards stream out part by part; stats add up.

A run of no more records than partition_records and no more captions than
bm25_shard_captions is not partitioned (pipeline.curate runs it in memory). With one shard per split the output equals
that path's, order of rows aside (tests/test_curate_partitioned.py).

Each task writes into a hidden folder renamed into place once whole, under
<out's folder>/.curate-parts/<digest of the inputs, settings and code>: a task that failed or was
killed leaves nothing that looks done, and a rerun of the same curation redoes only the tasks
without a folder; any other digest's folder is stale and removed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import polars as pl
from pydantic import ValidationError
import pyarrow.parquet as pq

from gen.atomic import atomic_path, init_ray_keeping_stop_handlers, sha256_file
from gen.curate import InputError, cross, filters, judged, negatives, positives, roundtrip
from gen.curate import split as splits
from gen.curate.config import CurateConfig
from gen.curate.decontaminate import load_eval_texts
from gen.curate.normalize import normalized
from gen.curate.pipeline import (INPUT_COLUMNS, RECORD_CASTS, _query_rows, _Timer, clean_captions, clean_queries,
                                 decontaminate_captions, finish_stats, merge_stats, partial_stats,
                                 record_steps, require_values, tokenize_captions)
from gen.curate.steps import split_off, with_rank
from gen.curate import views
from gen.curate.write import ShardedWriter, finish, write_jsonl, write_tsv

log = logging.getLogger("gen.curate")

PARTS_DIR = ".curate-parts"
READ_ROWS = 100_000          # rows the input pass reads and writes at a time
DROP_COLUMNS = ("row", *INPUT_COLUMNS, "reason", "detail")
SPLITS = ("train", "dev")


# --- stable hashes -----------------------------------------------------------------------

def caption_hash(ids: pl.Series) -> pl.Series:
    """A stable 64-bit number per caption id (sha256; polars' hash may change between
    versions, and parts written by one version are read by another after an upgrade)."""
    uniq = ids.unique()
    nums = [int.from_bytes(hashlib.sha256((i or "").encode("utf-8")).digest()[8:16], "big")
            for i in uniq.to_list()]
    # .cast: replace_strict keeps the input's type for an empty column
    return ids.replace_strict(uniq, pl.Series(nums, dtype=pl.UInt64), return_dtype=pl.UInt64).cast(pl.UInt64)


def _part_of(h: pl.Expr, n: int) -> pl.Expr:
    return (h % n).cast(pl.Int64)


def _bm25_shard(h: pl.Expr, n: int) -> pl.Expr:
    # Other bits than the partition's, so a shard takes captions from every partition.
    return ((h // 2**24) % n).cast(pl.Int64)


def _roundtrip_shard(h: pl.Expr, n: int) -> pl.Expr:
    return ((h // 2**44) % n).cast(pl.Int64)


def _bucket(query_id: pl.Expr, n: int) -> pl.Expr:
    """A query's bucket from its id (positives.query_id, a sha256 of the normalised query)."""
    return (query_id.str.slice(1, 7).str.to_integer(base=16) % n).cast(pl.Int64)


def _row_shard(query_id: pl.Expr, n: int) -> pl.Expr:
    return (query_id.str.slice(8, 7).str.to_integer(base=16) % n).cast(pl.Int64)


def with_query_ids(df: pl.DataFrame) -> pl.DataFrame:
    uniq = df["q_norm"].unique()
    ids = pl.Series([positives.query_id(t) for t in uniq.to_list()], dtype=pl.String)
    return df.with_columns(_qid=pl.col("q_norm").replace_strict(uniq, ids, return_dtype=pl.String))


# --- executors ---------------------------------------------------------------------------

class LocalExecutor:
    """Tasks one after another in this process."""

    def map(self, fn: Callable[[dict], dict], items: list[dict], done: Callable[[dict, dict], None]) -> list[dict]:
        out = []
        for item in items:
            info = fn(item)
            done(item, info)
            out.append(info)
        return out


class RayExecutor:
    """Tasks as Ray tasks (one CPU each by default), results in the order given. The tasks
    read and write the run directory and its output folder: storage every node sees."""

    def __init__(self) -> None:
        try:
            import ray
        except ImportError as e:
            raise InputError("--executor ray needs Ray: pip install 'capgen[ray]'") from e
        self.ray = ray
        if not ray.is_initialized():
            init_ray_keeping_stop_handlers(ray)
        self.remote = ray.remote(_run_task)

    def map(self, fn: Callable[[dict], dict], items: list[dict], done: Callable[[dict, dict], None]) -> list[dict]:
        ray = self.ray
        pending = {self.remote.remote(fn, item): i for i, item in enumerate(items)}
        out: list[Optional[dict]] = [None] * len(items)
        try:
            while pending:
                # Short waits: ray.wait blocks in C++, where a stop signal's handler cannot run.
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    i = pending.pop(ref)
                    out[i] = ray.get(ref)
                    done(items[i], out[i])
        except BaseException:
            for ref in pending:   # a failed or stopped curation hands out no more work
                ray.cancel(ref)
            raise
        return out  # type: ignore[return-value]


def _run_task(fn: Callable[[dict], dict], item: dict) -> dict:
    return fn(item)


def executor_for(name: str):
    return RayExecutor() if name == "ray" else LocalExecutor()


# --- tasks: each writes a hidden folder, renamed into place when whole -------------------

def task(fn: Callable[[Path, dict], dict]) -> Callable[[dict], dict]:
    """fn(folder, item) -> info, run once per item["dir"]: a folder that exists is a task done
    (its info.json is the result); else fn writes into a hidden sibling renamed into place."""
    def run(item: dict) -> dict:
        final = Path(item["dir"])
        if (final / "info.json").is_file():
            return {**json.loads((final / "info.json").read_text()), "reused": True}
        tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            info = {**fn(tmp, item), "worker": f"{socket.gethostname()}:{os.getpid()}"}
            (tmp / "info.json").write_text(json.dumps(info))
            try:
                os.replace(tmp, final)
            except OSError:
                # A retried task whose first try, thought lost, finished after all: the same
                # parts are there already.
                if not (final / "info.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return info
    run.__name__ = run.__qualname__ = fn.__name__
    run.__module__ = fn.__module__
    return run


def _write(df: pl.DataFrame, path: Path) -> None:
    df.write_parquet(path, compression="zstd")


def _read(paths: Iterable[Path], schema: Optional[dict] = None) -> pl.DataFrame:
    frames = [pl.read_parquet(p) for p in paths if p.is_file()]
    if not frames:
        return pl.DataFrame(schema=schema or {})
    return pl.concat(frames, how="vertical_relaxed")


def _drops(frames: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat([d.select(DROP_COLUMNS) for d in frames], how="vertical_relaxed")


def _config(item: dict) -> CurateConfig:
    """The settings, checked again where the task runs: on a cluster node without the
    driver's files the check names the node and what is missing."""
    try:
        return CurateConfig.model_validate(item["config"])
    except ValidationError as e:
        problem = "; ".join(str(err.get("msg")) for err in e.errors())
        raise InputError(f"on {socket.gethostname()}: {problem} (the run directory, its output and every "
                         "--decontaminate-against file must be at the same path on every node)") from None


# --- 1. input ----------------------------------------------------------------------------

def _batches(path: Path, columns: list[str]) -> Iterable[pl.DataFrame]:
    """The file in slices; a damaged row group is named with its file, not a reader's traceback."""
    f = pq.ParquetFile(path)
    done = 0
    for g in range(f.num_row_groups):
        batches = f.iter_batches(READ_ROWS, row_groups=[g], columns=columns)
        while True:
            try:
                batch = next(batches, None)
            except Exception as e:  # pyarrow's errors for a bad page are of several types
                raise InputError(f"{path}: row group {g + 1} of {f.num_row_groups} (after row {done}) "
                                 f"is damaged: {e}") from None
            if batch is None:
                break
            done += batch.num_rows
            yield pl.from_arrow(batch)


def _split_file(path: Path, columns: list[str], key: str, parts: int, folder: Path, stem: str,
                prepare: Callable[[pl.DataFrame, int], pl.DataFrame], by_query: bool = False) -> tuple[int, Counter]:
    """path in `parts` files by a hash of the caption id in `key`, or with by_query by the
    bucket of the normalised query in `key`."""
    schema = prepare(pl.read_parquet(path, columns=columns, n_rows=0), 0).schema
    arrow_schema = pl.DataFrame(schema=schema).to_arrow().schema
    writers = [pq.ParquetWriter(folder / f"{stem}-{p:05d}.parquet", schema=arrow_schema, compression="zstd")
               for p in range(parts)]
    buffers: list[list[pl.DataFrame]] = [[] for _ in range(parts)]
    held = 0
    n, types = 0, Counter()
    try:
        for batch in _batches(path, columns):
            df = prepare(batch, n).cast(schema)
            n += df.height
            if "type" in df.columns:
                types.update(df["type"].to_list())
            if by_query:
                qids = with_query_ids(df.with_columns(q_norm=normalized(df[key])))["_qid"]
                df = df.with_columns(_p=_bucket(pl.lit(qids), parts))
            else:
                df = df.with_columns(_p=_part_of(caption_hash(df[key]), parts))
            for (p,), piece in df.partition_by("_p", as_dict=True, maintain_order=True).items():
                buffers[p].append(piece.drop("_p"))
                held += piece.height
            # What is held stays at a few batches however many partitions there are.
            if held >= 2 * READ_ROWS:
                held = _flush(writers, buffers)
        _flush(writers, buffers)
    finally:
        for w in writers:
            w.close()
    return n, types


def _flush(writers: list, buffers: list[list[pl.DataFrame]]) -> int:
    for p, pieces in enumerate(buffers):
        if pieces:
            writers[p].write_table(pl.concat(pieces).to_arrow())
            pieces.clear()
    return 0


def _input(folder: Path, item: dict) -> dict:
    run_dir, parts = Path(item["run_dir"]), item["parts"]
    queries, captions = run_dir / "queries.parquet", run_dir / "captions.parquet"
    n_q, types = _split_file(queries, list(INPUT_COLUMNS), "caption_id", parts, folder, "q",
                             lambda df, offset: require_values(df, queries, offset)
                             .with_row_index("row", offset=offset).cast(RECORD_CASTS))
    n_c, _ = _split_file(captions, ["id", "text"], "id", parts, folder, "c",
                         lambda df, offset: require_values(df, captions, offset))
    if item["config"]["judge_candidates"]:
        # The judge's grades of candidates by the bucket of their (normalised) query: a
        # bucket's tasks read its own, never the whole file.
        _split_file(run_dir / judged.CANDIDATE_JUDGEMENTS, ["caption_id", "query", "judge_grade"], "query", parts,
                    folder, "g", lambda df, offset: df, by_query=True)
    return {"queries": n_q, "captions_rows": n_c,
            "queries_in_by_type": {str(k): v for k, v in types.items()}, "none_type": types.get(None, 0)}


# --- 2. captions -------------------------------------------------------------------------

def _captions(folder: Path, item: dict) -> dict:
    config = _config(item)
    src = Path(item["input"]) / f"c-{item['part']:05d}.parquet"
    caps = pl.read_parquet(src).unique("id", keep="first", maintain_order=True)
    n_in = caps.height
    caps, refused, guard = clean_captions(caps)
    evals = load_eval_texts(config.decontaminate_against)
    caps, hits, n_scored = decontaminate_captions(caps, evals, config)
    caps = tokenize_captions(caps, config)
    caps = splits.assign(caps, config.dev_fraction).with_columns(h=caption_hash(caps["id"]))
    _write(caps.select("id", "text", "c_norm", "c_words", "split", "h"), folder / "caps.parquet")
    _write(refused, folder / "refused.parquet")
    _write(hits, folder / "hits.parquet")
    return {"captions_in": n_in, **guard, "eval_texts": len(evals), "pairs_scored": n_scored,
            "captions_dropped": hits.height, "captions": caps.height,
            "by_split": {s: int((caps["split"] == s).sum()) for s in SPLITS}}


# --- 3. records --------------------------------------------------------------------------

def _records(folder: Path, item: dict) -> dict:
    config = _config(item)
    run_dir, buckets = Path(item["run_dir"]), item["parts"]
    cap_dir = Path(item["captions"])
    raw = pl.read_parquet(Path(item["input"]) / f"q-{item['part']:05d}.parquet")
    caps = pl.read_parquet(cap_dir / "caps.parquet")
    recs, guard = clean_queries(raw)
    known = with_query_ids(recs.select("caption_id", "q_norm").unique())
    for (b,), piece in known.with_columns(_b=_bucket(pl.col("_qid"), buckets)).partition_by(
            "_b", as_dict=True).items():
        _write(piece.select("caption_id", "q_norm"), folder / f"known-{b:05d}.parquet")
    drops: list[pl.DataFrame] = []
    common = pl.Series(item["common"], dtype=pl.String)
    recs, grounding = record_steps(recs, caps, pl.read_parquet(cap_dir / "refused.parquet"),
                                   pl.read_parquet(cap_dir / "hits.parquet"), run_dir, config, _Timer(), drops,
                                   common)
    recs = recs.join(caps.select(caption_id="id", pos_text="text", split="split", _h="h"), on="caption_id",
                     maintain_order="left")
    recs = with_query_ids(recs).with_columns(_b=_bucket(pl.col("_qid"), buckets))
    keep = [c for c in recs.columns if c not in ("_qid", "_h", "_b", "c_norm")]
    for (b,), piece in recs.partition_by("_b", as_dict=True).items():
        _write(piece.select(keep), folder / f"recs-{b:05d}.parquet")
    # This partition's captions by BM25 shard, so that a shard's task reads its own captions
    # only (reading every partition's whole file per shard would grow with shards x captions).
    for name in SPLITS:
        n = item["shards"][name]
        mine = caps.filter(pl.col("split") == name).with_columns(_s=_bm25_shard(pl.col("h"), n))
        for (sh,), piece in mine.partition_by("_s", as_dict=True).items():
            _write(piece.select("id", "text", "c_norm", "c_words", "split"), folder / f"caps-{name}-{sh:05d}.parquet")
    if config.roundtrip_k is not None:
        n = item["roundtrip_shards"]
        for (sh,), piece in recs.with_columns(_rt=_roundtrip_shard(pl.col("_h"), n)).partition_by(
                "_rt", as_dict=True).items():
            _write(piece.drop("_qid", "_h", "_b", "_rt"), folder / f"rt-recs-{sh:05d}.parquet")
        for (sh,), piece in caps.with_columns(_rt=_roundtrip_shard(pl.col("h"), n)).partition_by(
                "_rt", as_dict=True).items():
            _write(piece.select("id", "c_words"), folder / f"rt-caps-{sh:05d}.parquet")
    dropped = _drops(drops)
    _write(dropped, folder / "drops.parquet")
    return {"records": raw.height, "kept": recs.height, **guard,
            "grounding": {k: grounding[k] for k in filters.GROUNDING_COUNTS},
            "mix_counts": list(positives.mix_counts(recs)),
            "dropped_by_reason": dict(Counter(dropped["reason"].to_list()))}


# --- 4. round trip -----------------------------------------------------------------------

def _roundtrip(folder: Path, item: dict) -> dict:
    config = _config(item)
    s = item["shard"]
    caps = _read((Path(d) / f"rt-caps-{s:05d}.parquet" for d in item["records"]),
                 {"id": pl.String, "c_words": pl.List(pl.String)})
    # Ranks are a partition's own; the row number is unique over the run.
    recs = _read(Path(d) / f"rt-recs-{s:05d}.parquet" for d in item["records"])
    if recs.height == 0:
        recs = pl.read_parquet(item["schema"]).clear()
    recs = recs.with_columns(rank=pl.col("row"))
    _, dropped = roundtrip.apply(recs, caps, config)
    _write(dropped.select(DROP_COLUMNS), folder / "drops.parquet")
    _write(with_query_ids(dropped).select("row", "_qid"), folder / "missed.parquet")
    return {"checked": recs.height, "missed": dropped.height, "mix_counts": list(positives.mix_counts(dropped)),
            "dropped_by_reason": dict(Counter(dropped["reason"].to_list()))}


# --- 5. group ----------------------------------------------------------------------------

def _group(folder: Path, item: dict) -> dict:
    config = _config(item)
    b, buckets = item["bucket"], item["parts"]
    recs = _read(Path(d) / f"recs-{b:05d}.parquet" for d in item["records"])
    if item["missed"]:
        missed = pl.scan_parquet(item["missed"]).filter(_bucket(pl.col("_qid"), buckets) == b).select("row").collect()
        recs = recs.join(missed, on="row", how="anti")
    known = _read((Path(d) / f"known-{b:05d}.parquet" for d in item["records"]),
                  {"caption_id": pl.String, "q_norm": pl.String}).unique()
    graded = judged.candidates(Path(item["run_dir"]), False)
    if config.judge_candidates:
        graded = judged.graded(pl.read_parquet(Path(item["input"]) / f"g-{b:05d}.parquet"))
    _write(graded, folder / "graded.parquet")
    drops: list[pl.DataFrame] = []
    rows = None
    if recs.height:
        recs = with_rank(recs.drop("rank", "_rt", "c_norm", strict=False))
        recs, d = positives.mix(recs, config.summary_share, tuple(item["mix_counts"]))
        drops.append(d)
        recs, d = positives.group(recs, item["n_captions"], config)
        drops.append(d)
        rows = _query_rows(recs)
    counts = {}
    for name in SPLITS:
        n = item["shards"][name]
        if rows is None:
            continue
        part = rows.filter(pl.col("split") == name).with_columns(_s=_row_shard(pl.col("query_id"), n))
        mine = recs.filter(pl.col("split") == name).with_columns(_s=_row_shard(pl.col("query_id"), n))
        by_shard = mine.partition_by("_s", as_dict=True)
        for (s,), r in part.partition_by("_s", as_dict=True, maintain_order=True).items():
            r = r.drop("_s", "qrow").with_row_index("qrow")
            if r.height:
                _write(r, folder / f"rows-{name}-{s:05d}.parquet")
                _write(by_shard[(s,)].select(*DROP_COLUMNS[:-2], "query_id", "split"),
                       folder / f"recs-{name}-{s:05d}.parquet")
                # The guard's pairs of these rows' queries alone: each shard's task reads its own.
                _write(known.join(r.select("q_norm").unique(), on="q_norm", how="semi"),
                       folder / f"known-{name}-{s:05d}.parquet")
                counts[f"{name}-{s}"] = r.height
    dropped = _drops(drops) if drops else pl.DataFrame(schema={c: pl.String for c in DROP_COLUMNS})
    _write(dropped, folder / "drops.parquet")
    return {"records": recs.height, "rows": counts,
            "dropped_by_reason": dict(Counter(dropped["reason"].to_list()))}


# --- 6. negatives ------------------------------------------------------------------------

class _ShardIndexes(negatives.SplitIndexes):
    """SplitIndexes over one shard of one split; n_queries: all the rows that will search it
    (what bm25s' backend choice weighs), though they come bucket by bucket."""

    def __init__(self, caps: pl.DataFrame, n_queries: int, config: CurateConfig):
        super().__init__(caps, pl.DataFrame({"split": pl.Series([], dtype=pl.String)}), config)
        self.n_queries = n_queries

    def index(self, name: str) -> negatives.SplitIndex:
        if name not in self._index:
            self._index[name] = negatives.SplitIndex(self.captions(name)["c_words"].to_list(), self.config,
                                                     self.n_queries)
        return self._index[name]


def _negatives(folder: Path, item: dict) -> dict:
    config = _config(item)
    name, s, n, buckets = item["split"], item["shard"], item["shards"], item["parts"]
    caps = _read((Path(d) / f"caps-{name}-{s:05d}.parquet" for d in item["records"]),
                 {"id": pl.String, "text": pl.String, "c_norm": pl.String, "c_words": pl.List(pl.String),
                  "split": pl.String})
    indexes = _ShardIndexes(caps, item["n_queries"], config)
    least = min(config.min_negatives, config.negatives)
    parts, reasons, n_judged = [], Counter(), 0
    for b in range(buckets):
        group = Path(item["groups"][b])
        src = group / f"rows-{name}-{s:05d}.parquet"
        if not src.is_file():
            continue
        rows = pl.read_parquet(src)
        recs = pl.read_parquet(group / f"recs-{name}-{s:05d}.parquet")
        grades = pl.read_parquet(group / "graded.parquet")
        known = pl.concat([pl.read_parquet(group / f"known-{name}-{s:05d}.parquet"),
                           judged.positives(grades).select("caption_id", "q_norm")]).unique()
        rows, jp = cross.extend(rows, indexes, config, judged.positives(grades))
        n_judged += jp
        guard: Counter = Counter()
        rows = judged.mark_confirmed(negatives.attach(rows, indexes, known, config, guard), grades)
        few = rows.filter(pl.col("neg").list.len() < least).select("query_id", "split")
        rows = rows.join(few, on=["query_id", "split"], how="anti")
        recs = recs.join(few.with_columns(_few=pl.lit(True)), on=["query_id", "split"], how="left")
        recs, d = split_off(recs, pl.col("_few").is_not_null(), "too_few_negatives",
                            pl.format("fewer than {} negatives", pl.lit(least)))
        d = d.select(DROP_COLUMNS)
        reasons.update(d["reason"].to_list())
        _write(rows.drop("q_words", "q_norm", "qrow"), folder / f"rows-{b:05d}.parquet")
        _write(d, folder / f"drops-{b:05d}.parquet")
        parts.append(partial_stats(rows, recs, guard, config))
        # A shard's task is the longest of a large run: it says how far it is (here; a Ray
        # worker's log goes where Ray sends it).
        log.info("curate: negatives %s shard %d/%d, bucket %d/%d: %d query rows", name, s + 1, n, b + 1, buckets,
                 rows.height, extra={"fields": {"event": "curate_task_progress", "step": "negatives", "split": name,
                                                "shard": s + 1, "shards": n, "bucket": b + 1, "buckets": buckets,
                                                "query_rows": rows.height}})
    return {"stats": merge_stats(parts) if parts else None, "judged_positives": n_judged,
            "dropped_by_reason": dict(reasons), "captions": caps.height}


# --- the driver --------------------------------------------------------------------------

def needed(run_dir: Path, config: CurateConfig) -> bool:
    """Whether the run is past what the in-memory path takes with these settings: more
    records than partition_records, or more captions than one BM25 shard."""
    rows = lambda name: pq.ParquetFile(run_dir / name).metadata.num_rows  # noqa: E731
    return rows("queries.parquet") > config.partition_records or rows("captions.parquet") > config.bm25_shard_captions


def code_files() -> list[Path]:
    """The code that writes and reads parts: the curation's own and the text rules it applies."""
    import schemas
    here = Path(__file__).parent
    return sorted(here.glob("*.py")) + sorted(Path(schemas.__file__).parent.glob("*.py"))


def inputs_digest(run_dir: Path, config: CurateConfig) -> str:
    """What names a curation's parts: its inputs' contents, the settings that shape the
    parts and the code, so a changed input, or an upgrade between a failed curation and its
    rerun, never meets parts of the old one."""
    h = hashlib.sha256(config.fingerprint().encode())
    h.update(f"partition_records={config.partition_records}".encode())
    for path in code_files():
        h.update(hashlib.sha256(path.read_bytes()).digest())
    for path in [run_dir / "queries.parquet", run_dir / "captions.parquet",
                 *judged.inputs(run_dir, config.judge, config.judge_candidates)]:
        h.update(sha256_file(path).encode() if path.is_file() else b"-")
    return h.hexdigest()


def parts_root(out: Path) -> Path:
    # Beside a hidden staging folder (removed when a curation fails), so a rerun finds them.
    return (out.parent if out.name.startswith(".") else out) / PARTS_DIR


def remove_parts(out: Path) -> None:
    shutil.rmtree(parts_root(out), ignore_errors=True)


class _Progress:
    def __init__(self, step: str, total: int):
        self.step, self.total, self.n, self.t0 = step, total, 0, time.perf_counter()
        log.info("curate: %s, %d part(s)", step, total,
                 extra={"fields": {"event": "curate_step", "step": step, "parts": total}})

    def __call__(self, item: dict, info: dict) -> None:
        self.n += 1
        counts = {k: v for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        counts["reused"] = bool(info.get("reused"))
        log.info("curate: %s %d/%d done: %s", self.step, self.n, self.total,
                 " ".join(f"{k}={v}" for k, v in counts.items()),
                 extra={"fields": {"event": "curate_progress", "step": self.step, "part": self.n,
                                   "parts": self.total, "elapsed_s": round(time.perf_counter() - self.t0, 1),
                                   "worker": info.get("worker"), **counts}})


def curate_partitioned(run_dir: Path, config: CurateConfig, out: Path, name: Optional[Path] = None) -> dict:
    timer, t_start = _Timer(), time.perf_counter()
    judged.require(run_dir, config.judge, config.judge_candidates)
    digest = inputs_digest(run_dir, config)
    root = parts_root(out)
    work = root / digest[:24]
    if root.is_dir():
        for old in root.iterdir():   # another input's or settings' parts: never reused
            if old != work:
                shutil.rmtree(old, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("*/.*.tmp-*"):   # a task killed outright
        shutil.rmtree(stale, ignore_errors=True)
    n_records = pq.ParquetFile(run_dir / "queries.parquet").metadata.num_rows
    parts = max(1, math.ceil(n_records / config.partition_records))
    cfg = config.model_dump(mode="json")
    base = {"run_dir": str(run_dir), "config": cfg, "parts": parts}
    log.info("curate: %d records in %d partition(s), parts in %s", n_records, parts, work,
             extra={"fields": {"event": "curate_partitions", "records": n_records, "parts": parts,
                               "executor": config.executor, "work_dir": str(work)}})
    executor = executor_for(config.executor)

    def step(label: str, fn, items: list[dict], here: bool = False) -> list[dict]:
        with timer(label):
            return (LocalExecutor() if here else executor).map(task(fn), items, _Progress(label, len(items)))

    # The input pass runs here: it reads the run once, and a damaged file is this process's error.
    inp = step("partition", _input, [{**base, "dir": str(work / "input" / "all")}], here=True)[0]
    input_dir = work / "input" / "all"
    cap_items = [{**base, "part": p, "input": str(input_dir), "dir": str(work / "captions" / f"p{p:05d}")}
                 for p in range(parts)]
    cap_info = step("captions", _captions, cap_items)
    cap_files = [str(Path(i["dir"]) / "caps.parquet") for i in cap_items]

    with timer("common_units"):
        c_norm = pl.scan_parquet(cap_files).select("c_norm").collect(engine="streaming")["c_norm"]
        common = filters.run_common_units(c_norm)
        del c_norm
    n_caps = sum(i["captions"] for i in cap_info)
    by_split = {s: sum(i["by_split"][s] for i in cap_info) for s in SPLITS}
    shards = {s: max(1, math.ceil(by_split[s] / config.bm25_shard_captions)) for s in SPLITS}
    rt_shards = max(1, math.ceil(n_caps / config.bm25_shard_captions))
    log.info("curate: %d captions; BM25 shards: train %d, dev %d", n_caps, shards["train"], shards["dev"],
             extra={"fields": {"event": "curate_shards", "captions": n_caps, "bm25_shards": shards}})

    rec_items = [{**base, "part": p, "input": str(input_dir), "captions": cap_items[p]["dir"],
                  "common": common.to_list() if common is not None else [], "roundtrip_shards": rt_shards,
                  "shards": shards,
                  "dir": str(work / "records" / f"p{p:05d}")} for p in range(parts)]
    rec_info = step("records", _records, rec_items)
    rec_dirs = [i["dir"] for i in rec_items]
    mix_counts = [sum(i["mix_counts"][k] for i in rec_info) for k in (0, 1)]

    rt_info, missed = [], []
    if config.roundtrip_k is not None:
        recs_files = [f for d in rec_dirs for f in sorted(Path(d).glob("recs-*.parquet"))]
        rt_items = [{**base, "shard": s, "records": rec_dirs, "schema": str(recs_files[0]) if recs_files else None,
                     "dir": str(work / "roundtrip" / f"s{s:05d}")} for s in range(rt_shards)]
        if recs_files:
            rt_info = step("roundtrip", _roundtrip, rt_items)
            missed = [str(Path(i["dir"]) / "missed.parquet") for i in rt_items]
            for i in rt_info:
                mix_counts = [mix_counts[k] - i["mix_counts"][k] for k in (0, 1)]

    group_items = [{**base, "bucket": b, "records": rec_dirs, "input": str(input_dir), "missed": missed,
                    "mix_counts": mix_counts, "n_captions": n_caps, "shards": shards,
                    "dir": str(work / "group" / f"b{b:05d}")}
                   for b in range(parts)]
    group_info = step("group", _group, group_items)
    group_dirs = [i["dir"] for i in group_items]

    neg_items = [{**base, "split": sp, "shard": s, "shards": shards[sp], "records": rec_dirs, "groups": group_dirs,
                  "n_queries": sum(i["rows"].get(f"{sp}-{s}", 0) for i in group_info),
                  "dir": str(work / "negatives" / f"{sp}-{s:05d}")}
                 for sp in SPLITS for s in range(shards[sp])]
    neg_info = step("negatives", _negatives, neg_items)

    with timer("write"):
        t_write = time.perf_counter()
        reasons: Counter = Counter()
        for info in (*rec_info, *rt_info, *group_info, *neg_info):
            reasons.update(info["dropped_by_reason"])
        drop_files = ([Path(d) / "drops.parquet" for d in rec_dirs]
                      + [Path(i["dir"]) / "drops.parquet" for i in (rt_items if rt_info else [])]
                      + [Path(d) / "drops.parquet" for d in group_dirs]
                      + [f for i in neg_items for f in sorted(Path(i["dir"]).glob("drops-*.parquet"))])
        files, n_dropped = _write_shards(out, config, neg_items, cap_files, drop_files)
        partial = merge_stats([i["stats"] for i in neg_info if i["stats"]]) or partial_stats(
            pl.DataFrame(schema=_EMPTY_ROWS), pl.DataFrame(schema={"type": pl.String}), Counter(), config)
        stats = {
            "queries_in": inp["queries"], "captions_in": sum(i["captions_in"] for i in cap_info),
            "queries_in_by_type": _in_by_type(inp),
            "text_guard": {k: sum(i[k] for i in (rec_info if k.startswith("queries") else cap_info))
                           for k in ("queries_refused", "queries_cleaned", "captions_refused", "captions_cleaned")},
            "decontamination": {"eval_texts": cap_info[0]["eval_texts"] if cap_info else 0,
                                "pairs_scored": sum(i["pairs_scored"] for i in cap_info),
                                "captions_dropped": sum(i["captions_dropped"] for i in cap_info)},
            "grounding": filters.grounding_summary(
                {k: sum(i["grounding"][k] for i in rec_info) for k in filters.GROUNDING_COUNTS}),
            "judged_positives": sum(i["judged_positives"] for i in neg_info),
        }
        if stats["grounding"]["warning"]:
            log.warning("curation of %s: %s", name or run_dir, stats["grounding"]["warning"])
        stats.update(finish_stats(partial, dict(reasons)))
        stats["peak_rss_gib_after_step"] = timer.peak_gib
        if stats["pairs_out"] + n_dropped != inp["queries"]:
            raise AssertionError(f"curation lost records: {inp['queries']} in, {stats['pairs_out']} "
                                 f"out, {n_dropped} dropped")
    manifest = finish(out, files, config, stats, timer.seconds, t_start, t_write)
    shutil.rmtree(work, ignore_errors=True)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    return manifest


_EMPTY_ROWS = {"split": pl.String, "type": pl.String, "n_generated": pl.UInt32, "pos": pl.List(pl.String),
               "neg": pl.List(pl.String), "neg_judged": pl.List(pl.Boolean), "neg_bm25": pl.List(pl.Float64)}


def _in_by_type(inp: dict) -> dict:
    counts: dict[Any, int] = dict(inp["queries_in_by_type"])
    if inp.get("none_type"):
        counts.pop("None", None)
        counts[None] = inp["none_type"]
    return dict(sorted(counts.items(), key=lambda kv: str(kv[0])))


def _write_shards(out: Path, config: CurateConfig, neg_items: list[dict], cap_files: list[str],
                  drop_files: list[Path]) -> tuple[list[dict], int]:
    files: list[dict] = []
    n = config.rows_per_shard
    dev_rows = []
    for name in SPLITS:
        writers = [ShardedWriter(out, name, "parquet", n, out), ShardedWriter(out / "flag", name, "jsonl", n, out),
                   ShardedWriter(out / "st", name, "parquet", n, out)]
        pieces = [f for i in neg_items if i["split"] == name for f in sorted(Path(i["dir"]).glob("rows-*.parquet"))]
        for path in pieces or [None]:
            rows = pl.read_parquet(path) if path else pl.DataFrame(schema=_SHARD_SCHEMA)
            rows = rows.select(list(_SHARD_SCHEMA)).cast(_SHARD_SCHEMA)
            writers[0].add(views.query_rows(rows))
            writers[1].add(views.flag(rows))
            writers[2].add(views.sentence_transformers(rows, config.negatives))
            if name == "dev":
                dev_rows.append(rows.select("query_id", "query", "pos_ids", "pos_scores"))
        for w in writers:
            files += w.close()
    dev = pl.concat(dev_rows)
    dev_caps = (pl.scan_parquet(cap_files).filter(pl.col("split") == "dev").select("id", "text")
                .collect(engine="streaming")
                if cap_files else pl.DataFrame(schema={"id": pl.String, "text": pl.String}))
    corpus, queries, qrels = views.beir(dev, dev_caps)
    for df, rel, writer in ((corpus, "beir/corpus.jsonl", write_jsonl),
                            (queries, "beir/queries.jsonl", write_jsonl),
                            (qrels, "beir/qrels/dev.tsv", write_tsv)):
        files.append({"file": rel, "rows": df.height, **writer(df, out / rel)})
    n_dropped = 0
    path = out / "dropped.parquet"
    with atomic_path(path) as tmp:
        writer = None
        for f in drop_files:
            df = pl.read_parquet(f).select(DROP_COLUMNS).cast(_DROP_SCHEMA)
            if writer is None:
                writer = pq.ParquetWriter(tmp, df.to_arrow().schema, compression="zstd", write_statistics=False)
            if df.height:
                writer.write_table(df.to_arrow())
                n_dropped += df.height
        if writer is None:
            writer = pq.ParquetWriter(tmp, pl.DataFrame(schema=_DROP_SCHEMA).to_arrow().schema, compression="zstd")
        writer.close()
    files.append({"file": "dropped.parquet", "rows": n_dropped, "sha256": sha256_file(path),
                  "bytes": path.stat().st_size})
    return files, n_dropped


_DROP_SCHEMA = {"row": pl.UInt32, "caption_id": pl.String, "query": pl.String, "type": pl.String,
                "subtype": pl.String, "grade": pl.Int64, "salience": pl.Int64, "source": pl.String,
                "model": pl.String, "answer_key": pl.String, "reason": pl.String, "detail": pl.String}
_SHARD_SCHEMA = {"query_id": pl.String, "query": pl.String, "type": pl.String, "subtype": pl.String,
                 "split": pl.String, "n_generated": pl.UInt32,
                 "pos": pl.List(pl.String), "pos_ids": pl.List(pl.String), "pos_scores": pl.List(pl.Float64),
                 "neg": pl.List(pl.String), "neg_ids": pl.List(pl.String), "neg_bm25": pl.List(pl.Float64),
                 "neg_judged": pl.List(pl.Boolean)}
