"""File helpers: write-then-rename, so a crash never leaves a file that looks complete but is
not; groups of renames that a stop signal cannot split; and the sha256 of a file's content,
read in blocks."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yields a temporary path beside `target`; renamed onto it only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


class _Held:
    depth = 0
    signal: Optional[BaseException] = None


def raise_unless_held(exc: BaseException) -> None:
    """For a stop-signal handler: raise exc now or, inside all_or_none(), once that is done."""
    if _Held.depth:
        _Held.signal = _Held.signal or exc
        return
    raise exc


@contextlib.contextmanager
def all_or_none() -> Iterator[None]:
    """Renames that belong together (a run's queries, captions and rejects): a SIGTERM that
    arrives between two of them waits until all are done, or a reader would find new
    queries beside old captions."""
    _Held.depth += 1
    held = None
    try:
        yield
    finally:
        _Held.depth -= 1
        if _Held.depth == 0:
            held, _Held.signal = _Held.signal, None
    if held is not None:   # the block ended normally; the stop it held goes on now
        raise held


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
