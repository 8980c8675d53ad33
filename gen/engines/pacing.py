"""Pacing: stay under a hosted API's rate limits instead of bouncing off them with 429s.

Two gates, both passed before a request is sent; either may be off.

Limits the user gives (`--rpm`, `--tpm`): a sliding log of what was sent over the last
`window` seconds (60: per minute; shorter for a provider that counts per second or per
10 s), with the limits scaled to it. A request is charged 1 request and an estimate of
its tokens: at first its bound (prompt characters / 2.2, plus max_tokens: the most it can
cost), then that bound scaled by what replies so far used of theirs (a model that answers
in 400 tokens of 1,024 is not charged 1,024 a request for the whole run). When its reply
comes, the charge becomes the reply's actual usage, dated then (the server counted it no
earlier), so an estimate that is off is corrected within a reply's time.
A sliding log obeys a sliding window, and with it a fixed one or a token bucket of the
same size; a rate with no bursts would not, unless it gave up a margin.

What the server says (`x-ratelimit-remaining-requests`/`-tokens`, `x-ratelimit-reset-
requests`/`-tokens`): the remaining budget, less what was sent after the request that
reply answers, is spent down as requests go; when it cannot pay for the next one, every
request waits until the server says the budget is whole again (the reset time: never too
early, whether the server keeps a sliding log, fixed windows or a bucket that refills
evenly), then one request alone fetches fresh figures. With --rpm or --tpm, the first
request also goes alone: its reply may say that another job already spent part of the
key's budget. A 429 holds every request, not just its own: its Retry-After, else its
reset headers, else one second.

One pacer per engine, i.e. per API key (capgen sends one key to every --base-url): hosted
providers count limits per key, so a pool of URLs behind a key shares one budget, and
their headers describe that budget. Separate keys are separate runs, each with its own.

Headers are untrusted: a value that does not parse, is negative or absurdly large is
ignored or capped (a wait never exceeds MAX_HOLD seconds) and logged once per kind.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

log = logging.getLogger(__name__)

MAX_HOLD = 60.0          # the longest any hint from a server holds requests, in seconds
DEFAULT_HOLD = 1.0       # a 429 that says nothing of when to come back
# A reply's usage counts up to this many times the request's bound: the prompt's part is
# an estimate (a tokenizer may cut Chinese finer than 2.2 characters a token), but a server
# that claims far more is not believed, or one reply could hold every request for a window.
USAGE_SLACK = 3
_MAX_COUNT = 10 ** 12    # a remaining or limit figure above this is not believed
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")


def parse_duration(text: Optional[str]) -> Optional[float]:
    """Seconds in OpenAI's reset format ("1s", "6m0s", "120ms", "1h2m3.5s") or a bare number
    of seconds; None for anything else."""
    if text is None:
        return None
    text = text.strip()
    if not text or len(text) > 40:
        return None
    try:
        value = float(text)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    pos, total = 0, 0.0
    for m in _PART.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    return total if pos == len(text) and pos else None


def _count(text: Optional[str]) -> Optional[float]:
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 <= value <= _MAX_COUNT else None


@dataclass(frozen=True)
class Hint:
    """One dimension (requests or tokens) of a reply's rate-limit headers."""
    remaining: Optional[float]
    reset: Optional[float]        # seconds until the budget is whole again


def hints(headers: Mapping[str, str]) -> tuple[Optional[Hint], Optional[Hint], list[str]]:
    """The requests and tokens hints in `headers` (lower-case names), None where a dimension
    has no usable remaining figure, and the names of the headers that did not parse."""
    bad: list[str] = []
    out = []
    for kind in ("requests", "tokens"):
        raw = {f: headers.get(f"x-ratelimit-{f}-{kind}") for f in ("remaining", "reset")}
        remaining, reset = _count(raw["remaining"]), parse_duration(raw["reset"])
        for field, value in (("remaining", remaining), ("reset", reset)):
            if raw[field] is not None and value is None:
                bad.append(f"x-ratelimit-{field}-{kind}")
        out.append(Hint(remaining, reset) if remaining is not None else None)
    return out[0], out[1], bad


@dataclass
class Ticket:
    """A request let through: what it was charged, to be corrected when it is answered."""
    seq: int
    tokens: float             # what it is charged while in flight
    bound: float = 0.0        # the most it may cost
    counted: bool = False     # its charge moved from in flight to the log


class _Budget:
    """The server's view of one dimension: what is left, as its newest reply said."""

    def __init__(self) -> None:
        self.reported = False                     # whether the server ever gave a figure for it
        self.remaining: Optional[float] = None   # None: unknown, send one request to learn
        self.ready_at = 0.0                       # no request before this (a hold)


