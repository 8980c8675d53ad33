"""Several OpenAI-compatible servers as one: least outstanding requests first, and a server
that keeps failing, or whose answers fail validation far more often than its peers', is
taken out for a while, then tried again.

vLLM's own advice for many GPUs is one server per GPU; this is the client-side balancer for
that. A caption's retry goes back through `pick`, so it lands on a healthy server.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

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

    def pick(self) -> Server:
        now = self.clock()
        healthy = [s for s in self.servers if s.down_until <= now]
        if not healthy:
            # All out: probe the one that comes back soonest rather than stall the run.
            return min(self.servers, key=lambda s: s.down_until)
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
        if server.consecutive_failures >= self.failures_to_eject and len(self.servers) > 1:
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
        when nearly all of its answers fail. Answers that fail everywhere alike (a hard
        caption, a weak model) make no server suspect; a lone server never is.
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
        peer_share = (sum(s.invalid for s in peers) + 1) / (sum(s.answers for s in peers) + 2)
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

    def describe(self) -> list[dict[str, Any]]:
        return [{"url": s.url, "requests": s.requests, "failures": s.failures,
                 "taken_out": s.taken_out} for s in self.servers]
