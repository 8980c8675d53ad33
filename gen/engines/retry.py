"""When to retry a request and how long to wait: one small frozen policy, and the errors it judges.

Retried: 429 (rate limit), 408/409/5xx, timeouts, dropped connections, unreadable replies, and
a 200 with no choices; all say "the server could not answer now", not "this request is wrong".
Not retried: other 4xx (the request itself is wrong; retrying repeats the cost) and
invalid answers (those get repair rounds in gen.generate instead).
Refusals are neither: 401, 402, 403, 404 and a 429 for a spent quota say the key, the account,
the model or the URL is wrong, the same for every request, so the server that sent one is
taken out for the rest of the run (gen.engines.pool) and the run stops when none is left.
A connection no server accepts is the pool's to judge too: an outage, not a caption's fault.
A Retry-After header is honoured, capped so one bad header cannot stall a job for hours;
otherwise exponential backoff with full jitter spreads many clients' retries apart.
"""
from __future__ import annotations

import email.utils
import json
import math
import random
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Mapping, Optional

from tenacity import RetryCallState


class RequestFailed(Exception):
    """A request that got no answer; the subclass says why."""


class EmptyAnswer(RequestFailed):
    """A 200 reply with no usable answer in it: no choices, another shape, empty or refused,
    not text, too large. The server's fault, not the caption's: worth another try."""


class TransportError(RequestFailed):
    """No usable HTTP reply: a timeout, a refused or dropped connection, a body that is not JSON.

    unreachable: no connection could be made at all (refused, no such host): the server is
    not there, rather than slow or failing.
    silent: the connection was made but no reply came before the timeout: a server that hangs
    looks like this, and so does one request that takes too long."""

    def __init__(self, message: str, unreachable: bool = False, silent: bool = False):
        super().__init__(message)
        self.unreachable, self.silent = unreachable, silent


class StatusError(RequestFailed):
    """The server answered with an error status; status, headers and body decide what follows."""

    def __init__(self, status: int, headers: Mapping[str, str], text: str):
        self.status, self.text = status, text
        self.headers = {k.lower(): v for k, v in headers.items()}
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        super().__init__(f"HTTP {status} {phrase}: {_server_message(text)}")


def _server_message(text: str) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), else the body."""
    try:
        error = json.loads(text)["error"]
        return str(error["message"] if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError, RecursionError):
        return text.strip()


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    initial: float = 1.0      # seconds before the first retry (before jitter)
    maximum: float = 30.0     # cap of the exponential backoff
    retry_after_cap: float = 120.0

    def patience(self, retries: Optional[int] = None) -> float:
        """The longest the first `retries` backoffs (default: all of them) may wait in all."""
        n = self.max_attempts - 1 if retries is None else min(retries, self.max_attempts - 1)
        return sum(min(self.maximum, self.initial * 2 ** min(k, 60)) for k in range(max(n, 0)))

    def wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hinted = retry_after_seconds(exc)
        if hinted is not None:
            return min(hinted, self.retry_after_cap)
        # Full jitter: uniform in [0, capped exponential], so a fleet of clients spreads out.
        # The exponent capped: attempts lost to an outage do not count, so their number has no bound.
        ceiling = min(self.maximum, self.initial * 2 ** min(state.attempt_number - 1, 60))
        return random.uniform(0, ceiling)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (TransportError, EmptyAnswer)):
        return True
    if isinstance(exc, StatusError) and not is_refusal(exc):
        return exc.status in (408, 409, 429) or exc.status >= 500
    return False


# What to check, by status; the run's error message ends with it.
_REFUSALS = {401: "check the API key", 402: "the account's credit is spent",
             403: "the key may not use this model or endpoint", 404: "check --model and --base-url"}


def is_refusal(exc: BaseException) -> bool:
    """A reply no retry can change: the key, the account, the model or the URL is refused.
    Not a content filter's 403 (one caption's text refused): that caption fails, the run goes on."""
    return (isinstance(exc, StatusError) and (exc.status in _REFUSALS or _quota_spent(exc))
            and not content_refused(exc))


# How providers name a refusal of the request's content (OpenAI and Azure, DashScope, DeepSeek,
# moderation layers in front of self-hosted servers), in the error's code, type or message.
_CONTENT_MARKERS = ("content_filter", "content_policy", "content policy", "data_inspection",
                    "datainspection", "inappropriate", "content exists risk", "moderation",
                    "safety system", "sensitive content")


def content_refused(exc: StatusError) -> bool:
    """A 400 or 403 that refuses this request's content rather than the key or the account."""
    error = _error_object(exc) if exc.status in (400, 403) else None
    if error is None:
        return False
    said = " ".join(str(error.get(k, ""))[:500] for k in ("code", "type", "message")).lower()
    return any(m in said for m in _CONTENT_MARKERS)


def refusal_hint(exc: StatusError) -> str:
    return "the account's quota is spent" if _quota_spent(exc) else _REFUSALS.get(exc.status, "")


def _quota_spent(exc: StatusError) -> bool:
    """OpenAI answers a spent quota with 429, as it does a rate limit; the error's code tells."""
    if exc.status != 429:
        return False
    error = _error_object(exc)
    return error is not None and "insufficient_quota" in (error.get("code"), error.get("type"))


def _error_object(exc: StatusError) -> Optional[dict]:
    """The reply's {"error": {...}} object (a bare string as its message), or None."""
    try:
        error = json.loads(exc.text).get("error")
    except (ValueError, RecursionError, AttributeError):
        return None
    if isinstance(error, str):
        return {"message": error}
    return error if isinstance(error, dict) else None


def retry_after_seconds(exc: Optional[BaseException]) -> Optional[float]:
    """The server's requested wait: at least 0, None where absent or not a number (NaN, a
    date past what datetime holds) so that the backoff decides; callers cap it."""
    if not isinstance(exc, StatusError):
        return None
    value = exc.headers.get("retry-after-ms")
    if value:
        try:
            return _seconds(float(value) / 1000)
        except ValueError:
            pass
    value = exc.headers.get("retry-after")
    if not value:
        return None
    try:
        return _seconds(float(value))
    except ValueError:
        pass
    try:  # the HTTP-date form
        return _seconds(email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _seconds(value: float) -> Optional[float]:
    # NaN would pass every min() cap and sleep an unbounded, heap-corrupting while.
    return None if math.isnan(value) else max(0.0, value)
