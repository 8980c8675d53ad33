"""capgen against a peer, bespokelabs-curator, on the same job, server and concurrency.

    .venv/bin/python benchmarks/peer_curator.py                        # N=2,000, C=64 and 256, 2 reps each
    .venv/bin/python benchmarks/peer_curator.py --small                # N=200, C=16, 1 rep: a smoke test
    .venv/bin/python benchmarks/peer_curator.py --json-out /tmp/peer.json

Curator lives in a virtual environment of its own (its dependencies are not capgen's):

    python3 -m venv /tmp/curator-venv && /tmp/curator-venv/bin/pip install bespokelabs-curator

(`--curator-python` points elsewhere). Per measured run:
  1. N real captions (CapRetrieval, cycled as in gen_bench.py: copy k>=1 gets id `<id>#k` and
     text `<text>（第k+1组）`), written once as the JSON lines both sides read;
  2. a fresh benchmarks/sim_server.py (tests/fake_openai.FakeOpenAI in its own process): at most
     C requests in service, each for latency + per_token_latency * completion_tokens seconds,
     the rest queued FIFO; it writes per-request timings when stopped;
  3. one side as a child process, timed spawn to exit, CPU seconds and peak RSS from os.wait4:
       capgen:  python -m gen.run --captions F --out D --base-url URL --model fake-model
                --concurrency C --no-progress
       curator: <curator python> benchmarks/peer_curator_job.py (see its docstring: capgen's own
                PromptSet renders the messages, CaptionQueries is the response_format (curator
                validates it; parse() adds the caption check), max_concurrent_requests = C, rate limits far
                above the server, telemetry/viewer/HF hub off, non-loopback connections refused);
  4. checks that the side really did the job: N captions with answers, the same number of query
     rows on both sides (the fake's answers are deterministic), and the requests the server saw.
The order alternates (capgen first in even repetitions, curator first in odd ones) so drift in
the machine's load does not favour either side; the load average is recorded around each run.

The limit. The fake's answer, so its token count and service time s_i, is a deterministic
function of the caption: no client can finish before LB = max(max_i s_i, sum_i s_i / C) (with
equal s this is ceil(N/C) * s up to rounding). Every wall is reported as wall / LB; FIFO is the
makespan of an ideal client that keeps C requests in flight in file order. Each wall splits
into head (spawn -> first request), prep (first request -> first caption request: curator's two
probe requests and its request file; 0 for capgen), caption span (first caption request -> last
answer, how fast the client drains the server) and tail (last answer -> exit: writing outputs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CURATOR_PYTHON = Path("/tmp/curator-venv/bin/python")
PYTHON = sys.executable


# The same captions, limit, server and machine record as gen_bench.py: one definition, imported.
from gen_bench import (  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
    CAPTIONS, base_captions, cycled as _cycle, extra_flags, fifo_makespan, lower_bound, machine,
    service_times, start_server, stop_server,
)


def cycled(path: Path, n: int) -> list[dict]:
    return _cycle(base_captions(path), n)


def server_view(timings: list[dict], t0: float, skip: int = 0) -> dict:
    """What the server saw: requests, busy slots, the most in flight at once, first arrival.

    caption_span_s: first caption request's arrival -> last answer, leaving out the first `skip`
    requests (curator's two probes), i.e. how fast the client drained the captions once started.
    """
    if not timings:
        return {"requests_seen": 0}
    captions = [t for t in timings if t["index"] >= skip] or timings
    answered = [t for t in timings if t.get("status") == 200]
    first, last = min(t["t_arrive"] for t in timings), max(t["t_done"] for t in timings)
    span = last - first
    busy = sum(t["t_done"] - t["t_start_service"] for t in answered if t.get("t_start_service"))
    events = sorted([(t["t_arrive"], 1) for t in timings] + [(t["t_done"], -1) for t in timings])
    depth = peak = 0
    for _, d in events:
        depth += d
        peak = max(peak, depth)
    return {"requests_seen": len(timings), "answered_200": len(answered),
            "first_request_after_s": first - t0, "last_answer_after_s": last - t0,
            "span_s": span,
            "caption_span_s": max(t["t_done"] for t in captions) - min(t["t_arrive"] for t in captions),
            "first_caption_request_after_s": min(t["t_arrive"] for t in captions) - t0,
            "mean_in_service": busy / span if span else 0.0, "peak_in_flight": peak}


# --------------------------------------------------------------------------- one measured run

def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        return ""


def measure(side: str, cap_file: Path, *, c: int, latency: float, per_token: float, work: Path,
            curator_python: Path, n: int) -> dict[str, Any]:
    d = Path(tempfile.mkdtemp(prefix=f"{side}_c{c}_", dir=work))
    timings_file = d / "timings.json"
    server = start_server(c, latency, per_token, timings_file)
    time.sleep(0.2)
    env = dict(os.environ, OPENAI_API_KEY="bench", PYTHONHASHSEED="0")
    if side == "capgen":
        cmd = [PYTHON, "-m", "gen.run", "--captions", str(cap_file), "--out", str(d / "out"),
               "--base-url", server.base_url, "--model", "fake-model", "--concurrency", str(c), "--no-progress",
               *extra_flags()]  # --no-curate: curator has no curation stage to match
    else:
        cmd = [str(curator_python), str(ROOT / "benchmarks" / "peer_curator_job.py"), "--captions", str(cap_file),
               "--base-url", server.base_url, "--model", "fake-model", "--concurrency", str(c),
               "--work", str(d / "work"), "--summary-out", str(d / "summary.json")]
    rec: dict[str, Any] = {"side": side, "concurrency": c, "n": n, "uptime_before": uptime(),
                           "loadavg_before": os.getloadavg()}
    with (d / "log.txt").open("wb") as log:
        t0 = time.monotonic()
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, ru = os.wait4(child.pid, 0)
        t1 = time.monotonic()
    rec["loadavg_after"] = os.getloadavg()
    stop_server(server)
    rec.update(wall_s=t1 - t0, exit_code=os.waitstatus_to_exitcode(status), cpu_user_s=ru.ru_utime,
               cpu_sys_s=ru.ru_stime, cpu_s=ru.ru_utime + ru.ru_stime, peak_rss_mib=ru.ru_maxrss / 1024)
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else []
    # curator's first two requests are probes: rate limits (no messages), structured output
    rec["server"] = server_view(timings, t0, skip=0 if side == "capgen" else 2)
    # spawn -> first request (imports, setup, probes) and last answer -> exit (writing the output)
    rec["head_s"] = rec["server"].get("first_request_after_s", 0.0)
    rec["tail_s"] = rec["wall_s"] - rec["server"].get("last_answer_after_s", rec["wall_s"])
    # first request -> first caption request: curator's two probes and its request file (0 for capgen)
    rec["prep_s"] = rec["server"].get("first_caption_request_after_s", 0.0) - rec["head_s"]

    problems = []
    if side == "capgen":
        m = json.loads((d / "out" / "manifest.json").read_text()) if (d / "out" / "manifest.json").exists() else {}
        cnt = m.get("counts", {})
        rec.update(captions_with_queries=cnt.get("captions_with_queries", 0), queries=cnt.get("queries", 0),
                   requests_made=m.get("usage", {}).get("requests", 0),
                   inner_s=m.get("timings", {}).get("generate_s", 0.0))
        expected_requests = n
    else:
        sm = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        rec.update(captions_with_queries=sm.get("captions_with_queries", 0), queries=sm.get("queries", 0),
                   requests_made=sm.get("request_stats", {}).get("total", 0),
                   inner_s=sm.get("timings", {}).get("call_s", 0.0), curator=sm)
        if sm.get("blocked_network"):
            problems.append(f"curator tried to reach off-machine: {sm['blocked_network'][:5]}")
        # + its rate-limit probe (POST with no messages) and its structured-output probe
        expected_requests = n + 2
    if rec["exit_code"] != 0:
        problems.append(f"{side} exited {rec['exit_code']} (log: {d / 'log.txt'})")
    if rec["captions_with_queries"] != n:
        problems.append(f"{side}: {rec['captions_with_queries']} of {n} captions have queries")
    if rec["server"]["requests_seen"] != expected_requests:
        problems.append(f"{side}: server saw {rec['server']['requests_seen']} requests, expected {expected_requests}")
    rec["problems"] = problems
    rec["dir"] = str(d)
    if not problems:
        shutil.rmtree(d, ignore_errors=True)
    return rec


# --------------------------------------------------------------------------- report

def curator_version(py: Path) -> str:
    out = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('bespokelabs-curator'))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or f"unknown ({out.stderr.strip()[-200:]})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--latency", type=float, default=0.5)
    ap.add_argument("--per-token-latency", type=float, default=0.002)
    ap.add_argument("--curator-python", type=Path, default=CURATOR_PYTHON)
    ap.add_argument("--small", action="store_true", help="N=200, C=16, 1 repetition")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temp dir); failed runs are kept there")
    a = ap.parse_args(argv)
    if a.small:
        a.n, a.concurrency, a.repeat = 200, [16], 1
    if not a.curator_python.exists():
        print(f"no curator environment at {a.curator_python}: python3 -m venv /tmp/curator-venv && "
              "/tmp/curator-venv/bin/pip install bespokelabs-curator (or --curator-python)", file=sys.stderr)
        return 2

    work = a.work or Path(tempfile.mkdtemp(prefix="peer_curator_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = cycled(CAPTIONS, a.n)
    cap_file = work / "captions.jsonl"
    with cap_file.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    s = service_times(rows, a.latency, a.per_token_latency)

    report: dict[str, Any] = {"machine": machine(), "curator_version": curator_version(a.curator_python),
                              "n": a.n, "latency": a.latency, "per_token_latency": a.per_token_latency,
                              "service_s": {"mean": statistics.mean(s), "min": min(s), "max": max(s)},
                              "runs": [], "summary": []}
    print(f"# capgen vs bespokelabs-curator {report['curator_version']}: N={a.n}, service "
          f"{a.latency}s + {a.per_token_latency * 1000:g} ms/token (mean {statistics.mean(s):.3f}s)", flush=True)
    failed = False
    for c in a.concurrency:
        lb, fifo = lower_bound(s, c), fifo_makespan(s, c)
        print(f"\n## C={c}: LB {lb:.2f}s (ceil(N/C)*mean = {math.ceil(a.n / c) * statistics.mean(s):.2f}s), "
              f"FIFO {fifo:.2f}s", flush=True)
        per_side: dict[str, list[dict]] = {"capgen": [], "curator": []}
        for rep in range(a.repeat):
            for side in (("capgen", "curator") if rep % 2 == 0 else ("curator", "capgen")):
                r = measure(side, cap_file, c=c, latency=a.latency, per_token=a.per_token_latency, work=work,
                            curator_python=a.curator_python, n=a.n)
                r.update(rep=rep, lower_bound_s=lb, fifo_s=fifo, ratio=r["wall_s"] / lb)
                report["runs"].append(r)
                per_side[side].append(r)
                sv = r["server"]
                print(f"  rep {rep} {side:7s} wall {r['wall_s']:6.2f}s  wall/LB {r['ratio']:.3f}  "
                      f"inner {r['inner_s']:6.2f}s  caption span {sv.get('caption_span_s', 0):6.2f}s  "
                      f"head {r['head_s']:.2f}s  prep {r['prep_s']:.2f}s  tail {r['tail_s']:.2f}s  "
                      f"cpu {r['cpu_s']:5.1f}s  rss {r['peak_rss_mib']:4.0f} MiB  peak in flight "
                      f"{sv.get('peak_in_flight', 0)}  answered {r['captions_with_queries']}/{a.n}  queries "
                      f"{r['queries']}  requests {sv['requests_seen']}  load {r['loadavg_before'][0]:.2f}->"
                      f"{r['loadavg_after'][0]:.2f}" + (f"  PROBLEMS {r['problems']}" if r["problems"] else ""),
                      flush=True)
                failed |= bool(r["problems"])
        q = {side: {x["queries"] for x in runs} for side, runs in per_side.items()}
        same_output = len(q["capgen"] | q["curator"]) == 1
        if not same_output:
            print(f"  query rows differ between sides: {q}", flush=True)
            failed = True
        summ = {"concurrency": c, "lower_bound_s": lb, "fifo_s": fifo, "same_query_rows": same_output}
        for side, runs in per_side.items():
            summ[side] = {"wall_s": [x["wall_s"] for x in runs],
                          "wall_median_s": statistics.median(x["wall_s"] for x in runs),
                          "ratio_median": statistics.median(x["ratio"] for x in runs),
                          "inner_median_s": statistics.median(x["inner_s"] for x in runs),
                          "caption_span_median_s": statistics.median(x["server"].get("caption_span_s", 0) for x in runs),
                          "head_median_s": statistics.median(x["head_s"] for x in runs),
                          "prep_median_s": statistics.median(x["prep_s"] for x in runs),
                          "tail_median_s": statistics.median(x["tail_s"] for x in runs),
                          "cpu_median_s": statistics.median(x["cpu_s"] for x in runs),
                          "rss_max_mib": max(x["peak_rss_mib"] for x in runs)}
        summ["curator_over_capgen"] = summ["curator"]["wall_median_s"] / summ["capgen"]["wall_median_s"]
        report["summary"].append(summ)
        print(f"  median wall: capgen {summ['capgen']['wall_median_s']:.2f}s, curator "
              f"{summ['curator']['wall_median_s']:.2f}s -> curator/capgen {summ['curator_over_capgen']:.3f}", flush=True)

    if a.json_out:
        a.json_out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    if not failed and a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
