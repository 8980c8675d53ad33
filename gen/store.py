"""The answer store: every finished answer, persisted the moment it arrives.

SQLite in WAL mode, one row per answer key (see gen.config.answer_key). An answer that
validated is stored with its parsed JSON; one that still failed after its repair rounds is
stored as rejected with its raw text and reason, so a rerun does not pay for it again
unless it allows more repair rounds than that answer had.
Transient failures (server down after every retry) are not stored: a rerun asks again.

A row is data from disk, as untrusted as a server's reply: one damaged there (JSON cut
short, bytes that are not UTF-8) is read without an error, is no answer to KEPT, and
export rejects it with the reason (gen.export), so the run goes on and the caption is
asked again.
"""
from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('ok', 'rejected')),
    answer TEXT,            -- validated CaptionQueries JSON when ok
    raw TEXT,               -- the model's last raw text
    reason TEXT,            -- why it was rejected
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created REAL NOT NULL
)
"""

# Batch mode (gen/generate/batch.py). A batch is known by the digest of its request file from before
# it is uploaded (status 'intent'), so that a run killed between upload, create and this
# row's update finds it again on the provider; then by the provider's id ('live'); then by
# the provider's final status. Stores from before batch mode get the tables on opening.
_BATCH_SCHEMA = ("""
CREATE TABLE IF NOT EXISTS batches (
    digest TEXT PRIMARY KEY,        -- sha256 of the request file
    batch_id TEXT,                  -- the provider's, once created
    file_id TEXT,
    status TEXT NOT NULL,           -- intent | live | completed | failed | expired | cancelled | ...
    requests INTEGER NOT NULL,
    reason TEXT,
    answered INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    finished REAL
)""", """
CREATE TABLE IF NOT EXISTS batch_requests (
    key TEXT PRIMARY KEY,           -- so a caption is in one live batch at most
    digest TEXT NOT NULL,
    caption_id TEXT NOT NULL,
    text TEXT NOT NULL,             -- the caption, which its answer is validated against
    round INTEGER NOT NULL,         -- requests it had before this one (a repair round when > 0)
    prompt_tokens INTEGER NOT NULL, -- and their tokens, which this answer's add to
    completion_tokens INTEGER NOT NULL
)""", "CREATE INDEX IF NOT EXISTS batch_requests_digest ON batch_requests (digest)")


@dataclass(frozen=True)
class BatchRow:
    digest: str
    batch_id: Optional[str]
    file_id: Optional[str]
    status: str
    requests: int
    created: float


@dataclass(frozen=True)
class BatchRequest:
    key: str
    caption_id: str
    text: str
    round: int
    prompt_tokens: int
    completion_tokens: int


# Which stored answers a run keeps, given its repair rounds (the one parameter): every
# accepted one whose JSON is intact, and each rejected one that had at least as many rounds
# (its requests less one) and whose last answer was not empty. A run allowed more rounds
# asks again; fewer never discards what is there. An empty last answer (a refusal) is the
# server's failure, not the caption's: stores written before capgen retried those hold them.
KEPT = ("((status = 'ok' AND json_valid(answer)) "
        "OR (status = 'rejected' AND requests > ? AND trim(coalesce(raw, '')) != ''))")


@dataclass(frozen=True)
class Stored:
    key: str
    status: str
    answer: Optional[str]
    raw: Optional[str]
    reason: Optional[str]
    requests: int
    prompt_tokens: int
    completion_tokens: int


def _text(value: bytes) -> "str | bytes":
    """A TEXT column as str; bytes that are not UTF-8 (damaged on disk) as bytes, which
    export rejects, rather than sqlite3's error, which would stop the run."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


class StoreError(OSError):
    """The store cannot be read or written: disk full, not a database, locked past the wait.
    An OSError, so the CLI reports it as it does any file it cannot write (exit 1)."""


