"""Real engines: capgen's in-process vLLM engine against raw `vllm.LLM.chat`, and (on a CPU)
against vLLM's OpenAI-compatible server, on the same prompts and settings.

    python benchmarks/vllm_engine_bench.py --n 64                   # GPU: ratio to raw LLM.chat
    python benchmarks/vllm_engine_bench.py --n 32 --server          # also time the server path
    python benchmarks/vllm_engine_bench.py --n 4 --model local      # smoke mode (CPU, minutes)

Ratio = capgen's completion tokens per second / raw LLM.chat's, both on one loaded model
(the same `LLM` object, so weights, KV cache and compilation are shared); raw runs both
before and after capgen so a warm prefix cache favours neither. Output: one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CAPTIONS = ROOT / "tests" / "fixtures" / "capretrieval_captions.jsonl"


def captions(n: int) -> list[dict]:
    rows = [json.loads(line) for line in CAPTIONS.read_text(encoding="utf-8").splitlines()]
    return [{"id": f"b{i}", "text": rows[i % len(rows)]["text"] + ("" if i < len(rows) else f"（{i}）")}
            for i in range(n)]


def raw_chat(engine, messages) -> tuple[float, int]:
    t = time.perf_counter()
    outs = engine.llm.chat(messages, engine.params, use_tqdm=False, **engine.chat_kwargs)
    return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)


def capgen_run(engine, caps, prompts, fingerprint) -> tuple[float, int]:
    from gen.generate import generate
    from gen.store import AnswerStore
    from schemas import Caption
    with tempfile.TemporaryDirectory() as tmp:
        store = AnswerStore(Path(tmp) / "cache.sqlite")
        t = time.perf_counter()
        stats = asyncio.run(generate((Caption(**c) for c in caps), engine=engine, prompts=prompts,
                                     store=store, fingerprint=fingerprint, concurrency=len(caps)))
        wall = time.perf_counter() - t
        store.close()
    return wall, stats.completion_tokens


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
                            + (["--enforce-eager"] if not _gpu() else []),
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


def _gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--model", default="local", help="model path, or 'local' for the bundled model")
    ap.add_argument("--server", action="store_true", help="also run through vLLM's OpenAI server")
    a = ap.parse_args()
    from gen import localmodel
    from gen.config import RunConfig, generation_fingerprint
    from gen.engines.vllm import VLLMEngine
    from gen.prompts import PromptSet
    from schemas import Caption, answer_json_schema, decoding_constraints

    model = str(localmodel.ensure()) if a.model == "local" else a.model
    caps = captions(a.n)
    prompts = PromptSet()
    schema = answer_json_schema()
    config = RunConfig(captions=Path("x"), model=model)
    t = time.perf_counter()
    engine = VLLMEngine(model=model, schema=schema, sampling=config.sampling, batch_size=a.n)
    startup = time.perf_counter() - t
    messages = [prompts.messages(Caption(**c)) for c in caps]
    raw1 = raw_chat(engine, messages)
    fp = generation_fingerprint(config, prompts.digest, decoding_constraints())
    mine = capgen_run(engine, caps, prompts, fp)
    raw2 = raw_chat(engine, messages)
    raw_tps = (raw1[1] + raw2[1]) / (raw1[0] + raw2[0])
    # capgen may spend extra tokens on repair rounds; the ratio is throughput, tokens per second
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpus": os.cpu_count(),
        "gpu": _gpu(), "model": model, "n": a.n, "engine_start_s": round(startup, 1),
        "raw_wall_s": [round(raw1[0], 2), round(raw2[0], 2)], "raw_tokens": [raw1[1], raw2[1]],
        "capgen_wall_s": round(mine[0], 2), "capgen_tokens": mine[1],
        "raw_tokens_per_s": round(raw_tps, 1), "capgen_tokens_per_s": round(mine[1] / mine[0], 1),
        "ratio": round((mine[1] / mine[0]) / raw_tps, 3),
        "in_process_captions_per_min": round(a.n / mine[0] * 60, 2),
    }
    del engine
    if a.server:
        result.update(server_run(model, caps))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
