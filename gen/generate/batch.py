"""Batch mode: the captions go to a batch API as request files, and their answers come back
hours later, at about half the price of online requests.

A run (`--batch`, typically from cron) first collects every batch that has finished, then
submits the captions that are neither answered nor in a live batch, and returns: exit 4
while answers are pending, unless `--wait`. Each request line is exactly what the online
engine would send (gen.engines.openai.request_options), keyed by the caption's answer key
(custom_id); each answer goes through the same validation into the same store, and export
writes what is answered.

Two providers: an OpenAI-compatible server's files and batches API (the openai SDK), or a
directory (`--batch-dir`) where request files are written for a site's own queue, which
places the results beside them (vLLM's run_batch reads and writes these files as they are).

Crash safety. The store holds each batch from before its upload as an intent, keyed by the
digest of its request file; the file is uploaded as capgen-<digest>.jsonl and the batch
created with that digest in its metadata. A run killed anywhere in between finds, on the
next run, the batch (listing the provider's batches) or the file (listing its files) and
carries on from there; only when neither exists is the intent dropped and its captions
submitted afresh. So no request file is submitted twice. An answer is stored once per
caption and round: a batch collected again after a crash mid-download stores nothing twice.

Repair rounds go by default into a follow-up batch on the next run (the stored invalid answer
and its validation error make the repair request): they keep the batch price and need no
online server at collection time, at the cost of one more cycle for the few answers that need
it. `--batch-repair online` sends them online as soon as the invalid answer is collected.

Everything the provider sends is untrusted: files are downloaded up to a bound that follows
from the requests and --max-tokens, lines past their bound, not JSON, of another shape, for
captions never sent or seen twice are logged with the batch id and skipped; a caption that
got no usable answer is submitted again by the next run.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import os
import secrets
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Iterator, Optional, Union

from gen.atomic import atomic_path
from gen.config import RunConfig, answer_key
from gen.engines.base import EngineError, printable
from gen.engines.openai import _completion, reply_limit, request_options
from gen.engines.retry import EmptyAnswer
from gen.logs import json_line, public_url
from gen.generate import SHORT_CAPTION_SCHEMA, GenStats, ask_until_valid, rejection
from gen.generate.prompts import PromptSet
from gen.store import AnswerStore, BatchRequest, BatchRow
from gen.generate.validate import AnswerError, parse_answer
from schemas import Caption, Reject, is_short

log = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
FINAL = ("completed", "failed", "expired", "cancelled")
RUNNING = ("validating", "in_progress", "finalizing", "cancelling")
MAX_POLL = 600.0               # seconds between polls at most, with --wait
MAX_LISTED = 10_000            # batches or files looked through when reconciling
ERROR_LINE_BYTES = 65_536      # an error line holds a message, not an answer


class BatchError(EngineError):
    """The batch API refused or failed (exit 1); the message says what to change."""


class NoBatchApi(BatchError):
    """The server has no files or batches API at this URL (404/405): no batch can be checked."""


class TooLarge(BatchError):
    """A file past the bound its requests allow: read as no answers (its captions are asked
    again), unlike a download that fails, which leaves the batch to the next run."""


def checkpoint(name: str) -> None:
    """A named point of the lifecycle ('uploaded', 'created', 'downloading'); tests replace
    this to kill the run there."""


@dataclass
class State:
    """A batch as the provider reports it, checked."""
    status: str
    output: Optional[str] = None     # file ids (or paths, for a directory)
    errors: Optional[str] = None
    reason: Optional[str] = None


def _str(value: Any, limit: int = 200) -> Optional[str]:
    return printable(value, limit) if isinstance(value, str) and value else None


class Provider(ABC):
    name: str

    @abstractmethod
    def find_batch(self, digest: str, since: float) -> Optional[tuple[str, Optional[str]]]:
        """(batch id, file id) of a batch created for this request file, if any."""

    @abstractmethod
    def find_file(self, digest: str, since: float) -> Optional[str]:
        """The id of this request file uploaded, if it was."""

    @abstractmethod
    def upload(self, path: Path, digest: str) -> str: ...

    @abstractmethod
    def create(self, file_id: str, digest: str, requests: int) -> str: ...

    @abstractmethod
    def state(self, batch_id: str) -> State: ...

    @abstractmethod
    def download(self, file_id: str, dest: Path, limit: int) -> None:
        """The file's content into `dest`; BatchError past `limit` bytes."""

    @abstractmethod
    def cancel(self, batch_id: str) -> None: ...


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _file_name(digest: str) -> str:
    return f"capgen-{digest}.jsonl"


