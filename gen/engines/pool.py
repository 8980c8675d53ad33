"""Several OpenAI-compatible servers as one: least outstanding requests first, and a server
that keeps failing is taken out for a while, then tried again.

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


@dataclass
class ServerPool:
    servers: list[Server]
    # Three transient failures in a row: a server is down, not unlucky.
    failures_to_eject: int = 3
    cooldown: float = 30.0
    clock: Callable[[], float] = field(default=time.monotonic)

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

    def describe(self) -> list[dict[str, Any]]:
        return [{"url": s.url, "requests": s.requests, "failures": s.failures,
                 "taken_out": s.taken_out} for s in self.servers]
