"""`python -m gen.run --captions raw.jsonl`: captions -> prompts -> engine -> validated queries.

The CLI only wires the stages together; each stage lives in its own module, in the order a
caption travels: captions -> prompts -> engines -> validate/generate (into the store, and on
to export as each answer arrives: queries.parquet, rejects.jsonl) -> manifest.json.

Exit codes, for schedulers: 0 done (rejected rows are data, not failure); 1 the run itself
failed: among others, every server refused the key, the account or the model, or none could
be reached (the run stops at once, writes and publishes nothing; stored answers stay and a
rerun resumes); 2 bad usage, or bad input (with --strict any bad line; else no good line at
all); 3 finished but some captions got no answer after every retry (a rerun asks only for
those); 143 stopped by SIGTERM or Ctrl-C (the engine is shut down first; a rerun resumes).
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from gen import __version__, localmodel, report
from gen.atomic import atomic_path, raise_unless_held
from gen.captions import CaptionError, read_captions
from gen.cli import ConfigError, load_config
from gen.config import RunConfig, generation_fingerprint, model_identity
from gen.engines import EngineError, EngineUnusable, build_engine
from gen.engines.lazy import LazyEngine
from gen.export import Exporter, export
from gen.generate import generate
from gen.progress import Progress, count_lines
from gen.prompts import PromptSet
from gen.store import AnswerStore
from schemas import decoding_constraints

log = logging.getLogger("gen.run")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3
EXIT_STOPPED = 128 + signal.SIGTERM  # stopped by SIGTERM or Ctrl-C; what shells report for a kill


class UsageError(Exception):
    pass


def resolve_model(config: RunConfig) -> str:
    if not config.model.startswith("local:"):
        return config.model
    try:
        model = localmodel.bundled(config.model)
    except KeyError as e:
        raise UsageError(e.args[0]) from None
    if config.engine == "openai":
        raise UsageError("with --base-url, name the served model with --model")
    path = localmodel.model_dir(model)
    if not (path / "CHECKSUM").is_file():
        setup = "" if model is localmodel.SMALL else f" --model {model.name}"
        raise UsageError(f"the bundled local model {model.name} is not set up at {path}: run "
                         f"`python -m gen.localmodel{setup}` (or scripts/setup.sh), or name one with --model")
    return str(path)


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
    if config.dry_run:
        return dry_run(config)
    lock = lock_out_dir(config.out_dir)
    stop = stop_on_sigterm()
    try:
        return await _run_locked(config)
    finally:
        stop()
        lock.close()  # also on failure: a library caller may run again in this process


class Terminated(KeyboardInterrupt):
    """SIGTERM. A KeyboardInterrupt, so that asyncio lets it out of the loop at once and
    cancels the rest, running every `finally` (engine shut down, partial files removed)."""


def stop_on_sigterm() -> Callable[[], None]:
    """SIGTERM (what schedulers send) stops the run like Ctrl-C. Killed outright, capgen left
    vLLM's engine processes running. An asyncio callback would have to wait for the loop,
    which vLLM's start-up blocks for minutes, so the handler raises wherever the main thread
    is; the loop's own wakeup (registered through asyncio) makes sure that thread wakes up
    though the signal may reach another thread. Stored answers stay; a rerun resumes.
    Returns the undo."""
    def stop(signum, frame):
        raise_unless_held(Terminated())   # not in the middle of the output files' renames
    loop = asyncio.get_running_loop()
    original = signal.getsignal(signal.SIGTERM)
    try:
        loop.add_signal_handler(signal.SIGTERM, lambda: None)
        signal.signal(signal.SIGTERM, stop)
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread, or no unix signals
        return lambda: None
    previous = loop.get_exception_handler()

    def quiet(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        # A SIGTERM that lands inside a task's step leaves that task holding the Terminated,
        # and asyncio prints it with a traceback as "never retrieved" when the task is
        # collected, after the stop was already reported. Left installed by the undo: that
        # happens after it.
        if isinstance(context.get("exception"), Terminated):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)
    loop.set_exception_handler(quiet)

    def undo() -> None:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, original)
    return undo


def dry_run(config: RunConfig) -> int:
    from gen.plan import plan
    prompts = PromptSet(config.prompts)
    fingerprint = generation_fingerprint(config, prompts.digest, decoding_constraints())
    records = read_captions(config.captions, config.max_caption_chars, config.strict)
    result = plan(records, config, prompts, fingerprint)
    log.info("dry run: %d captions, %d cached, %d to request (%d-%d requests), ~%s prompt tokens",
             result["captions"], result["cached"], result["to_request"], result["requests_at_least"],
             result["requests_at_most"], result["prompt_tokens_estimate"], extra={"fields": {"plan": result}})
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return EXIT_OK


async def _run_locked(config: RunConfig) -> int:
    started = time.time()
    out_dir = config.out_dir
    prompts = PromptSet(config.prompts)
    constraints = decoding_constraints()
    schema = constraints["caption"]   # the engine's own; gen.generate picks a short caption's
    fingerprint = generation_fingerprint(config, prompts.digest, constraints)
    model = resolve_model(config)
    store = AnswerStore(config.cache_path)
    engine = LazyEngine(lambda: build_engine(config, model, schema))
    progress = Progress(count_lines(config.captions), bar=config.progress)
    read = lambda: read_captions(config.captions, config.max_caption_chars, config.strict)
    try:
        try:
            if config.executor == "ray":
                from gen.ray_executor import ExecutorUnavailable, generate_ray
                try:  # blocks this loop; nothing else runs on it meanwhile
                    stats = generate_ray(read(), config=config, model=model, schema=schema,
                                         store=store, fingerprint=fingerprint, on_progress=progress)
                except ExecutorUnavailable as e:
                    raise UsageError(str(e)) from None
                generated_at = time.time()
                exported = export(read(), store=store, fingerprint=fingerprint,
                                  model=model_identity(config.model), out_dir=out_dir, failures=stats.failures)
                exported_at = time.time()
            else:  # exports as it generates: the files are done moments after the last answer
                with Exporter(out_dir, model_identity(config.model)) as sink:
                    stats = await generate(read(), engine=engine, prompts=prompts, store=store,
                                           fingerprint=fingerprint, concurrency=config.concurrency,
                                           force=config.force, repair_rounds=config.repair_rounds,
                                           on_progress=progress, sink=sink)
                    generated_at = time.time()
                exported, exported_at = sink.stats, time.time()
        finally:
            progress.close()
            await engine.aclose()
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
        "repair_rounds": config.repair_rounds,
        "engine": engine.describe(),
        "counts": {
            "captions": stats.captions,
            "input_rejects": stats.input_rejects,
            "cached": stats.cached,
            "requested": stats.requested,
            "accepted": stats.accepted,
            "repaired": stats.repaired,
            "rejected": stats.rejected,
            # Of all the rejected answers exported (this run's and the store's), those
            # whose valid queries were kept.
            "salvaged": exported.salvaged,
            "failed": stats.failed,
            "captions_with_queries": exported.captions_with_queries,
            "queries": exported.queries,
            "queries_by_type": dict(exported.queries_by_type),
            "rejects_by_stage": dict(exported.rejects),
        },
        "usage": {"requests": stats.requests, "prompt_tokens": stats.prompt_tokens,
                  "completion_tokens": stats.completion_tokens},
        "timings": {"started": started, "generate_s": round(generated_at - started, 3),
                    "export_s": round(exported_at - generated_at, 3),
                    "total_s": round(time.time() - started, 3)},
        "outputs": {"queries": "queries.parquet", "captions": "captions.parquet",
                    "rejects": "rejects.jsonl", "report": "report.html", "cache": str(config.cache_path)},
    }
    if config.curate and exported.queries:
        from gen.publish import curate_versioned
        t = time.time()
        cur = curate_versioned(out_dir, config.curation)
        manifest["curation"] = {k: cur[k] for k in ("version", "reused", "fingerprint", "stats", "files")}
        manifest["curation"]["dir"] = f"shards/{cur['version']}"
        manifest["timings"]["curate_s"] = round(time.time() - t, 3)
        manifest["timings"]["total_s"] = round(time.time() - started, 3)
        log.info("curated: %s pairs in shards/%s%s", cur["stats"]["pairs_out"], cur["version"],
                 " (unchanged inputs: latest version reused)" if cur["reused"] else "")
    summary = exported.tally.summary()
    manifest["report"] = {k: v for k, v in summary.items() if k != "sample"}
    with atomic_path(out_dir / "report.html") as tmp:
        tmp.write_text(report.render(manifest, summary), encoding="utf-8")
    # Last: a manifest says the files beside it are complete.
    with atomic_path(out_dir / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    c = manifest["counts"]
    log.info("done in %.1fs: %d captions, %d with queries (%d queries), %d cached, %d rejected "
             "inputs, %d rejected answers (%d kept in part), %d without answer; %d requests, %d tokens -> %s",
             manifest["timings"]["total_s"], c["captions"], c["captions_with_queries"], c["queries"],
             c["cached"], c["input_rejects"], c["rejected"], c["salvaged"], c["failed"], stats.requests,
             stats.prompt_tokens + stats.completion_tokens, out_dir,
             extra={"fields": {"summary": manifest["counts"], "usage": manifest["usage"]}})
    if stats.input_rejects and not stats.captions:
        # Some bad lines are data; every line bad is the wrong file (a CSV, a JSON array), and a
        # scheduled job must not report an empty success. The rejects are written all the same.
        log.error("no line of %s is a caption (%d rejected, reasons in %s): check the file's format",
                  config.captions, stats.input_rejects, out_dir / "rejects.jsonl")
        return EXIT_USAGE
    return EXIT_INCOMPLETE if stats.failed else EXIT_OK


def entry(argv: Optional[list[str]], work: Callable[[RunConfig], int]) -> int:
    """What every capgen command shares: settings, logging, and errors turned into exit codes."""
    from gen import logs
    try:
        config = load_config(argv)
    except ConfigError as e:
        logs.setup("text")
        log.error("%s", e)
        return EXIT_USAGE
    logs.setup(config.log_format)
    try:
        return work(config)
    except (UsageError, CaptionError) as e:
        log.error("%s", e)
        return EXIT_USAGE
    except EngineError as e:
        log.error("engine failed: %s", e)
        return EXIT_FAILED
    except EngineUnusable as e:
        log.error("stopped: %s. Answers stored so far are kept and a rerun resumes from them; "
                  "no output file was replaced and nothing was published", e)
        return EXIT_FAILED
    except OSError as e:
        log.error("cannot read or write: %s", e)
        return EXIT_FAILED
    except (asyncio.CancelledError, KeyboardInterrupt):
        log.error("stopped before the end: every answer received so far is stored, and a rerun "
                  "resumes from there; the output files were left as they were")
        return EXIT_STOPPED


def main(argv: Optional[list[str]] = None) -> int:
    return entry(argv, lambda config: asyncio.run(run(config)))


def cli() -> int:
    """`capgen` and `python -m gen.run`: main() in a process of our own."""
    from gen.export import skip_pandas_probe
    skip_pandas_probe()
    return main()


if __name__ == "__main__":
    sys.exit(cli())
