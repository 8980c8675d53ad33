"""Writers for curated shards. Every file is written beside its target under a temporary
name and renamed into place (gen.atomic), so a crash never leaves a half shard that looks
whole; callers write the manifest last, so a shard set without a manifest is unfinished.
query_shards() is how readers find the query shards of a version."""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any, Callable

import polars as pl

from gen.atomic import atomic_path, sha256_file
from gen.logs import json_line


def query_shards(directory: Path) -> list[Path]:
    """A curated version's query shards (train, then dev), for the readers of a version."""
    return sorted(directory.glob("train-*.parquet")) + sorted(directory.glob("dev-*.parquet"))


def _atomic(path: Path, write: Callable[[Path], None]) -> dict[str, Any]:
    with atomic_path(path) as tmp:
        write(tmp)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_parquet(df: pl.DataFrame, path: Path) -> dict[str, Any]:
    return _atomic(path, lambda tmp: df.write_parquet(tmp, compression="zstd", statistics=False))


def write_jsonl(df: pl.DataFrame, path: Path) -> dict[str, Any]:
    # polars writes lists as JSON arrays and text as UTF-8, which is what trainers read.
    def write(tmp: Path) -> None:
        df.write_ndjson(tmp)
        _escape_line_separators(tmp)
    return _atomic(path, write)


_SEPARATORS = {"\u2028".encode(): b"\\u2028", "\u2029".encode(): b"\\u2029"}


def _escape_line_separators(path: Path) -> None:
    """polars writes U+2028 and U+2029 raw, valid JSON that str.splitlines(), JavaScript
    readers and many editors split in two: escaped, as in every JSON-lines file capgen
    writes (logs.json_line). They can only stand inside strings, so bytes are replaced."""
    if path.stat().st_size == 0:
        return
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if all(m.find(raw) < 0 for raw in _SEPARATORS):
            return
    escaped = path.with_name(path.name + ".escaped")
    with path.open("rb") as src, escaped.open("wb") as dst:
        for line in src:
            for raw, esc in _SEPARATORS.items():
                line = line.replace(raw, esc)
            dst.write(line)
    os.replace(escaped, path)


def write_text(text: str, path: Path) -> dict[str, Any]:
    return _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(obj: Any, path: Path) -> dict[str, Any]:
    return write_text(json_line(obj, indent=2) + "\n", path)


def write_tsv(df: pl.DataFrame, path: Path) -> dict[str, Any]:
    return _atomic(path, lambda tmp: df.write_csv(tmp, separator="\t"))


WRITERS = {"parquet": write_parquet, "jsonl": write_jsonl}


def write_sharded(df: pl.DataFrame, folder: Path, stem: str, fmt: str, rows_per_shard: int,
                  root: Path) -> list[dict[str, Any]]:
    """`stem-00000.fmt`, ... of at most rows_per_shard rows each (one empty shard for an
    empty frame, so a reader always finds the schema). Returns one manifest entry a shard."""
    entries = []
    n_shards = max(1, -(-df.height // rows_per_shard))
    for i in range(n_shards):
        part = df.slice(i * rows_per_shard, rows_per_shard)
        path = folder / f"{stem}-{i:05d}.{fmt}"
        info = WRITERS[fmt](part, path)
        entries.append({"file": path.relative_to(root).as_posix(), "rows": part.height, **info})
    return entries
