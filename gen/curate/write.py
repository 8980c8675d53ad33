"""Lay out shards/ and write the manifest last.

    train-00000.parquet ...     query rows: FlagEmbedding fields + ids + BM25 scores
    dev-00000.parquet ...
    flag/{train,dev}-00000.jsonl    the same rows as FlagEmbedding JSON lines
    st/{train,dev}-00000.parquet    sentence-transformers: anchor, positive, negative_1..k
    beir/corpus.jsonl, beir/queries.jsonl, beir/qrels/dev.tsv    the dev split for MTEB/BEIR
    dropped.parquet             every input record not in a shard, with `reason`
    manifest.json               files (rows, sha256), settings, fingerprint, stats
"""
from __future__ import annotations

import time
from pathlib import Path

import polars as pl

from gen.curate import views
from gen.curate.config import CurateConfig
from gen.curate.shards import write_json, write_jsonl, write_parquet, write_sharded, write_tsv

# Files an earlier curation may have left here; ones this run does not rewrite are removed,
# or a reader globbing train-*.parquet would mix two curations.
_OWNED = ("train-*.parquet", "dev-*.parquet", "flag/*.jsonl", "st/*.parquet")


def write_outputs(out: Path, rows: pl.DataFrame, caps: pl.DataFrame, dropped: pl.DataFrame,
                  config: CurateConfig, stats: dict, timings: dict, t_start: float) -> dict:
    t_write = time.perf_counter()
    files: list[dict] = []
    n = config.rows_per_shard
    for name in ("train", "dev"):
        part = rows.filter(pl.col("split") == name)
        files += write_sharded(views.query_rows(part), out, name, "parquet", n, out)
        files += write_sharded(views.flag(part), out / "flag", name, "jsonl", n, out)
        files += write_sharded(views.sentence_transformers(part, config.negatives), out / "st", name, "parquet", n, out)
    dev = rows.filter(pl.col("split") == "dev")
    corpus, queries, qrels = views.beir(dev, caps.filter(pl.col("split") == "dev"))
    for df, rel, writer in ((corpus, "beir/corpus.jsonl", write_jsonl),
                            (queries, "beir/queries.jsonl", write_jsonl),
                            (qrels, "beir/qrels/dev.tsv", write_tsv),
                            (dropped, "dropped.parquet", write_parquet)):
        files.append({"file": rel, "rows": df.height, **writer(df, out / rel)})

    written = {f["file"] for f in files}
    for pattern in _OWNED:
        for stale in out.glob(pattern):
            if stale.relative_to(out).as_posix() not in written:
                stale.unlink()

    timings = dict(timings, write=time.perf_counter() - t_write)
    total = time.perf_counter() - t_start
    manifest = {
        "stage": "curate",
        "fingerprint": config.fingerprint(),
        "settings": config.data_settings(),
        "runtime_settings": config.model_dump(mode="json", include={"workers", "bm25_backend", "rows_per_shard"}),
        "files": files,
        "stats": stats,
        "timings_s": {k: round(v, 3) for k, v in timings.items()} | {"total": round(total, 3)},
    }
    write_json(manifest, out / "manifest.json")
    return manifest
