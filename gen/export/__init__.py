"""Export, the fourth stage: outcomes -> files: queries.parquet, captions.parquet, rejects.jsonl
(report.py: the run's report.html).

Rows are written in input order, one caption after another, from this run's captions and
this fingerprint's answers only, so the files always describe exactly this input (no stale
rows from an older template, no duplicates after a resumed run) and memory stays flat.
Every caption ends in exactly one place: its queries, or a reject with the reason. An answer
rejected after its repair rounds keeps its valid queries when only single queries were wrong
(gen.generate.validate.salvage); each dropped one is a reject of its own, stage "query".
"""
from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import pyarrow as pa
import pyarrow.parquet as pq

from gen.atomic import all_or_none, atomic_path
from gen.config import answer_key
from gen.engines.base import printable
from gen.export.report import Tally
from gen.logs import json_line
from gen.store import AnswerStore, Stored
from gen.generate.validate import salvage
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


def skip_pandas_probe() -> None:
    """Tell pyarrow that pandas is absent, unless something already imported it.

    pyarrow imports pandas (0.15-0.3 s of CPU, more than a run's whole export of 1,000
    captions) the first time it builds an array, only to check whether the data is a pandas
    object; capgen never passes one. An explicit `to_pandas()` still imports it. Called by
    the CLI for its own process only, never on import: a library caller may want pandas.
    """
    import sys
    if "pandas" in sys.modules:
        return

    class _Absent:
        def find_spec(self, name, path=None, target=None):
            if name == "pandas":
                raise ModuleNotFoundError("pandas is not needed here", name=name)
            return None

    blocker = _Absent()
    sys.meta_path.insert(0, blocker)
    try:
        pa.lib._pandas_api.have_pandas  # pyarrow asks once and remembers the answer
    finally:
        sys.meta_path.remove(blocker)


@dataclass
class ExportStats:
    captions_with_queries: int = 0
    queries: int = 0
    salvaged: int = 0     # rejected answers whose valid queries were kept
    unreadable: int = 0   # stored answers damaged on disk: rejected, and asked again next run
    pending: int = 0      # captions in a batch not yet collected (gen.generate.batch): in no file yet
    rejects: Counter = field(default_factory=Counter)   # by stage
    tally: Tally = field(default_factory=Tally)          # the report's figures

    @property
    def queries_by_type(self) -> Counter:
        return self.tally.queries_by_type()


class _Batched:
    """A ParquetWriter fed column lists, flushed in bounded batches.

    Columns, not a dict (or a pydantic record) per row: at ~23 query rows a caption the
    per-row objects were most of export's CPU. The answers were validated when stored.
    """

    def __init__(self, path: Path, schema: pa.Schema, on_flush=None):
        self.writer = pq.ParquetWriter(str(path), schema, compression="zstd")
        self.schema, self.on_flush = schema, on_flush
        self.columns: dict[str, list] = {name: [] for name in schema.names}

    def flush_if_full(self) -> None:
        if len(self.columns[self.schema.names[0]]) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.columns[self.schema.names[0]]:
            if self.on_flush:
                self.on_flush(self.columns)
            self.writer.write_table(pa.Table.from_pydict(self.columns, schema=self.schema))
            self.columns = {name: [] for name in self.schema.names}

    def close(self) -> None:
        self.flush()
        self.writer.close()


