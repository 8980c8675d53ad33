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
from gen.curate.config import RUNTIME_FIELDS, CurateConfig
from gen.curate.shards import WRITERS, write_json, write_jsonl, write_parquet, write_sharded, write_tsv

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

    return finish(out, files, config, stats, timings, t_start, t_write)


def finish(out: Path, files: list[dict], config: CurateConfig, stats: dict, timings: dict,
           t_start: float, t_write: float) -> dict:
    """Removes what an earlier curation left that this one did not write, then writes the
    manifest (last)."""
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
        "runtime_settings": config.model_dump(mode="json", include=set(RUNTIME_FIELDS)),
        "files": files,
        "stats": stats,
        "timings_s": {k: round(v, 3) for k, v in timings.items()} | {"total": round(total, 3)},
    }
    write_json(manifest, out / "manifest.json")
    return manifest


class ShardedWriter:
    """write_sharded for a frame that arrives in pieces: the same files, rows_per_shard rows
    each, holding at most one shard's rows at a time."""

    def __init__(self, folder: Path, stem: str, fmt: str, rows_per_shard: int, root: Path):
        self.folder, self.stem, self.fmt, self.n, self.root = folder, stem, fmt, rows_per_shard, root
        self.buf: list[pl.DataFrame] = []
        self.rows = 0
        self.entries: list[dict] = []
        self.empty: pl.DataFrame | None = None

    def add(self, df: pl.DataFrame) -> None:
        self.empty = df.clear()
        if df.height:
            self.buf.append(df)
            self.rows += df.height
        while self.rows >= self.n:
            self._flush()

    def _flush(self) -> None:
        df = pl.concat(self.buf) if self.buf else self.empty
        part, rest = df.head(self.n), df.slice(self.n)
        path = self.folder / f"{self.stem}-{len(self.entries):05d}.{self.fmt}"
        info = WRITERS[self.fmt](part, path)
        self.entries.append({"file": path.relative_to(self.root).as_posix(), "rows": part.height, **info})
        self.buf, self.rows = ([rest] if rest.height else []), rest.height

    def close(self) -> list[dict]:
        if self.rows or not self.entries:
            self._flush()
        return self.entries
