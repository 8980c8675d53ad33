"""Logging set-up: readable lines for people, one JSON object a line for scheduled jobs."""
from __future__ import annotations

import json
import logging
import sys
import time
import urllib.parse


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
        return json.dumps(out, ensure_ascii=False, default=str)


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