class Exporter:
    """The three output files, written in input order as each caption's outcome is known.

    The local executor feeds it while it generates (gen.generate), so the files are done
    moments after the last answer; `export()` feeds it from the store in a pass of its own.
    Either way every caption ends in exactly one place, and nothing replaces the old files
    unless `close()` is reached: a failed run leaves the previous run's files as they were.
    """

    def __init__(self, out_dir: Path, model: str):
        self.model, self.out_dir = model, out_dir
        self.stats = ExportStats()
        self._files = contextlib.ExitStack()
        qpath = self._files.enter_context(atomic_path(out_dir / "queries.parquet"))
        cpath = self._files.enter_context(atomic_path(out_dir / "captions.parquet"))
        rpath = self._files.enter_context(atomic_path(out_dir / "rejects.jsonl"))
        self.queries = _Batched(qpath, QUERY_SCHEMA, on_flush=self.stats.tally.rows)
        self.captions = _Batched(cpath, CAPTION_SCHEMA)
        self.rejects = self._files.enter_context(rpath.open("w", encoding="utf-8"))

    def __enter__(self) -> "Exporter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort(exc)

    def _abort(self, exc: BaseException) -> None:
        """The temporary files go, the previous run's outputs stay."""
        for batched in (self.queries, self.captions):
            with contextlib.suppress(Exception):
                batched.writer.close()
        self._files.__exit__(type(exc), exc, exc.__traceback__)

    def reject(self, r: Reject) -> None:
        self.stats.rejects[r.stage] += 1
        self.stats.tally.reject(r.reason)
        self.rejects.write(json_line(r.model_dump()) + "\n")

    def caption(self, record: Caption, key: str, status: Optional[str], answer: Optional[str],
                raw: Optional[str], reason: Optional[str]) -> None:
        """One caption's outcome: status ok (with the validated answer JSON), rejected, or
        None when it got no answer (`reason` says why)."""
        if status is None:
            self.reject(Reject(stage="generation", caption_id=record.id,
                               reason=f"no answer ({reason}); a rerun will ask again"))
            return
        if status != "ok":
            # At export, not when stored: answers rejected before salvage existed, in any
            # store, are kept on the next run without asking the model again.
            kept = salvage(raw, record.text)
            if kept is None:
                self.reject(Reject(stage="generation", caption_id=record.id, reason=reason, raw=raw))
                return
            data, dropped = kept
            for item, why in dropped:
                self.reject(Reject(stage="query", caption_id=record.id, raw=item,
                                   reason=f"query dropped, the rest of the answer kept: {why}"))
            self.stats.salvaged += 1
        else:
            data = json.loads(answer)
        self._rows(record, key, flatten(data))

    def _rows(self, record: Caption, key: str, rows: list[dict]) -> None:
        c = self.captions.columns
        c["id"].append(record.id)
        c["text"].append(record.text)
        c["extra"].append(json.dumps(record.extra, ensure_ascii=False) if record.extra else None)
        self.captions.flush_if_full()
        q = self.queries.columns
        q["caption_id"].extend([record.id] * len(rows))
        q["model"].extend([self.model] * len(rows))
        q["answer_key"].extend([key] * len(rows))
        for name in ROW_FIELDS:
            q[name].extend([row[name] for row in rows])
        self.queries.flush_if_full()
        self.stats.queries += len(rows)
        self.stats.tally.caption(record.id, record.text, rows)
        self.stats.captions_with_queries += 1

    def stored(self, record: Caption, key: str, stored: Optional[Stored], why_missing: str) -> bool:
        """False when the stored row cannot be read (damaged on disk): it is a reject with the
        reason, and the caller discards it from the store so that a rerun asks again."""
        if stored is None:
            self.caption(record, key, None, None, None, why_missing)
            return True
        try:
            rows = _stored_rows(stored)
        except ValueError as e:
            self.stats.unreadable += 1
            self.reject(Reject(stage="generation", caption_id=record.id,
                               reason=f"the stored answer cannot be read ({e}); a rerun will ask again"))
            return False
        if rows is None:
            self.caption(record, key, stored.status, stored.answer, stored.raw, stored.reason)
        else:
            self._rows(record, key, rows)
        return True

    def close(self) -> ExportStats:
        try:  # the last batches are written here: a full disk shows up now
            self.queries.close()
            self.captions.close()
        except BaseException as e:
            self._abort(e)
            raise
        with all_or_none():   # a stop signal must not leave new queries beside old captions
            # The old manifest describes the files about to be replaced; gen.run writes the
            # new one last, so a run stopped from here on reads as incomplete.
            (self.out_dir / "manifest.json").unlink(missing_ok=True)
            self._files.close()  # fsync and rename each file onto its target
        return self.stats


def _stored_rows(stored: Stored) -> Optional[list[dict]]:
    """The query rows of a stored accepted answer (None for a rejected one), checked as data
    from disk must be: ValueError saying what is wrong with a damaged row. The answer was
    validated when stored, so this checks only what would otherwise stop the export."""
    if stored.status == "rejected":
        if not isinstance(stored.raw, (str, type(None))) or not isinstance(stored.reason, str):
            raise ValueError("its raw answer or reason is not UTF-8 text")
        return None
    if stored.status != "ok" or not isinstance(stored.answer, str):
        raise ValueError(f"status {printable(stored.status)!r} with an answer that is not UTF-8 text")
    try:
        rows = flatten(json.loads(stored.answer))
        for r in rows:
            if not (isinstance(r["query"], str) and isinstance(r["subtype"], (str, type(None)))
                    and isinstance(r["source"], (str, type(None))) and type(r["grade"]) is int
                    and 0 <= r["grade"] <= 2 and r["salience"] < 2 ** 15):
                raise TypeError(f"query {printable(r['query'], 60)!r} has fields of the wrong type")
        "".join(r["query"] + (r["subtype"] or "") + (r["source"] or "") for r in rows).encode("utf-8")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise ValueError(f"its answer JSON is damaged: {type(e).__name__}: {printable(e)}") from None
    return rows


def export(records: Iterable[Union[Caption, Reject]], *, store: AnswerStore, fingerprint: str,
           model: str, out_dir: Path, failures: dict[str, str],
           pending: Optional[Callable[[str], bool]] = None) -> ExportStats:
    """A pass of its own over the captions, looking each answer up in the store (used after
    the Ray executor, whose answers arrive out of order in another process's batches, and
    in batch mode). A caption `pending` in a batch is in no file (nor in the rejects) until
    a later run collects its answer; the stats count it."""
    with Exporter(out_dir, model) as out:
        for record in records:
            if isinstance(record, Reject):
                out.reject(record)
                continue
            key = answer_key(fingerprint, record.text)
            if pending is not None and pending(key):
                out.stats.pending += 1
                continue
            if not out.stored(record, key, store.get(key), failures.get(key, "not generated in this run")):
                store.discard(key)
    return out.stats