class Pacer:
    """Admits requests so that neither the user's limits nor the server's budget is exceeded."""

    def __init__(self, rpm: Optional[int] = None, tpm: Optional[int] = None, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.window, self.clock = window, clock
        # Without limits to keep, nothing waits for the first reply: a server of one's own
        # reports no limits, and a first request alone would cost its whole time.
        self.probe = bool(rpm or tpm)
        self.max_requests = rpm * window / 60 if rpm else None
        self.max_tokens = tpm * window / 60 if tpm else None
        self._log: deque[list] = deque()     # [time charged, tokens], oldest first
        self._logged_tokens = 0.0
        self._flight: dict[int, Ticket] = {}
        self._flight_tokens = 0.0
        self._seq = itertools.count()
        self._turn = asyncio.Lock()           # first come, first admitted
        self._changed = asyncio.Event()
        self.reports: Optional[bool] = None   # whether the server sends rate-limit headers
        self._budget = {"requests": _Budget(), "tokens": _Budget()}
        self._hold_until = 0.0
        self._warned: set[str] = set()
        self._bounds = self._used = 0.0      # over replies with usage: their bounds, their usage
        self.waited = 0.0                     # seconds requests spent held, summed over the run
        self.holds = 0                        # times the server's figures or a 429 held requests

    @property
    def active(self) -> bool:
        return (self.max_requests is not None or self.max_tokens is not None or self.reports is not False
                or self._hold_until > 0)

    def refused(self, headers: Mapping[str, str], retry_after: Optional[float]) -> None:
        """A 429 for a request that was not paced (no limits, a server that reports none):
        from now on every request is, and this one holds them all."""
        self._observe(Ticket(-1, 0.0), headers, 429, retry_after, self.clock())
        self._hold_until = max(self._hold_until, 1e-9)   # active from now on
        self._changed.set()

    # ------------------------------------------------------------------ admission

    async def acquire(self, bound: float) -> Ticket:
        """Wait until a request that costs at most `bound` tokens may go; its ticket goes to
        settle()."""
        async with self._turn:
            started = self.clock()
            while True:
                now = self.clock()
                # Anew each time: replies that came meanwhile tell better what one costs.
                tokens = round(bound * self._used / self._bounds) if self._bounds else bound
                delay = self._delay(tokens, now)
                if delay <= 0:
                    break
                self._changed.clear()
                try:   # a reply may free room sooner than the oldest charge leaves the window
                    await asyncio.wait_for(self._changed.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            self.waited += self.clock() - started
            ticket = Ticket(next(self._seq), tokens, bound)
            self._flight[ticket.seq] = ticket
            self._flight_tokens += tokens
            for kind, cost in (("requests", 1.0), ("tokens", tokens)):
                budget = self._budget[kind]
                if budget.remaining is not None:
                    budget.remaining -= cost
            return ticket

    def _delay(self, tokens: float, now: float) -> float:
        """0 when a request of `tokens` may go now, else how long to wait at most before
        looking again."""
        delay = self._hold_until - now
        self._expire(now)
        if self.max_requests is not None and len(self._log) + len(self._flight) + 1 > self.max_requests:
            if self._log:
                delay = max(delay, self._log[0][0] + self.window - now)
            else:
                delay = max(delay, self.window)   # all in flight: a reply will wake us
        if self.max_tokens is not None:
            used = self._logged_tokens + self._flight_tokens
            if used + tokens > self.max_tokens and (self._log or self._flight):
                if tokens > self.max_tokens:
                    self._warn("too big", "a request's token estimate (%d) is more than --tpm allows "
                               "in %g s (%d): it goes alone", tokens, self.window, self.max_tokens)
                delay = max(delay, self._tokens_free_at(used + tokens - self.max_tokens) - now)
        if self.reports is None and self.probe and self._flight:
            delay = max(delay, self.window)        # the first reply will say; woken by it
        elif self.reports:
            for kind, cost in (("requests", 1.0), ("tokens", tokens)):
                budget = self._budget[kind]
                if not budget.reported:
                    continue
                if budget.remaining is None and self._flight:
                    delay = max(delay, self.window)   # a probe is out; its reply will wake us
                elif budget.ready_at > now:
                    delay = max(delay, budget.ready_at - now)
                elif budget.remaining is not None and budget.remaining < cost and self._flight:
                    delay = max(delay, self.window)
        return delay

    def _expire(self, now: float) -> None:
        while self._log and self._log[0][0] + self.window <= now:
            self._logged_tokens -= self._log.popleft()[1]

    def _tokens_free_at(self, excess: float) -> float:
        """When the oldest charges that add up to `excess` tokens leave the window."""
        freed = 0.0
        for t, n in self._log:
            freed += n
            if freed >= excess:
                return t + self.window
        return self.clock() + self.window  # the rest is in flight: a reply will wake us

    # ------------------------------------------------------------------ replies

    def settle(self, ticket: Ticket, tokens: Optional[float], headers: Optional[Mapping[str, str]] = None,
               status: Optional[int] = None, retry_after: Optional[float] = None) -> None:
        """The request of `ticket` was answered (or failed): charge it `tokens` (its actual
        usage; None: keep the estimate, as when it is unknown whether the server counted
        it), dated now, and learn what the reply's headers say."""
        if ticket.counted:
            return
        ticket.counted = True
        now = self.clock()
        self._flight.pop(ticket.seq, None)
        self._flight_tokens -= ticket.tokens
        if tokens and ticket.bound:
            if tokens > USAGE_SLACK * ticket.bound:
                self._warn("usage", "a reply's usage (%d tokens) is more than %dx what the request could "
                           "cost (%d); counted as that much", tokens, USAGE_SLACK, ticket.bound)
                tokens = USAGE_SLACK * ticket.bound
            self._bounds += ticket.bound
            self._used += tokens
        charge = ticket.tokens if tokens is None else tokens
        self._log.append([now, charge])
        self._logged_tokens += charge
        if headers is not None:
            self._observe(ticket, headers, status, retry_after, now)
        self._changed.set()

    def _observe(self, ticket: Ticket, headers: Mapping[str, str], status: Optional[int],
                 retry_after: Optional[float], now: float) -> None:
        req, tok, bad = hints(headers)
        for name in bad:
            self._warn(name, "ignored a rate-limit header that does not parse: %s", name)
        if req is not None or tok is not None:
            self.reports = True
        elif self.reports is None and status is not None and 200 <= status < 300:
            self.reports = False        # a server that does not report limits: no probing
        later = [t for t in self._flight.values() if t.seq > ticket.seq] if req or tok else []
        spent = False
        for kind, hint in (("requests", req), ("tokens", tok)):
            if hint is None:
                continue
            budget = self._budget[kind]
            budget.reported = True
            need = 1.0 if kind == "requests" else ticket.tokens
            # What was sent after this request is not in the server's figure yet.
            left = hint.remaining - (len(later) if kind == "requests" else sum(t.tokens for t in later))
            mine = self._left(kind)
            if mine is not None and left >= mine - need:
                # The server counts no more than the log does: the log, which knows when each
                # charge leaves the window, paces better than a wait for the whole reset.
                budget.remaining = math.inf
                continue
            budget.remaining = left
            if budget.remaining < need:
                spent = True
                self.holds += 1
                self._hold(budget, hint.reset if hint.reset is not None else DEFAULT_HOLD, f"reset-{kind}", now)
        if status == 429:
            if retry_after is not None:
                self._hold(None, retry_after, "retry-after", now)
            elif not spent:
                self._hold(None, DEFAULT_HOLD, "429", now)
            self.holds += not spent

    def _left(self, kind: str) -> Optional[float]:
        """What the user's limit leaves for `kind` now, by the log; None without a limit."""
        if kind == "requests":
            return None if self.max_requests is None else self.max_requests - len(self._log) - len(self._flight)
        if self.max_tokens is None:
            return None
        return self.max_tokens - self._logged_tokens - self._flight_tokens

    def _hold(self, budget: Optional[_Budget], seconds: float, what: str, now: float) -> None:
        if seconds > MAX_HOLD:
            self._warn(what, "the server asks to wait %.0f s (%s); waiting %g s at most",
                       seconds, what, MAX_HOLD)
            seconds = MAX_HOLD
        until = now + max(seconds, 0.0)
        if budget is not None:
            if until > budget.ready_at:
                budget.ready_at = until
                budget.remaining = None   # unknown once it refills: one request asks again
        else:
            self._hold_until = max(self._hold_until, until)

    def _warn(self, kind: str, msg: str, *args) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(msg + " (said once)", *args,
                        extra={"fields": {"event": "rate_limit_hint", "kind": kind}})

    def describe(self) -> dict:
        return {"rpm": round(self.max_requests * 60 / self.window) if self.max_requests else None,
                "tpm": round(self.max_tokens * 60 / self.window) if self.max_tokens else None,
                "window_s": self.window, "server_reports_limits": self.reports,
                "held_s": round(self.waited, 3), "holds": self.holds}
