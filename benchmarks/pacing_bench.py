"""Pacing benchmark: does capgen use a hosted API's rate limit fully, without 429s?

    .venv/bin/python benchmarks/pacing_bench.py --small                  # ~1 min, what CI runs
    .venv/bin/python benchmarks/pacing_bench.py --old /tmp/pacing-old    # + the code before pacing

The provider: benchmarks/sim_server.py (tests/fake_openai.FakeOpenAI, own process) enforcing
600 requests and 300,000 tokens a minute, a request costing its usage (prompt + completion
tokens, ~1,500 with the bundled prompt), charged on arrival; beyond either limit it answers
429 with no Retry-After. A minute of simulated time would make a run last an hour, so time
is scaled: the "minute" is `--window` seconds (default 6), the limits per window are scaled
to it (6 s: 60 requests, 30,000 tokens), and so is the server's service time (0.5 s + 2 ms
a completion token per real minute). capgen is told the same: --rpm 600 --tpm 300000
--rate-window <window>.

Scenarios (each a real CLI run, `python -m gen.run ... --no-curate --concurrency K`):
  flags            the server sends no rate-limit headers; capgen gets --rpm/--tpm/--rate-window
  headers          the server sends x-ratelimit-*; capgen gets no limits, only the headers
  flags+headers    both
With --old DIR, the code in DIR (e.g. `git archive <commit> | tar -x -C DIR`) runs against
the same server, without and with headers (old/no-headers, old/headers), given no pacing
flags (it has none), in the same run.

Measured at the server: requests, 429s and their share; the share of the allowed
throughput used: over the whole windows from the first admitted request to the last,
the tokens (or requests, whichever limit binds) admitted divided by the limit times the
number of windows (no window-long span can hold more than the limit, so 1.0 is the most).
Targets (asserted with --enforce): >= 95 % of the allowed throughput, <= 1 % of requests 429.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ROOT / "tests" / "fixtures" / "capretrieval_captions.jsonl"
PYTHON = sys.executable
RPM, TPM = 600, 300_000
TARGET_SHARE, TARGET_429 = 0.95, 0.01


def start_server(window: float, headers: bool, kind: str, timings: Path) -> subprocess.Popen:
    scale = window / 60
    cmd = [PYTHON, str(ROOT / "benchmarks" / "sim_server.py"), "--capacity", "1000",
           "--latency", str(0.5 * scale), "--per-token-latency", str(0.002 * scale),
           "--timings-out", str(timings), "--rate-limit", str(RPM * scale), str(TPM * scale), str(window),
           "--rate-window-kind", kind] + (["--rate-headers"] if headers else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    proc.base_url = proc.stdout.readline().strip()
    if not proc.base_url.startswith("http"):
        proc.kill()
        raise RuntimeError("sim_server did not start")
    return proc


def share_used(timings: list[dict], window: float) -> dict:
    """Admitted requests and tokens over the whole windows the run spans, against the limits."""
    ok = sorted((t for t in timings if t.get("charged")), key=lambda t: t["t_arrive"])
    if not ok:
        return {"windows": 0, "share": 0.0}
    t0, t_end = ok[0]["t_arrive"], ok[-1]["t_arrive"]
    k = int((t_end - t0) // window)
    if k < 1:
        return {"windows": 0, "share": None}
    inside = [t for t in ok if t["t_arrive"] < t0 + k * window]
    scale = window / 60
    by_tokens = sum(t["charged"] for t in inside) / (k * TPM * scale)
    by_requests = len(inside) / (k * RPM * scale)
    return {"windows": k, "share": round(max(by_tokens, by_requests), 4),
            "share_tokens": round(by_tokens, 4), "share_requests": round(by_requests, 4)}


def run(code: Path, label: str, flags: list[str], *, n: int, window: float, headers: bool, kind: str,
        concurrency: int, work: Path) -> dict:
    captions = work / "captions.jsonl"
    if not captions.exists():
        with CAPTIONS.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()][:n]
        captions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = work / f"out-{label}"
    timings = work / f"timings-{label}.json"
    server = start_server(window, headers, kind, timings)
    cmd = [PYTHON, "-m", "gen.run", "--captions", str(captions), "--out", str(out), "--base-url",
           server.base_url, "--model", "fake-model", "--concurrency", str(concurrency), "--no-progress",
           "--no-curate", "--log-format", "json", *flags]
    start = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=code, env={**os.environ, "PYTHONPATH": str(code)},
                           capture_output=True, text=True, timeout=1800)
    finally:
        wall = time.monotonic() - start
        server.terminate()
        server.wait(30)
    rows = json.loads(timings.read_text(encoding="utf-8"))
    statuses = [t["status"] for t in rows]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8")) if (out / "manifest.json").exists() else {}
    result = {"label": label, "code": str(code), "flags": flags, "server_headers": headers, "exit": r.returncode,
              "wall_s": round(wall, 2), "requests": len(statuses), "answered": statuses.count(200),
              "429": statuses.count(429), "share_429": round(statuses.count(429) / max(len(statuses), 1), 4),
              "failed_captions": manifest.get("counts", {}).get("failed"), **share_used(rows, window)}
    if r.returncode not in (0, 3):
        result["stderr"] = r.stderr[-2000:]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="60 captions, a 2 s window: a smoke test")
    ap.add_argument("--n", type=int, default=400, help="captions (CapRetrieval, the first N)")
    ap.add_argument("--window", type=float, default=6.0, help="seconds that stand for a minute")
    ap.add_argument("--kind", choices=["sliding", "fixed"], default="sliding")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--old", type=Path, help="a copy of older capgen code to run the same scenarios against")
    ap.add_argument("--enforce", action="store_true", help="exit 1 when the new code misses a target")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    if args.small:
        args.n, args.window = 60, 2.0
    limits = ["--rpm", str(RPM), "--tpm", str(TPM), "--rate-window", str(args.window)]
    scenarios = [("flags", limits, False), ("headers", [], True), ("flags+headers", limits, True)]
    results = []
    print(f"# pacing_bench {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}; N={args.n}, window {args.window:g} s "
          f"({args.kind}) = a minute: {RPM * args.window / 60:g} requests, {TPM * args.window / 60:g} tokens; "
          f"--concurrency {args.concurrency}", flush=True)
    with tempfile.TemporaryDirectory(prefix="capgen-pacing-") as tmp:
        work = Path(tmp)
        runs = []
        if args.old:
            runs += [(args.old, f"old/{'headers' if headers else 'no-headers'}", [], headers)
                     for _, _, headers in scenarios[:2]]
        runs += [(ROOT, f"new/{name}", flags, headers) for name, flags, headers in scenarios]
        for code, label, flags, headers in runs:
            res = run(code, label.replace("/", "-").replace("+", "-"), flags, n=args.n, window=args.window,
                      headers=headers, kind=args.kind, concurrency=args.concurrency, work=work)
            res["label"] = label
            results.append(res)
            share = "-" if res["share"] is None else f"{100 * res['share']:.1f} %"
            print(f"{label:20} exit {res['exit']}  wall {res['wall_s']:7.2f} s  requests {res['requests']:5}  "
                  f"429 {res['429']:5} ({100 * res['share_429']:.1f} %)  share of the limit used "
                  f"{share} over {res['windows']} windows"
                  f"  failed captions {res['failed_captions']}", flush=True)
            if "stderr" in res:
                print(res["stderr"], file=sys.stderr)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    bad = [r for r in results if r["label"].startswith("new/") and r["exit"] != 0]
    if bad:
        print("FAILED: capgen did not finish cleanly:", [r["label"] for r in bad], file=sys.stderr)
        return 1
    missed = [r["label"] for r in results if r["label"].startswith("new/") and r["label"] != "new/headers"
              and ((r["share"] or 0) < TARGET_SHARE or r["share_429"] > TARGET_429)]
    if missed:
        print(f"targets missed (>= {TARGET_SHARE:.0%} of the limit, <= {TARGET_429:.0%} 429): {missed}")
    return 1 if missed and args.enforce else 0


if __name__ == "__main__":
    sys.exit(main())
