"""`python -m gen.run --captions raw.jsonl`: captions -> prompts -> engine -> validated queries.

The CLI only wires the stages together; each stage lives in its own module, in the order a
caption travels: captions -> prompts -> engines -> validate/generate (into the store, and on
to export as each answer arrives: queries.parquet, rejects.jsonl) -> manifest.json.

Exit codes, for schedulers: 0 done (rejected rows are data, not failure); 1 the run itself
failed: among others, every server refused the key, the account or the model, or none could
be reached (the run stops at once, writes and publishes nothing; stored answers stay and a
rerun resumes); 2 bad usage, or bad input (with --strict any bad line; else no good line at
all; a publication gen.publish refuses);
3 finished but some captions got no answer after every retry (a rerun asks only for those;
where they would shrink the curation past the shrink guard, nothing is published);
4 batch mode: captions are in batches not yet finished (submitted or still running), and the
outputs hold what is answered so far; the next run collects them (not a failure: cron runs
it again; --wait instead polls until they are done);
75 another run holds the output directory, nothing done (EX_TEMPFAIL of sysexits.h: a
temporary condition, retry later; clear of the shell's 126-165 and of capgen's own codes);
143 stopped by SIGTERM, SIGHUP or Ctrl-C (the engine is shut down first; a rerun resumes).
--dry-run exits 1 when no server would serve the model (none reachable, the key refused, the
model not listed) or the in-process engine's model directory is missing: as the run would.

Publication is all or nothing: the new files are made in OUT/.staging/ and the new curated
version in a hidden folder; only when all are complete are they renamed into place, in
one step a stop signal waits for. A run that fails, stops or is refused (gen.publish's
shrink guard, a shards/latest that is not capgen's) leaves the previous outputs as they were.

Every command logs a `start` event first and a `finished` event last (exit status, its
meaning, fingerprint, shards version, duration), at a level that follows the exit status.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from gen import __version__, localmodel, logs
from gen.engines import cost
from gen.export import report
from gen.atomic import (STOP_SIGNALS, Terminated, all_or_none, atomic_path, stop_signalled,  # noqa: F401 (Terminated: for callers)
                        on_stop_signal, sha256_file, stop_signals)
from gen.input.captions import STDIN, CaptionDigest, CaptionError, is_stream, read_captions, spooled
from gen.cli import ConfigError, load_config, log_format_hint
from gen.config import RunConfig, generation_fingerprint, model_identity
from gen.engines import EngineError, EngineUnusable, build_engine
from gen.engines.lazy import LazyEngine
from gen.export import Exporter, export
from gen.generate import generate
from gen.generate.progress import Progress, count_lines
from gen.generate.prompts import PromptError, PromptSet
from gen.store import AnswerStore
from schemas import decoding_constraints

log = logging.getLogger("gen.run")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3
EXIT_PENDING = 4   # batch mode: submitted, answers pending; a later run collects them
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds the output directory; try again later
EXIT_STOPPED = 128 + signal.SIGTERM  # stopped by SIGTERM or Ctrl-C; what shells report for a kill
ENGINE_LOG = "engine.log"

# What each exit status means, and the level of the `finished` event that reports it.
OUTCOMES = {
    EXIT_OK: (logging.INFO, "done"),
    EXIT_FAILED: (logging.ERROR, "failed"),
    EXIT_USAGE: (logging.ERROR, "bad usage or input"),
    EXIT_INCOMPLETE: (logging.WARNING, "finished, some captions got no answer: a rerun asks only for them"),
    EXIT_PENDING: (logging.INFO, "submitted: answers pending in batches, a later run collects them"),
    EXIT_LOCKED: (logging.WARNING, "another run holds the output directory: nothing done, retry later"),
    EXIT_STOPPED: (logging.WARNING, "stopped by a signal: a rerun resumes"),
}

# What the command found out for its `finished` event (fingerprint, shards version, ...).
_facts: contextvars.ContextVar[dict] = contextvars.ContextVar("capgen_facts")


def note(**facts) -> None:
    """Adds facts to the `finished` event of the command running (no-op outside one)."""
    found = _facts.get(None)
    if found is not None:
        found.update(facts)


class UsageError(Exception):
    pass


class DirectoryLocked(Exception):
    """Another run holds the output directory."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


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
        f.close()
        raise DirectoryLocked(f"{out_dir} is in use by a running capgen ({holder}); wait for it or use another --out",
                              out_dir)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


