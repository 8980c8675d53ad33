"""Where capgen's client CPU goes, per caption: the evidence behind gen_bench's CPU numbers.

    .venv/bin/python benchmarks/client_cost.py            # ~1 min
    .venv/bin/python benchmarks/client_cost.py --n 1000 --concurrency 256

Part 1 sends the same N real chat requests (capgen's own messages and request options,
schema included) to benchmarks/sim_server.py (own process, short service time, capacity =
concurrency) through several HTTP client set-ups, K in flight, and reports this process's CPU
seconds per request (time.process_time over the timed loop; the server's CPU is not in it):

  engine         capgen's OpenAIEngine as it is (one aiohttp session, retries, server pool)
  sdk            the openai SDK, default httpx transport (the SDK as shipped)
  keepalive      the SDK with an httpx pool keeping K connections alive (default keeps 100)
  aiohttp_sdk    the SDK with its aiohttp transport (openai.DefaultAioHttpClient), pool of K
  aiohttp_post   same, request sent with client.post(...) (skips the SDK's params transform)
  aiohttp        a bare aiohttp.ClientSession: json.dumps body, json.loads reply (the floor)

Part 2 times capgen's per-caption work outside HTTP, in a loop: rendering the messages,
validating an answer (gen.generate.validate.parse_answer), the answer key, and the store write.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gen_bench  # noqa: E402  (captions, the fake's answers)


def start_server(capacity: int, latency: float, per_token: float):
    tmp = Path(tempfile.mkdtemp(prefix="client_cost_"))
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "sim_server.py"), "--capacity", str(capacity),
                             "--latency", str(latency), "--per-token-latency", str(per_token),
                             "--timings-out", str(tmp / "t.json")], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


async def timed(name: str, send, messages: list, k: int, warm: int = 50) -> dict:
    slots = asyncio.Semaphore(k)

    async def one(m):
        async with slots:
            text = await send(m)
            assert text.startswith("{"), text[:80]

    await asyncio.gather(*(one(m) for m in messages[:warm]))
    c0, w0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(one(m) for m in messages[warm:]))
    c1, w1 = time.process_time(), time.monotonic()
    n = len(messages) - warm
    return {"variant": name, "requests": n, "cpu_ms_per_request": (c1 - c0) / n * 1000, "wall_s": w1 - w0}


async def part1(messages: list, k: int, base_url: str, only: list[str] | None) -> list[dict]:
    import aiohttp
    import httpx2
    import openai
    from openai.types.chat import ChatCompletion

    from gen.config import Sampling
    from gen.engines.openai import OpenAIEngine
    from schemas import answer_json_schema

    schema = answer_json_schema()
    os.environ.setdefault("OPENAI_API_KEY", "bench")
    # The request capgen sends, split the way the SDK takes it (chat_template_kwargs is not
    # an SDK parameter).
    options = OpenAIEngine(base_urls=[base_url], model="fake-model", schema=schema, sampling=Sampling())._options()

    def request(m) -> dict:
        return {"model": options["model"], "messages": m, **options}

    def sdk_kwargs(m) -> dict:
        kw = request(m)
        extra = {"chat_template_kwargs": kw.pop("chat_template_kwargs")}
        return {**kw, "extra_body": extra}

    limits = httpx2.Limits(max_connections=k, max_keepalive_connections=k)

    async def v_engine():
        e = OpenAIEngine(base_urls=[base_url], model="fake-model", schema=schema, sampling=Sampling())
        r = await timed("engine (as is)", lambda m: _text(e.complete(m)), messages, k)
        await e.aclose()
        return r

    async def sdk(name, http_client=None):
        client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=120,
                                    **({"http_client": http_client} if http_client else {}))

        async def send(m):
            resp = await client.chat.completions.create(**sdk_kwargs(m))
            return resp.choices[0].message.content
        r = await timed(name, send, messages, k)
        await client.close()
        return r

    async def v_aiohttp_post():
        client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=120,
                                    http_client=openai.DefaultAioHttpClient(limits=limits, timeout=120))

        async def send(m):
            resp = await client.post("/chat/completions", body=request(m), cast_to=ChatCompletion,
                                     options={"security": {"bearer_auth": True}})
            return resp.choices[0].message.content
        r = await timed("sdk+aiohttp+post", send, messages, k)
        await client.close()
        return r

    async def v_aiohttp():
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=k),
                                        headers={"Authorization": "Bearer bench"})
        url = base_url.rstrip("/") + "/chat/completions"

        async def send(m):
            async with session.post(url, data=json.dumps(request(m), ensure_ascii=False).encode(),
                                    headers={"Content-Type": "application/json"}) as resp:
                data = json.loads(await resp.read())
            return data["choices"][0]["message"]["content"]
        r = await timed("aiohttp (bare)", send, messages, k)
        await session.close()
        return r

    variants = {
        "engine": v_engine,
        "sdk": lambda: sdk("sdk (as capgen was)"),
        "keepalive": lambda: sdk("sdk+keepalive", openai.DefaultAsyncHttpxClient(limits=limits, timeout=120)),
        "aiohttp_sdk": lambda: sdk("sdk+aiohttp", openai.DefaultAioHttpClient(limits=limits, timeout=120)),
        "aiohttp_post": v_aiohttp_post,
        "aiohttp": v_aiohttp,
    }
    out = []
    for name, fn in variants.items():
        if only and name not in only:
            continue
        r = await fn()
        print(f"  {r['variant']:<20} {r['cpu_ms_per_request']:6.3f} ms CPU/request  "
              f"({r['requests']} requests, {r['wall_s']:.1f} s wall)", file=sys.stderr, flush=True)
        out.append(r)
    return out


async def _text(coro) -> str:
    return (await coro).text


def part2(rows: list[dict]) -> list[dict]:
    from gen.config import answer_key
    from gen.generate.prompts import PromptSet
    from gen.store import AnswerStore
    from gen.generate.validate import parse_answer
    from schemas import Caption

    prompts = PromptSet()
    caps = [Caption(id=r["id"], text=r["text"]) for r in rows]
    answers = [gen_bench.fake_openai.default_answer(r["text"].strip()) for r in rows]
    out = []

    def clock(name, fn):
        c0 = time.process_time()
        for i in range(len(rows)):
            fn(i)
        ms = (time.process_time() - c0) / len(rows) * 1000
        out.append({"step": name, "cpu_ms_per_caption": ms})
        print(f"  {name:<34} {ms:6.3f} ms CPU/caption", file=sys.stderr, flush=True)

    clock("prompts.messages", lambda i: prompts.messages(caps[i]))
    parsed = {}
    clock("validate.parse_answer", lambda i: parsed.__setitem__(i, parse_answer(answers[i], caps[i].text)))
    clock("config.answer_key", lambda i: answer_key("f" * 64, caps[i].text))
    with tempfile.TemporaryDirectory() as d:
        store = AnswerStore(Path(d) / "cache.sqlite")
        clock("answer.model_dump_json + store.put",
              lambda i: store.put(str(i), "ok", answer=parsed[i].model_dump_json(), raw=answers[i], reason=None,
                                  requests=1, prompt_tokens=800, completion_tokens=300))
        clock("store key lookup (store.has)", lambda i: store.has(str(i)))
        store.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--only", nargs="*", help="variants: engine sdk keepalive aiohttp_sdk aiohttp_post aiohttp")
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()

    from gen.generate.prompts import PromptSet
    from schemas import Caption
    rows = gen_bench.cycled(gen_bench.base_captions(gen_bench.CAPTIONS), a.n)
    prompts = PromptSet()
    messages = [prompts.messages(Caption(id=r["id"], text=r["text"])) for r in rows]
    server, url = start_server(a.concurrency, a.latency, 0.0)
    try:
        print(f"part 1: {a.n} requests, {a.concurrency} in flight, server latency {a.latency}s "
              f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr)
        p1 = asyncio.run(part1(messages, a.concurrency, url, a.only))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()
    print("part 2: capgen's per-caption work outside HTTP", file=sys.stderr)
    p2 = part2(rows)
    if a.json_out:
        a.json_out.write_text(json.dumps({"http": p1, "steps": p2}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