class ApiProvider(Provider):
    """An OpenAI-compatible server's files and batches API, through the openai SDK (its
    per-request cost does not matter at a few calls a run, unlike the online engine's)."""
    name = "api"

    def __init__(self, base_url: str, api_key: str, window: str, timeout: float, attempts: int):
        import openai
        self.openai = openai
        self.base_url = base_url
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=max(timeout, 60.0),
                                    max_retries=max(attempts - 1, 0))
        self.window = window
        self._secret = api_key if api_key != "EMPTY" else None
        # A connection lost while a file streams raises the transport's own error, not the
        # SDK's: httpx's, or httpx2's in later SDK releases.
        self._transport_errors = tuple(m.HTTPError for m in map(_module, ("httpx", "httpx2")) if m is not None)

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        o = self.openai
        try:
            return fn(*args, **kwargs)
        except o.APIStatusError as e:
            text = self._redact(printable(getattr(e, "message", str(e)), 300))
            if e.status_code in (404, 405):
                raise NoBatchApi(f"{self.base_url} has no batch API (HTTP {e.status_code} on {what}): run "
                                 "without --batch (online mode), or give a server with files and batches "
                                 "endpoints") from None
            if e.status_code in (400, 413) and any(w in text.lower() for w in ("size", "large", "limit", "quota",
                                                                              "exceed", "too many")):
                raise BatchError(f"{what} refused (HTTP {e.status_code}: {text}): lower --batch-max-bytes or "
                                 "--batch-max-requests to the provider's limits") from None
            raise BatchError(f"{what} failed: HTTP {e.status_code}: {text}") from None
        except o.APIError as e:   # no connection, a timeout, a reply that is not JSON
            raise BatchError(f"{what} failed: {type(e).__name__}: {self._redact(printable(e, 300))}") from None

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _listed(self, what: str, fn: Callable, **kwargs) -> Iterator[Any]:
        """The items of a paginated list, every page fetched through _call: the SDK's own
        iteration fetches the pages after the first outside it, where a failure is a raw
        SDK error."""
        page = self._call(what, fn, **kwargs)
        while True:
            yield from page.data or ()
            if not page.has_next_page():
                return
            page = self._call(f"{what} (next page)", page.get_next_page)

    def find_batch(self, digest, since):
        # Newest first: a batch made after the intent is among the first listed.
        for n, b in enumerate(self._listed("GET /batches", self.client.batches.list, limit=100)):
            meta = getattr(b, "metadata", None)
            if isinstance(meta, dict) and meta.get("capgen_digest") == digest and isinstance(b.id, str):
                return b.id, _str(getattr(b, "input_file_id", None))
            created = getattr(b, "created_at", None)
            if n >= MAX_LISTED or (isinstance(created, (int, float)) and created < since - 86400):
                return None
        return None

    def find_file(self, digest, since):
        name = _file_name(digest)
        for n, f in enumerate(self._listed("GET /files", self.client.files.list, purpose="batch")):
            if getattr(f, "filename", None) == name and isinstance(f.id, str):
                return f.id
            if n >= MAX_LISTED:
                return None
        return None

    def upload(self, path, digest):
        with path.open("rb") as f:
            uploaded = self._call("POST /files", self.client.files.create,
                                  file=(_file_name(digest), f, "application/jsonl"), purpose="batch")
        if not _str(getattr(uploaded, "id", None)):
            raise BatchError("POST /files answered without a file id")
        return uploaded.id

    def create(self, file_id, digest, requests):
        # Sent once: a create whose reply is lost may have made the batch, and a retry would
        # make (and bill) a second one from the same file. The batch is looked up by its
        # digest instead; found nowhere, the intent stays, and the next run's reconcile finds
        # the batch or creates it from the uploaded file.
        try:
            made = self._call("POST /batches", self.client.with_options(max_retries=0).batches.create,
                              input_file_id=file_id, endpoint=ENDPOINT, completion_window=self.window,
                              metadata={"capgen_digest": digest, "capgen_requests": str(requests)})
            if not _str(getattr(made, "id", None)):
                raise BatchError("POST /batches answered without a batch id")
            return made.id
        except BatchError as e:
            try:
                found = self.find_batch(digest, time.time())
            except BatchError:
                found = None
            if not found:
                raise
            log.warning("batch %s: created although POST /batches failed (%s)", found[0], printable(e, 200),
                        extra={"fields": {"event": "batch_recovered", "batch_id": found[0]}})
            return found[0]

    def state(self, batch_id):
        def retrieve():
            try:
                return self.client.batches.retrieve(batch_id)
            except self.openai.NotFoundError:
                return None
        b = self._call(f"GET /batches/{batch_id}", retrieve)
        if b is None:
            # Gone only if this server lists batches at all: a wrong --base-url or a route
            # that 404s must not close live batches, whose captions would be paid for twice.
            self._call("GET /batches", self.client.batches.list, limit=1)
            return State("failed", reason="the provider no longer knows this batch")
        status = getattr(b, "status", None)
        reason = None
        errors = getattr(getattr(b, "errors", None), "data", None)
        if isinstance(errors, list) and errors:
            reason = "; ".join(f"{_str(getattr(e, 'code', None)) or 'error'}: {_str(getattr(e, 'message', None))}"
                               + (f" (line {e.line})" if type(getattr(e, "line", None)) is int else "")
                               for e in errors[:5])
        elif status in ("expired", "cancelled"):
            reason = f"the batch {status}"
        # Not a string: shown as it came, and never equal to a known status.
        return State(status if isinstance(status, str) else f"{type(status).__name__} {printable(status, 40)}", _str(getattr(b, "output_file_id", None)),
                     _str(getattr(b, "error_file_id", None)), reason)

    def download(self, file_id, dest, limit):
        size = 0
        try:
            with self.client.files.with_streaming_response.content(file_id) as r, atomic_path(dest) as tmp, \
                    tmp.open("wb") as out:
                for chunk in r.iter_bytes(1 << 16):
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(f"file {file_id} is larger than {limit:,} bytes, more than its requests "
                                       "can hold at --max-tokens; not read")
                    out.write(chunk)
                    checkpoint("downloading")
        except (self.openai.APIError, *self._transport_errors) as e:   # the batch stays open: downloaded again
            raise BatchError(f"GET /files/{file_id}/content failed: {type(e).__name__}: "
                             f"{self._redact(printable(e, 300))}") from None

    def cancel(self, batch_id):
        self._call(f"POST /batches/{batch_id}/cancel", self.client.batches.cancel, batch_id)