@contextmanager
def _sqlite(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as e:
        raise StoreError(f"answer store {path}: {e} (answers stored before this are kept; "
                         "a rerun resumes from them)") from e
    except sqlite3.DatabaseError as e:
        if type(e) is not sqlite3.DatabaseError:  # integrity and programming errors are bugs
            raise
        raise StoreError(f"answer store {path}: {e}") from e


class AnswerStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        with _sqlite(path):
            # --cache lets runs on other output directories share this store; SQLite takes one
            # writer at a time. A write is one row, so the wait is short (three runs at once:
            # tests/test_reliability.py); 60 s rather than sqlite3's 5 so that a slow disk is
            # a slow run, not a failed one.
            self.db = sqlite3.connect(str(path), isolation_level=None, timeout=60.0)
            self.db.text_factory = _text
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process (only power loss can drop the tail).
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute(_SCHEMA)
            for statement in _BATCH_SCHEMA:
                self.db.execute(statement)

    def get(self, key: str) -> Optional[Stored]:
        with _sqlite(self.path):
            row = self.db.execute(
                "SELECT key, status, answer, raw, reason, requests, prompt_tokens, completion_tokens "
                "FROM answers WHERE key = ?", (key,)).fetchone()
        return Stored(*row) if row else None

    def has(self, key: str, since: float = 0.0, repair_rounds: int = 0) -> bool:
        """Whether `key` has an answer stored at or after `since` (a time.time()) that a run
        with `repair_rounds` keeps (see KEPT)."""
        with _sqlite(self.path):
            return self.db.execute(f"SELECT 1 FROM answers WHERE key = ? AND created >= ? AND {KEPT}",
                                   (key, since, repair_rounds)).fetchone() is not None

    def put(self, key: str, status: str, *, answer: Optional[str], raw: Optional[str],
            reason: Optional[str], requests: int, prompt_tokens: int, completion_tokens: int) -> None:
        # REPLACE: --force regenerates an existing key; one row per key either way.
        with _sqlite(self.path):
            self.db.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, status, answer, raw, reason, requests, prompt_tokens, completion_tokens, time.time()),
            )

    def discard(self, key: str) -> None:
        """Forget a row that cannot be read, so that a rerun asks again."""
        with _sqlite(self.path):
            self.db.execute("DELETE FROM answers WHERE key = ?", (key,))

    # ------------------------------------------------------------------ batch mode

    def reserve_batch(self, digest: str, requests: list[BatchRequest]) -> None:
        """Record the intent to submit a request file, with its captions, in one transaction.
        A caption already in a live batch is an IntegrityError: never in two at once."""
        try:
            with _sqlite(self.path), self._transaction():
                self.db.execute("INSERT INTO batches (digest, status, requests, created) VALUES (?, 'intent', ?, ?)",
                                (digest, len(requests), time.time()))
                self.db.executemany(
                    "INSERT INTO batch_requests VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(r.key, digest, r.caption_id, r.text, r.round, r.prompt_tokens, r.completion_tokens)
                     for r in requests])
        except sqlite3.IntegrityError:
            raise StoreError(f"answer store {self.path}: a caption of this request file went into a batch of "
                             "another run sharing the store meanwhile; nothing was submitted, and a rerun "
                             "submits the rest") from None

    def batch_created(self, digest: str, batch_id: str, file_id: Optional[str]) -> None:
        with _sqlite(self.path):
            self.db.execute("UPDATE batches SET batch_id = ?, file_id = ?, status = 'live' WHERE digest = ?",
                            (batch_id, file_id, digest))

    def open_batches(self) -> list[BatchRow]:
        """Batches not yet collected: intents and live ones, oldest first."""
        with _sqlite(self.path):
            rows = self.db.execute("SELECT digest, batch_id, file_id, status, requests, created FROM batches "
                                   "WHERE status IN ('intent', 'live') ORDER BY created").fetchall()
        return [BatchRow(*r) for r in rows]

    def batch_requests(self, digest: str) -> dict[str, BatchRequest]:
        with _sqlite(self.path):
            rows = self.db.execute("SELECT key, caption_id, text, round, prompt_tokens, completion_tokens "
                                   "FROM batch_requests WHERE digest = ?", (digest,)).fetchall()
        return {r[0]: BatchRequest(*r) for r in rows}

    def pending(self, key: str) -> bool:
        """Whether `key` is in a batch not yet collected."""
        with _sqlite(self.path):
            return self.db.execute("SELECT 1 FROM batch_requests WHERE key = ?", (key,)).fetchone() is not None

    def close_batch(self, digest: str, status: str, reason: Optional[str], answered: int = 0,
                    prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """The batch is over: its captions are free to be submitted again (those answered are
        in the store by now), its final status and usage kept. An intent that never became a
        batch is forgotten."""
        with _sqlite(self.path):
            with self._transaction():
                self.db.execute("DELETE FROM batch_requests WHERE digest = ?", (digest,))
                if status == "dropped":
                    self.db.execute("DELETE FROM batches WHERE digest = ?", (digest,))
                else:
                    self.db.execute("UPDATE batches SET status = ?, reason = ?, answered = ?, prompt_tokens = ?, "
                                    "completion_tokens = ?, finished = ? WHERE digest = ?",
                                    (status, reason, answered, prompt_tokens, completion_tokens, time.time(),
                                     digest))

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        self.db.close()


# --- pruning: `python -m gen.store prune` --------------------------------------------------

def unused_keys(store_path: Path, keep: set[str]) -> tuple[int, list[str]]:
    """(answers stored, keys of those not in `keep`)."""
    with _sqlite(store_path):
        db = sqlite3.connect(str(store_path))
        try:
            stored = [k for (k,) in db.execute("SELECT key FROM answers")]
        finally:
            db.close()
    return len(stored), [k for k in stored if k not in keep]


def delete_keys(store_path: Path, keys: list[str]) -> None:
    store = AnswerStore(store_path)
    try:
        with _sqlite(store_path):
            store.db.execute("BEGIN IMMEDIATE")
            store.db.executemany("DELETE FROM answers WHERE key = ?", [(k,) for k in keys])
            store.db.execute("COMMIT")
            store.db.execute("VACUUM")   # give the space back to the disk
    finally:
        store.close()


@dataclass
class PruneJob:
    out: Path
    captions: list[Path]
    cache: Path
    fingerprints: list[str]
    apply: bool
    min_share: float
    log_format: str


def _prune_parser():
    from gen.cli import Parser
    from gen.config import MIN_SHARE
    ap = Parser(prog="python -m gen.store prune", description=(
        "Answers in the store that none of the captions uses under the fingerprint of the output "
        "directory's last run (its manifest.json) or one named with --fingerprint. Counts them; "
        "--apply deletes them. A store shared by several jobs (--cache) needs every job's captions "
        "and fingerprints, or it loses answers those jobs pay for again. Captions files with no "
        "caption, or far fewer than the last run had, are refused (exit 2), as gen.run refuses them."))
    ap.add_argument("--out", type=Path, required=True,
                    help="the run's output directory (locked while deleting: exit 75 while a run holds it)")
    ap.add_argument("--captions", type=Path, action="append", required=True,
                    help="the current captions file; repeat for several")
    ap.add_argument("--cache", type=Path, help="the answer store (default: OUT/cache.sqlite)")
    ap.add_argument("--fingerprint", action="append", default=[],
                    help="another generation fingerprint whose answers stay; repeatable")
    ap.add_argument("--apply", action="store_true", help="delete them (default: count only)")
    ap.add_argument("--allow-shrink", action="store_true",
                    help=f"prune even when the captions are under {MIN_SHARE:.0%} of the last run's")
    ap.add_argument("--log-format", choices=["text", "json"],
                    help="json: one object per line, for scheduled jobs (default: $CAPGEN_LOG_FORMAT or text)")
    return ap


def _prune_load(argv: list[str]) -> PruneJob:
    from gen.cli import log_format_hint
    from gen.config import MIN_SHARE
    args = _prune_parser().parse_args(argv)
    return PruneJob(args.out, args.captions, args.cache or args.out / "cache.sqlite", list(args.fingerprint),
                    args.apply, 0.0 if args.allow_shrink else MIN_SHARE, args.log_format or log_format_hint(argv))


def _prune_start(job: PruneJob, command: str) -> tuple[str, dict]:
    return f"{command} started: {job.cache} ({'delete' if job.apply else 'count only'})", {
        "event": "start", "command": command, "out": str(job.out), "cache": str(job.cache),
        "captions": [str(p) for p in job.captions], "apply": job.apply}


def _prune(job: PruneJob) -> int:
    import json
    import logging

    from gen.input.captions import read_captions
    from gen.config import answer_key
    from gen.publish import published_captions
    from gen.run import UsageError, lock_out_dir
    from schemas import Caption
    from schemas.caption import MAX_CAPTION_CHARS

    log = logging.getLogger("gen.store")
    if not job.out.is_dir():
        raise UsageError(f"output directory not found: {job.out}")
    fingerprints = list(job.fingerprints)
    try:
        fingerprints.append(json.loads((job.out / "manifest.json").read_text())["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):   # TypeError: a manifest of another shape
        if not fingerprints:
            raise UsageError(f"no finished run in {job.out} (a manifest.json with its fingerprint): nothing "
                             "says which answers are in use; run gen.run first or name --fingerprint") from None
    if not job.cache.is_file():
        raise UsageError(f"answer store not found: {job.cache}")
    lock = lock_out_dir(job.out) if job.apply else None   # no run writes the store meanwhile
    try:
        texts, captions, rejected = set(), 0, 0
        for path in job.captions:
            if not path.is_file():
                raise UsageError(f"captions file not found: {path}")
            for r in read_captions(path, MAX_CAPTION_CHARS * 100):
                if isinstance(r, Caption):
                    texts.add(r.text)
                    captions += 1
                else:
                    rejected += 1
        names = ", ".join(map(str, job.captions))
        # Every answer no caption uses goes: a wrong file (a CSV, an empty export) would take
        # every paid answer with it, so the checks gen.run makes on its input come first.
        if rejected and not captions:
            raise UsageError(f"no line of {names} is a caption ({rejected} rejected): check the file's "
                             "format; nothing was deleted")
        previous = published_captions(job.out)
        if previous and captions < job.min_share * previous:
            raise UsageError(f"{captions} captions in {names} ({rejected} lines rejected), under "
                             f"{job.min_share:.0%} of the {previous} of the last run in {job.out}: refused, "
                             "nothing was deleted. If the file is right, rerun with --allow-shrink")
        keep = {answer_key(fp, text) for fp in fingerprints for text in texts}
        total, unused = unused_keys(job.cache, keep)
        log.info("%s: %d answers, %d used by the %d distinct captions of %s (%d lines rejected), %d unused%s",
                 job.cache, total, total - len(unused), len(texts), names, rejected, len(unused),
                 "" if job.apply else " (count only: --apply deletes them)",
                 extra={"fields": {"event": "prune", "answers": total, "unused": len(unused),
                                   "captions": len(texts), "input_rejects": rejected, "apply": job.apply}})
        if job.apply and unused:
            delete_keys(job.cache, unused)
            log.info("deleted %d unused answers; %d kept", len(unused), total - len(unused),
                     extra={"fields": {"event": "pruned", "deleted": len(unused), "kept": total - len(unused)}})
        return 0
    finally:
        if lock is not None:
            lock.close()


def prune_main(argv: Optional[list[str]] = None) -> int:
    """Answers no current caption uses: listed by default, deleted with --apply. Logs,
    errors and exit codes as gen.run's (75 while a run holds --out)."""
    from gen.run import entry
    return entry(argv, _prune, command="gen.store prune", load=_prune_load, start=_prune_start)


if __name__ == "__main__":
    import sys
    import signal

    from gen.atomic import stop_signals
    if sys.argv[1:2] != ["prune"]:
        print("usage: python -m gen.store prune --out DIR --captions FILE [--apply]", file=sys.stderr)
        sys.exit(2)
    with stop_signals(after=signal.SIG_IGN):   # a late Ctrl-C must not change the exit code
        code = prune_main(sys.argv[2:])
    sys.exit(code)
