"""Several OpenAI-compatible servers as one: least outstanding requests first, and a server
that keeps failing is taken out for a while, then tried again.

vLLM's own advice for many GPUs is one server per GPU; this is the client-side balancer for
that. A caption's retry goes back through `pick`, so it lands on a healthy server.

Two things stop the run (EngineUnusable) instead of failing caption after caption:
- every server refused it (the key, the account, the model or the URL: see retry.is_refusal).
  A server that refuses is out for good, with an error line naming it; the others carry on.
- no server reached for longer than the retries would wait: a circuit over the whole pool,
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
    refused: Optional[str] = None      # why it refused the run: out for the rest of it
    unreachable: Optional[str] = None  # the last connection it did not accept, until it answers


@dataclass
class ServerPool:
    servers: list[Server]
    # Three transient failures in a row: a server is down, not unlucky.
    failures_to_eject: int = 3
    cooldown: float = 30.0
    clock: Callable[[], float] = field(default=time.monotonic)
    # Seconds with no server reached that stop the run, before and after the first reply;
    # OpenAIEngine sets them from its retry policy (RetryPolicy.patience).
    first_outage_limit: float = 3.0
    outage_limit: float = 31.0
    outage_since: Optional[float] = None
    answered: bool = False   # some server has replied in this run

    def pick(self) -> Server:
        serving = [s for s in self.servers if s.refused is None]
        if not serving:
            raise EngineUnusable("every server refused the run: " + "; ".join(
                f"{s.url}: {s.refused}" for s in self.servers))
        now = self.clock()
        healthy = [s for s in serving if s.down_until <= now]
        if not healthy:
            # All out: probe the one that comes back soonest rather than stall the run.
            return min(serving, key=lambda s: s.down_until)
        return min(healthy, key=lambda s: (s.outstanding, s.requests))

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
            log.warning("server %s failed %d times in a row; out for %.0f s",
                        server.url, self.failures_to_eject, self.cooldown)

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

    def unreachable(self, server: Server, reason: str) -> None:
        """`server` accepted no connection; raises EngineUnusable once no server has been
        reached for longer than the limit."""
        server.unreachable = reason
        if self.outage_since is None:
            self.outage_since = self.clock()
        if self.outage_left() <= 0:
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