class DirProvider(Provider):
    """A directory on a shared file system: capgen writes <name>.requests.jsonl; the site's
    queue runs them (vLLM: `python -m vllm.entrypoints.openai.run_batch -i X.requests.jsonl
    -o X.results.jsonl.part --model DIR && mv X.results.jsonl.part X.results.jsonl`) and
    places X.results.jsonl beside it, whole (renamed into place). An X.errors.jsonl, if
    present, is read as a provider's error file."""
    name = "dir"

    def __init__(self, directory: Path):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: str, kind: str) -> Path:
        return self.dir / f"capgen-{digest}.{kind}.jsonl"

    def find_batch(self, digest, since):
        path = self._path(digest, "requests")
        return (f"dir:{digest}", str(path)) if path.is_file() else None

    def find_file(self, digest, since):
        return None

    def upload(self, path, digest):
        with atomic_path(self._path(digest, "requests")) as tmp:
            tmp.write_bytes(path.read_bytes())
            tmp.chmod(0o644)   # a queue may run as another user
        return str(self._path(digest, "requests"))

    def create(self, file_id, digest, requests):
        return f"dir:{digest}"

    def state(self, batch_id):
        digest = batch_id.removeprefix("dir:")
        results, errors = self._path(digest, "results"), self._path(digest, "errors")
        if results.is_file():
            return State("completed", str(results), str(errors) if errors.is_file() else None)
        if not self._path(digest, "requests").is_file():
            return State("cancelled", None, str(errors) if errors.is_file() else None,
                         "the request file is gone and no results came")
        return State("in_progress")

    def download(self, file_id, dest, limit):
        if Path(file_id).stat().st_size > limit:
            raise TooLarge(f"{file_id} is larger than {limit:,} bytes, more than its requests can hold at "
                             "--max-tokens; not read")
        with atomic_path(dest) as tmp:
            tmp.write_bytes(Path(file_id).read_bytes())

    def cancel(self, batch_id):
        self._path(batch_id.removeprefix("dir:"), "requests").unlink(missing_ok=True)