async def run(config: RunConfig) -> int:
    check_input(config.captions, config.out)
    prompts = PromptSet(config.prompts)   # a template that cannot render fails here, before any request
    if config.dry_run:
        with spooled(config.captions, None) as source:
            return dry_run(config, prompts, source)
    lock = lock_out_dir(config.out_dir)
    stop = stop_on_sigterm()
    engine_log = config.out_dir / ENGINE_LOG
    try:
        with spooled(config.captions, config.out_dir) as source, \
                logs.divert_output(None if config.verbose else engine_log) as diverted:
            try:
                return await _run_locked(config, prompts, source, diverted)
            except EngineError as e:
                if diverted is None:
                    raise
                raise EngineError(f"{e} (the engine's own output is in {diverted})") from e
    finally:
        stop()
        lock.close()  # also on failure: a library caller may run again in this process
        if not config.verbose and engine_log.is_file() and engine_log.stat().st_size == 0:
            engine_log.unlink()  # a server engine prints nothing: no empty file to wonder about


def stop_on_sigterm() -> Callable[[], None]:
    """SIGTERM (what schedulers send), SIGHUP and Ctrl-C stop the run alike (gen.atomic's
    stop_signals). Killed outright, capgen left vLLM's engine processes running. An asyncio
    callback would have to wait for the loop, which vLLM's start-up blocks for minutes, so
    the handler raises wherever the main thread is; the loop's own wakeup (registered
    through asyncio) makes sure that thread wakes up though the signal may reach another
    thread. Stored answers stay; a rerun resumes. Returns the undo."""
    loop = asyncio.get_running_loop()
    held = contextlib.ExitStack()
    held.enter_context(stop_signals())
    original = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    added = []
    try:
        for s in STOP_SIGNALS:
            loop.add_signal_handler(s, lambda: None)
            added.append(s)
            signal.signal(s, on_stop_signal)   # held while the output files are renamed
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread, or no unix signals
        for s in added:
            loop.remove_signal_handler(s)
            signal.signal(s, original[s])
        held.close()
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
        for s in added:
            loop.remove_signal_handler(s)
            signal.signal(s, original[s])
        held.close()
    return undo


def check_input(captions: Path, out: Optional[Path]) -> None:
    # outputs/<stem>/ would be outputs/stdin/ or outputs/63/ (<(zcat ...)) whatever the data;
    # /dev/stdin redirected from a file is a regular file, but no better a name.
    if out is None and (is_stream(captions) or captions.parts[:2] in (("/", "dev"), ("/", "proc"))):
        raise UsageError(f"captions from a stream ({captions}) need --out DIR: a stream has no "
                         "file name to name the output directory after")
    if is_stream(captions):
        return
    if not captions.exists():
        raise UsageError(f"captions file not found: {captions}")
    if not captions.is_file():
        raise UsageError(f"captions: {captions} is not a file (a directory?); give a JSON lines "
                         "or parquet file, or - for standard input")


def _input_name(config: RunConfig) -> str:
    return "<stdin>" if config.captions == STDIN else str(config.captions)


