"""Generation benchmark: does capgen keep a capacity-limited LLM server fully busy, cheaply?

    .venv/bin/python benchmarks/gen_bench.py --small     # ~20-30 s, what CI can run so this cannot rot
    .venv/bin/python benchmarks/gen_bench.py             # full: N=1,000 and 10,000 + concurrency sweep
    .venv/bin/python benchmarks/gen_bench.py --repeat 2 --wait-quiet 120 --json-out /tmp/gen.json

What it does, per measured run:
  1. writes N real captions (CapRetrieval, cycled; copy k>=1 gets id `<id>#k` and text
     `<text>（第k+1组）`, so no two are identical and the answer store dedupes nothing);
  2. starts benchmarks/sim_server.py in its own process: tests/fake_openai.FakeOpenAI with a
     vLLM-like capacity model (at most C requests in service, each for latency +
     per_token_latency * completion_tokens seconds, the rest queued FIFO), TCP_NODELAY on;
  3. runs the real CLI, `python -m gen.run --captions F --out D --base-url URL --model
     fake-model --concurrency K --no-progress --no-curate` (curation has its own benchmark),
     as a child process, and takes its wall time,
     CPU seconds and peak RSS from os.wait4 (the server's CPU is not capgen's and is not counted);
  4. compares the wall time with the best any client could get from that server.

The limit. Every caption's service time s_i is known before the run (the fake's answer is a
deterministic function of the caption, and so is its token count). No schedule of N jobs on C
slots can finish before LB = max(max_i s_i, sum_i s_i / C); that lower bound is the
denominator of every ratio reported (conservative: the true optimum is a little above it).
For reference it also reports FIFO, the makespan of an ideal client that keeps >= C requests
in flight in file order against this FCFS server (what a perfect client actually gets).

Token accounting (no server needed): the bundled model's tokenizer and chat template on the
rendered prompts (gen.generate.prompts.PromptSet), the shared token prefix of all prompts (what vLLM's
prefix cache reuses), and output tokens per accepted query, measured on the fake's answers
re-serialised as compact JSON (the format the prompt's examples show), split into query text
and JSON syntax.

Targets are reported, not asserted (timings on a shared 2-core box are noisy); `--enforce`
makes a missed target exit 1. A run whose accounting is wrong (a caption without an answer,
more than one request per caption) always exits 1.
"""
from __future__ import annotations

import argparse
import heapq
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
# All 3,024 CapRetrieval captions, kept in the repository (tests/fixtures/README.md).
CAPTIONS = ROOT / "tests" / "fixtures" / "capretrieval_captions.jsonl"
TOKENIZER = Path.home() / ".cache" / "capgen" / "models" / "qwen2.5-coder-0.5b-instruct"
PYTHON = sys.executable

TARGET_RATIO = 1.05          # capgen wall / limit
TARGET_CPU_PER_1K = 1.0      # client CPU seconds per 1,000 captions
TARGET_RSS_GROWTH = 1.10     # peak RSS at 10x N over peak RSS at N ("flat")
TARGET_PREFIX_SHARE = 0.70   # shared prefix / prompt tokens


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)
    spec.loader.exec_module(mod)
    return mod


fake_openai = _load("fake_openai", ROOT / "tests" / "fake_openai.py")


# --------------------------------------------------------------------------- inputs

