"""capgen's Ray path with vLLM engines (`--executor ray --engine vllm`) against raw
`vllm.LLM.chat` on the same prompts, and its scaling from one actor to two.

    python benchmarks/ray_vllm_gpu.py --model /models/Qwen2.5-7B-Instruct --n 2048   # a GPU machine
    python benchmarks/ray_vllm_gpu.py --model local --n 4 --replicas 1                 # smoke (CPU, minutes)

Each measurement runs in a process of its own, so one engine's GPU memory is free before the
next starts: raw `LLM.chat` over all N prompts at once (one engine, one GPU group), then
capgen's generation stage (gen.generate.ray_executor.generate_ray, the driver and answer store a run
uses) with 1 actor, then with 2. Throughput is completion tokens per second from the moment
every actor's engine is up to the last answer recorded (engine start-up excluded on both
sides; capgen's repair rounds count as tokens, as they are work the GPU does).
Goals: ratio = capgen with 1 actor / raw >= 0.95; scaling = 2 actors / 1 actor, near 2 when
the machine has GPUs for both. The 2-actor step is skipped when the local Ray cluster has
fewer GPUs than two actors need. Output: one JSON line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from vllm_engine_bench import captions, gpu_available  # noqa: E402  (the same prompts, the same check)


def _model(name: str) -> str:
    from gen import localmodel
    return str(localmodel.ensure()) if name == "local" else name


def phase_raw(a) -> dict:
    """vLLM alone: one LLM, every prompt in one LLM.chat call, capgen's sampling and schema."""
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from gen.config import RunConfig
    from gen.generate.prompts import PromptSet
    from schemas import Caption, answer_json_schema
    model = _model(a.model)
    s = RunConfig(captions=Path("x"), model=model).sampling
    gpu = gpu_available()
    llm = LLM(model=model, enable_prefix_caching=True, max_model_len=4096, enforce_eager=not gpu,
              seed=s.seed, **a.vllm_args)
    params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                            seed=s.seed if gpu else None,
                            structured_outputs=StructuredOutputsParams(json=answer_json_schema()))
    prompts = PromptSet()
    messages = [prompts.messages(Caption(**c)) for c in captions(a.n)]
    t = time.perf_counter()
    outs = llm.chat(messages, params, use_tqdm=False, chat_template_kwargs={"enable_thinking": False})
    wall = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"wall_s": round(wall, 2), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "captions_per_s": round(a.n / wall, 3)}


class _UpAt(logging.Handler):
    """When the last actor's engine came up: generation starts there."""

    def __init__(self, actors: int):
        super().__init__()
        self.left, self.at = actors, None

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "fields", {}).get("event") == "ray_actor_up":
            self.left -= 1
            if self.left == 0:
                self.at = time.perf_counter()


def phase_ray(a) -> dict:
    import ray

    from gen.config import RunConfig, generation_fingerprint
    from gen.generate.prompts import PromptSet
    from gen.generate.ray_executor import ExecutorUnavailable, generate_ray
    from gen.store import AnswerStore
    from schemas import Caption, decoding_constraints
    model = _model(a.model)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    config = RunConfig(captions=Path("x"), engine="vllm", model=model, executor="ray",
                       ray_actors=a.replicas, concurrency=a.concurrency, vllm_args=a.vllm_args)
    constraints = decoding_constraints()
    prompts = PromptSet()
    fingerprint = generation_fingerprint(config, prompts.digest, constraints)
    up = _UpAt(a.replicas)
    logging.getLogger("gen.generate.ray_executor").addHandler(up)
    logging.getLogger("gen.generate.ray_executor").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        store = AnswerStore(Path(tmp) / "cache.sqlite")
        t = time.perf_counter()
        try:
            stats = generate_ray((Caption(**c) for c in captions(a.n)), config=config, model=model,
                                 schema=constraints["caption"], store=store, fingerprint=fingerprint)
        except ExecutorUnavailable as e:
            return {"skipped": str(e), "cluster_gpus": gpus}
        done = time.perf_counter()
        store.close()
    wall = done - (up.at or t)
    if stats.accepted + stats.rejected != a.n or stats.failed:
        raise SystemExit(f"accounting: {a.n} captions, {stats.accepted} accepted, {stats.rejected} rejected, "
                         f"{stats.failed} without answer")
    return {"replicas": a.replicas, "cluster_gpus": gpus, "start_s": round((up.at or t) - t, 1),
            "wall_s": round(wall, 2), "completion_tokens": stats.completion_tokens,
            "requests": stats.requests, "accepted": stats.accepted, "rejected": stats.rejected,
            "tokens_per_s": round(stats.completion_tokens / wall, 1), "captions_per_s": round(a.n / wall, 3)}


def _child(phase: str, a, replicas: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"   # not stdout: vLLM prints there too
        cmd = [sys.executable, __file__, "--phase", phase, "--result", str(result), "--model", a.model,
               "--n", str(a.n), "--concurrency", str(a.concurrency), "--replicas", str(replicas)]
        for k, v in a.vllm_args.items():
            cmd += ["--vllm-arg", f"{k}={json.dumps(v)}"]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if p.returncode != 0 or not result.is_file():
            raise SystemExit(f"{phase} ({replicas} actor(s)) failed:\n{(p.stdout + p.stderr)[-4000:]}")
        return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="local", help="model path or name; 'local': the bundled 0.5B model")
    ap.add_argument("--n", type=int, default=2048, help="captions")
    ap.add_argument("--concurrency", type=int, default=512, help="capgen's --concurrency (captions in flight per actor)")
    ap.add_argument("--replicas", type=int, default=2, help="the largest actor count measured (1..this)")
    ap.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to vllm.LLM on both sides, e.g. gpu_memory_utilization=0.9")
    ap.add_argument("--phase", choices=["raw", "ray"], help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.vllm_args = {}
    for item in a.vllm_arg:
        k, _, v = item.partition("=")
        try:
            a.vllm_args[k] = json.loads(v)
        except json.JSONDecodeError:
            a.vllm_args[k] = v
    if a.phase:
        a.result.write_text(json.dumps(phase_raw(a) if a.phase == "raw" else phase_ray(a)))
        return
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpus": os.cpu_count(),
              "gpu": gpu_available(), "model": a.model, "n": a.n, "concurrency": a.concurrency, "vllm_args": a.vllm_args}
    result["raw"] = raw = _child("raw", a)
    result["ray"] = {}
    for k in range(1, a.replicas + 1):
        result["ray"][k] = _child("ray", a, k)
    one = result["ray"][1]
    result["ratio"] = round(one["tokens_per_s"] / raw["tokens_per_s"], 3)
    result["ratio_goal_met"] = result["ratio"] >= 0.95
    two = result["ray"].get(2, {})
    if "captions_per_s" in two:
        result["scaling_2_over_1"] = round(two["captions_per_s"] / one["captions_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
