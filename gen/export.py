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
from schemas import Caption, Reject
from schemas.answer import flatten

QUERY_SCHEMA = pa.schema([
    ("caption_id", pa.string()), ("query", pa.string()), ("type", pa.string()),
    ("subtype", pa.string()), ("grade", pa.int8()), ("salience", pa.int16()),
    ("source", pa.string()), ("model", pa.string()), ("answer_key", pa.string()),
])
# `extra` holds the input line's other fields as JSON text, carried through untouched.
CAPTION_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("extra", pa.string())])
# The QUERY_SCHEMA columns that come from schemas.answer.flatten(); the rest name the caption.
ROW_FIELDS = ("query", "type", "subtype", "grade", "salience", "source")
BATCH_ROWS = 20_000


@dataclass
class ExportStats:
    captions_with_queries: int = 0
    queries: int = 0
    rejects: Counter = field(default_factory=Counter)   # by stage
    queries_by_type: Counter = field(default_factory=Counter)


class _Batched:
    """A ParquetWriter fed column lists, flushed in bounded batches.

    Columns, not a dict (or a pydantic record) per row: at ~23 query rows a caption the
    per-row objects were most of export's CPU. The answers were validated when stored.
    """

    def __init__(self, path: Path, schema: pa.Schema):
        self.writer = pq.ParquetWriter(str(path), schema, compression="zstd")
        self.schema = schema
        self.columns: dict[str, list] = {name: [] for name in schema.names}

    def flush_if_full(self) -> None:
        if len(self.columns[self.schema.names[0]]) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.columns[self.schema.names[0]]:
            self.writer.write_table(pa.Table.from_pydict(self.columns, schema=self.schema))
            self.columns = {name: [] for name in self.schema.names}

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
                c = captions.columns
                c["id"].append(record.id)
                c["text"].append(record.text)
                c["extra"].append(json.dumps(record.extra, ensure_ascii=False) if record.extra else None)
                captions.flush_if_full()
                rows = flatten(json.loads(stored.answer))
                q = queries.columns
                q["caption_id"].extend([record.id] * len(rows))
                q["model"].extend([model] * len(rows))
                q["answer_key"].extend([key] * len(rows))
                for name in ROW_FIELDS:
                    q[name].extend([row[name] for row in rows])
                queries.flush_if_full()
                stats.queries += len(rows)
                stats.queries_by_type.update(row["type"] for row in rows)
                stats.captions_with_queries += 1
        queries.close()
        captions.close()
    return stats
