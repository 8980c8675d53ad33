"""`python -m gen.run --captions raw.jsonl`: captions -> prompts -> engine -> validated queries.

The CLI only wires the stages together; each stage lives in its own module, in the order a
caption travels: captions -> prompts -> engines -> validate/generate (into the store) ->
export (queries.parquet, rejects.jsonl) -> manifest.json.

Exit codes, for schedulers: 0 done (rejected rows are data, not failure); 1 the run itself
failed; 2 bad usage or, with --strict, bad input; 3 finished but some captions got no answer
after every retry (a rerun asks only for those).
"""
from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from gen import __version__, localmodel
from gen.atomic import atomic_path
from gen.captions import CaptionError, read_captions
from gen.config import RunConfig, Sampling, generation_fingerprint, model_identity
from gen.engines import Completion, Engine, EngineError, build_engine
from gen.export import export
from gen.generate import generate
from gen.progress import Progress, count_lines
from gen.prompts import PromptSet
from gen.store import AnswerStore
from schemas import answer_json_schema

log = logging.getLogger("gen.run")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3


class UsageError(Exception):
    pass


def parse_args(argv: Optional[list[str]]) -> RunConfig:
    d = RunConfig.model_fields
    s = Sampling()
    ap = argparse.ArgumentParser(prog="python -m gen.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=Path, required=True, help="JSON lines or parquet with id and text")
    ap.add_argument("--out", type=Path, help="output directory (default: outputs/<captions stem>/)")
    ap.add_argument("--cache", type=Path, help="answer store (default: <out>/cache.sqlite); share it across outputs to reuse answers")
    ap.add_argument("--engine", choices=["vllm", "openai"], help="default: openai when --base-url is given, else vllm")
    ap.add_argument("--model", help=f"model name or path (default: {d['model'].default}, the bundled local model)")
    ap.add_argument("--base-url", action="append", default=[],
                    help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1; repeat it to spread requests over several servers")
    ap.add_argument("--api-key-env", default=d["api_key_env"].default, help="environment variable holding the API key")
    ap.add_argument("--prompts", type=Path, help="directory of templates replacing the bundled prompts/")
    ap.add_argument("--concurrency", type=int, default=d["concurrency"].default, help="requests in flight (vLLM: largest batch)")
    ap.add_argument("--timeout", type=float, default=d["timeout"].default, help="seconds per request")
    ap.add_argument("--max-attempts", type=int, default=d["max_attempts"].default, help="tries per request on transient faults")
    ap.add_argument("--retry-wait", type=float, default=d["retry_wait"].default, help="first backoff in seconds (doubles, with jitter)")
    ap.add_argument("--temperature", type=float, default=s.temperature)
    ap.add_argument("--top-p", type=float, default=s.top_p)
    ap.add_argument("--max-tokens", type=int, default=s.max_tokens)
    ap.add_argument("--seed", type=int, default=s.seed)
    ap.add_argument("--max-caption-chars", type=int, default=d["max_caption_chars"].default)
    ap.add_argument("--max-model-len", type=int, default=d["max_model_len"].default, help="vLLM context length")
    ap.add_argument("--allow-thinking", action="store_true", help="do not ask thinking models (Qwen3) to skip thinking")
    ap.add_argument("--strict", action="store_true", help="stop at the first bad input line")
    ap.add_argument("--force", action="store_true", help="regenerate answers already in the store")
    ap.add_argument("--log-format", choices=["text", "json"], default="text")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    engine = a.engine or ("openai" if a.base_url else "vllm")
    return RunConfig(
        captions=a.captions, out=a.out, cache=a.cache, engine=engine,
        model=a.model or d["model"].default, base_urls=a.base_url, api_key_env=a.api_key_env,
        prompts=a.prompts,
        sampling=Sampling(temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens, seed=a.seed),
        concurrency=a.concurrency, timeout=a.timeout, max_attempts=a.max_attempts, retry_wait=a.retry_wait,
        disable_thinking=not a.allow_thinking, max_caption_chars=a.max_caption_chars,
        max_model_len=a.max_model_len, strict=a.strict, force=a.force,
        log_format=a.log_format, progress=not a.no_progress and a.log_format == "text",
    )


def resolve_model(config: RunConfig) -> str:
    if config.model != localmodel.ALIAS:
        return config.model
    if config.engine == "openai":
        raise UsageError("with --base-url, name the served model with --model")
    path = localmodel.model_dir()
    if not (path / "CHECKSUM").is_file():
        raise UsageError(f"the bundled local model is not set up at {path}: run "
                         "`python -m gen.localmodel` (or scripts/setup.sh), or name one with --model")
    return str(path)


class LazyEngine(Engine):
    """Builds the real engine on the first request: a fully cached rerun starts no model."""

    def __init__(self, build):
        self.build, self.inner = build, None
        self.name = "lazy"

    async def complete(self, messages) -> Completion:
        if self.inner is None:
            self.inner = self.build()
        return await self.inner.complete(messages)

    async def aclose(self) -> None:
        if self.inner is not None:
            await self.inner.aclose()

    def describe(self) -> dict[str, Any]:
        return self.inner.describe() if self.inner else {"engine": None, "note": "no request needed"}


def lock_out_dir(out_dir: Path):
    """One run per output directory. flock dies with its process, so no lock is ever stale."""
    out_dir.mkdir(parents=True, exist_ok=True)
    f = open(out_dir / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        raise UsageError(f"{out_dir} is in use by a running capgen ({holder}); wait for it or use another --out")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


async def run(config: RunConfig) -> int:
    if not config.captions.is_file():
        raise UsageError(f"captions file not found: {config.captions}")
    lock = lock_out_dir(config.out_dir)
    try:
        return await _run_locked(config)
    finally:
        lock.close()  # also on failure: a library caller may run again in this process


async def _run_locked(config: RunConfig) -> int:
    started = time.time()
    out_dir = config.out_dir
    prompts = PromptSet(config.prompts)
    schema = answer_json_schema()
    fingerprint = generation_fingerprint(config, prompts.digest, schema)
    model = resolve_model(config)
    store = AnswerStore(config.cache_path)
    engine = LazyEngine(lambda: build_engine(config, model, schema))
    progress = Progress(count_lines(config.captions), bar=config.progress)
    read = lambda: read_captions(config.captions, config.max_caption_chars, config.strict)
    try:
        try:
            stats = await generate(read(), engine=engine, prompts=prompts, store=store,
                                   fingerprint=fingerprint, concurrency=config.concurrency,
                                   force=config.force, on_progress=progress)
        finally:
            progress.close()
            await engine.aclose()
        generated_at = time.time()
        exported = export(read(), store=store, fingerprint=fingerprint,
                          model=model_identity(config.model), out_dir=out_dir, failures=stats.failures)
    finally:
        store.close()
    manifest = {
        "capgen_version": __version__,
        "captions_file": str(config.captions),
        "fingerprint": fingerprint,
        "model": model_identity(config.model),
        "template_digest": prompts.digest,
        "templates": str(prompts.directory),
        "sampling": config.sampling.model_dump(),
        "engine": engine.describe(),
        "counts": {
            "captions": stats.captions,
            "input_rejects": stats.input_rejects,
            "cached": stats.cached,
            "requested": stats.requested,
            "accepted": stats.accepted,
            "repaired": stats.repaired,
            "rejected": stats.rejected,
            "failed": stats.failed,
            "captions_with_queries": exported.captions_with_queries,
            "queries": exported.queries,
            "queries_by_type": dict(exported.queries_by_type),
            "rejects_by_stage": dict(exported.rejects),
        },
        "usage": {"requests": stats.requests, "prompt_tokens": stats.prompt_tokens,
                  "completion_tokens": stats.completion_tokens},
        "timings": {"started": started, "generate_s": round(generated_at - started, 3),
                    "export_s": round(time.time() - generated_at, 3),
                    "total_s": round(time.time() - started, 3)},
        "outputs": {"queries": "queries.parquet", "captions": "captions.parquet",
                    "rejects": "rejects.jsonl", "cache": str(config.cache_path)},
    }
    with atomic_path(out_dir / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    c = manifest["counts"]
    log.info("done in %.1fs: %d captions, %d with queries (%d queries), %d cached, %d rejected "
             "inputs, %d rejected answers, %d without answer; %d requests, %d tokens -> %s",
             manifest["timings"]["total_s"], c["captions"], c["captions_with_queries"], c["queries"],
             c["cached"], c["input_rejects"], c["rejected"], c["failed"], stats.requests,
             stats.prompt_tokens + stats.completion_tokens, out_dir,
             extra={"fields": {"summary": manifest["counts"], "usage": manifest["usage"]}})
    return EXIT_INCOMPLETE if stats.failed else EXIT_OK


def main(argv: Optional[list[str]] = None) -> int:
    config = parse_args(argv)
    from gen import logs
    logs.setup(config.log_format)
    try:
        return asyncio.run(run(config))
    except (UsageError, CaptionError) as e:
        log.error("%s", e)
        return EXIT_USAGE
    except EngineError as e:
        log.error("engine failed: %s", e)
        return EXIT_FAILED
    except OSError as e:
        log.error("cannot read or write: %s", e)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
