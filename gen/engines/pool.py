"""Several OpenAI-compatible servers as one: least outstanding requests first, and a server
that keeps failing, or whose answers fail validation far more often than its peers', is
taken out for a while, then tried again.

vLLM's own advice for many GPUs is one server per GPU; this is the client-side balancer for
that. A caption's retry goes back through `pick`, so it lands on a healthy server.

Two things stop the run (EngineUnusable) instead of failing caption after caption:
- every server refused it (the key, the account, the model or the URL: see retry.is_refusal).
  A server that refuses is out for good, with an error line naming it; the others carry on.
- no server replying for longer than the retries would wait (no connection accepted, or
  not a byte before the timeout: a server that hangs): a circuit over the whole pool,
  not a probe before the run, because a server can also die mid-run and a probe would need
  an endpoint some servers lack. The clock starts at the first connection no server accepted
  and stops at any reply; before any server has answered in this run (a wrong URL, a server
  that is not up) it runs out after the first backoffs, later after all of them, so an outage
  a request's retries would have ridden out does not stop the run.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from gen.engines.base import EngineUnusable

from gen.logs import public_url

log = logging.getLogger(__name__)


@dataclass
class Server:
    url: str
    client: Any
    outstanding: int = 0
    consecutive_failures: int = 0
    down_until: float = 0.0
    requests: int = 0
    failures: int = 0
    taken_out: int = 0
    answers: int = 0          # validated or not, recently (see ServerPool.checked)
    invalid: int = 0
    refused: Optional[str] = None      # why it refused the run: out for the rest of it
    unreachable: Optional[str] = None  # the last connection it did not accept, until it answers


@dataclass
class ServerPool:
    servers: list[Server]
    # Three transient failures in a row: a server is down, not unlucky.
    failures_to_eject: int = 3
    cooldown: float = 30.0
    clock: Callable[[], float] = field(default=time.monotonic)
    # Answers a server gives before its share of invalid ones is judged, and how far above
    # its peers' share that one must be to take it out.
    answers_to_judge: int = 10
    invalid_margin: float = 0.4
    answers_alone: int = 3

    # Seconds with no server reached that stop the run, before and after the first reply;
    # OpenAIEngine sets them from its retry policy (RetryPolicy.patience).
    first_outage_limit: float = 3.0
    outage_limit: float = 31.0
    outage_since: Optional[float] = None
    answered: bool = False   # some server has replied in this run
    # The requests that timed out unanswered since the last reply: one alone may just be slow
    # (a caption the model rambles on), two or more mean the servers are silent.
    silent_requests: set = field(default_factory=set)

    def pick(self, avoid: Optional[str] = None) -> Server:
        """The healthy server with the fewest requests outstanding; not `avoid` (a URL) while
        another healthy one is there."""
        serving = [s for s in self.servers if s.refused is None]
        if not serving:
            raise EngineUnusable("every server refused the run: " + "; ".join(
                f"{s.url}: {s.refused}" for s in self.servers))
        now = self.clock()
        healthy = [s for s in serving if s.down_until <= now]
        if not healthy:
            # All out: probe the one that comes back soonest rather than stall the run.
            return min(serving, key=lambda s: s.down_until)
        others = [s for s in healthy if s.url != avoid]
        return min(others or healthy, key=lambda s: (s.outstanding, s.requests))

    def started(self, server: Server) -> None:
        server.outstanding += 1
        server.requests += 1

    def finished(self, server: Server, ok: bool) -> None:
        server.outstanding -= 1
        if ok:
            server.consecutive_failures = 0
            return
        server.failures += 1
        server.consecutive_failures += 1
        if server.consecutive_failures >= self.failures_to_eject and self._serving() > 1:
            server.down_until = self.clock() + self.cooldown
            server.consecutive_failures = 0
            server.taken_out += 1
            url = public_url(server.url)
            log.warning("server %s failed %d times in a row; out for %.0f s", url, self.failures_to_eject,
                        self.cooldown, extra={"fields": {"event": "server_out", "server": url,
                                                         "failures": server.failures, "taken_out": server.taken_out,
                                                         "cooldown_s": self.cooldown}})

    def checked(self, server: Server, valid: bool) -> bool:
        """One answer of `server` validated or not; True when it was invalid and the server's
        answers fail validation far more often than its peers' (then that answer says more
        of the server than of the caption).

        A server behind which a model is broken (or misconfigured) answers fast, so least
        outstanding first hands it ever more requests, and no HTTP error ever takes it out.
        Its invalid share, over its last 10 to 100 answers, `invalid_margin` above its peers'
        makes it suspect at once and takes it out like one that errors once it has given
        `answers_to_judge` answers. Peers' share is smoothed ((invalid + 1) / (answers + 2)):
        peers that answered little count as 0.5, so a server alone in use is suspect only
        when nearly all of its answers fail. With no peer answer yet, a server's first
        `answers_alone` answers make it suspect of nothing: the first hard caption of a run
        gets its repair round, not a plain retry (a fast broken server is still caught by
        its third answer, before its peers have answered). Answers that fail everywhere
        alike (a hard caption, a weak model) make no server suspect; a lone server never is.
        """
        now = self.clock()
        if server.answers >= 100:   # halved: the share follows what the server does now
            server.answers, server.invalid = server.answers // 2, server.invalid // 2
        server.answers += 1
        server.invalid += not valid
        if valid or len(self.servers) < 2:
            return False
        if server.down_until > now:
            return True
        peers = [s for s in self.servers if s is not server]
        peer_answers = sum(s.answers for s in peers)
        if not peer_answers and server.answers < self.answers_alone:
            return False
        peer_share = (sum(s.invalid for s in peers) + 1) / (peer_answers + 2)
        share = server.invalid / server.answers
        if share < peer_share + self.invalid_margin:
            return False
        if server.answers < self.answers_to_judge:
            return True
        server.down_until = now + self.cooldown
        server.answers = server.invalid = 0
        server.taken_out += 1
        log.warning("server %s: %.0f%% of its answers failed validation against %.0f%% of its peers'; "
                    "out for %.0f s", server.url, 100 * share, 100 * peer_share, self.cooldown)
        return True

    def refuse(self, server: Server, reason: str) -> None:
        """`server` refused the run: out for good. The last one's refusal is pick's to report."""
        if server.refused is not None:
            return
        server.refused = reason
        if self._serving():
            log.error("server %s refused the run: %s; out for the rest of it, %d of %d servers left",
                      server.url, reason, self._serving(), len(self.servers))

    def replied(self, server: Server) -> None:
        """Any HTTP reply, an error status too: the server is there."""
        server.unreachable = None
        self.outage_since, self.answered = None, True
        self.silent_requests.clear()

    def unreachable(self, server: Server, reason: str, silent_request: Optional[int] = None) -> None:
        """`server` accepted no connection, or (silent_request: that request's key) sent
        nothing before the timeout; raises EngineUnusable once no server has replied for
        longer than the limit, and for silence only once two requests have met it."""
        server.unreachable = reason
        if self.outage_since is None:
            self.outage_since = self.clock()
        if silent_request is not None:
            self.silent_requests.add(silent_request)
        if self.outage_left() <= 0 and (silent_request is None or len(self.silent_requests) > 1):
            elapsed = self.clock() - self.outage_since
            raise EngineUnusable(f"no server answers (for {elapsed:.1f} s): " + "; ".join(
                f"{s.url}: {s.refused or s.unreachable or 'not tried'}" for s in self.servers))

    def outage_left(self) -> float:
        """Seconds until the outage under way stops the run; inf when none is under way."""
        if self.outage_since is None:
            return math.inf
        limit = self.outage_limit if self.answered else self.first_outage_limit
        return self.outage_since + limit - self.clock()

    def _serving(self) -> int:
        return sum(s.refused is None for s in self.servers)

    def describe(self) -> list[dict[str, Any]]:
        return [{"url": s.url, "requests": s.requests, "failures": s.failures,
                 "taken_out": s.taken_out, **({"refused": s.refused} if s.refused else {})}
                for s in self.servers]
