"""Read captions, one at a time, from JSON lines (plain, or gzip, zstd, bz2, xz) or parquet.

Yields a `Caption` for every good record and a `Reject` (file, line, reason, the raw line)
for every bad one, so a run goes on past bad input and loses nothing; `strict` turns the
first bad record into a `CaptionError` instead. Memory stays flat in the file's size, apart
from a 64-bit hash and a line number per id seen (needed to refuse duplicates).
"""
from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import sys
import tempfile
import unicodedata
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Union

from pydantic import ValidationError

from schemas import Caption, Reject

BOM = b"\xef\xbb\xbf"

# The format is told by the first bytes, not the name: caption dumps come as captions.jsonl.gz,
# as data.gz, as parquet named .pq; read as text, any of them would become one reject
# ("invalid UTF-8") and a run with nothing in it.
MAGIC = ((b"PAR1", "parquet"), (b"\x1f\x8b", "gzip"), (b"(\xb5/\xfd", "zstd"), (b"BZh", "bz2"),
         (b"\xfd7zXZ\x00", "xz"))
# What a broken compressed stream raises (truncated download, bad block); pyarrow's zstd: OSError.
BROKEN = (EOFError, OSError, zlib.error, lzma.LZMAError)


def input_format(path: Path) -> str:
    """parquet, gzip, zstd, bz2, xz or jsonl."""
    with path.open("rb") as f:
        head = f.read(6)
    return next((kind for magic, kind in MAGIC if head.startswith(magic)), "jsonl")


def open_lines(path: Path, kind: str) -> BinaryIO:
    """The JSON lines' bytes, decompressed as they are read."""
    if kind == "zstd":  # no zstd in this Python's stdlib; pyarrow, already here for parquet, has it
        import pyarrow as pa
        return io.BufferedReader(pa.input_stream(str(path), compression="zstd"))
    opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}.get(kind)
    return opener(path, "rb") if opener else path.open("rb")


class CaptionError(ValueError):
    """A bad input record under --strict; the message names file, line and problem."""


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "record"
    msg = first["msg"].removeprefix("Value error, ")
    return f"field '{field}': {msg}"


class _Checker:
    def __init__(self, path: Path, max_chars: int, strict: bool):
        self.path, self.max_chars, self.strict = path, max_chars, strict
        # Keyed by a hash of the NFKC form: "Ａ1" and "A1" (or composed and decomposed accents)
        # look identical to a person and would silently merge downstream. A 64-bit hash, not
        # the id, keeps ~100 bytes a caption (two ids out of 10 million collide with odds of
        # about 1 in 400,000); the rare id not already in NFKC form is kept for the message.
        self.first_line: dict[int, int] = {}
        self.first_odd_id: dict[int, str] = {}

    def reject(self, line: int, reason: str, raw: Any, caption_id: Any = None) -> Reject:
        if self.strict:
            raise CaptionError(f"{self.path}:{line}: {reason}")
        cid = caption_id if isinstance(caption_id, str) else None
        return Reject(stage="input", reason=reason, file=str(self.path), line=line,
                      caption_id=cid, raw=raw)

    def check(self, line: int, record: Any, raw: Any) -> Union[Caption, Reject]:
        if not isinstance(record, dict):
            return self.reject(line, f"expected a JSON object, got {type(record).__name__}", raw)
        for field in ("id", "text"):
            if field not in record or record[field] is None:
                return self.reject(line, f"field '{field}' is missing", raw, record.get("id"))
        extra = {k: v for k, v in record.items() if k not in ("id", "text")}
        try:
            caption = Caption.model_validate(
                {"id": record["id"], "text": record["text"], "extra": extra},
                context={"max_chars": self.max_chars},
            )
        except ValidationError as e:
            return self.reject(line, _describe(e), raw, record.get("id"))
        norm = unicodedata.normalize("NFKC", caption.id)
        h = int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "big")
        first = self.first_line.setdefault(h, line)
        if first == line:
            if norm != caption.id:
                self.first_odd_id[h] = caption.id
            return caption
        first_id = self.first_odd_id.get(h, norm)
        same = "" if first_id == caption.id else f", as {first_id!r} after Unicode normalisation"
        return self.reject(line, f"duplicate id {caption.id!r} (first seen on line {first}{same})",
                           raw, caption.id)


