"""Logging set-up: readable lines for people, one JSON object a line for scheduled jobs."""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, TextIO


# Written as JSON escapes: U+2028 and U+2029 are valid in JSON strings, yet str.splitlines()
# and many editors break lines there; a lone surrogate (a server's "\udc00", kept in a
# reject's raw answer) has no UTF-8 form and would stop the write.
_ESCAPED = re.compile("[\u2028\u2029\ud800-\udfff]")


def json_line(obj: object, **kwargs) -> str:
    """One JSON object for a file capgen writes: text as UTF-8 except what _ESCAPED names, so
    a reader finds one object a line and the same strings back, whatever a caption or a
    server's answer holds."""
    return _ESCAPED.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(obj, ensure_ascii=False, **kwargs))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json_line(out, default=str)


def setup(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json"
                         else logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # Client libraries log every request at INFO; a progress bar says it better.
    for noisy in ("httpx", "httpx2", "openai", "jieba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def public_url(url: str) -> str:
    """A URL fit for a log: no user, password or query string (where keys hide)."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "<unparsable URL>"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def console() -> TextIO:
    """Where capgen's own lines go (the log handler's stream): the progress bar writes there
    too, so that it stays on the terminal while an engine's output is diverted."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            return handler.stream
    return sys.stderr


def _fd(stream: TextIO) -> Optional[int]:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None


def _ours(record: logging.LogRecord) -> bool:
    return record.name == "gen" or record.name.startswith("gen.")


@contextmanager
def divert_output(path: Optional[Path]) -> Iterator[Optional[Path]]:
    """Send everything written to file descriptors 1 and 2 to `path`, while capgen's own log
    lines (and its progress bar) go on to the terminal.

    vLLM, Triton, torch and Ray print dozens of warnings, some from C++ and some from the
    engine's own processes, which inherit these descriptors when they start; only a
    redirect at the descriptor level catches them all. With `path` None nothing changes
    (--verbose). Yields the path, or None when nothing is diverted."""
    if path is None:
        yield None
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    swapped = []
    root = logging.getLogger()
    for handler in root.handlers:
        # Only a handler writing to the descriptor being diverted needs a stream of its own;
        # one writing elsewhere (a file, a test's capture) is left as it is.
        if isinstance(handler, logging.StreamHandler) and _fd(handler.stream) in (1, 2):
            own = os.fdopen(os.dup(saved_err if _fd(handler.stream) == 2 else saved_out), "w",
                            buffering=1, encoding="utf-8", errors="backslashreplace")
            swapped.append((handler, handler.setStream(own), own))
            handler.addFilter(_ours)
    # Libraries that log through the root logger (torch's and Triton's warnings) go with the
    # rest of the engine's output.
    theirs = logging.StreamHandler(sys.stderr)
    theirs.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    theirs.addFilter(lambda record: not _ours(record))
    root.addHandler(theirs)
    try:
        with open(path, "wb") as log_file:
            os.dup2(log_file.fileno(), 1)
            os.dup2(log_file.fileno(), 2)
        yield path
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        root.removeHandler(theirs)
        for handler, previous, own in swapped:
            handler.removeFilter(_ours)
            handler.setStream(previous)
            own.close()