def base_captions(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def cycled(base: list[dict], n: int) -> list[dict]:
    out = []
    for i in range(n):
        k, row = divmod(i, len(base))
        row = base[row]
        if k == 0:
            out.append({"id": row["id"], "text": row["text"]})
        else:
            out.append({"id": f"{row['id']}#{k}", "text": f"{row['text']}（第{k + 1}组）"})
    return out


def write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- the limit

def service_times(rows: list[dict], latency: float, per_token: float) -> list[float]:
    """What the fake will hold a slot for, per caption (its answer and token count are deterministic)."""
    return [latency + per_token * fake_openai._tokens(fake_openai.default_answer(r["text"].strip()))
            for r in rows]


def lower_bound(s: list[float], capacity: int) -> float:
    return max(max(s), sum(s) / capacity)


def fifo_makespan(s: list[float], capacity: int) -> float:
    """C slots, jobs started in list order as slots free up: an ideal client against a FCFS server."""
    slots = [0.0] * min(capacity, len(s))
    heapq.heapify(slots)
    end = 0.0
    for x in s:
        t = heapq.heappop(slots) + x
        end = max(end, t)
        heapq.heappush(slots, t)
    return end


# --------------------------------------------------------------------------- one measured run

@dataclass
class Run:
    n: int
    capacity: int
    concurrency: int
    latency: float
    per_token_latency: float
    lower_bound_s: float
    fifo_s: float
    wall_s: float = 0.0              # the capgen process, spawn to exit
    generate_s: float = 0.0          # manifest timings.generate_s (start of run() -> all answers stored)
    export_s: float = 0.0
    startup_s: float = 0.0           # spawn -> first request seen by the server
    server_span_s: float = 0.0       # first request arrives -> last answer sent
    mean_in_service: float = 0.0     # time-averaged busy slots over the server span
    cpu_user_s: float = 0.0
    cpu_sys_s: float = 0.0
    peak_rss_mib: float = 0.0
    server_cpu_s: float = 0.0
    requests_seen: int = 0
    accepted: int = 0
    manifest_requests: int = 0
    prompt_tokens_fake: int = 0
    completion_tokens_fake: int = 0
    queries: int = 0
    exit_code: int = 0
    waited_s: float = 0.0            # --wait-quiet: time spent waiting for an idle machine
    busy_before_pct: float = -1.0    # CPU busy % (all cores) just before the run, if measured
    loadavg_before: tuple = ()
    loadavg_after: tuple = ()
    problems: list = field(default_factory=list)

    @property
    def cpu_s(self) -> float:
        return self.cpu_user_s + self.cpu_sys_s

    @property
    def ratio(self) -> float:
        return self.wall_s / self.lower_bound_s

    @property
    def ratio_fifo(self) -> float:
        return self.wall_s / self.fifo_s

    @property
    def ratio_generate(self) -> float:
        return self.generate_s / self.lower_bound_s

    @property
    def cpu_per_1k(self) -> float:
        return self.cpu_s / self.n * 1000

    def summary(self) -> dict:
        d = asdict(self)
        d.update(cpu_s=self.cpu_s, ratio=self.ratio, ratio_fifo=self.ratio_fifo, ratio_generate=self.ratio_generate,
                 cpu_per_1k=self.cpu_per_1k)
        return d


def start_server(capacity: int, latency: float, per_token: float, timings_out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [PYTHON, str(ROOT / "benchmarks" / "sim_server.py"), "--capacity", str(capacity),
         "--latency", str(latency), "--per-token-latency", str(per_token), "--timings-out", str(timings_out)],
        stdout=subprocess.PIPE, text=True)
    proc.base_url = proc.stdout.readline().strip()
    if not proc.base_url.startswith("http"):
        proc.kill()
        raise RuntimeError("sim_server did not start")
    return proc


def stop_server(proc: subprocess.Popen) -> float:
    """SIGTERM (it writes its timings), wait; returns the server's CPU seconds."""
    proc.send_signal(signal.SIGTERM)
    _, _, ru = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return ru.ru_utime + ru.ru_stime


_EXTRA: Optional[list[str]] = None


def extra_flags() -> list[str]:
    """`--no-curate` where the CLI has it: curation after generation is benchmarked apart
    (benchmarks/curate_bench.py); this benchmark measures generation, export and report."""
    global _EXTRA
    if _EXTRA is None:
        helptext = subprocess.run([PYTHON, "-m", "gen.run", "--help"], cwd=ROOT, capture_output=True,
                                  text=True).stdout
        _EXTRA = ["--no-curate"] if "--no-curate" in helptext else []
    return _EXTRA


def wait_quiet(max_wait: float, busy_below: float = 15.0) -> tuple[float, float]:
    """Wait (at most max_wait s) until the machine's CPUs are under busy_below % busy, sampled
    over 2 s; returns (seconds waited, last busy %). Other jobs on a 2-core box skew timings."""
    try:
        import psutil
    except ImportError:
        return 0.0, -1.0
    t0 = time.monotonic()
    while True:
        busy = psutil.cpu_percent(interval=2.0)
        if busy < busy_below or time.monotonic() - t0 >= max_wait:
            return time.monotonic() - t0, busy


def measure(rows: list[dict], *, capacity: int, concurrency: int, latency: float, per_token: float,
            work: Path, s: Optional[list[float]] = None, keep: bool = False,
            capgen_cmd: tuple[str, ...] = (PYTHON, "-m", "gen.run"), quiet_wait: float = 0.0) -> Run:
    n = len(rows)
    tag = f"n{n}_c{capacity}_k{concurrency}"
    d = work / tag
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    cap_file, out_dir, timings_file = d / "captions.jsonl", d / "out", d / "timings.json"
    write_jsonl(rows, cap_file)
    s = s or service_times(rows, latency, per_token)
    run = Run(n=n, capacity=capacity, concurrency=concurrency, latency=latency, per_token_latency=per_token,
              lower_bound_s=lower_bound(s, capacity), fifo_s=fifo_makespan(s, capacity))

    if quiet_wait > 0:
        run.waited_s, run.busy_before_pct = wait_quiet(quiet_wait)
    server = start_server(capacity, latency, per_token, timings_file)
    time.sleep(0.2)  # let the server settle; nothing of capgen's runs yet
    run.loadavg_before = os.getloadavg()
    cmd = [*capgen_cmd, "--captions", str(cap_file), "--out", str(out_dir),
           "--base-url", server.base_url, "--model", "fake-model",
           "--concurrency", str(concurrency), "--no-progress", *extra_flags()]
    env = dict(os.environ, OPENAI_API_KEY="bench", PYTHONHASHSEED="0")
    with (d / "capgen.log").open("wb") as log:
        t0 = time.monotonic()
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, ru = os.wait4(child.pid, 0)
        t1 = time.monotonic()
        child.returncode = os.waitstatus_to_exitcode(status)
    run.loadavg_after = os.getloadavg()
    run.server_cpu_s = stop_server(server)
    run.wall_s = t1 - t0
    run.cpu_user_s, run.cpu_sys_s = ru.ru_utime, ru.ru_stime
    run.peak_rss_mib = ru.ru_maxrss / 1024
    run.exit_code = child.returncode

    timings = json.loads(timings_file.read_text()) if timings_file.exists() else []
    answered = [t for t in timings if t.get("status") == 200]
    run.requests_seen = len(timings)
    if answered:
        first = min(t["t_arrive"] for t in timings)
        last = max(t["t_done"] for t in timings)
        run.server_span_s = last - first
        busy = sum(t["t_done"] - t["t_start_service"] for t in answered if t["t_start_service"])
        run.mean_in_service = busy / run.server_span_s if run.server_span_s else 0.0
        # t_arrive is time.monotonic() in the server process: same clock as ours on Linux.
        run.startup_s = first - t0

    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        m = json.loads(manifest_path.read_text())
        run.generate_s = m["timings"]["generate_s"]
        run.export_s = m["timings"]["export_s"]
        run.accepted = m["counts"]["accepted"]
        run.queries = m["counts"]["queries"]
        run.manifest_requests = m["usage"]["requests"]
        run.prompt_tokens_fake = m["usage"]["prompt_tokens"]
        run.completion_tokens_fake = m["usage"]["completion_tokens"]
    if run.exit_code != 0:
        run.problems.append(f"capgen exited {run.exit_code} (see {d / 'capgen.log'})")
    if run.accepted != n:
        run.problems.append(f"{run.accepted} of {n} captions accepted")
    if run.requests_seen != n or run.manifest_requests != n:
        run.problems.append(f"not one request per caption: server saw {run.requests_seen}, "
                            f"capgen counted {run.manifest_requests}, for {n} captions")
    if not keep and not run.problems:
        shutil.rmtree(d, ignore_errors=True)
    return run


# --------------------------------------------------------------------------- tokens

def _compact_with_spans(answer: dict) -> tuple[str, list[tuple[int, int]]]:
    """Compact JSON (as json.dumps(separators=(",", ":"))) and the char spans of query texts."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def put(s: str) -> None:
        nonlocal pos
        parts.append(s)
        pos += len(s)

    def string(s: str, is_query: bool) -> None:
        enc = json.dumps(s, ensure_ascii=False)
        if is_query:
            spans.append((pos + 1, pos + len(enc) - 1))  # inside the quotes
        put(enc)

    def value(v: Any, query: bool) -> None:
        if isinstance(v, dict):
            put("{")
            for i, (k, x) in enumerate(v.items()):
                if i:
                    put(",")
                put(json.dumps(k, ensure_ascii=False) + ":")
                value(x, query=k in ("text", "hypernyms", "summaries"))
            put("}")
        elif isinstance(v, list):
            put("[")
            for i, x in enumerate(v):
                if i:
                    put(",")
                value(x, query)
            put("]")
        elif isinstance(v, str):
            string(v, query)
        else:
            put(json.dumps(v))

    value(answer, False)
    text = "".join(parts)
    assert text == json.dumps(answer, ensure_ascii=False, separators=(",", ":"))
    return text, spans


def token_report(rows: list[dict]) -> dict:
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer
    from gen.generate.prompts import PromptSet
    from schemas import Caption, CaptionQueries

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))

    def ids(x) -> list[int]:
        return list(x["input_ids"] if hasattr(x, "keys") else x)

    prompts = PromptSet()
    prompt_ids = [ids(tok.apply_chat_template(prompts.messages(Caption(id=r["id"], text=r["text"])),
                                              add_generation_prompt=True, tokenize=True)) for r in rows]
    prefix = prompt_ids[0]
    for p in prompt_ids[1:]:
        k = 0
        for a, b in zip(prefix, p):
            if a != b:
                break
            k += 1
        prefix = prefix[:k]
    lens = [len(p) for p in prompt_ids]
    block = 16  # vLLM caches whole KV blocks (16 tokens by default)
    cached_blocks = len(prefix) // block * block
    mean_len = sum(lens) / len(lens)

    # Output side: the fake's answers as compact JSON, split into query text vs syntax.
    out_tokens = text_tokens = n_queries = fake_tokens = spaced_tokens = positional_tokens = 0
    for r in rows:
        raw = fake_openai.default_answer(r["text"].strip())
        answer = json.loads(raw)
        n_queries += len(CaptionQueries.model_validate(answer, context={"caption": r["text"]}).queries())
        compact, spans = _compact_with_spans(answer)
        enc = tok(compact, add_special_tokens=False, return_offsets_mapping=True)
        out_tokens += len(enc["input_ids"]) + 1  # + <|im_end|>, which the model also generates
        spaced_tokens += len(tok(raw, add_special_tokens=False)["input_ids"]) + 1
        fake_tokens += fake_openai._tokens(raw)
        # What-if: the same content with positional arrays instead of repeated keys.
        positional = {k: ([[e["text"], e["kind"], e["grade"], e["hypernyms"]] for e in v] if k == "entities"
                          else v if k == "summaries" else [[i["text"], i["grade"]] for i in v])
                      for k, v in answer.items()}
        positional_tokens += len(tok(json.dumps(positional, ensure_ascii=False, separators=(",", ":")),
                                     add_special_tokens=False)["input_ids"]) + 1
        j = 0
        for a, b in enc["offset_mapping"]:
            if b <= a:
                continue
            overlap = 0
            while j < len(spans) and spans[j][1] <= a:
                j += 1
            for sa, sb in spans[j:j + 2]:
                overlap += max(0, min(b, sb) - max(a, sa))
            text_tokens += overlap / (b - a)
    n = len(rows)
    return {
        "captions": n,
        "tokenizer": TOKENIZER.name,
        "prompt_tokens_mean": mean_len,
        "prompt_tokens_min": min(lens),
        "prompt_tokens_max": max(lens),
        "shared_prefix_tokens": len(prefix),
        "shared_prefix_share": len(prefix) / mean_len,
        "shared_prefix_share_min": len(prefix) / max(lens),
        "cacheable_prefix_tokens_16": cached_blocks,
        "cacheable_prefix_share_16": cached_blocks / mean_len,
        "uncached_tokens_per_caption": mean_len - len(prefix),
        "requests_per_caption": 1,
        "queries_per_answer": n_queries / n,
        "output_tokens_per_answer": out_tokens / n,
        "output_tokens_per_query": out_tokens / n_queries,
        "output_query_text_share": text_tokens / (out_tokens - n),
        "output_syntax_share": 1 - text_tokens / (out_tokens - n),
        "spaced_json_tokens_per_answer": spaced_tokens / n,
        "fake_estimate_tokens_per_answer": fake_tokens / n,
        "positional_json_tokens_per_answer": positional_tokens / n,
    }


# --------------------------------------------------------------------------- report

def machine() -> dict:
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    model = next((l.split(":", 1)[1].strip() for l in sh("lscpu").splitlines() if l.startswith("Model name")), "")
    mem = next((l.split()[1] for l in sh("free -g").splitlines() if l.startswith("Mem:")), "?")
    return {"nproc": sh("nproc"), "cpu": model, "arch": platform.machine(), "mem_gib": mem,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "git": sh(f"git -C {ROOT} rev-parse --short HEAD") + (" (dirty)" if sh(f"git -C {ROOT} status --porcelain -- gen schemas prompts") else "")}


def fmt_load(t: tuple) -> str:
    return "/".join(f"{x:.1f}" for x in t) if t else "-"


def bar(x: float, scale: float, width: int = 40) -> str:
    return "#" * max(1, min(width, round(x * scale)))


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def report(result: dict) -> str:
    L: list[str] = []
    p = result["params"]
    L.append(f"Command: `{result['command']}`  ")
    m = result["machine"]
    L.append(f"Machine: {m['nproc']} cores {m['arch']} ({m['cpu']}), {m['mem_gib']} GiB, Python {m['python']}; "
             f"capgen {m['git']}; {m['date']}  ")
    L.append(f"Server model: capacity C={p['capacity']}, service time = {p['latency']} s + "
             f"{p['per_token_latency'] * 1000:g} ms x completion tokens (the fake's count), FIFO queue, "
             f"own process. Limit = LB = max(max s_i, sum s_i / C).")
    L.append("")
    L.append("| N | concurrency | LB s | FIFO s | capgen wall s | **wall/LB** | wall/FIFO | generate/LB | startup s | export s "
             "| busy slots (mean) | CPU s | **CPU s / 1k** | **peak RSS MiB** | server CPU s | load before/after (busy % before) |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in result["runs"]:
        busy = f" ({r['busy_before_pct']:.0f}%)" if r["busy_before_pct"] >= 0 else ""
        L.append(f"| {r['n']:,} | {r['concurrency']} | {r['lower_bound_s']:.2f} | {r['fifo_s']:.2f} | {r['wall_s']:.2f} "
                 f"| **{r['ratio']:.3f}** | {r['ratio_fifo']:.3f} | {r['ratio_generate']:.3f} | {r['startup_s']:.2f} "
                 f"| {r['export_s']:.2f} | {r['mean_in_service']:.0f} | {r['cpu_s']:.2f} | **{r['cpu_per_1k']:.2f}** "
                 f"| **{r['peak_rss_mib']:.0f}** | {r['server_cpu_s']:.1f} "
                 f"| {fmt_load(r['loadavg_before'][:1])}/{fmt_load(r['loadavg_after'][:1])}{busy} |")
    L.append("")
    sweep = [r for r in result["runs"] if r.get("sweep")]
    if sweep:
        L.append(f"Concurrency sweep (N={sweep[0]['n']:,}, C={p['capacity']}): wall/LB, and the bar is "
                 f"LB/wall, the share of the server's capacity used (40 `#` = 100%)")
        L.append("```")
        for r in sorted(sweep, key=lambda r: r["concurrency"]):
            L.append(f"--concurrency {r['concurrency']:>4}  wall/LB {r['ratio']:6.2f}  "
                     f"|{bar(1 / r['ratio'], scale=40):<40}| {1 / r['ratio']:4.0%}")
        L.append("```")
    t = result.get("targets", {})
    L.append("Targets:" + (" (small mode is a smoke test: at this N start-up dominates, so the targets are "
                           "judged on the full run only)" if result.get("small") else ""))
    for name, (value, target, ok) in t.items():
        L.append(f"- {name}: {value} (target {target}) {verdict(ok)}")
    tk = result.get("tokens")
    if tk:
        L.append("")
        L.append(f"Tokens ({tk['captions']} real captions, `{tk['tokenizer']}` tokenizer + chat template, "
                 f"default templates):")
        L.append(f"- prompt tokens per caption: mean {tk['prompt_tokens_mean']:.1f} "
                 f"(min {tk['prompt_tokens_min']}, max {tk['prompt_tokens_max']}); one request per caption")
        L.append(f"- shared prefix (identical in every prompt: chat header + system message + user header): "
                 f"{tk['shared_prefix_tokens']} tokens = **{tk['shared_prefix_share']:.1%}** of the mean prompt "
                 f"(worst caption {tk['shared_prefix_share_min']:.1%}); in whole 16-token KV blocks "
                 f"{tk['cacheable_prefix_tokens_16']} = {tk['cacheable_prefix_share_16']:.1%}; "
                 f"new tokens per caption {tk['uncached_tokens_per_caption']:.1f}")
        L.append(f"- output (proxy: the fake's answers as compact JSON, + end token): "
                 f"{tk['output_tokens_per_answer']:.1f} tokens per answer, {tk['queries_per_answer']:.1f} queries "
                 f"per answer, **{tk['output_tokens_per_query']:.2f} output tokens per accepted query**; "
                 f"query text {tk['output_query_text_share']:.1%} of answer tokens, JSON keys/punctuation/"
                 f"grades/kinds {tk['output_syntax_share']:.1%} (the same answers with json.dumps' default "
                 f"spaces: {tk['spaced_json_tokens_per_answer']:.1f} tokens; what-if positional arrays instead "
                 f"of repeated keys, e.g. `[\"小女孩\",\"person\",2,[\"儿童\"]]`: "
                 f"{tk['positional_json_tokens_per_answer']:.1f} tokens, "
                 f"{1 - tk['positional_json_tokens_per_answer'] / tk['output_tokens_per_answer']:.0%} fewer)")
    if result.get("problems"):
        L.append("")
        L.append("Problems: " + "; ".join(result["problems"]))
    return "\n".join(L)


# --------------------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="smoke test (~20 s): N=50 and 500 at C=64, sweep k=16 at N=200, 0.05 s + 0.2 ms/token, tokens on 50")
    ap.add_argument("--capacity", type=int, help="server slots C (default 256; --small 64)")
    ap.add_argument("--latency", type=float, help="base seconds per request (default 0.5; --small 0.05)")
    ap.add_argument("--per-token-latency", type=float, help="seconds per output token (default 0.002; --small 0.0002)")
    ap.add_argument("--sizes", type=int, nargs="+", help="N values at concurrency=C (default 1000 10000; --small 50 500)")
    ap.add_argument("--repeat", type=int, default=1, help="run the largest N this many times")
    ap.add_argument("--sweep", type=int, nargs="*", help="concurrency values for the sweep "
                    "(default 32 64 128 256 512 at N=2000; --small 16 at N=200); empty to skip")
    ap.add_argument("--sweep-n", type=int, help="N for the sweep (default 2000; --small 200)")
    ap.add_argument("--token-captions", type=int, help="captions for token accounting (default 300; --small 50; 0 skips)")
    ap.add_argument("--captions", type=Path, default=CAPTIONS)
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep each run's files")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--capgen-cmd", default=f"{PYTHON} -m gen.run",
                    help="how to start capgen (default: this interpreter, -m gen.run); split on spaces")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each run wait up to S seconds for the CPUs to be <15%% busy")
    ap.add_argument("--enforce", action="store_true", help="exit 1 when a target is missed")
    a = ap.parse_args(argv)

    small = a.small
    C = a.capacity or (64 if small else 256)
    lat = a.latency if a.latency is not None else (0.05 if small else 0.5)
    ptl = a.per_token_latency if a.per_token_latency is not None else (0.0002 if small else 0.002)
    sizes = sorted(a.sizes or ([50, 500] if small else [1000, 10000]))
    sweep = a.sweep if a.sweep is not None else ([16] if small else [32, 64, 128, 256, 512])
    sweep_n = a.sweep_n or (200 if small else 2000)
    token_n = a.token_captions if a.token_captions is not None else (50 if small else 300)

    base = base_captions(a.captions)
    work = a.work or Path(tempfile.mkdtemp(prefix="gen_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": "python benchmarks/gen_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "params": {"capacity": C, "latency": lat, "per_token_latency": ptl, "captions": str(a.captions)},
        "runs": [], "problems": [], "small": small,
    }

    def go(n: int, k: int, sweep_run: bool = False) -> dict:
        rows = cycled(base, n)
        r = measure(rows, capacity=C, concurrency=k, latency=lat, per_token=ptl, work=work, keep=a.keep,
                    capgen_cmd=tuple(a.capgen_cmd.split()), quiet_wait=a.wait_quiet)
        d = r.summary()
        d["sweep"] = sweep_run
        result["runs"].append(d)
        result["problems"] += [f"N={n} k={k}: {p}" for p in r.problems]
        print(f"  N={n:>6} concurrency={k:>4}: wall {r.wall_s:6.2f}s  LB {r.lower_bound_s:6.2f}s  "
              f"ratio {r.ratio:.3f} (generate {r.ratio_generate:.3f}, busy {r.mean_in_service:.0f})  "
              f"CPU {r.cpu_s:.2f}s ({r.cpu_per_1k:.2f}/1k)  RSS {r.peak_rss_mib:.0f} MiB  "
              f"server CPU {r.server_cpu_s:.1f}s  load {fmt_load(r.loadavg_before)}"
              + (f" busy-before {r.busy_before_pct:.0f}%" if r.busy_before_pct >= 0 else ""),
              file=sys.stderr, flush=True)
        return d

    print(f"gen_bench: C={C} latency={lat} per_token={ptl} work={work}", file=sys.stderr)
    by_n: dict[int, list[dict]] = {}
    for n in sizes:
        for _ in range(a.repeat if n == sizes[-1] else 1):
            by_n.setdefault(n, []).append(go(n, C))
    for k in sweep:
        if k == C and sweep_n in by_n:
            d = dict(by_n[sweep_n][0], sweep=True)
            result["runs"].append(d)
            continue
        go(sweep_n, k, sweep_run=True)

    # Targets, from the largest N at concurrency = C (worst of the repeats).
    big, small_n = sizes[-1], sizes[0]
    worst = max(by_n[big], key=lambda d: d["ratio"])
    targets: dict[str, tuple] = {}
    targets[f"wall/limit at N={big:,}, concurrency=C"] = (f"{worst['ratio']:.3f}", f"<= {TARGET_RATIO}",
                                                         worst["ratio"] <= TARGET_RATIO)
    cpu1k = max(d["cpu_per_1k"] for d in by_n[big])
    targets[f"client CPU s per 1,000 captions at N={big:,}"] = (f"{cpu1k:.2f}", f"< {TARGET_CPU_PER_1K}",
                                                               cpu1k < TARGET_CPU_PER_1K)
    if len(sizes) > 1:
        lo, hi = by_n[small_n][0], max(by_n[big], key=lambda d: d["peak_rss_mib"])
        growth = hi["peak_rss_mib"] / lo["peak_rss_mib"]
        targets[f"peak RSS N={big:,} / N={small_n:,}"] = (
            f"{hi['peak_rss_mib']:.0f} / {lo['peak_rss_mib']:.0f} MiB = {growth:.3f}",
            f"<= {TARGET_RSS_GROWTH}", growth <= TARGET_RSS_GROWTH)
        marginal = (min(d["cpu_s"] for d in by_n[big]) - lo["cpu_s"]) / (big - small_n) * 1000
        fixed = lo["cpu_s"] - marginal * small_n / 1000
        result["cpu_marginal_per_1k"], result["cpu_fixed_s"] = marginal, fixed
        targets["client CPU s per 1,000 captions, marginal (startup excluded)"] = (
            f"{marginal:.2f} (+ {fixed:.2f} s fixed per run)", f"< {TARGET_CPU_PER_1K}", marginal < TARGET_CPU_PER_1K)
    if token_n and not (TOKENIZER / "tokenizer.json").exists():
        print(f"  token accounting skipped: no tokenizer at {TOKENIZER} (python -m gen.localmodel "
              "assembles it)", file=sys.stderr)
    elif token_n:
        print(f"  token accounting on {token_n} captions ...", file=sys.stderr, flush=True)
        tk = token_report(cycled(base, token_n))
        result["tokens"] = tk
        targets["shared prefix share of prompt tokens"] = (f"{tk['shared_prefix_share']:.1%}",
                                                           f">= {TARGET_PREFIX_SHARE:.0%}",
                                                           tk["shared_prefix_share"] >= TARGET_PREFIX_SHARE)
    result["targets"] = targets
    text = report(result)
    print(text)
    if a.json_out:
        a.json_out.write_text(json.dumps(result, ensure_ascii=False, indent=1, default=str) + "\n")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    if result["problems"]:
        return 1
    if a.enforce and not all(ok for _, _, ok in targets.values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
