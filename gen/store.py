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

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        self.db.close()