def _read_jsonl(path: Path, checker: _Checker, kind: str) -> Iterator[Union[Caption, Reject]]:
    lineno = 0
    with open_lines(path, kind) as f:
        lines = iter(f)
        while True:
            try:
                data = next(lines)
            except StopIteration:
                return
            except BROKEN as e:  # what came before is good; say where it broke and go on
                yield checker.reject(lineno + 1, f"{kind} data broken after line {lineno} "
                                     f"({type(e).__name__}: {e}); the rest of the file is not read", None)
                return
            lineno += 1
            record = _line(lineno, data, checker)
            if record is not None:
                yield record


def _line(lineno: int, data: bytes, checker: _Checker) -> Union[Caption, Reject, None]:
    if lineno == 1 and data.startswith(BOM):
        data = data[len(BOM):]
    data = data.rstrip(b"\r\n")
    if not data.strip():
        return None  # blank lines separate nothing; not a record
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return checker.reject(lineno, f"invalid UTF-8 at byte {e.start}", data.decode("utf-8", errors="replace"))
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return checker.reject(lineno, f"not valid JSON: {e.msg} at column {e.colno}", text)
    except RecursionError:
        return checker.reject(lineno, "not valid JSON: nested too deeply", text[:10_000])
    except ValueError as e:   # an integer past Python's 4,300-digit conversion limit
        return checker.reject(lineno, f"not readable JSON: {str(e)[:200]}", text[:10_000])
    return checker.check(lineno, record, text)


def _read_parquet(path: Path, checker: _Checker) -> Iterator[Union[Caption, Reject]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield checker.check(row, record, record)


def read_captions(path: Path, max_chars: int, strict: bool = False,
                  name: Optional[str] = None) -> Iterator[Union[Caption, Reject]]:
    """Line numbers are 1-based (of the decompressed text); for parquet they count rows.
    `name`: what rejects and errors call the input, when `path` is a copy of a stream."""
    checker = _Checker(Path(name) if name else path, max_chars, strict)
    kind = input_format(path)
    if kind == "parquet":
        return _read_parquet(path, checker)
    return _read_jsonl(path, checker, kind)


STDIN = Path("-")


def is_stream(path: Path) -> bool:
    """`-` (standard input), a pipe, a FIFO, a terminal: bytes that can be read only once."""
    if path == STDIN:
        return True
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)


_SPOOL_PREFIX, _SPOOL_SUFFIX = ".captions-", ".stream"


@contextlib.contextmanager
def spooled(path: Path, directory: Optional[Path]) -> Iterator[Path]:
    """A regular file to read as often as needed: `path` itself, or a stream's bytes copied
    once into `directory` (None: the system's temporary directory) and removed afterwards.
    A run reads its input more than once: the format is told by the first bytes, the
    progress bar counts lines, parquet is read by seeking, the Ray executor reads it twice.
    A `directory` is an output directory whose lock the caller holds: a copy found there is a
    killed run's (kill -9 while copying) and goes."""
    if directory is not None:
        for stale in Path(directory).glob(f"{_SPOOL_PREFIX}*{_SPOOL_SUFFIX}"):
            stale.unlink(missing_ok=True)
    if not is_stream(path):
        yield path
        return
    fd, tmp = tempfile.mkstemp(prefix=_SPOOL_PREFIX, suffix=_SPOOL_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as copy:
            if path == STDIN:
                shutil.copyfileobj(sys.stdin.buffer, copy, 1 << 20)
            else:
                with path.open("rb") as stream:
                    shutil.copyfileobj(stream, copy, 1 << 20)
        yield Path(tmp)
    finally:
        os.unlink(tmp)


class CaptionDigest:
    """What a run read, order-free and in constant memory: the sum of each caption's hash
    (id, text, extra). A run records it in its manifest; --dry-run compares it to tell
    whether a rerun would export the same captions."""

    def __init__(self):
        self.total, self.count = 0, 0

    def add(self, record: Caption) -> None:
        blob = json.dumps([record.id, record.text, record.extra], ensure_ascii=False, sort_keys=True)
        self.total = (self.total + int.from_bytes(hashlib.sha256(blob.encode("utf-8", "surrogatepass")).digest(), "big")) % (1 << 256)
        self.count += 1

    def through(self, records: Iterator[Union[Caption, Reject]]) -> Iterator[Union[Caption, Reject]]:
        for record in records:
            if isinstance(record, Caption):
                self.add(record)
            yield record

    def hexdigest(self) -> str:
        return hashlib.sha256(f"{self.count}:{self.total}".encode()).hexdigest()
