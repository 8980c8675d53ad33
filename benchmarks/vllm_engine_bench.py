"""Real engines on the same prompts and settings: raw `vllm.LLM.chat` (the whole run in one
call), capgen's in-process engine (vLLM's `AsyncLLM`, one continuous batch) and the chunked
`LLM.chat` engine it replaced; optionally (on a CPU) capgen through vLLM's OpenAI server.

    python benchmarks/vllm_engine_bench.py --n 48 --concurrency 24 --repeat 2    # CPU, ~15 min
    python benchmarks/vllm_engine_bench.py --n 1024 --concurrency 256 --model M  # GPU (gpu_check.py)
    python benchmarks/vllm_engine_bench.py --n 16 --server                       # also the server

Both engines are loaded once, side by side (one `vllm.LLM` for raw and chunked, one
`AsyncLLM` for capgen), and the variants run interleaved (raw, chunked, capgen, then the
reverse order, `--repeat` times), each from an empty prefix cache, so drift on a shared
machine and a warm cache favour none. Per variant: completion tokens per second, captions per
minute, and seconds to the first stored answer (raw stores nothing before its call returns:
its whole wall time). Ratio = tokens per second / raw's, each run against the mean of raw's
runs. capgen's variants spend some tokens on repair rounds; tokens per second counts them.
Output: one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CAPTIONS = ROOT / "tests" / "fixtures" / "capretrieval_captions.jsonl"

from gen.engines.base import Completion, Engine, EngineError  # noqa: E402


def captions(n: int) -> list[dict]:
    """N distinct texts (a copy gets a suffix), so the answer store dedupes nothing."""
    rows = [json.loads(line) for line in CAPTIONS.read_text(encoding="utf-8").splitlines()]
    return [{"id": f"b{i}", "text": rows[i % len(rows)]["text"] + ("" if i < len(rows) else f"（{i}）")}
            for i in range(n)]


class ChunkedLLMEngine(Engine):
    """capgen's former in-process engine, kept here to measure against: it gathers the
    requests waiting (up to `batch_size`) and hands them to the synchronous `LLM.chat`, which
    returns when the last of them is done; the next chunk starts only then."""
    name = "vllm-chunked"

    def __init__(self, llm, params, chat_kwargs: dict, batch_size: int):
        self.llm, self.params, self.chat_kwargs, self.batch_size = llm, params, chat_kwargs, batch_size
        self._params_by_schema: dict[str, Any] = {}
        self._make_params = None
        self.batches = 0
        self._queue: list[tuple[list[dict[str, str]], Any, asyncio.Future]] = []
        self._worker: Optional[asyncio.Task] = None

    def _params(self, schema: Optional[dict]) -> Any:
        if schema is None:
            return self.params
        key = json.dumps(schema, sort_keys=True)
        if key not in self._params_by_schema:
            self._params_by_schema[key] = self._make_params(schema)
        return self._params_by_schema[key]

    async def complete(self, messages, schema=None) -> Completion:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((messages, self._params(schema), future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        await asyncio.sleep(0)
        while self._queue:
            batch, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size:]
            try:
                outputs = await asyncio.to_thread(
                    self.llm.chat, [m for m, _, _ in batch], [p for _, p, _ in batch], use_tqdm=False,
                    **self.chat_kwargs)
            except Exception as exc:
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(EngineError(f"vLLM failed: {exc}"))
                continue
            self.batches += 1
            for (_, _, fut), out in zip(batch, outputs):
                gen = out.outputs[0]
                if not fut.done():
                    fut.set_result(Completion(
                        text=gen.text, prompt_tokens=len(out.prompt_token_ids or []),
                        completion_tokens=len(gen.token_ids), finish_reason=gen.finish_reason))
            await asyncio.sleep(0)


class Timed(Engine):
    """Passes requests through, adding up the time each was in flight: over the wall time,
    the mean number in flight (how full the engine's batch was kept)."""

    def __init__(self, inner: Engine):
        self.inner, self.name, self.busy = inner, inner.name, 0.0

    async def complete(self, messages, schema=None) -> Completion:
        t = time.perf_counter()
        try:
            return await self.inner.complete(messages, schema)
        finally:
            self.busy += time.perf_counter() - t


def cpu_seconds(procs) -> float:
    """CPU time of an engine's processes (engine core, workers): against other jobs on the
    same cores, tokens per engine CPU second compares engines where wall time cannot."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # noqa: BLE001 - gone
            pass
    return total


def raw_chat(llm, params, chat_kwargs, messages) -> dict:
    llm.reset_prefix_cache()
    t = time.perf_counter()
    outs = llm.chat(messages, params, use_tqdm=False, **chat_kwargs)
    wall = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"variant": "raw", "wall_s": wall, "tokens": tokens, "first_answer_s": wall,
            "requests": len(outs), "prompt_ids": [list(o.prompt_token_ids) for o in outs]}


async def capgen_run(variant: str, engine: Engine, caps, prompts, fingerprint, concurrency: int) -> dict:
    from gen.generate import generate
    from gen.store import AnswerStore
    from schemas import Caption
    first: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = AnswerStore(Path(tmp) / "cache.sqlite")

        def progress(stats) -> None:
            if not first and stats.accepted + stats.rejected + stats.failed:
                first.append(time.perf_counter() - t)
        t = time.perf_counter()
        timed = Timed(engine)
        stats = await generate((Caption(**c) for c in caps), engine=timed, prompts=prompts, store=store,
                               fingerprint=fingerprint, concurrency=concurrency, on_progress=progress)
        wall = time.perf_counter() - t
        store.close()
    return {"variant": variant, "wall_s": wall, "tokens": stats.completion_tokens,
            "first_answer_s": first[0] if first else None, "requests": stats.requests,
            "accepted": stats.accepted, "failed": stats.failed, "mean_in_flight": timed.busy / wall}


def server_run(model: str, caps: list[dict]) -> dict:
    """capgen through vLLM's OpenAI-compatible server on the same machine (start-up excluded)."""
    import socket
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                             "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
                             "--max-model-len", "4096", "--enable-prefix-caching"]
                            + (["--enforce-eager"] if not gpu_available() else []),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/models", timeout=2)
                break
            except OSError:
                time.sleep(1)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "caps.jsonl"
            path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in caps), encoding="utf-8")
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "gen.run", "--captions", str(path), "--out", str(Path(tmp) / "o"),
                            "--base-url", url, "--model", "bench", "--concurrency", str(len(caps)),
                            "--no-progress"], cwd=ROOT, check=True, capture_output=True)
            wall = time.perf_counter() - t
            m = json.loads((Path(tmp) / "o" / "manifest.json").read_text())
        return {"server_wall_s": round(wall, 2), "server_completion_tokens": m["usage"]["completion_tokens"],
                "server_captions_per_min": round(len(caps) / wall * 60, 2)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def gpu_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


async def bench(a: argparse.Namespace, model: str) -> dict:
    from vllm import LLM

    from gen.config import RunConfig, generation_fingerprint
    from gen.engines.vllm import VLLMEngine, _cpu_defaults, _on_cpu, engine_kwargs, sampling_params_factory
    from gen.generate.prompts import PromptSet
    from schemas import Caption, answer_json_schema, decoding_constraints

    caps = captions(a.n)
    prompts = PromptSet()
    schema = answer_json_schema()
    config = RunConfig(captions=Path("x"), model=model)
    _cpu_defaults()
    on_cpu = _on_cpu()
    # vLLM's batch as wide as capgen's --concurrency, as at the default of 256 (vLLM's own
    # default on a CPU): raw runs that many at once, refilled as each finishes.
    extra = {"max_num_seqs": a.max_num_seqs or a.concurrency}
    if not on_cpu:  # two engines on one GPU: each gets its share of the memory
        extra["gpu_memory_utilization"] = a.gpu_memory_utilization
    kwargs = engine_kwargs(config.sampling, on_cpu, extra)
    t = time.perf_counter()
    import psutil
    me = psutil.Process()
    llm = LLM(model=model, enable_prefix_caching=True, max_model_len=4096, **kwargs)
    llm_procs = me.children(recursive=True)
    sync_start = time.perf_counter() - t
    make_params = sampling_params_factory(config.sampling, on_cpu)
    chat_kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    chunked = ChunkedLLMEngine(llm, make_params(schema), chat_kwargs, batch_size=a.concurrency)
    chunked._make_params = make_params
    t = time.perf_counter()
    capgen = await asyncio.to_thread(lambda: VLLMEngine(
        model=model, schema=schema, sampling=config.sampling, max_in_flight=a.concurrency, **extra))
    async_start = time.perf_counter() - t
    async_procs = [p for p in me.children(recursive=True) if p.pid not in {q.pid for q in llm_procs}]
    messages = [prompts.messages(Caption(**c)) for c in caps]
    fp = generation_fingerprint(config, prompts.digest, decoding_constraints())

    # The same prompt tokens: capgen's rendering against LLM.chat's, caption by caption.
    rendered = [list((await capgen.llm.renderer.render_chat_async([m], capgen._chat, capgen._tok))[1][0]
                     ["prompt_token_ids"]) for m in messages]

    runs: list[dict] = []
    order = ["raw", "chunked", "capgen"]
    same_prompts = None
    for r in range(a.repeat):
        for variant in (order if r % 2 == 0 else order[::-1]):
            load = _load()
            procs = async_procs if variant == "capgen" else llm_procs
            cpu = cpu_seconds(procs)
            if variant == "raw":
                run = raw_chat(llm, make_params(schema), chat_kwargs, messages)
                ids = run.pop("prompt_ids")
                same_prompts = (same_prompts is not False) and ids == rendered
            elif variant == "chunked":
                llm.reset_prefix_cache()
                run = await capgen_run(variant, chunked, caps, prompts, fp, a.concurrency)
            else:
                await capgen.llm.reset_prefix_cache()
                run = await capgen_run(variant, capgen, caps, prompts, fp, a.concurrency)
            run["load_before"] = load
            run["engine_cpu_s"] = cpu_seconds(procs) - cpu
            runs.append(run)
            print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in run.items()}),
                  file=sys.stderr, flush=True)
    await capgen.aclose()
    llm.llm_engine.engine_core.shutdown()

    raw_tps = statistics.mean(r["tokens"] / r["wall_s"] for r in runs if r["variant"] == "raw")
    summary: dict[str, Any] = {}
    for variant in order:
        mine = [r for r in runs if r["variant"] == variant]
        tps = [r["tokens"] / r["wall_s"] for r in mine]
        summary[variant] = {
            "wall_s": [round(r["wall_s"], 1) for r in mine],
            "tokens": [r["tokens"] for r in mine],
            "tokens_per_s": [round(x, 1) for x in tps],
            "ratio_to_raw": [round(x / raw_tps, 3) for x in tps],
            "captions_per_min": [round(a.n / r["wall_s"] * 60, 2) for r in mine],
            "first_answer_s": [round(r["first_answer_s"], 1) for r in mine],
            "requests": [r["requests"] for r in mine],
            "tokens_per_engine_cpu_s": [round(r["tokens"] / r["engine_cpu_s"], 2) for r in mine],
            "mean_in_flight": [round(r["mean_in_flight"], 1) for r in mine if "mean_in_flight" in r],
            "load_before": [r["load_before"] for r in mine],
        }
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(), "cpus": os.cpu_count(),
        "gpu": gpu_available(), "model": model, "n": a.n, "concurrency": a.concurrency,
        "max_num_seqs": a.max_num_seqs or a.concurrency, "repeat": a.repeat,
        "engine_start_s": {"llm": round(sync_start, 1), "async_llm": round(async_start, 1)},
        "same_prompt_tokens": same_prompts, "variants": summary,
        "capgen_ratio_mean": round(statistics.mean(summary["capgen"]["ratio_to_raw"]), 3),
        "chunked_ratio_mean": round(statistics.mean(summary["chunked"]["ratio_to_raw"]), 3),
    }


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=48, help="captions (CapRetrieval's, cycled)")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="capgen's --concurrency (default n/2: the chunked engine's chunk size)")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of the three variants")
    ap.add_argument("--model", default="local", help="model path, or 'local' for the bundled model")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="vLLM's batch width, for every variant (default: --concurrency)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="each engine's share (GPU)")
    ap.add_argument("--server", action="store_true", help="also run through vLLM's OpenAI server")
    a = ap.parse_args(argv)
    a.concurrency = a.concurrency or max(1, a.n // 2)
    from gen import localmodel
    model = str(localmodel.ensure()) if a.model == "local" else a.model
    result = asyncio.run(bench(a, model))
    if a.server:
        result.update(server_run(model, captions(a.n)))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
