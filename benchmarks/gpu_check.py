"""The checks that need a GPU, as one command on a machine with GPUs and vLLM installed:

    python benchmarks/gpu_check.py                          # the bundled model
    python benchmarks/gpu_check.py --model /models/Qwen2.5-7B-Instruct --n 4096

capgen's in-process engine (vLLM's AsyncLLM) against raw `LLM.chat` (the whole run in one
call) and the former chunked `LLM.chat` engine, on the same prompts (vllm_engine_bench.py at
a GPU's size: vLLM's batch as wide as its offline default on an H100/H200, 1024 sequences, and
--concurrency as high, so the chunked engine runs two chunks). Exit 0 when capgen
reaches `--goal` (0.97) of raw's tokens per second on average and renders the same prompt
tokens as `LLM.chat`; 1 otherwise; 2 without a GPU. Prints the benchmark's JSON line, then a
verdict.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vllm_engine_bench  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="local")
    ap.add_argument("--n", type=int, default=2048, help="captions (two chunks of the chunked engine)")
    ap.add_argument("--concurrency", type=int, default=1024, help="and vLLM's batch width")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--goal", type=float, default=0.97)
    a = ap.parse_args()
    if not vllm_engine_bench.gpu_available():
        print("gpu_check: no GPU visible to torch", file=sys.stderr)
        return 2
    result = vllm_engine_bench.main(["--model", a.model, "--n", str(a.n), "--concurrency", str(a.concurrency),
                                     "--repeat", str(a.repeat)])
    ok = result["capgen_ratio_mean"] >= a.goal and result["same_prompt_tokens"]
    print(json.dumps({"check": "in-process engine vs raw LLM.chat", "goal": a.goal,
                      "capgen_ratio_mean": result["capgen_ratio_mean"],
                      "chunked_ratio_mean": result["chunked_ratio_mean"],
                      "same_prompt_tokens": result["same_prompt_tokens"], "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