def dry_run(config: RunConfig, prompts: PromptSet, source: Path) -> int:
    """The plan, whether curation would publish, and whether the engine could serve the run.
    Exit 1 when it could not, as the run would fail, and 2 when the run would be refused (a
    shrunken captions file, gen.publish): a pre-flight check is asked exactly that. Also
    with nothing to ask: the captions file grows before the scheduled run does."""
    from gen.plan import check_engine, plan
    fingerprint = generation_fingerprint(config, prompts.digest, decoding_constraints())
    note(fingerprint=fingerprint)
    model = resolve_model(config)
    records = read_captions(source, config.max_caption_chars, config.strict, _input_name(config))
    result = plan(records, config, prompts, fingerprint)
    result["engine"] = check_engine(config, model)
    result["refused"] = _refusal(config, result["captions"])
    cur, engine, price = result["curation"], result["engine"], result["cost"]
    bill = (f"cost ~{price['online']:g} online, ~{price['batch']:g} by batch ({price['note']})"
            if price["online"] is not None else price["note"])
    log.info("dry run: %d captions, %d cached, %d to request (%d-%d requests), ~%s prompt tokens, ~%s "
             "completion tokens (%s); %s; curation: %s (%s)", result["captions"], result["cached"],
             result["to_request"], result["requests_at_least"], result["requests_at_most"],
             result["prompt_tokens_estimate"], result["completion_tokens_estimate"],
             "from history" if result["completion_estimate_from"] == "history" else "at --max-tokens, an upper bound",
             bill, "a new version" if cur["new_version"] else "no new version", cur["reason"],
             extra={"fields": {"event": "dry_run", "plan": result}})
    if "batch" in result:
        b = result["batch"]
        log.info("batch mode: %d captions pending in %d open batches; %d would be submitted",
                 b["pending"], len(b["open_batches"]), b["to_submit"],
                 extra={"fields": {"event": "dry_run_batch", "batch": b}})
    for server in engine.get("servers", []):
        if server["error"]:
            log.warning("server %s: %s", server["url"], server["error"],
                        extra={"fields": {"event": "server_check", **server}})
    if not engine["ready"]:
        log.error("the engine could not serve this run: %s", "no server answers with the model "
                  f"{model!r}" if engine["engine"] == "openai" else f"no model directory {model}",
                  extra={"fields": {"event": "engine_check", "engine": engine}})
    if result["refused"]:
        log.error("the run would be refused: %s", result["refused"], extra={"fields": {"event": "refused"}})
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return EXIT_FAILED if not engine["ready"] else EXIT_USAGE if result["refused"] else EXIT_OK


def _refusal(config: RunConfig, captions: int) -> Optional[str]:
    """What gen.publish would refuse before the curation (a shrunken captions file, a
    shards/latest that is not capgen's), or None."""
    from gen.publish import PublishRefused, check_pointer, check_share, published_captions
    try:
        if config.curate:
            check_pointer(config.out_dir / "shards")
        check_share("captions", published_captions(config.out_dir), captions,
                    config.min_share_of_previous, str(config.captions))
    except PublishRefused as e:
        return str(e)
    return None


STAGING = ".staging"
OUTPUTS = ("queries.parquet", "captions.parquet", "rejects.jsonl", "report.html")


async def _run_locked(config: RunConfig, prompts: PromptSet, source: Path,
                      engine_log: Optional[Path] = None) -> int:
    """`source`: the captions as a regular file (a stream's copy); `engine_log`: where the
    engine's own output goes, if anywhere."""
    from gen.publish import ShrunkByFailures
    out_dir = config.out_dir
    staging = out_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)   # a killed run's; we hold the lock
    prepared, published = None, False
    try:
        try:
            if config.curate:
                from gen.publish import check_pointer
                check_pointer(out_dir / "shards")   # before paying for anything
            staging.mkdir()
            try:
                code, prepared, manifest = await _generate(config, prompts, source, staging, engine_log)
                if manifest is None:   # --batch-cancel
                    return code
            except ShrunkByFailures as e:   # a server's outage, not bad input: retry, exit 3
                note(outputs="previous")
                log.warning("%s", e, extra={"fields": {"event": "not_published", "kind": "failed_captions"}})
                return EXIT_INCOMPLETE
            with all_or_none():   # a stop signal waits: the previous state or the new one, not a mix
                _commit(out_dir, staging, prepared)
                published = True
        finally:
            if prepared is not None:
                prepared.discard()
            shutil.rmtree(staging, ignore_errors=True)
        if prepared is not None:
            from gen.publish import prune
            prune(out_dir / "shards", config.keep_versions)
        return _report(config, code, manifest)
    except BaseException as e:
        e.published = published   # for entry's last line: which state the outputs are in
        raise


