"""`--dry-run`: what a run would generate and roughly what it would cost, without an LLM.

Reads the captions and the answer store (read-only), so the plan is exact about which
captions would be requested. Token figures come from the store's history of this
fingerprint when it has answers for this input (what this model and template really cost
per request); otherwise the prompt's from characters, at 2.2 characters per token, measured
with Qwen2.5's tokenizer on the bundled template (gen.engines.cost), and the completion's from
--max-tokens, an upper bound. With prices (--price-in, --price-out) it prints the bill,
online and through a batch API; without, it says the cost is unknown.
It also says whether curation would publish a new shard version, and whether the engine
could serve the run: each server is asked for its model list (no generation is paid for).
"""
from __future__ import annotations

import http.client
import json
import os
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Union

from gen.input.captions import CaptionDigest
from gen.config import RunConfig, answer_key
from gen.engines.cost import CHARS_PER_TOKEN, bill, prompt_chars as chars_of
from gen.logs import public_url
from gen.generate.prompts import PromptSet
from gen.store import KEPT
from schemas import Caption, Reject

PROBE_TIMEOUT = 5.0          # seconds per server; a pre-flight check must not hang a job
PROBE_MAX_BYTES = 1 << 20    # a model list is a few KB; the server's reply is untrusted


class _Stored:
    """The answer store, read-only. Which keys it already answers is asked a chunk at a time:
    a store shared by many runs can hold far more keys than this input has, and loading
    them all cost memory. Under --force nothing counts as answered, but the store's token
    history still prices the plan."""

    def __init__(self, cache: Path, force: bool):
        self.db = _read_only(cache) if cache.is_file() else None
        self.force = force

    def which(self, keys: list[str], repair_rounds: int) -> set[str]:
        if self.db is None or self.force or not keys:
            return set()
        marks = ",".join("?" * len(keys))
        return {k for (k,) in self._query(f"SELECT key FROM answers WHERE key IN ({marks}) AND {KEPT}",
                                          [*keys, repair_rounds])}

    def pending(self, keys: list[str]) -> set[str]:
        """Those of `keys` in a batch not yet collected (batch mode)."""
        if self.db is None or not keys:
            return set()
        marks = ",".join("?" * len(keys))
        return {k for (k,) in self._query(f"SELECT key FROM batch_requests WHERE key IN ({marks})", keys)}

    def open_batches(self) -> list[dict]:
        rows = self._query("SELECT batch_id, status, requests, created FROM batches "
                           "WHERE status IN ('intent', 'live') ORDER BY created") if self.db else []
        return [{"batch_id": b, "status": s, "requests": n, "created": c} for b, s, n, c in rows]

    def usage(self, keys: list[str]) -> tuple[int, int, int]:
        """Prompt tokens, completion tokens and requests the stored answers of `keys` cost
        (keys are of one fingerprint: this is that fingerprint's history)."""
        if self.db is None or not keys:
            return 0, 0, 0
        rows = self._query(f"SELECT SUM(prompt_tokens), SUM(completion_tokens), SUM(requests) FROM answers "
                           f"WHERE requests > 0 AND key IN ({','.join('?' * len(keys))})", keys)
        return tuple(int(v or 0) for v in rows[0]) if rows else (0, 0, 0)

    def _query(self, sql: str, args=()) -> list[tuple]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError:  # not a store, or no answers table yet: nothing is known
            return []

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


def _read_only(cache: Path) -> sqlite3.Connection:
    """The store, opened so that nothing is written beside it. mode=ro alone still makes the
    WAL's -wal and -shm files where a run left none. With none there, every answer is in the
    main file and nobody is writing: immutable reads it with no lock and no WAL. With them
    there (a run at work, or killed) the answers may still be in the WAL: read through it."""
    uri = Path(cache).resolve().as_uri()
    if any(Path(f"{cache}{suffix}").exists() for suffix in ("-wal", "-shm")):
        return sqlite3.connect(f"{uri}?mode=ro", uri=True)
    return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True)