def provider_for(config: RunConfig) -> Provider:
    if config.batch_dir is not None:
        return DirProvider(config.batch_dir)
    from gen.engines.openai import DEFAULT_BASE_URL
    url = (config.base_urls or [os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL])[0]
    if len(config.base_urls) > 1:
        log.warning("batch mode submits to one server: %s (the first --base-url)", url)
    return ApiProvider(url, os.environ.get(config.api_key_env) or "EMPTY", config.batch_window,
                       config.timeout, config.max_attempts)


@dataclass
class BatchStats:
    submitted: list[dict] = field(default_factory=list)    # {batch_id, requests}
    collected: list[dict] = field(default_factory=list)    # {batch_id, status, answered, tokens...}
    cancelled: list[str] = field(default_factory=list)
    oddities: int = 0

    def usage(self) -> dict[str, Any]:
        """The token usage of the batches collected in this run: what the provider bills at
        its batch price (per batch, and in total)."""
        return {"batches": [{k: c[k] for k in ("batch_id", "requests", "prompt_tokens", "completion_tokens")}
                            for c in self.collected],
                "requests": sum(c["requests"] for c in self.collected),
                "prompt_tokens": sum(c["prompt_tokens"] for c in self.collected),
                "completion_tokens": sum(c["completion_tokens"] for c in self.collected)}


