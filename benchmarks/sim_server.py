"""The simulated LLM server for the generation benchmark, in a process of its own.

    python benchmarks/sim_server.py --capacity 256 --latency 0.5 --per-token-latency 0.002 \
        --timings-out /tmp/timings.json

It is `tests/fake_openai.FakeOpenAI` (imported by path: the same capacity model the tests
use) plus two things: TCP_NODELAY on its sockets, as real servers have (without it every
keep-alive response waits ~40 ms for a delayed ACK, which would be measured as capgen's
fault), and, on SIGTERM or SIGINT, the per-request timings written to `--timings-out`, so the
benchmark can check how busy the server actually was. The first line of stdout is the base URL.

Capacity model (FakeOpenAI's): at most `capacity` requests in service at once, each holding
its slot for `latency + per_token_latency * completion_tokens` seconds, the rest queued FIFO.
Running it in its own process keeps its CPU time (and its GIL) apart from capgen's.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_fake():
    """tests/fake_openai.py as a module, without putting tests/ on sys.path."""
    spec = importlib.util.spec_from_file_location("fake_openai", ROOT / "tests" / "fake_openai.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fake_openai", mod)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", type=int, default=256)
    ap.add_argument("--latency", type=float, default=0.5)
    ap.add_argument("--per-token-latency", type=float, default=0.002)
    ap.add_argument("--timings-out", type=Path, required=True)
    ap.add_argument("--rate-limit", type=float, nargs=3, metavar=("REQUESTS", "TOKENS", "WINDOW_S"),
                    help="a provider's limits: at most REQUESTS and TOKENS per WINDOW_S seconds, 429 beyond")
    ap.add_argument("--rate-window-kind", choices=["sliding", "fixed"], default="sliding")
    ap.add_argument("--rate-headers", action="store_true", help="send x-ratelimit-* headers")
    args = ap.parse_args(argv)

    fake_openai = load_fake()
    # http.server writes the headers and the body of a response in two send()s; with Nagle's
    # algorithm on, the body then waits for the client's delayed ACK (~40 ms on Linux) on every
    # keep-alive response. Real servers (vLLM's uvicorn) set TCP_NODELAY; so does this one.
    fake_openai._Handler.disable_nagle_algorithm = True
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    limit = (int(args.rate_limit[0]), int(args.rate_limit[1]), args.rate_limit[2]) if args.rate_limit else None
    with fake_openai.FakeOpenAI(capacity=args.capacity, latency=args.latency,
                                per_token_latency=args.per_token_latency, rate_limit=limit,
                                rate_window_kind=args.rate_window_kind, rate_headers=args.rate_headers) as fake:
        print(fake.base_url, flush=True)
        while not stop.wait(0.2):
            pass
        with fake._lock:
            timings = list(fake.timings)
    args.timings_out.write_text(json.dumps(timings), encoding="utf-8")


if __name__ == "__main__":
    main()
