"""Any OpenAI-compatible server (vLLM's, llama.cpp's, a hosted API) over plain HTTP.

One aiohttp session per server posts the chat-completions JSON and reads the reply as a
dict. Not the openai SDK: its httpx connection pool, params transform and pydantic reply
models cost ~3.2 ms CPU a request at 256 in flight, against ~0.4 ms here (benchmarks/
BENCHMARKS.md), and at that rate the client, not the server, bounds a fast run.

Servers differ in what they accept, so the request starts with the strongest options and
steps down, once for the whole run, when the server refuses one by name (HTTP 400):
  response_format json_schema -> json_object -> none (the prompt still describes the JSON);
  chat_template_kwargs {enable_thinking: false} (Qwen3 and other thinking models) -> dropped.
The API key comes from the environment and goes only into the Authorization header: never
logged, and redacted from any error text a server echoes it in.

A reply is untrusted input. It is read up to `reply_limit(max_tokens)` bytes, decompressed
here (gzip or deflate, never past the limit: a gzip bomb costs at most that), and any reply
that holds no usable answer (past the limit, another shape, empty or refused, not text) is
EmptyAnswer: the server's fault, retried and counted against that server, never a traceback
and never a stored answer.

A server that refuses the key or the model is taken out for the rest of the run, and no
server at all (every one refused, or none reachable for longer than the retries would wait)
stops the run with EngineUnusable: see engines/pool.py.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import urllib.parse
import urllib.request
import zlib
from typing import Any, Optional

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from gen.config import Sampling, base_url_problem
from gen.engines.cost import prompt_tokens
from gen.engines.base import Completion, Engine, EngineError, printable
from gen.engines.pacing import Pacer, Ticket
from gen.engines.pool import Server, ServerPool
from gen.engines.retry import (EmptyAnswer, RequestFailed, RetryPolicy, StatusError, TransportError,
                               is_refusal, is_transient, refusal_hint, retry_after_seconds)

log = logging.getLogger(__name__)

FORMATS = ("json_schema", "json_object", "none")
# Where the openai SDK sends requests when no base URL is given; kept so --base-url stays optional.
DEFAULT_BASE_URL = "https://api.openai.com/v1"


def _refuses(exc: StatusError, *names: str) -> bool:
    text = exc.text.lower()
    return any(n in text for n in names)


def _unreachable(exc: Optional[BaseException]) -> bool:
    return isinstance(exc, TransportError) and exc.unreachable


def _env_proxy(url: str) -> Optional[str]:
    """The proxy HTTP(S)_PROXY and NO_PROXY name for `url`, as the SDK's httpx client honoured
    them. Looked up once per server: aiohttp's trust_env does it in a thread for every request."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def reply_limit(max_tokens: int) -> int:
    """The most bytes a reply to a request for `max_tokens` tokens may hold, decompressed: 64
    a token (a Chinese token escaped as \\uXXXX takes 6 to 18) and 64 KiB for the rest."""
    return 64 * max_tokens + 65536


def _kind(value: Any) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string"}.get(
        type(value), f"a {type(value).__name__}")


def _text(msg: dict, field: str) -> str:
    value = msg.get(field)
    if value is None or isinstance(value, str):
        return value or ""
    # The typed-parts form some servers use: [{"type": "text", "text": "..."}].
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise EmptyAnswer(f"the reply's message {field} is {_kind(value)}, not text")


def _count(usage: Any, field: str) -> int:
    """A token count; usage is bookkeeping, so a wrong one counts 0 rather than lose the answer."""
    value = usage.get(field) if isinstance(usage, dict) else None
    return value if type(value) is int and 0 <= value <= 10 ** 9 else 0


def _completion(data: Any, server: Optional[str] = None) -> Completion:
    """The answer in a chat-completions reply, or EmptyAnswer saying why there is none."""
    if not isinstance(data, dict):
        raise EmptyAnswer(f"the reply is {_kind(data)}, not an object")
    choices = data.get("choices")
    if not choices:
        raise EmptyAnswer("server answered 200 with no choices")
    if not isinstance(choices, list):
        raise EmptyAnswer(f"the reply's choices are {_kind(choices)}, not a list")
    choice = choices[0]
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        what = choice.get("message") if isinstance(choice, dict) else choice
        raise EmptyAnswer(f"the reply's message is {_kind(what)}, not an object")
    msg = choice["message"]
    # Thinking models behind some servers put the whole answer in the reasoning field.
    text = _text(msg, "content") or _text(msg, "reasoning_content") or _text(msg, "reasoning")
    if not text.strip():
        refusal = msg.get("refusal")
        raise EmptyAnswer(f"the model refused: {printable(refusal)}" if refusal else "the answer is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EmptyAnswer(f"the answer is not text: a lone surrogate {text[e.start]!r} at character "
                          f"{e.start}") from None
    finish = choice.get("finish_reason")
    usage = data.get("usage")
    return Completion(
        text=text, prompt_tokens=_count(usage, "prompt_tokens"),
        completion_tokens=_count(usage, "completion_tokens"),
        finish_reason=printable(finish) if isinstance(finish, str) else None, server=server,
    )