def _report(config: RunConfig, code: int, manifest: dict) -> int:
    out_dir = config.out_dir
    c = manifest["counts"]
    log.info("done in %.1fs: %d captions, %d with queries (%d queries), %d cached, %d rejected "
             "inputs, %d rejected answers (%d kept in part), %d without answer; %d requests, %d tokens -> %s",
             manifest["timings"]["total_s"], c["captions"], c["captions_with_queries"], c["queries"],
             c["cached"], c["input_rejects"], c["rejected"], c["salvaged"], c["failed"], manifest["usage"]["requests"],
             manifest["usage"]["prompt_tokens"] + manifest["usage"]["completion_tokens"], out_dir,
             extra={"fields": {"event": "summary", "summary": manifest["counts"], "usage": manifest["usage"],
                               "timings": manifest["timings"],
                               "captions_per_s": round(c["captions"] / max(manifest["timings"]["total_s"], 1e-3), 3)}})
    note(captions=c["captions"], queries=c["queries"], failed=c["failed"], requests=manifest["usage"]["requests"])
    if "engine_log" in manifest["outputs"]:
        log.info("the engine's own output (warnings included) is in %s; -v shows it here instead",
                 out_dir / ENGINE_LOG, extra={"fields": {"event": "engine_log", "path": str(out_dir / ENGINE_LOG)}})
    if code == EXIT_PENDING:
        log.info("%d captions are in batches not yet finished; a later run collects them (exit %d)",
                 c["pending"], EXIT_PENDING, extra={"fields": {"event": "batch_pending", "pending": c["pending"]}})
    return code


def _no_caption(config: RunConfig, staging: Path, rejected: int) -> None:
    """Some bad lines are data; every line bad is the wrong file (a CSV, a JSON array): a
    usage error before anything is published, whatever --allow-shrink says, so the previous
    outputs stay. The rejects go beside them only where there are none to contradict."""
    out_dir = config.out_dir
    first = []
    with contextlib.suppress(OSError, ValueError):
        with (staging / "rejects.jsonl").open(encoding="utf-8") as f:
            for line, _ in zip(f, range(3)):
                r = json.loads(line)
                first.append(f"line {r.get('line')}: {r.get('reason')}")
    from gen.publish import published_captions
    if published_captions(out_dir) is None and (staging / "rejects.jsonl").is_file():
        os.replace(staging / "rejects.jsonl", out_dir / "rejects.jsonl")
        first.append(f"every reason in {out_dir / 'rejects.jsonl'}")
    else:
        first.append("the previous outputs were left as they were")
    raise UsageError(f"no line of {_input_name(config)} is a caption ({rejected} rejected: "
                     f"{'; '.join(first)}): check the file's format")


def _commit(out_dir: Path, staging: Path, prepared) -> None:
    """Renames only: the new version's folder first (unseen until shards/latest points at it,
    so a failure there changes nothing a reader sees), then the new files, the pointer, and
    the manifest last."""
    if prepared is not None:
        prepared.place()
    (out_dir / "manifest.json").unlink(missing_ok=True)
    for name in OUTPUTS:
        os.replace(staging / name, out_dir / name)
    if prepared is not None:
        prepared.commit()
    os.replace(staging / "manifest.json", out_dir / "manifest.json")