class Batches:
    """One run's batch lifecycle over one store and one provider."""

    def __init__(self, config: RunConfig, prompts: PromptSet, store: AnswerStore, model: str,
                 schema: dict, provider: Provider, stats: GenStats):
        self.config, self.prompts, self.store, self.provider = config, prompts, store, provider
        self.model, self.schema, self.stats = model, schema, stats
        self.work = config.out_dir / "batches"
        self.line_limit = reply_limit(config.sampling.max_tokens) + 8192
        self.batch = BatchStats()
        # Keys whose request failed in this run, and how often: submitted again at once, up to
        # --max-attempts times a run, so that --wait cannot loop on a caption the provider
        # always fails.
        self.failed_here: Counter[str] = Counter()
        self.answered: set[str] = set()      # keys answered by the batches collected in this run
        self.to_repair: list[tuple[str, BatchRequest, str, str]] = []   # --batch-repair online
        # Finished batches whose files failed to download in this run, and how often: tried
        # again up to --max-attempts times, so that --wait cannot loop on a file the provider
        # never serves; they stay open for the next run.
        self.unfetched: Counter[str] = Counter()
        self.unchecked: Counter[str] = Counter()   # the same for a batch whose status could not be read
        self._since = time.time() if config.force else 0.0   # with --force, only this run's answers count
        self.fingerprint = ""

    # ------------------------------------------------------------------ reconcile and collect

    def reconcile(self) -> None:
        """Intents from a run that stopped between recording and creating a batch."""
        for row in self.store.open_batches():
            if row.status != "intent":
                continue
            found = self.provider.find_batch(row.digest, row.created)
            if found:
                log.warning("batch %s was created by a run that stopped before recording it; collecting it",
                            found[0], extra={"fields": {"event": "batch_recovered", "batch_id": found[0]}})
                self.store.batch_created(row.digest, found[0], found[1])
                continue
            file_id = self.provider.find_file(row.digest, row.created)
            if file_id:
                batch_id = self.provider.create(file_id, row.digest, row.requests)
                checkpoint("created")
                self.store.batch_created(row.digest, batch_id, file_id)
                log.warning("request file %s was uploaded by a run that stopped before creating its batch; "
                            "batch %s created from it", file_id, batch_id,
                            extra={"fields": {"event": "batch_recovered", "batch_id": batch_id}})
                continue
            log.warning("a request file of %d captions was never uploaded (the run stopped first); they are "
                        "submitted again", row.requests,
                        extra={"fields": {"event": "batch_dropped", "digest": row.digest}})
            self.store.close_batch(row.digest, "dropped", None)

    def collect(self) -> int:
        """Every finished batch into the store; the number still running (a finished batch
        whose files could not be downloaded counts as running while this run tries again)."""
        running = 0
        for row in self.store.open_batches():
            if row.status != "live" or max(self.unfetched[row.batch_id], self.unchecked[row.batch_id]) \
                    >= self.config.max_attempts:
                continue
            try:
                state = self.provider.state(row.batch_id)
            except NoBatchApi:
                raise   # every batch alike: the run stops, naming the URL
            except BatchError as e:
                # One batch's status out of reach (a 5xx, a lost connection) must not stop the
                # others from being collected; it stays live and is asked about again.
                self.unchecked[row.batch_id] += 1
                log.warning("batch %s: %s; it stays open and is checked again", row.batch_id, printable(e, 300),
                            extra={"fields": {"event": "batch_check_failed", "batch_id": row.batch_id,
                                              "error": printable(e, 300)}})
                running += self.unchecked[row.batch_id] < self.config.max_attempts
                continue
            if state.status not in FINAL:
                if state.status not in RUNNING:
                    log.warning("batch %s: unknown status %r; taken as still running", row.batch_id,
                                printable(state.status, 60))
                running += 1
                continue
            expected = self.store.batch_requests(row.digest)
            # Every file before any answer is stored: a batch left open stores nothing twice
            # when it is collected later, and one batch's files do not stop the others'.
            try:
                files = self._download(row, state, len(expected))
            except BatchError as e:
                self.unfetched[row.batch_id] += 1
                log.warning("batch %s (%s): %s; it stays open and a later run downloads it again", row.batch_id,
                            state.status, printable(e, 300),
                            extra={"fields": {"event": "batch_download_failed", "batch_id": row.batch_id,
                                              "error": printable(e, 300)}})
                running += self.unfetched[row.batch_id] < self.config.max_attempts
                continue
            self._collect(row, state, expected, files)
        return running

    def _download(self, row: BatchRow, state: State, n: int) -> list[tuple[str, Path]]:
        """(kind, local path) of the batch's output and error files, downloaded."""
        self.work.mkdir(parents=True, exist_ok=True)
        files: list[tuple[str, Path]] = []
        try:
            for kind, file_id, limit in (("output", state.output, n * self.line_limit + (1 << 20)),
                                         ("errors", state.errors, n * ERROR_LINE_BYTES + (1 << 20))):
                if not file_id:
                    continue
                local = self.work / f"{row.batch_id.replace(':', '-')}.{kind}.jsonl"
                try:
                    self.provider.download(file_id, local, limit)
                except TooLarge as e:
                    self._odd(row.batch_id, f"{kind} file: {e}")
                    continue
                files.append((kind, local))
        except BatchError:
            for _, local in files:
                local.unlink(missing_ok=True)
            raise
        return files

    def _collect(self, row: BatchRow, state: State, expected: dict[str, BatchRequest],
                 files: list[tuple[str, Path]]) -> None:
        bid = row.batch_id
        self._opened = row.created
        seen: set[str] = set()
        tally = {"answered": 0, "prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
        n = len(expected)
        for kind, local in files:
            with local.open("rb") as f:
                for number, line in enumerate(_lines(f, self.line_limit if kind == "output" else ERROR_LINE_BYTES),
                                              1):
                    self._line(bid, kind, number, line, expected, seen, tally)
            local.unlink()
        missing = [k for k in expected if k not in seen]
        if missing:
            log.warning("batch %s (%s): %d captions without an answer line%s; they are submitted again",
                        bid, state.status, len(missing), f" ({state.reason})" if state.reason else "",
                        extra={"fields": {"event": "batch_missing", "batch_id": bid, "status": state.status,
                                          "reason": state.reason, "captions": len(missing)}})
        for key in missing:
            self.stats.failures[key] = f"batch {bid} {state.status}" + (f": {state.reason}" if state.reason else "")
            self.failed_here[key] += 1
        self.store.close_batch(row.digest, state.status, state.reason, tally["answered"],
                               tally["prompt_tokens"], tally["completion_tokens"])
        self.batch.collected.append({"batch_id": bid, "status": state.status, "reason": state.reason,
                                     "captions": n, **tally})
        log.info("batch %s %s: %d of %d captions answered", bid, state.status, tally["answered"], n,
                 extra={"fields": {"event": "batch_collected", "batch_id": bid, "status": state.status,
                                   "reason": state.reason, "captions": n, **tally}})

    def _odd(self, bid: str, what: str) -> None:
        self.batch.oddities += 1
        log.warning("batch %s: %s", bid, what, extra={"fields": {"event": "batch_oddity", "batch_id": bid,
                                                                  "what": what}})

    def _line(self, bid: str, kind: str, number: int, line: Optional[bytes], expected: dict[str, BatchRequest],
              seen: set[str], tally: dict) -> None:
        where = f"{kind} line {number}"
        if line is None:
            self._odd(bid, f"{where}: longer than {self.line_limit:,} bytes; skipped")
            return
        if not line.strip():
            return
        try:
            data = json.loads(line)
        except (ValueError, RecursionError):
            self._odd(bid, f"{where}: not JSON (cut short?): {printable(line[:80].decode('utf-8', 'replace'))!r}")
            return
        key = data.get("custom_id") if isinstance(data, dict) else None
        if not isinstance(key, str) or key not in expected:
            self._odd(bid, f"{where}: custom_id {printable(key, 80)!r} was not sent in this batch; skipped")
            return
        if key in seen:
            self._odd(bid, f"{where}: a second line for custom_id {key}; the first one kept")
            return
        seen.add(key)
        req = expected[key]
        response = data.get("response")
        body = response.get("body") if isinstance(response, dict) else None
        code = response.get("status_code") if isinstance(response, dict) else None
        error = data.get("error")
        if error or code != 200 or not isinstance(body, dict):
            what = error if error else (body.get("error") if isinstance(body, dict) else body)
            if isinstance(what, dict):
                what = what.get("message") or what.get("code") or what
            reason = f"batch {bid}: HTTP {printable(code, 10)}: {printable(what, 200)}"
            self._failed(key, req, reason)
            return
        try:
            done = _completion(body, f"batch {bid}")
        except EmptyAnswer as e:
            self._failed(key, req, f"batch {bid}: {e}")
            return
        # Billed by the provider whatever becomes of the answer: counted here.
        tally["requests"] += 1
        tally["prompt_tokens"] += done.prompt_tokens
        tally["completion_tokens"] += done.completion_tokens
        self.stats.requests += 1
        self.stats.prompt_tokens += done.prompt_tokens
        self.stats.completion_tokens += done.completion_tokens
        tally["answered"] += 1
        stored = self.store.get(key)
        if stored is not None and stored.requests > req.round and self.store.has(key, self._opened, 0):
            return   # stored since the batch was made: collected before a crash, or by another run
        counts = dict(requests=req.round + 1, prompt_tokens=req.prompt_tokens + done.prompt_tokens,
                      completion_tokens=req.completion_tokens + done.completion_tokens)
        try:
            answer = parse_answer(done.text, req.text, done.refusal)
        except AnswerError as e:
            self.store.put(key, "rejected", answer=None, raw=done.text, reason=rejection(req.round, str(e)), **counts)
            self.answered.add(key)
            if req.round < self.config.repair_rounds:
                online = self.config.batch_repair == "online"
                if online:
                    self.to_repair.append((key, req, done.text, str(e)))
                log.info("caption %s: invalid answer in batch %s; a repair round goes %s",
                         req.caption_id, bid, "online" if online else "into the next batch")
            else:
                self.stats.rejected += 1
            return
        self.store.put(key, "ok", answer=answer.model_dump_json(), raw=done.text, reason=None, **counts)
        self.answered.add(key)
        self.stats.accepted += 1
        self.stats.repaired += req.round > 0

    def _failed(self, key: str, req: BatchRequest, reason: str) -> None:
        log.warning("caption %s: no answer (%s); submitted again next run", req.caption_id, printable(reason, 300),
                    extra={"fields": {"event": "batch_line_failed", "caption_id": req.caption_id,
                                      "reason": printable(reason, 300)}})
        self.stats.failures[key] = reason
        self.failed_here[key] += 1

    # ------------------------------------------------------------------ submit

    def submittable(self, records: Iterable[Union[Caption, Reject]]) -> Iterator[tuple[Caption, str, Optional[str]]]:
        """(caption, key, None) for each caption to submit, and (caption, key, 'pending') for
        one in a live batch; answered ones and input rejects are passed over."""
        since = self._since
        asked: set[str] = set()
        for rec in records:
            if isinstance(rec, Reject):
                continue
            key = answer_key(self.fingerprint, rec.text)
            if key in asked or self.store.has(key, since, self.config.repair_rounds):
                continue
            if self.store.pending(key):
                yield rec, key, "pending"
                continue
            if self.failed_here[key] >= self.config.max_attempts:
                continue
            asked.add(key)
            yield rec, key, None

    def _request(self, caption: Caption, key: str) -> tuple[bytes, BatchRequest]:
        messages = self.prompts.messages(caption)
        round_, pt, ct = 0, 0, 0
        stored = self.store.get(key)
        # An invalid answer with repair rounds left (in this run's view: stored since `since`
        # with raw text): the repair request shows the model that answer and its error.
        if stored is not None and stored.status == "rejected" and self.store.has(key, self._since, 0) \
                and isinstance(stored.raw, str):
            try:
                parse_answer(stored.raw, caption.text)
            except AnswerError as e:
                messages = self.prompts.repair(messages, stored.raw, str(e))
                round_, pt, ct = stored.requests, stored.prompt_tokens, stored.completion_tokens
        schema = SHORT_CAPTION_SCHEMA if is_short(caption.text) else self.schema
        body = {"messages": messages, **request_options(self.model, self.config.sampling, schema,
                                                        "json_schema", self.config.disable_thinking)}
        line = json_line({"custom_id": key, "method": "POST", "url": ENDPOINT, "body": body}).encode("utf-8") + b"\n"
        return line, BatchRequest(key, caption.id, caption.text, round_, pt, ct)

    def submit(self, todo: Iterable[tuple[Caption, str]]) -> int:
        """Request files of at most --batch-max-requests lines and --batch-max-bytes each."""
        lines: list[bytes] = []
        reqs: list[BatchRequest] = []
        size = submitted = 0
        for caption, key in todo:
            line, req = self._request(caption, key)
            if len(line) > self.config.batch_max_bytes:
                self._failed(key, req, f"its request is {len(line):,} bytes, more than --batch-max-bytes "
                                       f"({self.config.batch_max_bytes:,}) allows one file")
                continue
            if lines and (len(lines) == self.config.batch_max_requests or size + len(line) > self.config.batch_max_bytes):
                submitted += self._submit(lines, reqs)
                lines, reqs, size = [], [], 0
            lines.append(line)
            reqs.append(req)
            size += len(line)
        if lines:
            submitted += self._submit(lines, reqs)
        return submitted

    def _submit(self, lines: list[bytes], reqs: list[BatchRequest]) -> int:
        blob = b"".join(lines)
        # The file's digest, and a nonce: the same captions submitted again after a failed
        # batch are a new intent, which the provider's listing must not confuse with the old.
        digest = f"{hashlib.sha256(blob).hexdigest()[:48]}-{secrets.token_hex(8)}"
        self.work.mkdir(parents=True, exist_ok=True)
        path = self.work / _file_name(digest)
        with atomic_path(path) as tmp:
            tmp.write_bytes(blob)
        # The intent, before anything leaves this machine. Left as it is when the upload or the
        # create is refused: the next run lists the provider's files and batches before it
        # drops an intent, so one whose create went through after all is still found.
        self.store.reserve_batch(digest, reqs)
        file_id = self.provider.upload(path, digest)
        checkpoint("uploaded")
        batch_id = self.provider.create(file_id, digest, len(reqs))
        checkpoint("created")
        self.store.batch_created(digest, batch_id, file_id)
        path.unlink(missing_ok=True)
        self.stats.requested += len(reqs)
        self.batch.submitted.append({"batch_id": batch_id, "requests": len(reqs), "bytes": len(blob)})
        log.info("batch %s submitted: %d captions, %d bytes", batch_id, len(reqs), len(blob),
                 extra={"fields": {"event": "batch_submitted", "batch_id": batch_id, "captions": len(reqs),
                                   "bytes": len(blob)}})
        return len(reqs)

    def counted(self, records: Iterable[Union[Caption, Reject]]) -> Iterator[Union[Caption, Reject]]:
        """The export pass's records, counting what collecting and submitting did not:
        captions, input rejects, and those answered by an earlier run."""
        for rec in records:
            if isinstance(rec, Reject):
                self.stats.input_rejects += 1
            else:
                self.stats.captions += 1
                key = answer_key(self.fingerprint, rec.text)
                if key not in self.answered and self.store.has(key, 0.0, self.config.repair_rounds):
                    self.stats.cached += 1
            yield rec

    def describe(self) -> dict[str, Any]:
        where = (str(self.provider.dir) if isinstance(self.provider, DirProvider)
                 else public_url(self.provider.base_url))
        return {"engine": "batch", "provider": self.provider.name, "at": where}

    def summary(self) -> dict[str, Any]:
        """The manifest's `batch`: what this run submitted and collected, what is still open."""
        return {"provider": self.provider.name, "submitted": self.batch.submitted,
                "collected": self.batch.collected, "cancelled": self.batch.cancelled,
                "open": [{"batch_id": r.batch_id, "requests": r.requests} for r in self.store.open_batches()],
                "oddities": self.batch.oddities, "usage": self.batch.usage()}

    def cancel_all(self) -> None:
        for row in self.store.open_batches():
            # A batch whose files failed to download has finished: nothing to cancel.
            if row.status == "live" and row.batch_id not in self.unfetched:
                self.provider.cancel(row.batch_id)
                self.batch.cancelled.append(row.batch_id)
                log.info("batch %s: cancel asked; the next run collects what it answered and submits the rest "
                         "again", row.batch_id, extra={"fields": {"event": "batch_cancel", "batch_id": row.batch_id}})

    async def repair_online(self, engine) -> None:
        """--batch-repair online: the repair rounds of this run's invalid batch answers, as
        online requests (gen.generate's ask_until_valid). One that gets no answer stays stored
        as invalid with rounds left, so the next run puts its repair into a batch."""
        slots = asyncio.Semaphore(self.config.concurrency)

        async def one(key: str, req: BatchRequest, raw: str, error: str) -> None:
            caption = Caption(id=req.caption_id, text=req.text)
            first = self.prompts.messages(caption)
            schema = SHORT_CAPTION_SCHEMA if is_short(caption.text) else None
            completions: list = []
            async with slots:
                try:
                    answer, error = await ask_until_valid(
                        engine, self.prompts.repair(first, raw, error), schema,
                        lambda done: parse_answer(done.text, caption.text, done.refusal),
                        lambda _, text, why: self.prompts.repair(first, text, why),
                        self.config.repair_rounds - req.round - 1, completions)
                except EngineError as e:
                    log.warning("caption %s: online repair got no answer (%s); the next run repairs it in a batch",
                                req.caption_id, printable(e, 200))
                    return
            stored = self.store.get(key)
            counts = dict(requests=stored.requests + len(completions),
                          prompt_tokens=stored.prompt_tokens + sum(c.prompt_tokens for c in completions),
                          completion_tokens=stored.completion_tokens + sum(c.completion_tokens for c in completions))
            self.stats.requests += len(completions)
            self.stats.prompt_tokens += sum(c.prompt_tokens for c in completions)
            self.stats.completion_tokens += sum(c.completion_tokens for c in completions)
            if error is None:
                self.store.put(key, "ok", answer=answer.model_dump_json(), raw=completions[-1].text, reason=None,
                               **counts)
                self.stats.accepted += 1
                self.stats.repaired += 1
            else:
                self.store.put(key, "rejected", answer=None, raw=completions[-1].text,
                               reason=rejection(counts["requests"] - 1, error), **counts)
                self.stats.rejected += 1

        todo, self.to_repair = self.to_repair, []
        await asyncio.gather(*(one(*item) for item in todo))

    async def run(self, read: Callable[[], Iterable[Union[Caption, Reject]]], fingerprint: str,
                  engine=None, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> int:
        """Collect, submit, and with --wait repeat until nothing is pending. The number of
        captions still pending."""
        self.fingerprint = fingerprint
        self.reconcile()
        if self.config.batch_cancel:
            self.collect()
            self.cancel_all()
            return sum(r.requests for r in self.store.open_batches())
        pause = self.config.batch_poll
        while True:
            running = self.collect()
            if self.to_repair and engine is not None:
                await self.repair_online(engine)
            todo = ((c, k) for c, k, state in self.submittable(read()) if state is None)
            submitted = self.submit(todo)
            if not self.config.wait or (running == 0 and submitted == 0):
                break
            await sleep(pause)
            pause = min(pause * 2, MAX_POLL)
        # A caption counts as failed when the run ends without its answer and outside any batch.
        for key in [k for k in self.stats.failures if self.store.get(k) is not None or self.store.pending(k)]:
            del self.stats.failures[key]
        self.stats.failed = len(self.stats.failures)
        return sum(r.requests for r in self.store.open_batches())


async def run_batches(config: RunConfig, prompts: PromptSet, store: AnswerStore, model: str, schema: dict,
                      fingerprint: str, read: Callable[[], Iterable[Union[Caption, Reject]]],
                      engine) -> tuple[GenStats, Batches]:
    """gen.run's batch mode: collect, submit (and with --wait, poll); `engine` serves the
    repair rounds with --batch-repair online."""
    stats = GenStats()
    batches = Batches(config, prompts, store, model, schema, provider_for(config), stats)
    pending = await batches.run(read, fingerprint, engine if config.batch_repair == "online" else None)
    if config.batch_cancel:
        log.info("cancel asked for %d batches (%d captions)", len(batches.batch.cancelled), pending,
                 extra={"fields": {"event": "batch_cancelled", "batches": batches.batch.cancelled}})
    return stats, batches


def _lines(f, limit: int) -> Iterator[Optional[bytes]]:
    """Lines of at most `limit` bytes; None for one longer (the rest of it is skipped)."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(1 << 20)
            yield None
            continue
        yield line