async def _read(r: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, decompressed, at most `limit` bytes; past that, EmptyAnswer. Decompressed
    here, chunk by chunk, with the output bounded: aiohttp's own decoder inflates a whole
    network chunk at once (a 204 KB gzip bomb became 200 MB)."""
    encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        inflate = zlib.decompressobj(wbits=47)   # a gzip or zlib header, whichever it has
    elif encoding in ("", "identity"):
        inflate = None
    else:
        raise EmptyAnswer(f"HTTP {r.status} reply in an encoding capgen does not read: {printable(encoding)}")
    parts, size = [], 0
    try:
        async for chunk in r.content.iter_chunked(1 << 16):
            while chunk:
                if inflate is None:
                    out, chunk = chunk, b""
                else:
                    out = inflate.decompress(chunk, limit + 1 - size)
                    chunk = inflate.unconsumed_tail
                size += len(out)
                parts.append(out)
                if size > limit:
                    raise EmptyAnswer(f"HTTP {r.status} reply larger than {limit:,} bytes (the limit for "
                                      "--max-tokens), cut off there; it begins "
                                      f"{printable(parts[0][:100].decode('utf-8', 'replace'))!r}")
                if inflate is not None and inflate.eof:   # what follows the stream is not read
                    return b"".join(parts)
    except zlib.error as e:
        raise EmptyAnswer(f"HTTP {r.status} reply that does not decompress ({encoding}): {e}") from None
    return b"".join(parts)


def request_options(model: str, sampling: Sampling, schema: dict, fmt: str = "json_schema",
                    thinking_kwargs: bool = True) -> dict[str, Any]:
    """Everything in a chat-completions body but the messages. The online engine and the batch
    request file (gen.generate.batch) both build their bodies here, so a batch asks exactly what a
    request would."""
    body: dict[str, Any] = dict(model=model, temperature=sampling.temperature,
                                top_p=sampling.top_p, max_tokens=sampling.max_tokens)
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if fmt == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "caption_queries", "schema": schema, "strict": True}}
    elif fmt == "json_object":
        body["response_format"] = {"type": "json_object"}
    if thinking_kwargs:
        body["chat_template_kwargs"] = {"enable_thinking": False}
    return body


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(self, *, base_urls: list[Optional[str]], model: str, schema: dict, sampling: Sampling,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 retry: RetryPolicy = RetryPolicy(), disable_thinking: bool = True,
                 cooldown: float = 30.0, pacer: Optional[Pacer] = None):
        self.model, self.schema, self.sampling, self.retry = model, schema, sampling, retry
        # Rate limits: the user's (--rpm, --tpm) and the server's headers (gen/engines/pacing.py).
        self.pacer = pacer or Pacer()
        # Local servers need no key; "EMPTY" is the placeholder vLLM's docs use, sent as before.
        api_key = os.environ.get(api_key_env) or "EMPTY"
        self._secret = api_key if api_key != "EMPTY" else None
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
                         "Accept": "application/json", "Accept-Encoding": "gzip, deflate"}
        self.timeout, self.api_key_env = timeout, api_key_env
        self.reply_limit = reply_limit(sampling.max_tokens)
        default = os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL)
        urls = [default if url is None else url for url in (base_urls or [None])]
        for url in urls:  # an empty one must not quietly send the key to the default
            if problem := base_url_problem(url):
                raise ValueError(f"base URL {problem}")
        # Sessions open on first use: aiohttp binds one to the running event loop.
        self.pool = ServerPool([Server(url=url, client=None) for url in urls], cooldown=cooldown,
                               first_outage_limit=retry.patience(2), outage_limit=retry.patience())
        self._proxies = {s.url: _env_proxy(s.url) for s in self.pool.servers}
        self.format_level = 0
        self.thinking_kwargs = disable_thinking
        self.attempts = 0
        self.retries = 0
        self._downgrade = asyncio.Lock()
        self._encoded: dict[Any, str] = {}   # (format state, schema) -> encoded options
        # Which server wrote a recent answer, so that a repair round asks another one: an
        # invalid answer is then judged by a second server before it becomes a final rejection,
        # not by the broken server that wrote it (before the pool has seen enough to take it out).
        self._authors: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._first: tuple[Any, str] = (None, "")     # (first message, its JSON)

    def _options(self, schema: Optional[dict] = None) -> dict[str, Any]:
        """Everything in a request body but the messages, as the server allows it now."""
        return request_options(self.model, self.sampling, schema or self.schema, FORMATS[self.format_level],
                               self.thinking_kwargs)

    def _body(self, messages: list[dict[str, str]], schema: Optional[dict] = None) -> bytes:
        """The request's JSON. Only the user message changes from caption to caption, so the
        options (the schema among them) and the system message are encoded once and reused:
        encoding them anew was a tenth of a millisecond a request."""
        state = (self.format_level, self.thinking_kwargs, json.dumps(schema, sort_keys=True) if schema else None)
        if state not in self._encoded:
            if len(self._encoded) > 64:   # a few schemas in use at once, never an ever-growing set
                self._encoded.clear()
            options = json.dumps(self._options(schema), ensure_ascii=False)
            self._encoded[state] = "," + options[1:]
        first = messages[0]
        if self._first[0] != first:
            self._first = (first, json.dumps(first, ensure_ascii=False))
        rest = "".join("," + json.dumps(m, ensure_ascii=False) for m in messages[1:])
        return f'{{"messages":[{self._first[1]}{rest}]{self._encoded[state]}'.encode()

    def _session(self, server: Server) -> aiohttp.ClientSession:
        if server.client is None:
            server.client = aiohttp.ClientSession(
                headers=self._headers, timeout=aiohttp.ClientTimeout(total=self.timeout),
                # No connection cap: the caller's concurrency bounds requests in flight.
                connector=aiohttp.TCPConnector(limit=0),
                auto_decompress=False)   # _read decompresses, within the reply limit
        return server.client

    async def _post(self, server: Server, body: bytes, reply: Optional[dict] = None) -> Any:
        """The reply's JSON; `reply` gets its status and headers (what pacing reads)."""
        url = server.url.rstrip("/") + "/chat/completions"
        status_line = False
        try:
            async with self._session(server).post(url, data=body,
                                                  proxy=self._proxies[server.url]) as r:
                status_line = True
                self.pool.replied(server)
                if reply is not None:
                    reply.update(status=r.status, headers=r.headers)
                raw = await _read(r, self.reply_limit)
                if not 200 <= r.status < 300:
                    raise StatusError(r.status, r.headers, raw.decode("utf-8", "replace"))
        except TimeoutError:
            # Silent when not even the status line came: the pool's outage clock runs then, as
            # it does for a connection nobody accepts, so a server that hangs stops the run.
            raise TransportError(f"timed out: no reply within {self.timeout:g} s",
                                 silent=not status_line) from None
        except aiohttp.ClientConnectorError as exc:  # refused, no such host, proxy or TLS failed
            raise TransportError(f"connection failed: {type(exc).__name__}: {exc}", unreachable=True) from None
        except aiohttp.ClientError as exc:
            raise TransportError(f"connection failed: {type(exc).__name__}: {exc}") from None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):   # not JSON, not UTF-8, or nested past the stack
            raise TransportError(f"HTTP {r.status} reply is not JSON: {raw[:100]!r}") from None

    async def _step_down(self, exc: StatusError, level: int, thinking: bool) -> bool:
        """Drop the option the server refused; False when there is nothing left to drop."""
        async with self._downgrade:
            if (level, thinking) != (self.format_level, self.thinking_kwargs):
                return True  # another request already stepped down; just try again
            if thinking and _refuses(exc, "chat_template_kwargs", "enable_thinking"):
                self.thinking_kwargs = False
            elif level + 1 < len(FORMATS) and _refuses(exc, "response_format", "json_schema", "json_object", "structured"):
                self.format_level = level + 1
            else:
                return False
            log.warning("server refused an option (%s); continuing with response_format=%s, "
                        "thinking kwargs %s", printable(self.redact(str(exc)), 300), FORMATS[self.format_level],
                        "on" if self.thinking_kwargs else "off")
            return True

    async def _send(self, server: Server, messages: list[dict[str, str]], schema: Optional[dict],
                    reply: Optional[dict] = None) -> Any:
        while True:
            level, thinking = self.format_level, self.thinking_kwargs
            self.attempts += 1
            try:
                return await self._post(server, self._body(messages, schema), reply)
            except StatusError as exc:
                if exc.status != 400 or not await self._step_down(exc, level, thinking):
                    raise

    async def _once(self, messages: list[dict[str, str]], schema: Optional[dict]) -> Completion:
        ticket = None
        if self.pacer.active:   # the most it may cost: its prompt, and every token it may answer
            ticket = await self.pacer.acquire(prompt_tokens(messages) + self.sampling.max_tokens)
        while True:  # round again only after a refusal took a server out: another may serve
            server = self.pool.pick(avoid=self._author(messages))   # EngineUnusable once every server has refused
            self.pool.started(server)
            reply: dict[str, Any] = {}
            try:
                done = _completion(await self._send(server, messages, schema, reply), server.url)
            except BaseException as exc:
                refused = is_refusal(exc)
                # Only the server's own trouble counts against it, not a request it rightly refused.
                self.pool.finished(server, ok=refused or not is_transient(exc))
                if refused:
                    self.pool.refuse(server, self._refusal(exc))
                    continue
                if _unreachable(exc):
                    self.pool.unreachable(server, str(exc))  # EngineUnusable past the outage limit
                elif getattr(exc, "silent", False):
                    # The same circuit for a server that hangs; its timeouts still count as
                    # attempts (complete's stop), so one caption that always takes too long
                    # ends as failed while the others are answered.
                    self.pool.unreachable(server, str(exc), silent_request=id(messages))
                if ticket is not None:
                    self._settle(ticket, exc, reply)
                elif isinstance(exc, StatusError) and exc.status == 429:
                    self.pacer.refused(exc.headers, retry_after_seconds(exc))
                raise
            self.pool.finished(server, ok=True)
            if len(self.pool.servers) > 1:
                self._authors[done.text] = server.url
                if len(self._authors) > 4096:   # a repair round follows its answer at once
                    self._authors.popitem(last=False)
            if ticket is not None:
                used = done.prompt_tokens + done.completion_tokens
                self.pacer.settle(ticket, used or None, reply.get("headers"), reply.get("status"))
            return done

    def _author(self, messages: list[dict[str, str]]) -> Optional[str]:
        """The server that wrote the answer a repair round shows (the last assistant message)."""
        for m in reversed(messages):
            if m.get("role") == "assistant":
                return self._authors.get(m.get("content"))
        return None

    def _refusal(self, exc: StatusError) -> str:
        hint = refusal_hint(exc) + (f" in ${self.api_key_env}" if exc.status == 401 else "")
        return f"{printable(self.redact(str(exc)), 300)} ({hint})"

    def _settle(self, ticket: Ticket, exc: BaseException, reply: dict) -> None:
        """A request that got no answer: one the server refused with a status cost no tokens;
        any other may have been served, so it keeps its estimate."""
        if isinstance(exc, StatusError):
            self.pacer.settle(ticket, 0, exc.headers, exc.status, retry_after_seconds(exc))
        else:
            self.pacer.settle(ticket, None, reply.get("headers"), reply.get("status"))

    async def complete(self, messages: list[dict[str, str]], schema: Optional[dict] = None) -> Completion:
        unreachable = 0

        def stop(state: RetryCallState) -> bool:
            nonlocal unreachable
            if _unreachable(state.outcome.exception()):
                unreachable += 1   # an outage: the pool's limit ends it, not this request's attempts
                return False
            return state.attempt_number - unreachable >= self.retry.max_attempts

        def wait(state: RetryCallState) -> float:
            pause = self.retry.wait(state)
            if _unreachable(state.outcome.exception()):   # try again as the outage limit passes
                pause = min(pause, max(0.0, self.pool.outage_left()) + 0.05)
            return pause

        try:
            async for attempt in AsyncRetrying(stop=stop, wait=wait, retry=retry_if_exception(is_transient),
                                               reraise=True):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        self.retries += 1
                    return await self._once(messages, schema)
        except RequestFailed as exc:
            raise EngineError(printable(self.redact(str(exc)), 300)) from None
        raise AssertionError("unreachable")

    def checked(self, done: Completion, valid: bool) -> bool:
        server = next((s for s in self.pool.servers if s.url == done.server), None)
        return server is not None and self.pool.checked(server, valid)

    def redact(self, text: str) -> str:
        """Some servers echo the key in a 401 message; it must not reach logs or rejects."""
        return text.replace(self._secret, "***") if self._secret else text

    async def aclose(self) -> None:
        for server in self.pool.servers:
            if server.client is not None:
                await server.client.close()
                server.client = None

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "servers": self.pool.describe(),
                "response_format": FORMATS[self.format_level],
                "thinking_kwargs": self.thinking_kwargs,
                "attempts": self.attempts, "retries": self.retries, "pacing": self.pacer.describe()}