async def _generate(config: RunConfig, prompts: PromptSet, source: Path, staging: Path,
                    engine_log: Optional[Path]):
    """Generation, export and curation into `staging` and a hidden version folder: nothing
    a reader sees changes here. Returns (exit code, the prepared version, the manifest)."""
    started = time.time()
    out_dir = config.out_dir
    constraints = decoding_constraints()
    schema = constraints["caption"]   # the engine's own; gen.generate picks a short caption's
    fingerprint = generation_fingerprint(config, prompts.digest, constraints)
    note(fingerprint=fingerprint)
    model = resolve_model(config)
    store = AnswerStore(config.cache_path)
    engine = LazyEngine(lambda: build_engine(config, model, schema))
    progress = Progress(count_lines(source), bar=config.progress)
    read = lambda: read_captions(source, config.max_caption_chars, config.strict, _input_name(config))
    digest = CaptionDigest()   # of the pass that exports: what --dry-run compares against
    batches = batch_summary = None
    ray_engine: dict = {}      # --executor ray: an actor's engine, as describe() says
    try:
        try:
            if config.batch:   # gen/generate/batch.py: collect, submit, export what is answered
                from gen.generate.batch import run_batches
                stats, batches = await run_batches(config, prompts, store, model, schema, fingerprint, read, engine)
                if config.batch_cancel:   # nothing to export or publish: the outputs stay
                    return EXIT_OK, None, None
                generated_at = time.time()
                exported = export(digest.through(batches.counted(read())), store=store,
                                  fingerprint=fingerprint, model=model_identity(config.model), out_dir=staging,
                                  failures=stats.failures, pending=store.pending)
                exported_at = time.time()
                batch_summary = batches.summary()
            elif config.executor == "ray":
                from gen.generate.ray_executor import ExecutorUnavailable, generate_ray
                try:  # blocks this loop; nothing else runs on it meanwhile
                    stats = generate_ray(read(), config=config, model=model, schema=schema,
                                         store=store, fingerprint=fingerprint, on_progress=progress,
                                         describe=ray_engine)
                except ExecutorUnavailable as e:
                    raise UsageError(str(e)) from None
                generated_at = time.time()
                exported = export(digest.through(read()), store=store, fingerprint=fingerprint,
                                  model=model_identity(config.model), out_dir=staging, failures=stats.failures)
                exported_at = time.time()
            else:  # exports as it generates: the files are done moments after the last answer
                with Exporter(staging, model_identity(config.model)) as sink:
                    stats = await generate(digest.through(read()), engine=engine, prompts=prompts, store=store,
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
        "captions_digest": digest.hexdigest(),
        "captions_sha256": sha256_file(source),
        "fingerprint": fingerprint,
        "model": model_identity(config.model),
        "template_digest": prompts.digest,
        "templates": str(prompts.directory),
        "sampling": config.sampling.model_dump(),
        "repair_rounds": config.repair_rounds,
        "engine": (batches.describe() if batches is not None else
                   {**ray_engine, "executor": "ray", "actors": config.ray_actors} if ray_engine else engine.describe()),
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
            # In a batch not yet collected (batch mode): in no output file until a later run.
            "pending": exported.pending,
            "captions_with_queries": exported.captions_with_queries,
            "queries": exported.queries,
            "queries_by_type": dict(exported.queries_by_type),
            "rejects_by_stage": dict(exported.rejects),
        },
        "usage": {"requests": stats.requests, "prompt_tokens": stats.prompt_tokens,
                  "completion_tokens": stats.completion_tokens},
        "batch": batch_summary,
        # Batch mode: priced as batch lines (repairs sent online with --batch-repair online are
        # counted at the batch price too: a small share, at most one request in 70 or so).
        "cost": cost.spent({"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens},
                           config.pricing, batch=bool(config.batch)),
        "timings": {"started": started, "generate_s": round(generated_at - started, 3),
                    "export_s": round(exported_at - generated_at, 3),
                    "total_s": round(time.time() - started, 3)},
        "outputs": {"queries": "queries.parquet", "captions": "captions.parquet",
                    "rejects": "rejects.jsonl", "report": "report.html", "cache": str(config.cache_path)},
    }
    if engine_log is not None and engine_log.is_file() and engine_log.stat().st_size:
        manifest["outputs"]["engine_log"] = engine_log.name
    if stats.input_rejects and not stats.captions:
        _no_caption(config, staging, stats.input_rejects)
    from gen import publish
    publish.check_share(f"captions ({stats.input_rejects} lines rejected)" if stats.input_rejects else "captions",
                        publish.published_captions(out_dir), stats.captions, config.min_share_of_previous,
                        str(config.captions))
    prepared = None
    # Without queries only an existing shards/latest needs curating: it must not describe
    # other captions than the outputs beside it.
    if config.curate and (exported.queries or (out_dir / "shards" / "latest").is_symlink()):
        from gen.curate.judged import CANDIDATE_JUDGEMENTS, JUDGEMENTS
        for name in (JUDGEMENTS, CANDIDATE_JUDGEMENTS):   # curation reads them beside the run's files
            if (out_dir / name).is_file():
                os.symlink((out_dir / name).resolve(), staging / name)
        t = time.time()
        # --executor ray curates on the cluster too (partitions as Ray tasks; small runs in memory).
        curation = (config.curation.model_copy(update={"executor": "ray"}) if config.executor == "ray"
                    else config.curation)
        prepared = publish.prepare_version(staging, curation, out_dir / "shards",
                                           config.min_share_of_previous, generation=manifest,
                                           failed=stats.failed, name=out_dir)
        cur = prepared.result()
        manifest["curation"] = {k: cur[k] for k in ("version", "reused", "fingerprint", "stats", "files")}
        manifest["curation"]["dir"] = f"shards/{cur['version']}"
        manifest["timings"]["curate_s"] = round(time.time() - t, 3)
        manifest["timings"]["total_s"] = round(time.time() - started, 3)
        note(shards_version=cur["version"], shards_reused=cur["reused"])
        stats_ = cur["stats"]
        log.info("curated: %s pairs in shards/%s%s", stats_["pairs_out"], cur["version"],
                 " (unchanged inputs: latest version reused)" if cur["reused"] else "",
                 extra={"fields": {"event": "curated", "shards_version": cur["version"],
                                   "shards_reused": cur["reused"], "queries_in": stats_.get("queries_in"),
                                   "pairs": stats_["pairs_out"], "splits": stats_.get("splits"),
                                   "dropped_by_reason": stats_.get("dropped_by_reason"),
                                   "curate_s": manifest["timings"]["curate_s"]}})
    try:
        summary = exported.tally.summary()
        manifest["report"] = {k: v for k, v in summary.items() if k != "sample"}
        with atomic_path(staging / "report.html") as tmp:
            tmp.write_text(report.render(manifest, summary), encoding="utf-8")
        with atomic_path(staging / "manifest.json") as tmp:
            tmp.write_text(logs.json_line(manifest, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        if prepared is not None:
            prepared.discard()
        raise
    code = EXIT_PENDING if exported.pending else EXIT_INCOMPLETE if stats.failed or exported.unreadable else EXIT_OK
    return code, prepared, manifest


def start_event(config: RunConfig, command: str) -> tuple[str, dict]:
    """The `start` event: its text and the main settings. The API key lives only in the
    environment and is never among them; URLs lose any user, password or query string."""
    try:
        fingerprint = generation_fingerprint(config, PromptSet(config.prompts).digest, decoding_constraints())
    except Exception:   # bad templates: the command itself reports them, after this event
        fingerprint = None
    note(fingerprint=fingerprint)
    text = f"{command} started: {config.captions} -> {config.out_dir} ({config.engine}, {config.model})"
    return text, {"event": "start", "command": command, "capgen_version": __version__, "pid": os.getpid(),
            "fingerprint": fingerprint, "captions": str(config.captions), "out": str(config.out_dir),
            "cache": str(config.cache_path), "engine": config.engine, "model": config.model,
            "base_urls": [logs.public_url(u) for u in config.base_urls], "api_key_env": config.api_key_env,
            "executor": config.executor, "concurrency": config.concurrency,
            "repair_rounds": config.repair_rounds, "sampling": config.sampling.model_dump(),
            "curate": config.curate, "dry_run": config.dry_run, "force": config.force, "strict": config.strict,
            "batch": config.batch}


def entry(argv: Optional[list[str]], work: Callable[[RunConfig], int], command: str = "gen.run",
          load: Callable[[list[str]], RunConfig] = load_config,
          start: Callable[[RunConfig, str], tuple[str, dict]] = start_event) -> int:
    """What every capgen command shares: settings, logging, errors turned into exit codes,
    and the `start` and `finished` events a scheduler reads. The log format is known before
    the settings are checked, so that a JSON log is JSON from its first line to its last."""
    argv = sys.argv[1:] if argv is None else list(argv)
    started = time.monotonic()
    facts: dict = {}
    token = _facts.set(facts)
    with stop_signals():   # to the last line: a second Ctrl-C must not cut the clean-up short
        try:
            code = _entry(argv, work, command, load, start)
        except KeyboardInterrupt:   # a stop signal before the command's work began
            code = _stopped_early(argv)
        finally:
            _facts.reset(token)
        level, meaning = OUTCOMES.get(code, (logging.ERROR, "failed"))
        fields = {"event": "finished", "command": command, "exit_status": code, "outcome": meaning,
                  "fingerprint": None, "shards_version": None, "shards_reused": None,
                  "duration_s": round(time.monotonic() - started, 3), **facts}
        state = {"previous": "; the previous outputs were left as they were",
                 "new": "; the new outputs are complete"}.get(facts.get("outputs"), "")
        log.log(level, "%s finished: exit %d, %s%s", command, code, meaning, state, extra={"fields": fields})
    return code


def _stopped_early(argv: list[str]) -> int:
    """The stop line for a signal that came during start-up (settings, logging, imports):
    in the job's log format, though the signal may have cut its set-up short."""
    try:
        logs.setup(log_format_hint(argv))
    except Exception:
        logs.setup("text")
    note(outputs="previous")
    log.warning("stopped while starting: nothing was done", extra={"fields": {"event": "stopped"}})
    return EXIT_STOPPED


def _entry(argv: list[str], work: Callable, command: str, load: Callable, start: Callable) -> int:
    from gen.publish import PublishRefused
    fmt = log_format_hint(argv)
    logs.setup(fmt)
    try:
        config = load(argv)
    except ConfigError as e:
        if e.usage and fmt == "text":
            sys.stderr.write(e.usage)   # as argparse would show it
        log.error("%s", e, extra={"fields": {"event": "error", "kind": "usage"}})
        return EXIT_USAGE
    logs.setup(config.log_format)
    text, fields = start(config, command)
    log.info("%s", text, extra={"fields": fields})
    try:
        try:
            return work(config)
        except BaseException as e:
            # A stop signal that surfaced as another error (polars turns an exception raised
            # in its Python callbacks into a PanicException): still the stop it is.
            if stop_signalled() and not isinstance(e, (KeyboardInterrupt, asyncio.CancelledError)):
                raise Terminated(f"stopped ({type(e).__name__} on the way)") from e
            raise
    except DirectoryLocked as e:
        log.warning("%s", e, extra={"fields": {"event": "locked", "out": str(e.path)}})
        return EXIT_LOCKED
    except PublishRefused as e:
        note(outputs="previous")
        log.error("%s", e, extra={"fields": {"event": "error", "kind": "refused"}})
        return EXIT_USAGE
    except (UsageError, CaptionError, PromptError) as e:
        log.error("%s", e, extra={"fields": {"event": "error", "kind": "usage"}})
        return EXIT_USAGE
    except EngineError as e:
        log.error("engine failed: %s", e, extra={"fields": {"event": "error", "kind": "engine"}})
        return EXIT_FAILED
    except EngineUnusable as e:
        log.error("stopped: %s. Answers stored so far are kept and a rerun resumes from them; "
                  "no output file was replaced and nothing was published", e)
        return EXIT_FAILED
    except OSError as e:
        log.error("cannot read or write: %s", e, extra={"fields": {"event": "error", "kind": "io"}})
        return EXIT_FAILED
    except (asyncio.CancelledError, KeyboardInterrupt) as e:
        # gen.run's outputs, or what gen.curate (a Job) publishes to
        where = getattr(config, "out_dir", None) or getattr(config, "out", None) or config.run_dir / "shards"
        if getattr(e, "published", False):
            note(outputs="new")
            log.warning("stopped after the new outputs were complete: %s holds them", where,
                        extra={"fields": {"event": "stopped"}})
        else:
            note(outputs="previous")
            log.warning("stopped before the end: every answer received so far is stored, and a rerun "
                        "resumes from there; the previous outputs in %s were left as they were",
                        where, extra={"fields": {"event": "stopped"}})
        return EXIT_STOPPED
    except Exception as e:   # a defect: still one log line and a finished event, then exit 1
        log.exception("unexpected failure: %s: %s", type(e).__name__, e,
                      extra={"fields": {"event": "error", "kind": "unexpected"}})
        return EXIT_FAILED


def main(argv: Optional[list[str]] = None) -> int:
    return entry(argv, lambda config: asyncio.run(run(config)))


def cli() -> int:
    """`capgen` and `python -m gen.run`: main() in a process of our own."""
    from gen.export import skip_pandas_probe
    skip_pandas_probe()
    with stop_signals(after=signal.SIG_IGN):
        return main()


if __name__ == "__main__":
    sys.exit(cli())