def _chunks(items: Iterable, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def cost_outlook(prompt_tokens: float, completion_tokens: float, config: RunConfig,
                 completion_from: str) -> dict[str, Any]:
    """The bill for the estimated tokens, online and through a batch API, in the unit the
    prices are given in; None with the reason when a price is not set."""
    p = config.pricing
    online = bill(prompt_tokens, completion_tokens, p.input, p.output)
    batch = bill(prompt_tokens, completion_tokens, p.input, p.output, batch=True, batch_discount=p.batch_discount)
    out: dict[str, Any] = {"online": None if online is None else round(online, 6),
                           "batch": None if batch is None else round(batch, 6),
                           "price_in_per_million": p.input, "price_out_per_million": p.output,
                           "batch_discount": p.batch_discount}
    if online is None:
        missing = [flag for flag, v in (("--price-in", p.input), ("--price-out", p.output)) if v is None]
        out["note"] = f"cost unknown: no price set ({' and '.join(missing)}, or [pricing] in the job file)"
    elif completion_from == "max_tokens":
        out["note"] = "an upper bound: completion tokens counted at --max-tokens until answers are stored"
    else:
        out["note"] = "from this fingerprint's stored usage per request (repair rounds not included)"
    return out


def curation_outlook(config: RunConfig, fingerprint: str, to_request: int, captions: str) -> dict[str, Any]:
    """Whether the run would publish a new shard version, by gen.publish's own rule: new
    answers, other captions or other generation settings change the run's files and make
    one; so do other curation settings or judge files; else shards/latest is reused."""
    from gen.publish import latest_version, reusable
    out = config.out_dir
    if not config.curate:
        return {"on": False, "new_version": False, "latest": None, "reason": "curation is off (--no-curate)"}
    current = latest_version(out) if (out / "shards").is_dir() else None
    try:
        last = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        last = {}
    if to_request:
        reason = f"{to_request} captions would be asked: their queries make a new version"
    elif current is None:
        reason = "no curated version yet"
    elif (last.get("captions_digest"), last.get("fingerprint")) != (captions, fingerprint):
        reason = "the captions or the generation settings differ from the last run's"
    elif reusable(out, config.curation) is None:
        reason = "the curation settings or the judge's grades changed since shards/latest"
    else:
        return {"on": True, "new_version": False, "latest": current[0],
                "reason": "unchanged inputs: shards/latest would be reused"}
    return {"on": True, "new_version": True, "latest": current[0] if current else None, "reason": reason}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib would resend the Authorization header to wherever a redirect points."""

    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def _probe(url: str, model: str, api_key: str, timeout: float) -> dict[str, Any]:
    """GET <url>/models: reachable, key accepted, model served. Costs no generation."""
    found: dict[str, Any] = {"url": public_url(url), "reachable": False, "status": None,
                             "serves_model": None, "error": None}
    try:
        request = urllib.request.Request(url.rstrip("/") + "/models", headers={
            "Authorization": f"Bearer {api_key}", "Accept": "application/json"})
        with _opener.open(request, timeout=timeout) as reply:
            found["reachable"], found["status"] = True, reply.status
            raw = reply.read(PROBE_MAX_BYTES + 1)
    except urllib.error.HTTPError as e:
        found["reachable"], found["status"] = True, e.code
        found["error"] = f"HTTP {e.code}" + (": the API key was refused" if e.code in (401, 403) else "")
        return found
    except (OSError, ValueError, http.client.HTTPException) as e:   # refused, timed out, bad URL, garbled
        reason = getattr(e, "reason", None) or e   # URLError wraps the socket's error
        found["error"] = f"{type(reason if isinstance(reason, BaseException) else e).__name__}: {reason}"
        if api_key != "EMPTY":
            found["error"] = found["error"].replace(api_key, "***")
        return found
    try:
        listed = json.loads(raw) if len(raw) <= PROBE_MAX_BYTES else None
    except (ValueError, RecursionError):
        listed = None
    models = listed.get("data") if isinstance(listed, dict) else None
    if isinstance(models, list):
        found["serves_model"] = any(isinstance(m, dict) and m.get("id") == model for m in models)
        if not found["serves_model"]:
            found["error"] = f"the server does not list the model {model!r}"
    else:
        found["error"] = "the server's model list is not readable; model not checked"
    return found


def check_engine(config: RunConfig, model: str) -> dict[str, Any]:
    """Could the engine serve the run? `ready` false: the run would fail, so the dry run does."""
    if config.batch_dir is not None:
        return {"engine": "batch", "batch_dir": str(config.batch_dir), "model": model, "ready": True}
    if config.engine == "openai":
        from gen.engines.openai import DEFAULT_BASE_URL
        urls = config.base_urls or [os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL]
        api_key = os.environ.get(config.api_key_env) or "EMPTY"   # as the engine sends it
        timeout = min(config.timeout, PROBE_TIMEOUT)
        servers = [_probe(url, model, api_key, timeout) for url in urls]
        # Every OpenAI-compatible server lists its models: any other status (a wrong path, a
        # redirect, a refused key, a broken server) would fail the run's requests too. A list
        # that cannot be read may still come from a server that serves; only a clear no counts.
        usable = [s for s in servers if s["status"] == 200 and s["serves_model"] is not False]
        return {"engine": "openai", "model": model, "servers": servers, "ready": bool(usable)}
    path = Path(model).expanduser()
    exists = path.is_dir()
    # A hub name (org/model) is vLLM's to fetch; only a path that is missing is certain to fail.
    named_as_path = path.is_absolute() or model.startswith((".", "~"))
    return {"engine": "vllm", "model": model, "model_dir_exists": exists,
            "ready": exists or not named_as_path}


def plan(records: Iterable[Union[Caption, Reject]], config: RunConfig, prompts: PromptSet,
         fingerprint: str) -> dict[str, Any]:
    stored = _Stored(config.cache_path, config.force)
    captions = rejects = cached = 0
    seen = CaptionDigest()
    to_request: set[str] = set()
    prompt_chars = 0
    pending: set[str] = set()
    history = [0, 0, 0]   # prompt tokens, completion tokens, requests of this input's stored answers
    try:
        for chunk in _chunks(records, 512):
            keyed = [(answer_key(fingerprint, r.text), r) for r in chunk if not isinstance(r, Reject)]
            rejects += len(chunk) - len(keyed)
            captions += len(keyed)
            keys = list({k for k, _ in keyed})
            known = stored.which(keys, config.repair_rounds)
            history = [a + b for a, b in zip(history, stored.usage(keys))]
            in_batches = stored.pending(keys) if config.batch else set()
            for key, record in keyed:
                seen.add(record)
                if key in known or key in to_request:
                    cached += 1
                    continue
                if key in in_batches:   # submitted already: collected by the run, not asked again
                    pending.add(key)
                    continue
                to_request.add(key)
                prompt_chars += chars_of(prompts.messages(record))
        open_batches = stored.open_batches() if config.batch else []
    finally:
        stored.close()
    n = len(to_request)
    most = (1 + config.repair_rounds) * n   # each repair round is one more request
    if history[2]:
        prompt_tokens, completion_tokens = history[0] / history[2] * n, history[1] / history[2] * n
        method = f"mean tokens per request of {history[2]} stored requests with this fingerprint"
        completion_from = "history"
    else:
        prompt_tokens = prompt_chars / CHARS_PER_TOKEN
        completion_tokens = n * config.sampling.max_tokens
        method = (f"prompt characters / {CHARS_PER_TOKEN}; completion at --max-tokens, an upper bound "
                  "(no answer with this fingerprint stored yet)")
        completion_from = "max_tokens"
    result = {
        "captions": captions, "input_rejects": rejects, "cached": cached, "to_request": n,
        "requests_at_least": n, "requests_at_most": most,
        "prompt_chars": prompt_chars,
        "prompt_tokens_estimate": round(prompt_tokens),
        "completion_tokens_estimate": round(completion_tokens),
        "completion_estimate_from": completion_from,
        "completion_tokens_at_most": most * config.sampling.max_tokens,
        "estimate_method": method,
        "cost": cost_outlook(prompt_tokens, completion_tokens, config, completion_from),
        "fingerprint": fingerprint,
        "curation": curation_outlook(config, fingerprint, n, seen.hexdigest()),
    }
    if config.batch:
        # What a batch run would do: collect these open batches first (their captions, if
        # answered, are not asked), then submit `to_request` captions in new request files.
        result["batch"] = {"pending": len(pending), "open_batches": open_batches, "to_submit": n,
                           "files_at_least": -(-n // config.batch_max_requests)}
    return result
