"""Store -> files: queries.parquet, captions.parquet, rejects.jsonl.

A second streaming pass over the captions, looking each answer up in the store, so the
files always describe exactly this input under this fingerprint (no stale rows from an
older template, no duplicates after a resumed run) and memory stays flat. Every caption
ends in exactly one place: its queries, or a reject with the reason.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Union

import pyarrow as pa
import pyarrow.parquet as pq

from gen.atomic import atomic_path
from gen.config import answer_key
from gen.store import AnswerStore
from schemas import Caption, CaptionQueries, QueryRecord, Reject

QUERY_SCHEMA = pa.schema([
    ("caption_id", pa.string()), ("query", pa.string()), ("type", pa.string()),
    ("subtype", pa.string()), ("grade", pa.int8()), ("salience", pa.int16()),
    ("source", pa.string()), ("model", pa.string()), ("answer_key", pa.string()),
])
# `extra` holds the input line's other fields as JSON text, carried through untouched.
CAPTION_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("extra", pa.string())])
BATCH_ROWS = 20_000


@dataclass
class ExportStats:
    captions_with_queries: int = 0
    queries: int = 0
    rejects: Counter = field(default_factory=Counter)   # by stage
    queries_by_type: Counter = field(default_factory=Counter)


class _Batched:
    """A ParquetWriter fed row dicts, flushed in bounded batches."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.writer = pq.ParquetWriter(str(path), schema, compression="zstd")
        self.schema, self.rows = schema, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def export(records: Iterable[Union[Caption, Reject]], *, store: AnswerStore, fingerprint: str,
           model: str, out_dir: Path, failures: dict[str, str]) -> ExportStats:
    stats = ExportStats()
    with atomic_path(out_dir / "queries.parquet") as qpath, \
         atomic_path(out_dir / "captions.parquet") as cpath, \
         atomic_path(out_dir / "rejects.jsonl") as rpath:
        queries, captions = _Batched(qpath, QUERY_SCHEMA), _Batched(cpath, CAPTION_SCHEMA)
        with rpath.open("w", encoding="utf-8") as rejects:
            def reject(r: Reject) -> None:
                stats.rejects[r.stage] += 1
                rejects.write(json.dumps(r.model_dump(), ensure_ascii=False) + "\n")

            for record in records:
                if isinstance(record, Reject):
                    reject(record)
                    continue
                key = answer_key(fingerprint, record.text)
                stored = store.get(key)
                if stored is None:
                    why = failures.get(key, "not generated in this run")
                    reject(Reject(stage="generation", caption_id=record.id,
                                  reason=f"no answer ({why}); a rerun will ask again"))
                    continue
                if stored.status != "ok":
                    reject(Reject(stage="generation", caption_id=record.id,
                                  reason=stored.reason, raw=stored.raw))
                    continue
                captions.add({"id": record.id, "text": record.text,
                              "extra": json.dumps(record.extra, ensure_ascii=False) if record.extra else None})
                answer = CaptionQueries.model_validate_json(stored.answer)
                for row in answer.queries():
                    rec = QueryRecord(caption_id=record.id, model=model, answer_key=key, **row)
                    queries.add(rec.model_dump())
                    stats.queries += 1
                    stats.queries_by_type[rec.type] += 1
                stats.captions_with_queries += 1
        queries.close()
        captions.close()
    return stats
